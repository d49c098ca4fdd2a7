"""The GPT-OSS reasoning SFT recipe's shape: 16,384-token multipacked micro-batches, lr 2e-4, 50 warm-up steps, cosine,
2 epochs, the Harmony chat template with the assistant's reasoning ("thinking") kept in the last turn.

    torchrun --nproc_per_node=8 train.py configs/sft_gpt_oss.py --init_from=/models/gpt-oss-20b \
        --data.corpus=reasoning.jsonl
    python train.py configs/sft_gpt_oss.py --init_from= --data.max_tokens=1024   # the debug size, on a CPU

Rows are chat `messages` (OpenAI / HF style; an assistant message may carry "thinking"), or any format data/sft.py
reads. With init_from a GPT-OSS Hugging Face directory (MXFP4 experts are dequantised on load), its shape, weights and
tokenizer are used; with init_from="" the debug-size GPT-OSS below trains from scratch on the o200k_harmony tokenizer,
which is how the tests run this config. LoRA on attention and experts is what the recipe trains on 20B/120B; until
it lands, this is full fine-tuning.
"""

from model.gpt_oss import GptOssConfig
from training.config import CkptConfig, DataConfig, EvalConfig, LogConfig, OptimConfig, ScheduleConfig, TrainConfig

config = TrainConfig(
    out_dir="out/sft-gpt-oss",
    seed=1337,
    epochs=2,
    init_from="",  # e.g. /models/gpt-oss-20b
    model=GptOssConfig(vocab_size=201088, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64,
                       n_experts=4, top_k=2, max_seq_len=16384, sliding_window=128),  # GPT-OSS's YaRN
    data=DataConfig(kind="sft", corpus="data/samples/gsm_sample.jsonl", val_files="data/samples/gsm_sample_val.jsonl",
                    tokenizer="o200k_harmony", chat_template="harmony", max_tokens=16384),
    optim=OptimConfig(lr=2e-4, weight_decay=0.0, grad_clip=1.0),
    schedule=ScheduleConfig(name="cosine", warmup_steps=50, min_lr_ratio=0.1),
    eval=EvalConfig(interval=100, batches=0),
    log=LogConfig(interval=5),
    ckpt=CkptConfig(interval=200, keep_last=2),
)
