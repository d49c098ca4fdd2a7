"""GPT-OSS (OpenAI, 2025: gpt-oss-20b and gpt-oss-120b), written to load Hugging Face checkpoints directly.

    x = embedding(tokens)
    n_layers x [ x = x + Attention(RMSNorm(x));  x = x + MoE(RMSNorm(x)) ]
    logits = output(RMSNorm(x))

What sets it apart from Llama:
- Attention has biases on q, k, v and o, and one learned sink logit per head that joins the softmax
  denominator without contributing a value, so a head can attend to "nothing". Layers alternate a 128-key
  sliding window (even layers) and full attention (odd layers). RoPE is YaRN-scaled (factor 32 over a 4096
  original context, cos and sin times 0.1 ln 32 + 1).
- The MLP is a mixture of experts (model.moe): a router with a bias picks the top 4 of 32 (20b) or 128 (120b)
  experts and softmaxes their 4 logits; each expert is a clamped SwiGLU with biases,
  (clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g), g = min(gate, 7).
- RMSNorm applies its weight in fp32 before casting back.

Checkpoints store each layer's experts fused: gate_up_proj (E, dim, 2 * ffn) with gate and up *interleaved*
along the last axis (gate = [..., 0::2], up = [..., 1::2]) and down_proj (E, ffn, dim), as x @ W. OpenAI's
released weights are MXFP4 (`*_blocks`, `*_scales`), dequantised to the model's dtype as they stream in
(model.mxfp4). HF_TRANSFORMS below turn both layouts into ours, (E, out, in) with gate rows then up rows.

Sinks rule out sdpa and flash: "auto" picks eager on CPU and flex on a GPU.
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
from model.moe import MoE
from model.norm import RMSNorm
from model.rope import RopeScaling, rope_scaling_from_hf, rope_scaling_to_hf
from model.weights import Transform

LAYER_TYPES = ("sliding_attention", "full_attention")


def _yarn() -> RopeScaling:
    return RopeScaling("yarn", factor=32.0, original_max_seq_len=4096, beta_fast=32.0, beta_slow=1.0, truncate=False)


@dataclass
class GptOssConfig:
    vocab_size: int = 201088  # embedding rows / output logits (o200k_harmony)
    dim: int = 2880  # model (residual stream) width
    n_layers: int = 36  # transformer blocks
    n_heads: int = 64  # query heads
    n_kv_heads: int = 8  # key/value heads (grouped-query attention)
    head_dim: int = 64  # per-head width
    ffn_dim: int = 2880  # hidden size of each expert
    n_experts: int = 128  # experts per MoE layer
    top_k: int = 4  # experts each token is routed to
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 150000.0  # RoPE base
    rope_scaling: RopeScaling = field(default_factory=_yarn)
    max_seq_len: int = 131072  # longest sequence the model is meant for (HF max_position_embeddings)
    sliding_window: int = 128  # keys seen by a sliding-window layer
    layer_types: tuple = ()  # per layer "sliding_attention" | "full_attention"; () = alternate, layer 0 sliding
    swiglu_alpha: float = 1.702  # expert activation: (clamp(up) + 1) * g * sigmoid(alpha * g)
    swiglu_limit: float = 7.0  # expert activation: gate clamped above, up clamped to [-limit, limit]
    aux_loss_coef: float = 0.0  # load-balancing loss weight (HF's router_aux_loss_coef is 0.001); 0 = off
    z_loss_coef: float = 0.0  # router z-loss weight; 0 = off
    tie_embeddings: bool = False  # output head shares the token embedding matrix
    attn_backend: str = "auto"  # attention implementation (model.attention): auto | eager | flex (sinks need one of these)
    kernels: KernelConfig = field(default_factory=KernelConfig)  # Triton and fused fast paths (kernels.KernelConfig)
    init_std: float = 0.02  # std of the normal init (see GptOss.init_weights)

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else LAYER_TYPES[i % 2]

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        check_config(self, ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                            "n_experts", "top_k", "max_seq_len", "sliding_window", "swiglu_alpha", "swiglu_limit"),
                     non_negative=("aux_loss_coef", "z_loss_coef"))
        check_layer_types(self, LAYER_TYPES)


# Named sizes, each the exact shape of the published model (its config.json).
GPT_OSS_CONFIGS: dict[str, GptOssConfig] = {
    "debug": GptOssConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64,
                          n_experts=4, top_k=2, max_seq_len=256, sliding_window=16,
                          rope_scaling=RopeScaling("yarn", factor=4.0, original_max_seq_len=64, truncate=False)),
    "gpt-oss-20b": GptOssConfig(n_layers=24, n_experts=32),
    "gpt-oss-120b": GptOssConfig(),
}


class Block(nn.Module):
    def __init__(self, config: GptOssConfig, layer_id: int):
        super().__init__()
        c = config
        window = c.sliding_window if c.layer_type(layer_id) == "sliding_attention" else 0
        self.attn_norm = RMSNorm(c.dim, c.norm_eps, scale_in_fp32=True)
        self.attn = SelfAttention(c.dim, c.n_heads, c.n_kv_heads, c.head_dim, layer_id, c.attn_backend,
                                  qkv_bias=True, out_bias=True, window=window, sinks=True,
                                  kernels=c.kernels)
        self.mlp_norm = RMSNorm(c.dim, c.norm_eps, scale_in_fp32=True)
        self.moe = MoE(c.dim, c.ffn_dim, c.n_experts, c.top_k, activation="gpt_oss", bias=True, router_bias=True,
                       swiglu_alpha=c.swiglu_alpha, swiglu_limit=c.swiglu_limit, aux_loss_coef=c.aux_loss_coef,
                       z_loss_coef=c.z_loss_coef)

    def forward(self, x: Tensor, plan: AttentionPlan, cache: KVCache | None = None) -> tuple[Tensor, Tensor]:
        x = x + self.attn(self.attn_norm(x), plan, cache)  # (B, T, dim)
        h, router = self.moe(self.mlp_norm(x))  # (B, T, dim)
        return x + h, router.aux_loss


class GptOss(CausalLM):
    def __init__(self, config: GptOssConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, scale_in_fp32=True)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_rope_buffer()  # and ties the output head to the embedding (tie_embeddings)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every tensor in place, then call init_buffers().

        - tok_embeddings.weight, output.weight (untied):        normal(0, init_std)
        - wq, wk, wv weights, router weight, expert w_gate_up:   normal(0, init_std)
        - wo weight, expert w_down (they write into the residual stream): normal(0, init_std / sqrt(2 * n_layers))
        - every bias: zeros; attention sinks: zeros (e^0 = one "empty" key of weight 1 at the start)
        - RMSNorm weights: ones
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers:
            attn = layer.attn
            for linear in (attn.wq, attn.wk, attn.wv, attn.wo):
                nn.init.normal_(linear.weight, std=residual_std if linear is attn.wo else std)
                nn.init.zeros_(linear.bias)
            nn.init.zeros_(attn.sinks)
            layer.moe.init_weights(std, residual_std)
            layer.attn_norm.reset_parameters()
            layer.mlp_norm.reset_parameters()
        self.norm.reset_parameters()
        if not self.config.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)
        self.init_buffers()

    def trunk(self, idx: Tensor, position_ids: Tensor | None = None, cache: KVCache | None = None,
              attention_mask: Tensor | None = None, cu_seqlens: Tensor | None = None) -> Trunk:
        """The final hidden states (B, T, dim) of idx (B, T), after the final norm, and the mean over
        layers of the router losses: where other heads attach. Arguments as in model.llama.Llama.forward."""
        plan = self.attention_plan(idx, position_ids, cache, attention_mask, cu_seqlens)  # once for every layer
        x = self.tok_embeddings(idx)  # (B, T, dim)
        aux = torch.zeros((), device=idx.device)
        for layer in self.layers:
            x, layer_aux = layer(x, plan, cache)  # (B, T, dim)
            aux = aux + layer_aux
        if cache is not None:
            cache.advance(idx.shape[1])
        return Trunk(self.norm(x), aux / self.config.n_layers)  # (B, T, dim)

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
        loss = lm_head_loss(trunk.hidden, self.output, labels, self.config.kernels, reduction=reduction,
                            loss_weights=weights, cu_seqlens=cu_seqlens)  # by default never holding all logits
        return loss._replace(aux_loss=trunk.aux_loss)


# ------------------------------------------------------------------------------------------ Hugging Face interop

CONFIG_CLASS = GptOssConfig
HF_MODEL_TYPES = ("gpt_oss",)

# Hugging Face GptOssForCausalLM names -> ours ("{i}" is a layer index). MXFP4 checkpoints hold
# `...experts.gate_up_proj_blocks` / `_scales` instead: model.weights presents each pair as `...gate_up_proj`.
HF_KEY_MAP: dict[str, str | None] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.wq.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.wq.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.wk.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.wk.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.wv.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.wv.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.wo.weight",
    "model.layers.{i}.self_attn.o_proj.bias": "layers.{i}.attn.wo.bias",
    "model.layers.{i}.self_attn.sinks": "layers.{i}.attn.sinks",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.router.weight": "layers.{i}.moe.router.weight",
    "model.layers.{i}.mlp.router.bias": "layers.{i}.moe.router.bias",
    "model.layers.{i}.mlp.experts.gate_up_proj": "layers.{i}.moe.w_gate_up",
    "model.layers.{i}.mlp.experts.gate_up_proj_bias": "layers.{i}.moe.b_gate_up",
    "model.layers.{i}.mlp.experts.down_proj": "layers.{i}.moe.w_down",
    "model.layers.{i}.mlp.experts.down_proj_bias": "layers.{i}.moe.b_down",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def deinterleave(t: Tensor) -> Tensor:
    """Along dim 1: [g0, u0, g1, u1, ...] -> [g0, g1, ..., u0, u1, ...]."""
    return torch.cat((t[:, 0::2], t[:, 1::2]), dim=1)


def interleave(t: Tensor) -> Tensor:
    """Along dim 1: [g0, g1, ..., u0, u1, ...] -> [g0, u0, g1, u1, ...] (the inverse of deinterleave)."""
    gate, up = t.chunk(2, dim=1)
    return torch.stack((gate, up), dim=2).flatten(1, 2)


HF_TRANSFORMS: dict[str, Transform] = {
    # (E, dim, 2 ffn) interleaved columns  <->  ours (E, 2 ffn, dim): gate rows, then up rows
    "layers.{i}.moe.w_gate_up": Transform(
        shape=lambda s: (s[0], s[2], s[1]),
        load=lambda t: deinterleave(t.transpose(1, 2)),
        export=lambda t: interleave(t).transpose(1, 2).contiguous()),
    "layers.{i}.moe.b_gate_up": Transform(shape=lambda s: s, load=deinterleave,
                                          export=interleave),
    # (E, ffn, dim)  <->  ours (E, dim, ffn)
    "layers.{i}.moe.w_down": Transform(shape=lambda s: (s[0], s[2], s[1]), load=lambda t: t.transpose(1, 2),
                                       export=lambda t: t.transpose(1, 2).contiguous()),
}


def config_from_hf(hf: dict) -> GptOssConfig:
    """GptOssConfig from a Hugging Face config.json dict (model_type "gpt_oss"); unsupported features raise."""
    if hf.get("model_type") != "gpt_oss":
        raise ValueError(f"HF config: model_type {hf.get('model_type')!r} is not gpt_oss")
    quant = (hf.get("quantization_config") or {}).get("quant_method")
    if quant not in (None, "mxfp4"):
        raise ValueError(f"HF config (gpt_oss): quantization {quant!r} is not supported (MXFP4 or unquantised)")
    if not hf.get("attention_bias", True):
        raise ValueError("HF config (gpt_oss): attention_bias=false is not supported by model.gpt_oss")
    rope_theta, rope_scaling = rope_scaling_from_hf(hf)
    n_layers = hf["num_hidden_layers"]
    layer_types = tuple(hf.get("layer_types") or ())
    config = GptOssConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=n_layers, n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim", 64),
        ffn_dim=hf["intermediate_size"], n_experts=hf.get("num_local_experts", hf.get("num_experts", 128)),
        top_k=hf.get("num_experts_per_tok", 4), norm_eps=float(hf.get("rms_norm_eps", 1e-5)), rope_theta=rope_theta,
        rope_scaling=rope_scaling, max_seq_len=hf.get("max_position_embeddings", 131072),
        sliding_window=int(hf.get("sliding_window") or 128),
        layer_types=() if layer_types == tuple(LAYER_TYPES[i % 2] for i in range(n_layers)) else layer_types,
        swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)), swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=float(hf.get("initializer_range", 0.02)),
    )
    config.validate()
    return config


def config_to_hf(config: GptOssConfig) -> dict:
    """The Hugging Face config.json dict of this config (the inverse of config_from_hf); weights are exported
    unquantised."""
    c = config
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": c.vocab_size,
        "hidden_size": c.dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.ffn_dim,
        "num_local_experts": c.n_experts, "num_experts_per_tok": c.top_k, "rms_norm_eps": c.norm_eps,
        "rope_parameters": {"rope_theta": c.rope_theta,
                            **(rope_scaling_to_hf(c.rope_scaling) or {"rope_type": "default"})},
        "max_position_embeddings": c.max_seq_len, "sliding_window": c.sliding_window,
        "layer_types": [c.layer_type(i) for i in range(c.n_layers)], "swiglu_alpha": c.swiglu_alpha,
        "swiglu_limit": c.swiglu_limit, "attention_bias": True, "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": c.init_std, "router_aux_loss_coef": c.aux_loss_coef or 0.001,
    }
