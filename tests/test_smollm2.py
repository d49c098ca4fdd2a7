"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from ../shared/assets, converted once per session) end to end:
perplexity against transformers on the same converted weights, a greedy chat answer, eval.py and generate.py
on the HF directory and on the GGUF file itself.
"""

import math

import pytest
import torch
import transformers  # test-only oracle

import eval as eval_script
import generate as generate_script
from data.tokenizer import load_tokenizer
from model.hf import from_pretrained
from training.generation import generate

# Sonnet 18 (public domain): a fixed passage for the perplexity comparison
PASSAGE = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""


@pytest.fixture(scope="module")
def smollm2(smollm2_hf_dir):
    return from_pretrained(smollm2_hf_dir), load_tokenizer(smollm2_hf_dir)


def test_perplexity_equals_transformers(smollm2, smollm2_hf_dir):
    model, tok = smollm2
    ids = tok.encode(PASSAGE)
    assert ids == transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)(PASSAGE)["input_ids"]
    x = torch.tensor([ids])  # (1, T)
    labels = torch.full_like(x, -100)
    labels[:, :-1] = x[:, 1:]
    with torch.no_grad():
        out = model(x, labels=labels)
        ours = math.exp((out.loss_sum / out.n_tokens).item())
        hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
        theirs = math.exp(hf(x, labels=x).loss.item())
    assert abs(ours - theirs) <= 1e-4 * theirs
    assert 5 < ours < 60  # a real model on Shakespeare: far better than chance (vocab 49152)


def test_greedy_chat_answer(smollm2):
    model, tok = smollm2
    enc = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True)
    assert tok.decode(enc.ids).endswith("<|im_start|>assistant\n")
    new = generate(model, [enc.ids], max_new_tokens=40, stop_ids=tok.stop_ids)
    answer = tok.decode(new[0])
    assert "5" in answer and new[0][-1] in tok.stop_ids, answer


def test_scripts_on_the_gguf_file_and_the_hf_dir(smollm2_gguf, smollm2_hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOFORGE_CACHE", str(tmp_path / "cache"))  # the GGUF is converted once into here
    replies = generate_script.main(["--ckpt", str(smollm2_gguf), "--chat", "--prompt", "What is 2+3?",
                                    "--temperature", "0", "--max_new_tokens", "40"])
    assert "5" in replies[0]
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1
    text = tmp_path / "sonnet.txt"
    text.write_text(PASSAGE * 4)
    r = eval_script.main(["--ckpt", str(smollm2_hf_dir), "--data", str(text), "--seq_len", "128"])
    assert r["tokens"] >= 3 * 127 and r["ppl"] < 60
