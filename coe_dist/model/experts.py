"""Routed experts held by one rank, computed in one grouped pass over tokens sorted by expert.

Shape legend: T = token copies (sorted by expert), D = hidden, F = expert width, E = local experts.
Weights are stored like stacked `nn.Linear` weights ([out, in]) so that the reference layout's
`gate_proj`/`up_proj`/`down_proj` map onto slices without transposes:
    w_gate_up_E2FD[e, :F] = experts.{e}.gate_proj.weight, w_gate_up_E2FD[e, F:] = up_proj.weight
    w_down_EDF[e]         = experts.{e}.down_proj.weight
"""

from __future__ import annotations

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

    def forward(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x_TD)
        x_TD = x_TD.to(dtype)
        w13 = self.w_gate_up_E2FD.to(dtype)
        w2 = self.w_down_EDF.to(dtype)
        if self.use_grouped_mm and dtype in _GROUPED_DTYPES and x_TD.shape[0] > 0:
            return self._grouped(x_TD, counts_E, w13, w2)
        return self._loop(x_TD, counts_E, w13, w2)

    def _grouped(self, x_TD, counts_E, w13, w2) -> torch.Tensor:
        offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        with torch.autocast(x_TD.device.type, enabled=False):
            h_T2F = torch._grouped_mm(x_TD, w13.transpose(-2, -1), offs=offs_E)
            gate_TF, up_TF = h_T2F.chunk(2, dim=-1)
            a_TF = (F.silu(gate_TF) * up_TF).contiguous()
            return torch._grouped_mm(a_TF, w2.transpose(-2, -1), offs=offs_E)

    def _loop(self, x_TD, counts_E, w13, w2) -> torch.Tensor:
        f = self.expert_hidden_size
        pieces = [x_TD[:0]]
        # One host sync for all experts instead of one per expert.
        for e, x in enumerate(x_TD.split(counts_E.tolist())):
            if x.shape[0]:
                h = x @ w13[e].t()
                pieces.append((F.silu(h[:, :f]) * h[:, f:]) @ w2[e].t())
        return torch.cat(pieces)
