"""AdamW with decay / no-decay parameter groups.

Weight decay shrinks the matrices of linear layers only. Norm gains, biases and embedding tables are left
alone: decaying a gain pulls it towards zero rather than towards "no change", and an embedding row only
receives gradient when its token appears, so decay would erase rare tokens (a tied output head shares its
table with the embedding and follows it).
"""

import torch
from torch import nn

from training.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and id(p) not in embedding_params:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; the fused CUDA implementation when the parameters live on a GPU."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=device.type == "cuda",
    )
