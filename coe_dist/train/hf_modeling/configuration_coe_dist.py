"""Hugging Face configuration of a coe-dist Chain-of-Experts model (written by `coe-dist convert export
--format hf`; standalone: it does not import coe_dist). Field names follow the CoE reference where one exists."""

try:  # transformers 5 renamed the base class
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4
    from transformers import PretrainedConfig as PreTrainedConfig


class CoeDistConfig(PreTrainedConfig):
    model_type = "coe_dist"

    def __init__(self, vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=None, intermediate_size=512, first_k_dense_replace=0,
                 max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6, qkv_bias=False, qk_norm=False,
                 n_routed_experts=8, num_experts_per_tok=2, inner_iter=2, n_shared_experts=1,
                 moe_intermediate_size=128, shared_expert_intermediate_size=None, shared_expert_gate=False,
                 inner_residual=True, outer_residual=False, use_igate=True, norm_topk_prob=False,
                 routed_scaling_factor=1.0, gate_scaling="reference", scoring_func="softmax", expert_bias=False,
                 n_group=1, topk_group=1, tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.inner_iter = inner_iter
        self.n_shared_experts = n_shared_experts
        self.moe_intermediate_size = moe_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.shared_expert_gate = shared_expert_gate
        self.inner_residual = inner_residual
        self.outer_residual = outer_residual
        self.use_igate = use_igate
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.gate_scaling = gate_scaling  # reference | renorm_then_scale
        self.scoring_func = scoring_func  # softmax | sigmoid
        self.expert_bias = expert_bias  # a per-router bias that only chooses experts (aux-loss-free balancing)
        self.n_group, self.topk_group = n_group, topk_group  # device-limited routing: the best topk_group groups
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
