"""Models built by hand, one file per architecture family, plus shared leaf layers and safetensors in/out."""

import torch
from torch import nn

from model.llama import LLAMA_CONFIGS, Llama, LlamaConfig

MODELS: dict[type, type[nn.Module]] = {LlamaConfig: Llama}


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


__all__ = ["LLAMA_CONFIGS", "Llama", "LlamaConfig", "MODELS", "build_model"]
