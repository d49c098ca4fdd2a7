"""Gemma 2 (Gemma Team, 2024), written to load Hugging Face checkpoints directly.

    x = embedding(tokens) * sqrt(dim)
    n_layers x [ x = x + PostNorm(Attention(PreNorm(x)));  x = x + PostNorm(GeGLU(PreNorm(x))) ]
    logits = 30 * tanh(output(RMSNorm(x)) / 30)

What sets it apart from Llama:
- RMSNorm scales by (1 + weight), in fp32; four norms per block (before and after attention and the MLP).
- The MLP is GeGLU: w_down(gelu_tanh(w_gate(x)) * w_up(x)).
- Attention scores are scaled by query_pre_attn_scalar ** -0.5 (not head_dim ** -0.5; head_dim is its own
  setting) and capped: 50 * tanh(scores / 50). Layers alternate sliding-window (4096 keys, even layers) and
  full attention (odd layers), as HF's default layer_types.
- The final logits are capped too, and the output head is the embedding matrix.

Softcapping rules out sdpa: "auto" picks eager on CPU and flex on a GPU.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kernels import KernelConfig
from model.attention import AttentionPlan, SelfAttention
from model.batch import Batch
from model.causal_lm import CausalLM, Trunk, check_config, check_layer_types, forward_inputs
from model.kv_cache import KVCache
from model.loss import LossOutput, lm_head_loss
from model.norm import RMSNorm
from model.rope import RopeScaling, rope_scaling_from_hf, rope_scaling_to_hf

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class Gemma2Config:
    vocab_size: int = 256000  # embedding rows / output logits
    dim: int = 2304  # model (residual stream) width
    n_layers: int = 26  # transformer blocks
    n_heads: int = 8  # query heads
    n_kv_heads: int = 4  # key/value heads (grouped-query attention)
    head_dim: int = 256  # per-head width (independent of dim / n_heads)
    ffn_dim: int = 9216  # hidden size of the GeGLU MLP
    norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_seq_len: int = 8192  # longest sequence the model is meant for (HF max_position_embeddings)
    query_pre_attn_scalar: int = 256  # attention scores are scaled by this ** -0.5
    sliding_window: int = 4096  # keys seen by a sliding-window layer (the query and the window - 1 before it)
    layer_types: tuple = ()  # per layer "sliding_attention" | "full_attention"; () = alternate, layer 0 sliding
    attn_softcap: float = 50.0  # attention scores -> cap * tanh(scores / cap); 0 = off
    final_softcap: float = 30.0  # output logits -> cap * tanh(logits / cap); 0 = off
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    attn_backend: str = "auto"  # attention implementation (model.attention): auto | eager | sdpa | flex | flash
    kernels: KernelConfig = field(default_factory=KernelConfig)  # Triton and fused fast paths (kernels.KernelConfig)
    init_std: float = 0.02  # std of the normal init (see Gemma2.init_weights)

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else LAYER_TYPES[i % 2]

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        check_config(self, ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                            "max_seq_len", "sliding_window", "query_pre_attn_scalar"),
                     non_negative=("attn_softcap", "final_softcap"))
        check_layer_types(self, LAYER_TYPES)


# Named sizes, each the exact shape of the published model (its config.json).
GEMMA2_CONFIGS: dict[str, Gemma2Config] = {
    "debug": Gemma2Config(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                          max_seq_len=256, query_pre_attn_scalar=16, sliding_window=32),
    "gemma-2-2b": Gemma2Config(),
    "gemma-2-9b": Gemma2Config(dim=3584, n_layers=42, n_heads=16, n_kv_heads=8, head_dim=256, ffn_dim=14336,
                               query_pre_attn_scalar=256),
    "gemma-2-27b": Gemma2Config(dim=4608, n_layers=46, n_heads=32, n_kv_heads=16, head_dim=128, ffn_dim=36864,
                                query_pre_attn_scalar=144),
}


class MLP(nn.Module):
    """GeGLU (Shazeer, 2020) with the tanh approximation of GELU: w_down(gelu(w_gate(x)) * w_up(x))."""

    def __init__(self, config: Gemma2Config):
        super().__init__()
        self.w_gate = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w_up = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w_down = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.gelu(self.w_gate(x), approximate="tanh") * self.w_up(x)  # (B, T, ffn_dim)
        return self.w_down(h)  # (B, T, dim)


class Block(nn.Module):
    def __init__(self, config: Gemma2Config, layer_id: int):
        super().__init__()
        c = config
        window = c.sliding_window if c.layer_type(layer_id) == "sliding_attention" else 0
        self.attn_norm = RMSNorm(c.dim, c.norm_eps, unit_offset=True)
        self.attn = SelfAttention(c.dim, c.n_heads, c.n_kv_heads, c.head_dim, layer_id, c.attn_backend,
                                  scale=c.query_pre_attn_scalar ** -0.5, window=window, softcap=c.attn_softcap,
                                  kernels=c.kernels)
        self.post_attn_norm = RMSNorm(c.dim, c.norm_eps, unit_offset=True)
        self.mlp_norm = RMSNorm(c.dim, c.norm_eps, unit_offset=True)
        self.mlp = MLP(c)
        self.post_mlp_norm = RMSNorm(c.dim, c.norm_eps, unit_offset=True)

    def forward(self, x: Tensor, plan: AttentionPlan, cache: KVCache | None = None) -> Tensor:
        x = x + self.post_attn_norm(self.attn(self.attn_norm(x), plan, cache))  # (B, T, dim)
        x = x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))  # (B, T, dim)
        return x


class Gemma2(CausalLM):
    def __init__(self, config: Gemma2Config):
        super().__init__()
        config.validate()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, unit_offset=True)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_rope_buffer()  # and ties the output head to the embedding (tie_embeddings)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every tensor in place, then call init_buffers().

        - tok_embeddings.weight (also the output head when tied): normal(0, init_std)
        - wq, wk, wv, w_gate, w_up weights:                          normal(0, init_std)
        - wo, w_down weights (they write into the residual stream):  normal(0, init_std / sqrt(2 * n_layers))
        - output.weight (untied):                                    normal(0, init_std)
        - RMSNorm weights: zeros (the scale is 1 + weight)
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers:
            for linear in (layer.attn.wq, layer.attn.wk, layer.attn.wv, layer.mlp.w_gate, layer.mlp.w_up):
                nn.init.normal_(linear.weight, std=std)
            nn.init.normal_(layer.attn.wo.weight, std=residual_std)
            nn.init.normal_(layer.mlp.w_down.weight, std=residual_std)
            for norm in (layer.attn_norm, layer.post_attn_norm, layer.mlp_norm, layer.post_mlp_norm):
                norm.reset_parameters()
        self.norm.reset_parameters()
        if not self.config.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)
        self.init_buffers()

    def trunk(self, idx: Tensor, position_ids: Tensor | None = None, cache: KVCache | None = None,
              attention_mask: Tensor | None = None, cu_seqlens: Tensor | None = None) -> Trunk:
        """The final hidden states (B, T, dim) of idx (B, T), after the final norm (before the head and its
        softcap): where other heads attach. Arguments as in model.llama.Llama.forward."""
        plan = self.attention_plan(idx, position_ids, cache, attention_mask, cu_seqlens)  # once for every layer
        x = self.tok_embeddings(idx)  # (B, T, dim)
        x = x * torch.tensor(self.config.dim**0.5, dtype=x.dtype)  # the normaliser, rounded to x's dtype as in HF
        for layer in self.layers:
            x = layer(x, plan, cache)  # (B, T, dim)
        if cache is not None:
            cache.advance(idx.shape[1])
        return Trunk(self.norm(x))  # (B, T, dim)

    def logits(self, hidden: Tensor) -> Tensor:
        """output(hidden) capped by final_softcap: (..., dim) -> (..., vocab_size)."""
        logits = self.output(hidden)
        cap = self.config.final_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, idx: Tensor | Batch, labels: Tensor | None = None, position_ids: Tensor | None = None,
                cache: KVCache | None = None, attention_mask: Tensor | None = None,
                cu_seqlens: Tensor | None = None, *, reduction: str = "sum",
                return_hidden: bool = False) -> Tensor | LossOutput | Trunk:
        """idx (B, T) int64 -> logits (B, T, vocab_size), capped by final_softcap, or LossOutput when labels (B, T)
        are given or idx is a Batch; Trunk with return_hidden. Arguments as in model.llama.Llama.forward.
        """
        idx, labels, position_ids, cu_seqlens, weights = forward_inputs(idx, labels, position_ids, cu_seqlens,
                                                                        reduction)
        trunk = self.trunk(idx, position_ids, cache, attention_mask, cu_seqlens)
        if return_hidden:
            return trunk
        cap = self.config.final_softcap
        if labels is not None:  # the loss applies the cap itself (by default never holding all logits)
            return lm_head_loss(trunk.hidden, self.output, labels, self.config.kernels, softcap=cap,
                                reduction=reduction, loss_weights=weights, cu_seqlens=cu_seqlens)
        return self.logits(trunk.hidden)  # (B, T, vocab_size)


CONFIG_CLASS = Gemma2Config
HF_MODEL_TYPES = ("gemma2",)

# Hugging Face Gemma2ForCausalLM names -> ours ("{i}" is a layer index).
HF_KEY_MAP: dict[str, str | None] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.post_attn_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.w_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.w_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.w_down.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "layers.{i}.post_mlp_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def config_from_hf(hf: dict) -> Gemma2Config:
    """Gemma2Config from a Hugging Face config.json dict (model_type "gemma2"); unsupported features raise."""
    if hf.get("model_type") != "gemma2":
        raise ValueError(f"HF config: model_type {hf.get('model_type')!r} is not gemma2")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    unsupported = {
        f"hidden_activation {act!r} (only gelu_pytorch_tanh)": act not in ("gelu_pytorch_tanh", "gelu_tanh"),
        "attention_bias": hf.get("attention_bias", False),
        "use_bidirectional_attention": hf.get("use_bidirectional_attention", False),
    }
    for what, present in unsupported.items():
        if present:
            raise ValueError(f"HF config (gemma2): {what} is not supported by model.gemma2")
    rope_theta, rope_scaling = rope_scaling_from_hf(hf)
    n_layers = hf["num_hidden_layers"]
    layer_types = tuple(hf.get("layer_types") or ())
    config = Gemma2Config(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=n_layers, n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim", 256),
        ffn_dim=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta,
        rope_scaling=rope_scaling, max_seq_len=hf.get("max_position_embeddings", 8192),
        query_pre_attn_scalar=int(hf.get("query_pre_attn_scalar", 256)),
        sliding_window=int(hf.get("sliding_window") or 4096),
        layer_types=() if layer_types == tuple(LAYER_TYPES[i % 2] for i in range(n_layers)) else layer_types,
        attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(hf.get("final_logit_softcapping") or 0.0),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), init_std=float(hf.get("initializer_range", 0.02)),
    )
    config.validate()
    return config


def config_to_hf(config: Gemma2Config) -> dict:
    """The Hugging Face config.json dict of this config (the inverse of config_from_hf)."""
    c = config
    return {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": c.vocab_size,
        "hidden_size": c.dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.ffn_dim,
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling_to_hf(c.rope_scaling), "max_position_embeddings": c.max_seq_len,
        "query_pre_attn_scalar": c.query_pre_attn_scalar, "sliding_window": c.sliding_window,
        "layer_types": [c.layer_type(i) for i in range(c.n_layers)],
        "attn_logit_softcapping": c.attn_softcap or None, "final_logit_softcapping": c.final_softcap or None,
        "attention_bias": False, "tie_word_embeddings": c.tie_embeddings, "initializer_range": c.init_std,
    }
