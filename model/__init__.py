"""Models built by hand, one file per architecture family, plus shared leaf layers and safetensors in/out.

What every family module (llama.py, gemma2.py, gpt_oss.py, granite_moe.py) provides:
    a config dataclass with at least vocab_size, max_seq_len, rope_theta, rope_scaling, attn_backend and
        validate(); a dict of named sizes (*_CONFIGS)
    the model: built on the meta device, init_weights() / init_buffers(), and
        forward(batch) with a model.batch.Batch -> a model.loss.LossOutput (reduction="none" adds per-token and
        per-sample losses; return_hidden=True gives the Trunk instead), or forward(idx, labels=None,
        position_ids=None, cache=None, attention_mask=None, cu_seqlens=None) -> logits (B, T, vocab) or a
        LossOutput; trunk(...) -> Trunk(hidden, aux_loss), the final hidden states apart from the LM head;
        new_cache(batch, max_len); num_params();
        flops_per_token(seq_len) (active parameters for mixtures of experts)
    Hugging Face interop (model/hf.py): HF_MODEL_TYPES, config_from_hf(dict), config_to_hf(config),
        HF_KEY_MAP {hf name: ours} and, where a tensor is not a plain rename, HF_TRANSFORMS {our name: Transform}
"""

import torch
from torch import nn

from model.gemma2 import GEMMA2_CONFIGS, Gemma2, Gemma2Config
from model.gpt_oss import GPT_OSS_CONFIGS, GptOss, GptOssConfig
from model.granite_moe import GRANITE_MOE_CONFIGS, GraniteMoe, GraniteMoeConfig
from model.llama import LLAMA_CONFIGS, Llama, LlamaConfig

MODELS: dict[type, type[nn.Module]] = {
    LlamaConfig: Llama,
    Gemma2Config: Gemma2,
    GptOssConfig: GptOss,
    GraniteMoeConfig: GraniteMoe,
}
ModelConfig = LlamaConfig | Gemma2Config | GptOssConfig | GraniteMoeConfig


def build_model(config) -> nn.Module:
    """Build the model for this config on the meta device (no memory allocated, nothing initialised).

    The caller materialises it with model.to_empty(device=...) and then model.init_weights(), or fills it from a
    checkpoint with model.weights.load_safetensors (which calls model.init_buffers()).
    """
    model_class = MODELS.get(type(config))
    if model_class is None:
        known = ", ".join(c.__name__ for c in MODELS)
        raise TypeError(f"build_model: no model for config type {type(config).__name__} (known: {known})")
    with torch.device("meta"):
        return model_class(config)


__all__ = ["GEMMA2_CONFIGS", "GPT_OSS_CONFIGS", "Gemma2", "Gemma2Config", "GptOss", "GptOssConfig", "GRANITE_MOE_CONFIGS", "GraniteMoe", "GraniteMoeConfig", "LLAMA_CONFIGS", "Llama", "LlamaConfig", "MODELS", "ModelConfig", "build_model"]
