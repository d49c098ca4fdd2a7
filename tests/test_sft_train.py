"""Supervised fine-tuning end to end through train.py: configs/debug_sft.py learns, epochs set the step count from the
packing plan, resume mid-epoch is bit-identical, 2 gloo ranks train as 1 process on the same packed global batches, a
chat template's missing tokens grow a Llama-2-vocabulary model that exports to transformers with the same logits and
chat ids, and (slow) the real SmolLM2-135M-Instruct lowers its held-out loss on GSM-format data and still chats.

Tolerances: 2 ranks vs 1 process 1e-5 absolute on the per-step losses (the sums of the step over ranks in another
order: measured ~1e-7); the export 1e-5 on logits (fp32, the same weights).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import merge
import train
from data.packing import PackedLoader
from data.sft import SFTShards
from model import build_model
from model.hf import save_pretrained
from training import checkpoint
from training.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def run(out_dir, *args, config="configs/debug_sft.py") -> dict:
    return train.main([config, f"--out_dir={out_dir}", "--log.interval=1", *args])


def records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out_dir) if "loss" in r}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    result = train.main(["configs/debug_sft.py", f"--out_dir={out}", "--log.interval=1", "--max_steps=30",
                         "--eval.interval=10", "--eval.batches=0"])
    return out, result


def test_debug_sft_learns_and_evaluates_on_learnable_tokens(sft_run):
    out, result = sft_run
    curve = losses(out)
    assert sorted(curve) == list(range(1, 31))
    assert sum(curve[s] for s in range(26, 31)) / 5 < curve[1] - 2.0, curve
    evals = [r for r in records(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert 0 < evals[-1]["val_token_acc"] < 1 and evals[-1]["val_tokens"] > 0
    # the held-out split is scored on the assistant tokens only: fewer than all its tokens
    val = SFTShards(_shard_dir(out), "val")
    assert evals[-1]["val_tokens"] == val.n_learnable < int(val.lengths.sum())
    rec = next(r for r in records(out) if "loss" in r)
    assert rec["learnable_tokens_per_s"] > 0 and rec["tokens_per_s"] >= rec["learnable_tokens_per_s"]


def test_eval_script_scores_the_sft_split_as_training_did(sft_run, capsys):
    import eval as eval_script

    out, result = sft_run
    r = eval_script.main(["--ckpt", str(out), "--task", "ppl"])
    assert r["tokens"] == result["val_tokens"]
    assert abs(r["loss"] - result["val_loss"]) <= 1e-5


def _shard_dir(out) -> str:
    return json.loads((Path(out) / "config.json").read_text())["data"]["shard_dir"]


def test_run_keeps_its_tokenizer_with_the_template(sft_run):
    out, _ = sft_run
    cfg = json.loads((out / "config.json").read_text())
    assert Path(cfg["data"]["tokenizer"]) == (out / "tokenizer").resolve()
    config = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]


def test_epochs_set_the_number_of_steps_from_the_packing_plan(tmp_path):
    result = run(tmp_path / "e", "--epochs=2", "--eval.interval=0", "--ckpt.interval=0")
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    loader = PackedLoader(SFTShards(cfg["data"]["shard_dir"], "train"), cfg["data"]["max_tokens"], seed=cfg["seed"])
    assert cfg["max_steps"] == loader.total_steps(2, 1, 1) == result["step"]
    assert sorted(losses(tmp_path / "e")) == list(range(1, cfg["max_steps"] + 1))


def test_resume_mid_epoch_is_bit_identical(tmp_path, monkeypatch):
    args = ["--max_steps=12", "--ckpt.interval=5", "--eval.interval=0"]
    run(tmp_path / "straight", *args)
    real_save = checkpoint.save_checkpoint

    def save_then_die(root, step, *a, **k):
        path = real_save(root, step, *a, **k)
        if step == 5:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", *args)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    run(tmp_path / "resumed", *args)
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [a[s] for s in range(1, 13)] == [b[s] for s in range(1, 13)]  # exact
    state = checkpoint.load_state(checkpoint.resolve(tmp_path / "resumed"))
    assert state["data"]["position"] > 0 and state["tokens"] > 0


def test_two_ranks_train_on_the_same_packed_global_batches_as_one_process(tmp_path):
    cfg = load_config("configs/debug_sft.py")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.to_empty(device="cpu")
    model.init_weights()
    seed = save_pretrained(model, tmp_path / "seed")
    common = ["configs/debug_sft.py", f"--init_from={seed}", "--data.tokenizer=gpt2", "--max_steps=6",
              "--eval.interval=3", "--eval.batches=0", "--ckpt.interval=3", "--log.interval=1",
              "--data.max_tokens=512"]
    train.main([*common, "--data.grad_accum=2", f"--out_dir={tmp_path / 'one'}"])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *common, f"--out_dir={tmp_path / 'two'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= 1e-5, f"per-step losses differ by up to {worst:.2e}"
    va = [r["val_loss"] for r in records(tmp_path / "one") if "val_loss" in r]
    vb = [r["val_loss"] for r in records(tmp_path / "two") if "val_loss" in r]
    assert len(va) == len(vb) == 2 and max(abs(x - y) for x, y in zip(va, vb)) <= 1e-5


# ---------------------------------------------------------------------------------- a template the model lacks

def _chat_file(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
                          {"role": "user", "content": "And times two?"},
                          {"role": "assistant", "content": f"{4 * i}."}]} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chatml_on_a_llama2_vocabulary_grows_trains_and_exports(tmp_path, shared_assets):
    """Llama-2's 32,000-id vocabulary has no <|im_start|> / <|im_end|>: they are added (ids 32000, 32001), the
    embedding and the untied head grow with the new rows at the mean of the old ones, and the export loads in
    transformers with our logits and our chat-template ids."""
    import shutil

    import transformers  # test-only oracle

    hf_config = transformers.LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path / "base")
    shutil.copy(shared_assets / "tokenizers" / "llama2" / "tokenizer.json", tmp_path / "base" / "tokenizer.json")
    data = _chat_file(tmp_path / "chats.jsonl")
    run(tmp_path / "run", f"--init_from={tmp_path / 'base'}", "--data.tokenizer=auto", f"--data.corpus={data}",
        "--data.val_files=", "--data.val_fraction=0.1", "--data.chat_template=chatml", "--max_steps=4",
        "--data.max_tokens=256", "--ckpt.interval=0", "--eval.interval=0")
    tuned, cfg = checkpoint.load_model(tmp_path / "run")
    assert cfg.model.vocab_size == 32002

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").float()
    old = base.model.embed_tokens.weight.detach()
    from model.hf import load_pretrained_weights
    fresh = build_model(cfg.model)
    fresh.to_empty(device="cpu")
    load_pretrained_weights(fresh, tmp_path / "base", grow_vocab=True)
    assert torch.equal(fresh.tok_embeddings.weight[:32000], old)
    assert torch.allclose(fresh.tok_embeddings.weight[32000:], old.mean(0).expand(2, -1))
    assert torch.allclose(fresh.output.weight[32000:], base.lm_head.weight.detach().mean(0).expand(2, -1))

    out = merge.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    theirs = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    from data.tokenizer import load_tokenizer
    ours = load_tokenizer(cfg.data.tokenizer).apply_chat_template(messages).ids
    assert list(theirs) == ours and 32000 in ours and 32001 in ours
    x = torch.tensor([ours])
    with torch.no_grad():
        assert (back(x).logits - tuned(x)).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------- the real model (slow)

@pytest.mark.slow
def test_sft_of_real_smollm2_lowers_held_out_loss_and_still_chats(tmp_path, shared_assets):
    from data.tokenizer import load_tokenizer
    from training.generation import generate

    # CPU-sized: 16 steps of 512 tokens (about 6 s each on 2 cores) and held-out loss on 4 micro-batches (8 steps
    # were too few: measured 1.168 -> 1.196); the README quotes a longer run of the same config
    train.main(["configs/sft_smollm2_gsm.py", f"--out_dir={tmp_path / 'sft'}", "--epochs=0", "--max_steps=16",
                "--data.max_tokens=512", "--optim.lr=1e-4", "--eval.interval=0", "--eval.at_start=true",
                "--eval.batches=4", "--log.interval=4"])
    evals = [r for r in records(tmp_path / "sft") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 16]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.05, evals
    model, cfg = checkpoint.load_model(tmp_path / "sft")
    tok = load_tokenizer(cfg.data.tokenizer)
    enc = tok.apply_chat_template([{"role": "user", "content": "Sam has 3 apples and buys 4 more. How many "
                                                               "apples does Sam have?"}], add_generation_prompt=True)
    new = generate(model, [enc.ids], 96, stop_ids=tok.stop_ids)[0]
    reply = tok.decode(new, skip_special=True)
    assert len(reply.split()) >= 3 and "apples" in reply.lower(), reply  # it still answers the question asked


def test_a_budget_smaller_than_the_longest_sample_stops_before_training(tmp_path):
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "x", "--data.max_tokens=64")
    assert "more than the budget of max_tokens=64" in str(e.value) and "data.too_long=truncate" in str(e.value)
    assert not (tmp_path / "x" / "ckpt").exists()


def test_gpt_oss_recipe_config_runs_at_the_debug_size(tmp_path):
    """configs/sft_gpt_oss.py's shape (Harmony template, sinks + window, experts) at a CPU-sized budget."""
    result = run(tmp_path / "g", "--data.max_tokens=1024", "--epochs=0", "--max_steps=2", "--eval.batches=1",
                 config="configs/sft_gpt_oss.py")
    assert result["step"] == 2 and result["val_tokens"] > 0
    from training.generation import load_for_inference

    _, tok = load_for_inference(str(tmp_path / "g"), torch.device("cpu"), "fp32")  # generate.py --chat's path
    enc = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert tok.decode(enc.ids).endswith("<|start|>assistant")  # Harmony, the template it was trained in
