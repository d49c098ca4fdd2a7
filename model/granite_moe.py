"""GraniteMoE (IBM Granite 3.0 MoE: granite-3.0-1b-a400m, granite-3.0-3b-a800m), loading HF checkpoints directly.

    x = embedding(tokens) * embedding_multiplier
    n_layers x [ x = x + residual_multiplier * Attention(RMSNorm(x));
                 x = x + residual_multiplier * MoE(RMSNorm(x)) ]
    logits = output(RMSNorm(x)) / logits_scaling

A Llama-shaped decoder with four scalar multipliers (the muP-style knobs of the Granite recipe): the attention
scores are scaled by attention_multiplier instead of head_dim ** -0.5, and every MLP is a mixture of experts
(model.moe): a bias-free router picks the top k experts and softmaxes their k logits; each expert is a SwiGLU.

Checkpoints store each layer's experts as `block_sparse_moe.input_linear.weight` (E, 2 * ffn, dim), the gate
rows then the up rows, and `block_sparse_moe.output_linear.weight` (E, dim, ffn): exactly our layout, so the
key map is a plain rename (transformers >= 5 renames them in memory; on disk they keep these names).
"""

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kernels import KernelConfig
from model.attention import AttentionPlan, SelfAttention
from model.batch import Batch
from model.causal_lm import CausalLM, Trunk, check_config, forward_inputs
from model.kv_cache import KVCache
from model.loss import LossOutput, lm_head_loss
from model.moe import MoE
from model.norm import RMSNorm
from model.rope import RopeScaling, rope_scaling_from_hf, rope_scaling_to_hf


@dataclass
class GraniteMoeConfig:
    vocab_size: int = 49155  # embedding rows / output logits
    dim: int = 1024  # model (residual stream) width
    n_layers: int = 24  # transformer blocks
    n_heads: int = 16  # query heads; head_dim = dim / n_heads
    n_kv_heads: int = 8  # key/value heads (grouped-query attention)
    ffn_dim: int = 512  # hidden size of each expert
    n_experts: int = 32  # experts per MoE layer
    top_k: int = 8  # experts each token is routed to
    norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_seq_len: int = 4096  # longest sequence the model is meant for (HF max_position_embeddings)
    embedding_multiplier: float = 12.0  # token embeddings are multiplied by this
    attention_multiplier: float = 0.015625  # attention score scale (instead of head_dim ** -0.5)
    residual_multiplier: float = 0.22  # each block's attention and MoE outputs are multiplied by this
    logits_scaling: float = 6.0  # output logits are divided by this
    aux_loss_coef: float = 0.0  # load-balancing loss weight (HF's router_aux_loss_coef is 0.001); 0 = off
    z_loss_coef: float = 0.0  # router z-loss weight; 0 = off
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    attn_backend: str = "auto"  # attention implementation (model.attention): auto | eager | sdpa | flex | flash
    kernels: KernelConfig = field(default_factory=KernelConfig)  # Triton and fused fast paths (kernels.KernelConfig)
    init_std: float = 0.02  # std of the normal init (see GraniteMoe.init_weights)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if self.n_heads > 0 and self.dim % self.n_heads:
            raise ValueError(f"GraniteMoeConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        check_config(self, ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "n_experts", "top_k",
                            "max_seq_len", "logits_scaling", "embedding_multiplier", "attention_multiplier",
                            "residual_multiplier"),
                     non_negative=("aux_loss_coef", "z_loss_coef"))


# Named sizes, each the exact shape of the published model (its config.json).
GRANITE_MOE_CONFIGS: dict[str, GraniteMoeConfig] = {
    "debug": GraniteMoeConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32, n_experts=4,
                              top_k=2, max_seq_len=256, attention_multiplier=0.25),
    "granite-3.0-1b-a400m": GraniteMoeConfig(),
    "granite-3.0-3b-a800m": GraniteMoeConfig(dim=1536, n_layers=32, n_heads=24, n_kv_heads=8, ffn_dim=512,
                                             n_experts=40, top_k=8),
}


class Block(nn.Module):
    def __init__(self, config: GraniteMoeConfig, layer_id: int):
        super().__init__()
        c = config
        self.residual_multiplier = c.residual_multiplier
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.attn = SelfAttention(c.dim, c.n_heads, c.n_kv_heads, c.head_dim, layer_id, c.attn_backend,
                                  scale=c.attention_multiplier,
                                  kernels=c.kernels)
        self.mlp_norm = RMSNorm(c.dim, c.norm_eps)
        self.moe = MoE(c.dim, c.ffn_dim, c.n_experts, c.top_k, activation="silu", aux_loss_coef=c.aux_loss_coef,
                       z_loss_coef=c.z_loss_coef)

    def forward(self, x: Tensor, plan: AttentionPlan, cache: KVCache | None = None) -> tuple[Tensor, Tensor]:
        x = x + self.attn(self.attn_norm(x), plan, cache) * self.residual_multiplier
        h, router = self.moe(self.mlp_norm(x))  # (B, T, dim)
        return x + h * self.residual_multiplier, router.aux_loss


class GraniteMoe(CausalLM):
    def __init__(self, config: GraniteMoeConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_rope_buffer()  # and ties the output head to the embedding (tie_embeddings)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every tensor in place, then call init_buffers().

        - tok_embeddings.weight, output.weight (untied):       normal(0, init_std)
        - wq, wk, wv weights, router weight, expert w_gate_up:  normal(0, init_std)
        - wo weight, expert w_down (they write into the residual stream): normal(0, init_std / sqrt(2 * n_layers))
        - RMSNorm weights: ones
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers:
            for linear in (layer.attn.wq, layer.attn.wk, layer.attn.wv):
                nn.init.normal_(linear.weight, std=std)
            nn.init.normal_(layer.attn.wo.weight, std=residual_std)
            layer.moe.init_weights(std, residual_std)
            layer.attn_norm.reset_parameters()
            layer.mlp_norm.reset_parameters()
        self.norm.reset_parameters()
        if not self.config.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)
        self.init_buffers()

    def trunk(self, idx: Tensor, position_ids: Tensor | None = None, cache: KVCache | None = None,
              attention_mask: Tensor | None = None, cu_seqlens: Tensor | None = None) -> Trunk:
        """The final hidden states (B, T, dim) of idx (B, T), after the final norm (before logits_scaling), and the mean over
        layers of the router losses: where other heads attach. Arguments as in model.llama.Llama.forward."""
        plan = self.attention_plan(idx, position_ids, cache, attention_mask, cu_seqlens)  # once for every layer
        x = self.tok_embeddings(idx) * self.config.embedding_multiplier  # (B, T, dim)
        aux = torch.zeros((), device=idx.device)
        for layer in self.layers:
            x, layer_aux = layer(x, plan, cache)  # (B, T, dim)
            aux = aux + layer_aux
        if cache is not None:
            cache.advance(idx.shape[1])
        return Trunk(self.norm(x), aux / self.config.n_layers)  # (B, T, dim)

    def logits(self, hidden: Tensor) -> Tensor:
        """output(hidden) / logits_scaling: (..., dim) -> (..., vocab_size)."""
        return self.output(hidden) / self.config.logits_scaling

    def forward(self, idx: Tensor | Batch, labels: Tensor | None = None, position_ids: Tensor | None = None,
                cache: KVCache | None = None, attention_mask: Tensor | None = None,
                cu_seqlens: Tensor | None = None, *, reduction: str = "sum",
                return_hidden: bool = False) -> Tensor | LossOutput | Trunk:
        """idx (B, T) int64 -> logits (B, T, vocab_size), or LossOutput when labels (B, T) are given or idx is a
        Batch (its aux_loss is the mean over layers of the router losses, when their coefficients are set); Trunk
        with return_hidden. Arguments as in model.llama.Llama.forward.
        """
        idx, labels, position_ids, cu_seqlens, weights = forward_inputs(idx, labels, position_ids, cu_seqlens,
                                                                        reduction)
        trunk = self.trunk(idx, position_ids, cache, attention_mask, cu_seqlens)
        if return_hidden:
            return trunk
        if labels is None:
            return self.logits(trunk.hidden)  # (B, T, vocab_size)
        # output(x) / s = output(x / s) for the bias-free head; the loss takes the scaled hidden states
        loss = lm_head_loss(trunk.hidden / self.config.logits_scaling, self.output, labels, self.config.kernels,
                            reduction=reduction, loss_weights=weights, cu_seqlens=cu_seqlens)
        return loss._replace(aux_loss=trunk.aux_loss)


# ------------------------------------------------------------------------------------------ Hugging Face interop

CONFIG_CLASS = GraniteMoeConfig
HF_MODEL_TYPES = ("granitemoe",)

# Hugging Face GraniteMoeForCausalLM names as saved on disk -> ours ("{i}" is a layer index).
HF_KEY_MAP: dict[str, str | None] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.block_sparse_moe.router.layer.weight": "layers.{i}.moe.router.weight",
    "model.layers.{i}.block_sparse_moe.input_linear.weight": "layers.{i}.moe.w_gate_up",
    "model.layers.{i}.block_sparse_moe.output_linear.weight": "layers.{i}.moe.w_down",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def config_from_hf(hf: dict) -> GraniteMoeConfig:
    """GraniteMoeConfig from a Hugging Face config.json dict (model_type "granitemoe"); unsupported features raise."""
    if hf.get("model_type") != "granitemoe":
        raise ValueError(f"HF config: model_type {hf.get('model_type')!r} is not granitemoe")
    unsupported = {
        f"hidden_act {hf.get('hidden_act')!r} (only silu)": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": hf.get("attention_bias", False),
        "head_dim != hidden_size / num_attention_heads":
            hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]) != hf["hidden_size"] // hf["num_attention_heads"],
    }
    for what, present in unsupported.items():
        if present:
            raise ValueError(f"HF config (granitemoe): {what} is not supported by model.granite_moe")
    rope_theta, rope_scaling = rope_scaling_from_hf(hf)
    config = GraniteMoeConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"], n_experts=hf.get("num_local_experts", 8), top_k=hf.get("num_experts_per_tok", 2),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta, rope_scaling=rope_scaling,
        max_seq_len=hf.get("max_position_embeddings", 4096),
        embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
        attention_multiplier=float(hf.get("attention_multiplier", 1.0)),
        residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
        logits_scaling=float(hf.get("logits_scaling", 1.0)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=float(hf.get("initializer_range", 0.02)),
    )
    config.validate()
    return config


def config_to_hf(config: GraniteMoeConfig) -> dict:
    """The Hugging Face config.json dict of this config (the inverse of config_from_hf)."""
    c = config
    return {
        "architectures": ["GraniteMoeForCausalLM"], "model_type": "granitemoe", "vocab_size": c.vocab_size,
        "hidden_size": c.dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "intermediate_size": c.ffn_dim, "num_local_experts": c.n_experts,
        "num_experts_per_tok": c.top_k, "hidden_act": "silu", "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": rope_scaling_to_hf(c.rope_scaling),
        "max_position_embeddings": c.max_seq_len, "embedding_multiplier": c.embedding_multiplier,
        "attention_multiplier": c.attention_multiplier, "residual_multiplier": c.residual_multiplier,
        "logits_scaling": c.logits_scaling, "attention_bias": False, "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": c.init_std, "router_aux_loss_coef": c.aux_loss_coef or 0.001,
    }
