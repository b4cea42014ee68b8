"""Decoder-only language model with CoE blocks (DeepSeek-V2 style, as in the CoE paper).

    tokens -> embed -> [ x += Attn(RMSNorm(x));  x = CoE(RMSNorm(x)) (+ x if outer_residual) ] x layers
           -> RMSNorm -> LM head (untied unless model.tie_embeddings) -> cross-entropy + sum of router losses

The first `first_k_dense` layers use a dense SwiGLU FFN with the usual residual instead of the CoE block.
Imported Hugging Face MoEs add grouped-query attention, q/k/v biases, QK-norm and tied embeddings, each a
`model.*` key whose default leaves the original model unchanged (docs/models.md).
Shape legend: B = batch, L = sequence, D = hidden, H = heads, Dh = head size, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from coe_dist.config import ModelConfig, MoEConfig
from coe_dist.kernels import rms_norm
from coe_dist.model.coe import CoELayer
from coe_dist.model.experts import SwiGLU


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 (or wider) whatever the autocast dtype: the CoE chain runs on this output.
        # apex's fused kernel where it runs (CUDA), else the same formula in torch: coe_dist/kernels.py.
        return rms_norm(x, self.weight, self.eps)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles_LF = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles_LF.cos().float(), angles_LF.sin().float()


def apply_rope(x_BHLDh: torch.Tensor, cos_LF: torch.Tensor, sin_LF: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :Dh/2], x[..., Dh/2:]) (the rotate-half convention of LLaMA/DeepSeek)."""
    L = x_BHLDh.shape[-2]
    cos, sin = cos_LF[:L].to(x_BHLDh.dtype), sin_LF[:L].to(x_BHLDh.dtype)
    x1, x2 = x_BHLDh.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    """Causal self-attention with RoPE; grouped-query when model.num_kv_heads < num_heads (each key/value head
    serves num_heads/num_kv_heads consecutive query heads, as in LLaMA/Mixtral). One fused projection holds
    [q; k; v]: Hq*Dh + 2*Hkv*Dh rows."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads or cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        # OLMoE's QK-norm: one RMSNorm over all heads' q (and k) before RoPE.
        self.q_norm = RMSNorm(q_size, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(kv_size, cfg.norm_eps) if cfg.qk_norm else None
        cos, sin = rope_tables(cfg.max_seq_len, self.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        H, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        if Hkv == H and self.q_norm is None:  # the original layout: one view, no copies
            q, k, v = self.qkv_proj(x_BLD).view(B, L, 3, H, Dh).unbind(2)
        else:
            q, k, v = self.qkv_proj(x_BLD).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
            if self.q_norm is not None:
                q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
            q, k, v = q.view(B, L, H, Dh), k.view(B, L, Hkv, Dh), v.view(B, L, Hkv, Dh)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
        q = apply_rope(q, self.rope_cos, self.rope_sin)
        k = apply_rope(k, self.rope_cos, self.rope_sin)
        if Hkv != H:
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, D))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, layer: int, seed: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.dense = layer < cfg.first_k_dense
        self.outer_residual = moe.outer_residual
        if self.dense:
            self.ffn: nn.Module = SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size)
        else:
            self.ffn = CoELayer(moe, cfg.hidden_size, layer=layer, seed=seed, init_std=cfg.init_std)

    def forward(self, x_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD))
        u_BLD = self.ffn_norm(x_BLD)
        if self.dense:
            return x_BLD + self.ffn(u_BLD), None
        h_BLD, aux = self.ffn(u_BLD)
        # COE_SPEC default: no outer residual, the chain's inner residual carries u.
        return (h_BLD + x_BLD if self.outer_residual else h_BLD), aux


@dataclass
class LMOutput:
    loss: torch.Tensor  # lm_loss + aux_loss: what backward runs on
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    logits: torch.Tensor


class CoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, moe, i, seed) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._init_dense(seed)

    @torch.no_grad()
    def _init_dense(self, seed: int) -> None:
        """Normal(0, init_std) for every dense matrix, from one generator: identical on all ranks.
        CoE layers initialise themselves (per global expert id)."""
        g = torch.Generator().manual_seed(seed)
        coe_params = {id(p) for layer in self.coe_layers() for p in layer.parameters()}
        for p in self.parameters():
            if id(p) in coe_params or p.dim() < 2:
                continue
            p.copy_(torch.randn(p.shape, generator=g) * self.config.init_std)

    def coe_layers(self) -> list[CoELayer]:
        return [m for m in self.modules() if isinstance(m, CoELayer)]

    def set_placement(self, orders: dict[int, list[int]]) -> None:
        """Layer index -> original expert per slot (moe.placement); layers not named keep theirs."""
        for layer in self.coe_layers():
            if layer.layer in orders:
                layer.set_placement(orders[layer.layer])

    def forward(self, tokens_BL: torch.Tensor, targets_BL: torch.Tensor | None = None) -> LMOutput:
        x_BLD = self.embed(tokens_BL)
        aux = x_BLD.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x_BLD, layer_aux = layer(x_BLD)
            if layer_aux is not None:
                aux = aux + layer_aux
        logits_BLV = self.lm_head(self.norm(x_BLD))
        if targets_BL is None:
            zero = aux.new_zeros(())
            return LMOutput(zero, zero, aux, logits_BLV)
        lm_loss = F.cross_entropy(logits_BLV.float().flatten(0, 1), targets_BL.flatten())
        return LMOutput(lm_loss + aux, lm_loss, aux, logits_BLV)

    def num_params(self) -> dict[str, int]:
        expert = sum(layer.experts.w_gate_up_E2FD.numel() + layer.experts.w_down_EDF.numel()
                     for layer in self.coe_layers())
        total = sum(p.numel() for p in self.parameters())
        return {"total_local": total, "expert_local": expert, "dense": total - expert}
