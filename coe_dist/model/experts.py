"""Routed experts held by one rank, computed in one grouped pass over tokens sorted by expert.

Shape legend: T = token copies (sorted by expert), D = hidden, F = expert width, E = local experts.
Weights are stored like stacked `nn.Linear` weights ([out, in]) so that the reference layout's
`gate_proj`/`up_proj`/`down_proj` map onto slices without transposes:
    w_gate_up_E2FD[e, :F] = experts.{e}.gate_proj.weight, w_gate_up_E2FD[e, F:] = up_proj.weight
    w_down_EDF[e]         = experts.{e}.down_proj.weight

The grouped path is one autograd node (`_GroupedSwiGLU`) for the whole expert MLP:
- forward: two `torch._grouped_mm` calls on the compute-dtype copies of the weights, the SwiGLU in
  between; it saves what autograd of the same ops would (x, the [T, 2F] pre-activation, silu(gate), the
  [T, F] activation, the weight copies), so backward recomputes nothing;
- backward: grad x, grad W in the compute dtype (the same GEMMs as autograd of the grouped path would run),
  the SwiGLU backward written straight into one [T, 2F] buffer (no cat), and the weight gradients returned
  in the parameters' dtype (float32 master weights), so gradients of several CoE iterations accumulate in
  float32 exactly as with autograd through `w.to(bf16)`.
Under autocast the weight cast to the compute dtype is a memory-bound pass over all expert weights (the
largest non-GEMM cost of the layer). `reuse_weight_casts()` lets a caller share one cast between the C
iterations of a CoE forward; outside that scope every call casts, as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_GROUPED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x would run in: the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype in _GROUPED_DTYPES:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class SwiGLU(nn.Module):
    """E(z) = W_down(silu(W_gate z) * (W_up z)), no biases. Used for shared and dense FFNs."""

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _GroupedSwiGLU(torch.autograd.Function):
    """y[rows of e] = silu(x W13[e,:F]^T) * (x W13[e,F:]^T) @ W2[e]^T for every expert e, rows sorted by e.

    Inputs: x_TD (compute dtype), the two parameters (any float dtype; only their gradients are produced
    here), the compute-dtype copies w13_E2FD / w2_EDF used by the GEMMs (no gradient), offs_E (int32
    cumulative row counts).
    """

    @staticmethod
    def forward(ctx, x_TD, w13_param, w2_param, w13_E2FD, w2_EDF, offs_E):
        f = w2_EDF.shape[-1]
        h_T2F = torch._grouped_mm(x_TD, w13_E2FD.transpose(-2, -1), offs=offs_E)
        silu_TF = F.silu(h_T2F[:, :f])
        a_TF = silu_TF * h_T2F[:, f:]
        y_TD = torch._grouped_mm(a_TF, w2_EDF.transpose(-2, -1), offs=offs_E)
        ctx.save_for_backward(x_TD, h_T2F, silu_TF, a_TF, w13_E2FD, w2_EDF, offs_E)
        ctx.param_dtypes = (w13_param.dtype, w2_param.dtype)
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, h_T2F, silu_TF, a_TF, w13_E2FD, w2_EDF, offs_E = ctx.saved_tensors
        f = w2_EDF.shape[-1]
        need_x, need_w13, need_w2 = ctx.needs_input_grad[:3]
        # An expanded (stride-0) gradient, e.g. from y.sum(), is refused by the grouped GEMM backward.
        dy_TD = dy_TD.to(x_TD.dtype).contiguous()
        dw2_EDF = torch._grouped_mm(dy_TD.t(), a_TF, offs=offs_E) if need_w2 else None
        da_TF = torch._grouped_mm(dy_TD, w2_EDF, offs=offs_E)
        # SwiGLU backward into one [T, 2F] buffer: d up = da * silu(gate), d gate = silu'(gate) * da * up.
        dh_T2F = torch.empty_like(h_T2F)
        torch.mul(da_TF, silu_TF, out=dh_T2F[:, f:])
        torch.ops.aten.silu_backward.grad_input(da_TF.mul_(h_T2F[:, f:]), h_T2F[:, :f], grad_input=dh_T2F[:, :f])
        del da_TF
        dw13_E2FD = torch._grouped_mm(dh_T2F.t(), x_TD, offs=offs_E) if need_w13 else None
        dx_TD = torch._grouped_mm(dh_T2F, w13_E2FD, offs=offs_E) if need_x else None
        w13_dtype, w2_dtype = ctx.param_dtypes
        return (dx_TD,
                None if dw13_E2FD is None else dw13_E2FD.to(w13_dtype),
                None if dw2_EDF is None else dw2_EDF.to(w2_dtype),
                None, None, None)


class GroupedExperts(nn.Module):
    """E SwiGLU experts. `forward(x_TD, counts_E)` runs expert e on its rows of x (rows sorted by expert)."""

    def __init__(self, num_experts: int, hidden_size: int, expert_hidden_size: int, *, impl: str = "grouped"):
        super().__init__()
        self.num_experts = num_experts
        self.expert_hidden_size = expert_hidden_size
        self.w_gate_up_E2FD = nn.Parameter(torch.empty(num_experts, 2 * expert_hidden_size, hidden_size))
        self.w_down_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, expert_hidden_size))
        # torch._grouped_mm needs 16-byte aligned strides: D and F multiples of 8 covers bf16 and fp32.
        aligned = hidden_size % 8 == 0 and expert_hidden_size % 8 == 0
        self.use_grouped_mm = impl == "grouped" and aligned and hasattr(torch, "_grouped_mm")
        self._cast_cache: dict | None = None  # set inside reuse_weight_casts()

    @contextlib.contextmanager
    def reuse_weight_casts(self) -> Iterator[None]:
        """Within this scope the compute-dtype copies of the weights are made once and shared by every
        forward call (e.g. the C iterations of one CoE forward). The copies carry no autograd history:
        gradients still reach the parameters through each call's own node. Do not update the weights
        inside the scope; a change of a parameter's version counter discards the cached copy anyway."""
        outer = self._cast_cache
        if outer is None:
            self._cast_cache = {}
        try:
            yield
        finally:
            if outer is None:
                self._cast_cache = None

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute-dtype copies of (w_gate_up, w_down), detached; the parameters themselves (detached) when
        they already have that dtype."""
        params = (self.w_gate_up_E2FD, self.w_down_EDF)
        if all(p.dtype == dtype for p in params):
            return params[0].detach(), params[1].detach()
        cache = self._cast_cache
        key = (dtype, *((p.data_ptr(), p._version) for p in params))
        if cache is not None and key in cache:
            return cache[key]
        with torch.no_grad():
            copies = (params[0].to(dtype), params[1].to(dtype))
        if cache is not None:
            cache.clear()
            cache[key] = copies
        return copies

    def forward(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x_TD)
        x_TD = x_TD.to(dtype)
        if self.use_grouped_mm and dtype in _GROUPED_DTYPES and x_TD.shape[0] > 0:
            w13, w2 = self._weights(dtype)
            offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
            with torch.autocast(x_TD.device.type, enabled=False):
                return _GroupedSwiGLU.apply(x_TD, self.w_gate_up_E2FD, self.w_down_EDF, w13, w2, offs_E)
        return self._loop(x_TD, counts_E, self.w_gate_up_E2FD.to(dtype), self.w_down_EDF.to(dtype))

    def _loop(self, x_TD, counts_E, w13, w2) -> torch.Tensor:
        f = self.expert_hidden_size
        pieces = []
        # One host sync for all experts instead of one per expert. Experts without rows run too (empty
        # matmuls): the output must depend on every weight even when this rank received nothing, or its
        # backward would skip the combine all-to-all that the other ranks run.
        for e, x in enumerate(x_TD.split(counts_E.tolist())):
            h = x @ w13[e].t()
            pieces.append((F.silu(h[:, :f]) * h[:, f:]) @ w2[e].t())
        return torch.cat(pieces)
