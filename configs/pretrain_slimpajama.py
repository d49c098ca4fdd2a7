"""A ~1.1B-parameter Llama (Llama-3.2-1B shapes, GPT-2 vocabulary) on SlimPajama, for GPUs.

    torchrun --nproc_per_node=8 train.py configs/pretrain_slimpajama.py --data.corpus=/data/SlimPajama-627B/train
    python train.py configs/pretrain_slimpajama.py --model.n_layers=12 --model.dim=768 ...   # a ~125M variant

The corpus is a directory in SlimPajama's own layout (`chunk*/example_train_*.jsonl.zst`); set it with
--data.corpus or the SLIMPAJAMA_DIR environment variable. The first run tokenises it into
data/cache/shards/ with one process per CPU core (rank 0; the other ranks wait). Under torchrun the model is
sharded with FSDP2 (training/parallel.py). The global batch is 8 x 2048 x 32 = 524,288 tokens whatever the
number of processes: with 8, each reads 1 of the 8 sequences of every micro-batch.
"""

import os
from dataclasses import replace

from model.llama import LLAMA_CONFIGS
from training.config import CkptConfig, DataConfig, EvalConfig, LogConfig, OptimConfig, ScheduleConfig, TrainConfig

config = TrainConfig(
    out_dir="out/slimpajama",
    seed=1337,
    max_steps=20000,  # ~10.5B tokens
    dtype="auto",  # bf16 autocast on CUDA
    compile=True,
    model=replace(LLAMA_CONFIGS["llama-1b"], vocab_size=50304, max_seq_len=2048),
    data=DataConfig(corpus=os.environ.get("SLIMPAJAMA_DIR", "data/SlimPajama-627B/train"),
                    files="example_train_*.jsonl.zst", val_fraction=0.0005, text_key="text",
                    prepare_workers=os.cpu_count() or 2, seq_len=2048, batch_size=8, grad_accum=32),
    optim=OptimConfig(lr=3e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0),
    schedule=ScheduleConfig(name="cosine", warmup_steps=2000, min_lr_ratio=0.1),
    eval=EvalConfig(interval=1000, batches=50),
    log=LogConfig(interval=10),
    ckpt=CkptConfig(interval=1000, keep_last=3),
)
