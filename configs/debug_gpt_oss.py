"""A tiny GPT-OSS (sinks, sliding window on layer 0, YaRN, 4 experts top-2 with a load-balancing loss) on the debug config's four plays: trains in seconds on a CPU.

    python train.py configs/debug_gpt_oss.py
"""

import dataclasses

from configs.debug import config as base
from model.gpt_oss import GptOssConfig
from model.rope import RopeScaling

config = dataclasses.replace(
    base, out_dir="out/debug_gpt_oss",
    model=GptOssConfig(vocab_size=50304, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64, n_experts=4,
                      top_k=2, max_seq_len=128, sliding_window=32, aux_loss_coef=0.01,
                      rope_scaling=RopeScaling("yarn", factor=4.0, original_max_seq_len=32, truncate=False)),
)
