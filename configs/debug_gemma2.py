"""A tiny Gemma2 (softcaps, sliding window on layer 0) on the debug config's four plays: trains in seconds on a CPU.

    python train.py configs/debug_gemma2.py
"""

import dataclasses

from configs.debug import config as base
from model.gemma2 import Gemma2Config

config = dataclasses.replace(
    base, out_dir="out/debug_gemma2",
    model=Gemma2Config(vocab_size=50304, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, max_seq_len=128,
                      query_pre_attn_scalar=16, sliding_window=32),
)
