"""model/hf.py and generate.py: HF directories in and out, the KV cache, batched generation against transformers.

Oracles: transformers' LlamaForCausalLM / Qwen2ForCausalLM (tiny random configs, fp32) for logits after an export
round trip and for greedy generate(); our own model without a cache for every cached / padded forward.
"""

import json

import pytest
import torch
import transformers  # test-only oracle
from safetensors.torch import load_file, save_file

from model import LLAMA_CONFIGS, build_model
from model.hf import check_tokenizer_fits, config_from_pretrained, from_pretrained, save_pretrained
from model.weights import WeightMismatchError
from training.generation import filter_logits, generate

VOCAB = 96
LOGITS_ATOL = 1e-5


def tiny_hf(family: str = "llama", tied: bool = True, seed: int = 0, **extra):
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                  attn_implementation="eager", **extra)
    config = (transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config)(**kwargs)
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def ids(seed: int, shape=(2, 13)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


class FakeTokenizer:
    """Just what save_pretrained and check_tokenizer_fits read (the real back ends are tested in test_tokenizer)."""

    def __init__(self, vocab_size: int):
        self.name, self.vocab_size, self.bos_id, self.eos_id, self.pad_id, self.stop_ids = "fake", vocab_size, 1, 2, None, [2, 3]

    def save_pretrained(self, out_dir):
        (out_dir / "tokenizer_config.json").write_text("{}")


@pytest.mark.parametrize("family,tied", [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)])
def test_export_round_trip_through_transformers(family, tied, tmp_path):
    hf = tiny_hf(family, tied, rope_parameters={"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0})
    hf.save_pretrained(tmp_path / "in")
    ours = from_pretrained(tmp_path / "in")
    x = ids(0)
    expected = hf(x).logits
    assert (ours(x) - expected).abs().max().item() <= LOGITS_ATOL

    save_pretrained(ours, tmp_path / "out", tokenizer=FakeTokenizer(VOCAB))
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == [".nanoforge.json", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer_config.json"]  # the marker says the directory is an export of ours
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert ("lm_head.weight" in saved) == (not tied)  # a tied head is stored once, as the embedding
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    assert type(back) is type(hf) and back.config.tie_word_embeddings == tied
    assert (back(x).logits - expected).abs().max().item() <= LOGITS_ATOL
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": [2, 3]}


def test_export_of_a_model_trained_from_scratch_loads_in_transformers(tmp_path):
    config = LLAMA_CONFIGS["debug"]
    model = build_model(config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    model.eval()
    save_pretrained(model, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    x = torch.randint(0, config.vocab_size, (2, 9))
    assert (back(x).logits - model(x)).abs().max().item() <= LOGITS_ATOL


def test_sharded_export_and_load(tmp_path):
    hf = tiny_hf("qwen2", tied=False)
    hf.save_pretrained(tmp_path / "in")
    ours = from_pretrained(tmp_path / "in")
    save_pretrained(ours, tmp_path / "out", max_shard_bytes=60_000)  # a few tensors per shard
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == set(shards)
    assert not (out / "model.safetensors").exists()
    x = ids(1)
    again = from_pretrained(out)
    assert torch.equal(again(x), ours(x))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert (back(x).logits - hf(x).logits).abs().max().item() <= LOGITS_ATOL


def test_load_in_bf16_and_overrides(tmp_path):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32
    exact = hf(ids(0)).logits
    ours_error = (model(ids(0)).float() - exact).norm() / exact.norm()
    hf_error = (hf.to(torch.bfloat16)(ids(0)).logits.float() - exact).norm() / exact.norm()
    assert ours_error.item() <= 1.5 * hf_error.item()  # bf16 costs us no more accuracy than it costs transformers

    longer = from_pretrained(tmp_path, rope_theta=40000.0, max_seq_len=256)
    assert longer.config.rope_theta == 40000.0 and longer.config.max_seq_len == 256
    assert torch.allclose(longer.inv_freq[1], torch.tensor(40000.0 ** (-2 / 16)))
    with pytest.raises(ValueError, match="n_layers.*change tensor shapes"):
        config_from_pretrained(tmp_path, n_layers=3)


def test_bad_model_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path / "empty")

    hf = tiny_hf()
    hf.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    with pytest.raises(ValueError, match="'gpt2' is not supported; supported: gemma2, gpt_oss, granitemoe, llama, qwen2"):
        from_pretrained(tmp_path / "m")

    # safetensors whose shapes disagree with config.json: every bad tensor named, nothing loaded
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(config, intermediate_size=128)))
    with pytest.raises(WeightMismatchError) as e:
        from_pretrained(tmp_path / "m")
    assert "mis-shaped (6)" in str(e.value) and "layers.1.mlp.w_down.weight: checkpoint [64, 112] vs model [64, 128]" in str(e.value)

    # a missing tensor and an unexpected one
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = tensors.pop("model.norm.weight")
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(WeightMismatchError, match=r"(?s)missing.*norm\.weight.*unexpected.*model\.layers\.0\.extra"):
        from_pretrained(tmp_path / "m")

    # pickled weights only: refused, with the way out
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin: pickled weights are never loaded"):
        from_pretrained(tmp_path / "m")


def test_tokenizer_larger_than_the_embedding_is_an_error():
    with pytest.raises(ValueError, match="has 50257 ids but the model has only 96 embedding rows"):
        check_tokenizer_fits(FakeTokenizer(50257), config_from_pretrained_dict())


def config_from_pretrained_dict():
    config = LLAMA_CONFIGS["debug"]
    return type(config)(**{**config.__dict__, "vocab_size": VOCAB})


# ------------------------------------------------------------------ KV cache and padding


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_kv_cache_matches_full_forward(backend, tmp_path):
    tiny_hf().save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, attn_backend=backend)
    x = ids(2, (3, 17))
    full = model(x)
    cache = model.new_cache(3, 20)
    pieces = [model(x[:, a:b], cache=cache) for a, b in [(0, 9), (9, 10), (10, 14), (14, 15), (15, 17)]]
    assert cache.length == 17
    assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_left_padding_gives_each_row_its_unpadded_logits(backend, tmp_path):
    tiny_hf().save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, attn_backend=backend)
    rows = [ids(3, (1, 11))[0], ids(4, (1, 4))[0], ids(5, (1, 1))[0]]
    T = 11
    x = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, r in enumerate(rows):
        x[b, T - len(r):], mask[b, T - len(r):] = r, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = model(x, position_ids=positions, attention_mask=mask)
    assert torch.isfinite(padded).all()  # padded queries see themselves: no 0/0 rows
    for b, r in enumerate(rows):
        alone = model(r[None])
        assert (padded[b, T - len(r):] - alone[0]).abs().max().item() <= 1e-5


# ------------------------------------------------------------------ generation


def test_greedy_batched_generation_equals_transformers(tmp_path):
    hf = tiny_hf(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    prompts = [ids(6, (1, 9))[0].tolist(), ids(7, (1, 3))[0].tolist(), ids(8, (1, 6))[0].tolist()]
    new = generate(ours, prompts, max_new_tokens=12, temperature=0.0)

    x = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for b, p in enumerate(prompts):
        x[b, 9 - len(p):], mask[b, 9 - len(p):] = torch.tensor(p), 1
    theirs = hf.generate(x, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    for b in range(3):
        assert new[b] == theirs[b, 9:].tolist()
        assert new[b] == generate(ours, [prompts[b]], max_new_tokens=12)[0]  # batching changes nothing


def test_generation_stops_and_limits(tmp_path):
    tiny_hf().save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    prompt = ids(9, (1, 5))[0].tolist()
    free = generate(model, [prompt], max_new_tokens=10)[0]
    assert len(free) == 10
    stop = free[3]
    stopped = generate(model, [prompt, prompt], max_new_tokens=10, stop_ids=[stop])
    assert stopped[0] == free[:free.index(stop) + 1] == stopped[1]
    # context: 64 positions; a 60-token prompt gets 4 new tokens, a 64-token prompt is refused
    assert len(generate(model, [ids(10, (1, 60))[0].tolist()], max_new_tokens=10)[0]) == 4
    with pytest.raises(ValueError, match="prompt of 64 tokens does not fit the model's context of 64"):
        generate(model, [ids(11, (1, 64))[0].tolist()], max_new_tokens=1)

    class Chars:  # decode ids as letters, to test stop strings
        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    target = Chars().decode(free[2:4])
    out = generate(model, [prompt], max_new_tokens=10, stop_strings=[target], tokenizer=Chars())[0]
    assert out == free[:4]


def test_sampling_is_seeded_and_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(filter_logits(logits, 1.0, 2, 1.0)[0, 2:]).all()
    p = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...: the nucleus of 0.8 is the first two tokens
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.8))[0].tolist()
    assert kept == [True, True, False, False, False] and p[0] < 0.8 < p[0] + p[1]
    assert torch.isfinite(filter_logits(logits, 1.0, 0, 0.01))[0].tolist() == [True, False, False, False, False]


def test_sampled_generation_is_reproducible(tmp_path):
    tiny_hf().save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    prompt = [ids(12, (1, 4))[0].tolist()]
    a = generate(model, prompt, 8, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert a == generate(model, prompt, 8, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert a != generate(model, prompt, 8, temperature=1.0, top_k=20, top_p=0.9, seed=4)


def test_float16_overflow_is_detected(tmp_path):
    tiny_hf().save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.float16)
    with torch.no_grad():
        model.norm.weight.fill_(3e4)  # final hidden states beyond what fp16 logits can hold
    with pytest.raises(FloatingPointError, match="load it in bfloat16 or float32"):
        generate(model, [[1, 2, 3]], max_new_tokens=2)
