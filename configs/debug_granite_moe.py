"""A tiny GraniteMoE (multipliers, 4 experts top-2 with a load-balancing loss) on the debug config's four plays: trains in seconds on a CPU.

    python train.py configs/debug_granite_moe.py
"""

import dataclasses

from configs.debug import config as base
from model.granite_moe import GraniteMoeConfig

config = dataclasses.replace(
    base, out_dir="out/debug_granite_moe",
    model=GraniteMoeConfig(vocab_size=50304, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, n_experts=4, top_k=2,
                          max_seq_len=128, attention_multiplier=0.25, aux_loss_coef=0.01),
)
