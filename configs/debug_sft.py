"""A tiny Llama fine-tuned on the committed GSM-format sample with ChatML: supervised fine-tuning in seconds on a CPU.
Used by the tests and for quick checks of the SFT path (chat data, assistant-only labels, packing, epochs).

    python train.py configs/debug_sft.py

The gpt2 tokenizer has no chat template: data.chat_template="chatml" attaches one and adds <|im_start|> and
<|im_end|> as special tokens (ids 50257 and 50258, inside the model's 50304 rows, so nothing grows here).
"""

from model.llama import LlamaConfig
from training.config import CkptConfig, DataConfig, EvalConfig, LogConfig, OptimConfig, ScheduleConfig, TrainConfig

config = TrainConfig(
    out_dir="out/debug_sft",
    seed=1337,
    max_steps=20,
    model=LlamaConfig(vocab_size=50304, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=512,
                      attn_backend="sdpa"),
    data=DataConfig(kind="sft", corpus="data/samples/gsm_sample.jsonl", val_files="data/samples/gsm_sample_val.jsonl",
                    tokenizer="gpt2", chat_template="chatml", max_tokens=1024),
    optim=OptimConfig(lr=3e-3, weight_decay=0.1),
    schedule=ScheduleConfig(name="cosine", warmup_steps=4),
    eval=EvalConfig(interval=10, batches=4),
    log=LogConfig(interval=5),
    ckpt=CkptConfig(interval=10, keep_last=2),
)
