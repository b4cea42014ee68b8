"""A coe-dist Chain-of-Experts language model for Hugging Face transformers, in plain torch (written by
`coe-dist convert export --format hf`; standalone: it does not import coe_dist).

    tokens -> embed -> [ x += Attn(RMSNorm(x));  u = RMSNorm(x);  h_0 = u
                         h_t = sum_k g_k E_k(h_{t-1}) + shared(h_{t-1}) (+ h_{t-1} if inner_residual), t = 1..C
                         x = h_C (+ x if outer_residual) ] x layers  -> RMSNorm -> LM head

The first `first_k_dense_replace` layers use x += SwiGLU(RMSNorm(x)) instead. Gating (COE_SPEC): scores of
h W_t^T in float32, top-k, gate rule: see Router (scores, expert bias, groups, renormalisation, scaling).
Routing is dropless and without a KV cache (generate() runs with use_cache=False);
padding masks are not supported (batches of equal-length sequences).
Shape legend: B = batch, L = sequence, D = hidden, H = heads, Dh = head size, T = tokens, N = experts.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_coe_dist import CoeDistConfig


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)) * self.weight.float()


def rope(x_BHLDh, theta):
    """Rotate-half RoPE; angles in float64 as coe-dist computes its tables."""
    L, Dh = x_BHLDh.shape[-2:]
    inv_freq = 1.0 / theta ** (torch.arange(0, Dh, 2, dtype=torch.float64, device=x_BHLDh.device) / Dh)
    angles = torch.outer(torch.arange(L, dtype=torch.float64, device=x_BHLDh.device), inv_freq)
    cos, sin = angles.cos().float().to(x_BHLDh.dtype), angles.sin().float().to(x_BHLDh.dtype)
    x1, x2 = x_BHLDh.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size, ffn_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Causal self-attention, one fused [q; k; v] projection, grouped-query when kv heads < heads."""

    def __init__(self, config):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.theta = config.rope_theta
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(q_size, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(kv_size, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x_BLD):
        B, L, D = x_BLD.shape
        H, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x_BLD).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        q, k, v = (t.view(B, L, -1, Dh).transpose(1, 2) for t in (q, k, v))
        q, k = rope(q, self.theta), rope(k, self.theta)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, H * Dh))


class Experts(nn.Module):
    """N SwiGLU experts stacked: w_gate_up_E2FD[e] = [gate_proj; up_proj], w_down_EDF[e] = down_proj."""

    def __init__(self, num_experts, hidden_size, expert_size):
        super().__init__()
        self.w_gate_up_E2FD = nn.Parameter(torch.empty(num_experts, 2 * expert_size, hidden_size))
        self.w_down_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size))

    def forward(self, h_TD, weights_TK, experts_TK):
        f = self.w_down_EDF.shape[-1]
        y_TD = torch.zeros_like(h_TD)
        for e in experts_TK.unique().tolist():
            token, slot = (experts_TK == e).nonzero(as_tuple=True)
            a = h_TD[token] @ self.w_gate_up_E2FD[e].t()
            out = (F.silu(a[:, :f]) * a[:, f:]) @ self.w_down_EDF[e].t()
            y_TD.index_add_(0, token, out * weights_TK[token, slot, None].to(out.dtype))
        return y_TD


class Router(nn.Module):
    """Scores (softmax or sigmoid), top-k of score + expert bias within the best topk_group of n_group groups;
    gates from the unbiased scores: renormalised when k > 1 and norm_topk_prob, else scaled (gate_scaling
    reference); renormalised when norm_topk_prob, then scaled (renorm_then_scale); sigmoid: renormalised, scaled."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.top_k, self.norm, self.scale = (config.num_experts_per_tok, config.norm_topk_prob,
                                             config.routed_scaling_factor)
        self.scoring, self.scaling = config.scoring_func, config.gate_scaling
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.register_buffer("expert_bias", torch.zeros(config.n_routed_experts) if config.expert_bias else None)

    def forward(self, h_TD):
        logits_TN = F.linear(h_TD.float(), self.weight.float())
        scores_TN = logits_TN.sigmoid() if self.scoring == "sigmoid" else logits_TN.softmax(dim=-1)
        choice_TN = scores_TN if self.expert_bias is None else scores_TN + self.expert_bias.float()
        if self.n_group > 1:
            T, N = choice_TN.shape
            grouped = choice_TN.view(T, self.n_group, N // self.n_group)
            best = grouped.amax(dim=-1).topk(self.topk_group, dim=-1).indices
            keep = torch.zeros(T, self.n_group, dtype=torch.bool, device=h_TD.device).scatter_(1, best, True)
            choice_TN = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(T, N)
        experts_TK = choice_TN.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TN.gather(1, experts_TK)
        if self.scoring == "sigmoid":
            renorm, scale = True, True
        elif self.scaling == "reference":
            renorm = self.top_k > 1 and self.norm
            scale = not renorm
        else:
            renorm, scale = self.norm, True
        if renorm:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights_TK * self.scale if scale else weights_TK), experts_TK


class CoEBlock(nn.Module):
    """C iterations of routed + shared experts on the post-attention-normed stream."""

    def __init__(self, config):
        super().__init__()
        self.iterations, self.inner_residual = config.inner_iter, config.inner_residual
        self.routers = nn.ModuleList(Router(config) for _ in range(config.inner_iter if config.use_igate else 1))
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        shared = config.shared_expert_intermediate_size or config.n_shared_experts * config.moe_intermediate_size
        self.shared_experts = SwiGLU(config.hidden_size, shared) if config.n_shared_experts else None
        self.shared_expert_gate = (nn.Linear(config.hidden_size, 1, bias=False)
                                   if config.n_shared_experts and config.shared_expert_gate else None)

    def forward(self, u_BLD):
        B, L, D = u_BLD.shape
        h_TD = u_BLD.reshape(B * L, D)
        for t in range(self.iterations):
            y_TD = self.experts(h_TD, *self.routers[min(t, len(self.routers) - 1)](h_TD))
            if self.shared_experts is not None:
                shared_TD = self.shared_experts(h_TD)
                if self.shared_expert_gate is not None:
                    shared_TD = torch.sigmoid(self.shared_expert_gate(h_TD)) * shared_TD
                y_TD = y_TD + shared_TD
            h_TD = (y_TD + h_TD if self.inner_residual else y_TD).to(u_BLD.dtype)
        return h_TD.view(B, L, D)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.dense = layer < config.first_k_dense_replace
        self.outer_residual = config.outer_residual
        self.ffn = SwiGLU(config.hidden_size, config.intermediate_size) if self.dense else CoEBlock(config)

    def forward(self, x_BLD):
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD))
        u_BLD = self.ffn_norm(x_BLD)
        if self.dense:
            return x_BLD + self.ffn(u_BLD)
        h_BLD = self.ffn(u_BLD)
        return h_BLD + x_BLD if self.outer_residual else h_BLD


class CoeDistPreTrainedModel(PreTrainedModel):
    config_class = CoeDistConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (Experts, Router)):
            for p in module.parameters():
                nn.init.normal_(p, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class CoeDistModel(CoeDistPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids):
        x_BLD = self.embed_tokens(input_ids)
        for layer in self.layers:
            x_BLD = layer(x_BLD)
        return self.norm(x_BLD)


class CoeDistForCausalLM(CoeDistPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = CoeDistModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("CoeDistForCausalLM supports no padding: pass sequences of equal length")
        hidden_BLD = self.model(input_ids)
        logits_BLV = self.lm_head(hidden_BLD.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits_BLV[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits_BLV)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}
