"""Llama-family decoder (Llama 2/3, SmolLM, Qwen2), written to load Hugging Face checkpoints directly.

    tokens -> embedding -> n_layers x [ x + Attention(RMSNorm(x)),  x + SwiGLU(RMSNorm(x)) ] -> RMSNorm -> output

Attention is grouped-query (n_kv_heads <= n_heads) with rotary position embeddings in HF's rotate-half layout;
Qwen2 adds a bias to the q/k/v projections. The output head may share its weight with the token embedding.

A model is built on the meta device and materialised by the caller:

    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device="cuda")
    model.init_weights()                # or load_safetensors(...), which calls model.init_buffers()
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
from model.norm import RMSNorm
from model.rope import RopeScaling, rope_scaling_from_hf, rope_scaling_to_hf

@dataclass
class LlamaConfig:
    vocab_size: int = 50304  # embedding rows / output logits (may exceed the tokenizer's ids, e.g. a multiple of 64)
    dim: int = 768  # model (residual stream) width
    n_layers: int = 12  # transformer blocks
    n_heads: int = 12  # query heads; head_dim = dim / n_heads
    n_kv_heads: int = 12  # key/value heads (grouped-query attention): n_heads / n_kv_heads queries share one
    ffn_dim: int = 2048  # hidden size of the SwiGLU MLP
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base: inv_freq[j] = theta ** (-2j / head_dim)
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_seq_len: int = 2048  # longest sequence the model is meant for (HF max_position_embeddings)
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    qkv_bias: bool = False  # Qwen2: bias on the q, k, v projections (never on the output projection)
    attn_backend: str = "sdpa"  # attention implementation: "sdpa" (fused kernels) | "eager" (fp32 reference) | "flex" | "flash" | "auto" (model.attention)
    kernels: KernelConfig = field(default_factory=KernelConfig)  # Triton and fused fast paths (kernels.KernelConfig)
    init_std: float = 0.02  # std of the normal init (see Llama.init_weights)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if self.n_heads > 0 and self.dim % self.n_heads:
            raise ValueError(f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        check_config(self, ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"))


# Named sizes. Those named after a published model have its exact shapes (from its config.json).
LLAMA_CONFIGS: dict[str, LlamaConfig] = {
    "debug": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=256),
    "llama-125m": LlamaConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048),
    "llama-350m": LlamaConfig(dim=1024, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=2816),
    "llama-1b": LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, rope_theta=500000.0),
    "smollm2-135m": LlamaConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                                rope_theta=100000.0, max_seq_len=8192),
    "smollm2-360m": LlamaConfig(vocab_size=49152, dim=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_dim=2560,
                                rope_theta=100000.0, max_seq_len=8192),
    "qwen2.5-0.5b": LlamaConfig(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864,
                                norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, qkv_bias=True),
    "llama-3.2-1b": LlamaConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                                rope_theta=500000.0, max_seq_len=131072,
                                rope_scaling=RopeScaling("llama3", factor=32.0, low_freq_factor=1.0,
                                                         high_freq_factor=4.0, original_max_seq_len=8192)),
}


class MLP(nn.Module):
    """SwiGLU (Shazeer, 2020): w_down(silu(w_gate(x)) * w_up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.w_gate = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w_up = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w_down = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.silu(self.w_gate(x)) * self.w_up(x)  # (B, T, ffn_dim)
        return self.w_down(h)  # (B, T, dim)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = SelfAttention(config.dim, config.n_heads, config.n_kv_heads, config.dim // config.n_heads, layer_id,
                                  config.attn_backend, qkv_bias=config.qkv_bias, kernels=config.kernels)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, plan: AttentionPlan, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), plan, cache)  # (B, T, dim)
        x = x + self.mlp(self.mlp_norm(x))  # (B, T, dim)
        return x


class Llama(CausalLM):
    def __init__(self, config: LlamaConfig):
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
        """Initialise every tensor in place (on whatever device the model lives), then call init_buffers().

        - tok_embeddings.weight:           normal(0, init_std)
        - wq, wk, wv, w_gate, w_up weights: normal(0, init_std)
        - wo, w_down weights (the projections that write into the residual stream):
                                           normal(0, init_std / sqrt(2 * n_layers)), as GPT-2 does, so the
                                           residual stream's variance does not grow with depth
        - output.weight (untied):          normal(0, init_std); when tied it is tok_embeddings.weight
        - q/k/v biases (qkv_bias):         zeros
        - RMSNorm weights:                 ones
        - inv_freq buffer:                 recomputed from the config (init_buffers)
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        for layer in self.layers:
            for linear in (layer.attn.wq, layer.attn.wk, layer.attn.wv, layer.mlp.w_gate, layer.mlp.w_up):
                nn.init.normal_(linear.weight, mean=0.0, std=std)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            nn.init.normal_(layer.attn.wo.weight, mean=0.0, std=residual_std)
            nn.init.normal_(layer.mlp.w_down.weight, mean=0.0, std=residual_std)
            layer.attn_norm.reset_parameters()
            layer.mlp_norm.reset_parameters()
        self.norm.reset_parameters()
        if not self.config.tie_embeddings:
            nn.init.normal_(self.output.weight, mean=0.0, std=std)
        self.init_buffers()

    def trunk(self, idx: Tensor, position_ids: Tensor | None = None, cache: KVCache | None = None,
              attention_mask: Tensor | None = None, cu_seqlens: Tensor | None = None) -> Trunk:
        """The final hidden states (B, T, dim) of idx (B, T), after the final norm: where the LM head, and any
        other head (classification, policy), attaches. Arguments as in forward."""
        plan = self.attention_plan(idx, position_ids, cache, attention_mask, cu_seqlens)  # once for every layer
        x = self.tok_embeddings(idx)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, plan, cache)  # (B, T, dim)
        if cache is not None:
            cache.advance(idx.shape[1])
        return Trunk(self.norm(x))  # (B, T, dim)

    def forward(self, idx: Tensor | Batch, labels: Tensor | None = None, position_ids: Tensor | None = None,
                cache: KVCache | None = None, attention_mask: Tensor | None = None,
                cu_seqlens: Tensor | None = None, *, reduction: str = "sum",
                return_hidden: bool = False) -> Tensor | LossOutput | Trunk:
        """idx (B, T) int64 -> logits (B, T, vocab_size), or LossOutput when labels (B, T) are given or idx is a
        model.batch.Batch (its labels, positions, cu_seqlens and loss_weights); Trunk with return_hidden.

        position_ids (B, T) default to 0..T-1 for every row (past..past+T-1 with a cache); packed batches pass
        positions that restart at each document together with cu_seqlens (n_docs + 1,) int32, the document
        offsets in the flattened B * T tokens, so that no token attends across a document boundary.
        cache: a KVCache that this call reads and extends (generation). attention_mask
        (B, past + T): 1 for real tokens, 0 for padding, which no query attends (left-padded prompts).
        reduction: "sum" (the sums only) or "none" (per token and per sample too; see model.loss.lm_head_loss).
        """
        idx, labels, position_ids, cu_seqlens, weights = forward_inputs(idx, labels, position_ids, cu_seqlens,
                                                                        reduction)
        trunk = self.trunk(idx, position_ids, cache, attention_mask, cu_seqlens)
        if return_hidden:
            return trunk
        if labels is None:
            return self.logits(trunk.hidden)  # (B, T, vocab_size)
        return lm_head_loss(trunk.hidden, self.output, labels, self.config.kernels, reduction=reduction,
                            loss_weights=weights, cu_seqlens=cu_seqlens)  # by default never holding all logits

CONFIG_CLASS = LlamaConfig
HF_MODEL_TYPES = ("llama", "qwen2")

# Hugging Face LlamaForCausalLM / Qwen2ForCausalLM names -> ours. "{i}" stands for a layer index. A None target
# marks a tensor some HF checkpoints carry that is not a weight of ours (skipped on load, never exported).
# Read by model.weights.key_mapper(HF_KEY_MAP) for loading, inverse=True for export.
HF_KEY_MAP: dict[str, str | None] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.wv.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.wq.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.wk.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.wv.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.w_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.w_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.w_down.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.self_attn.rotary_emb.inv_freq": None,  # saved by old transformers versions
}


def config_from_hf(hf_config: dict) -> LlamaConfig:
    """LlamaConfig from a Hugging Face config.json dict (model_type "llama" or "qwen2").

    Raises ValueError for features this model does not implement rather than loading something different.
    """
    model_type = hf_config.get("model_type")
    if model_type not in ("llama", "qwen2"):
        raise ValueError(f"HF config: model_type {model_type!r} is not supported by model.llama (llama, qwen2)")
    dim, n_heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    unsupported = {
        "hidden_act other than silu": hf_config.get("hidden_act", "silu") != "silu",
        "head_dim != hidden_size / num_attention_heads": hf_config.get("head_dim", dim // n_heads) != dim // n_heads,
        "attention_bias (bias on o_proj too)": model_type == "llama" and hf_config.get("attention_bias", False),
        "mlp_bias": hf_config.get("mlp_bias", False),
        "use_sliding_window": hf_config.get("use_sliding_window", False),
    }
    for what, present in unsupported.items():
        if present:
            raise ValueError(f"HF config ({model_type}): {what} is not supported by model.llama")
    rope_theta, rope_scaling = rope_scaling_from_hf(hf_config)
    config = LlamaConfig(
        vocab_size=hf_config["vocab_size"],
        dim=dim,
        n_layers=hf_config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf_config.get("num_key_value_heads") or n_heads,
        ffn_dim=hf_config["intermediate_size"],
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_seq_len=hf_config.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        init_std=float(hf_config.get("initializer_range", 0.02)),
    )
    config.validate()
    return config


def config_to_hf(config: LlamaConfig) -> dict:
    """The Hugging Face config.json dict of this config (the inverse of config_from_hf): Qwen2 when the model has
    q/k/v biases, else Llama. RoPE is written as top-level `rope_theta` + `rope_scaling`, which every
    transformers version reads (5.x also reads its own `rope_parameters` from it)."""
    family = "qwen2" if config.qkv_bias else "llama"
    hf = {
        "architectures": ["Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.dim // config.n_heads,
        "intermediate_size": config.ffn_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling_to_hf(config.rope_scaling),
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
    }
    if family == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False)
    return hf
