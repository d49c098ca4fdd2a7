"""llama.cpp GGUF files in: dequantise, undo llama.cpp's q/k row permutation, rebuild the HF config and tokenizer.

    gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "hf/smollm2")   # config.json, model.safetensors, tokenizer.json, ...

    gguf = open_gguf(path)                              # or load without writing files:
    config = gguf_config(gguf)                          # an HF config.json dict (model.llama.config_from_hf reads it)
    for hf_name, tensor in load_gguf_state_dict(gguf, torch.bfloat16):
        ...                                             # one tensor dequantised at a time

A GGUF file (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is a header of typed key/value metadata
(`llama.block_count`, `tokenizer.ggml.tokens`, ...), a table of tensors and their data. The PyPI `gguf` package
(llama.cpp's own reader) parses the container; the dequantisers below are ours. ggml writes a tensor's dimensions
fastest-moving first (ne0 = the input features of a weight), so torch's shape is the reverse, and quantisation
blocks run along each row. Only the `llama` architecture is read (Llama 1/2/3 layouts, SmolLM, and their fine-tunes);
its tokenizer must be byte-level BPE (`tokenizer.ggml.model == "gpt2"`).
"""

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.constants import GGUFEndian
from torch import Tensor

from model.files import check_output_dir, output_dir
from model.weights import DTYPES, HF_MODEL_KIND, check_tensors, key_mapper, write_safetensors

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor names (llama.cpp's `LLM_ARCH_LLAMA` names) -> Hugging Face LlamaForCausalLM names. "{i}" stands for a
# layer index. The q/k weights also need their rows un-permuted (see unpermute_qk); everything else is a rename.
GGUF_KEY_MAP: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the output head is tied to the embedding
}


# ---------------------------------------------------------------------------------------------------------------------
# Dequantisation. Each function takes the raw bytes of n blocks as a (n, block_bytes) uint8 tensor and returns their
# values as (n, block_elems) float32, computed in fp32 in the order ggml does (scale products first), so results are
# bit-identical to ggml's reference. Every multi-byte field is little-endian; "fp16" is IEEE half precision.
# ---------------------------------------------------------------------------------------------------------------------

def _fp16(blocks: Tensor, offset: int) -> Tensor:
    """The fp16 field at byte `offset` of every block, as (n, 1) float32."""
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: Tensor) -> Tensor:
    """(..., k) bytes -> (..., 2k): the k low nibbles, then the k high nibbles (ggml's order inside a block)."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _bits(packed: Tensor, n_bits: int) -> Tensor:
    """(n, k) bytes -> (n, n_bits) of 0/1: bit j of a little-endian bit field is bit j % 8 of byte j // 8."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed[:, :, None] >> shifts) & 1).reshape(packed.shape[0], -1)[:, :n_bits]


def _k_scales(packed: Tensor) -> tuple[Tensor, Tensor]:
    """The 12-byte field of Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins, one pair per 32-value sub-block.

        bytes 0-3:  scale[j] in bits 0-5, bits 4-5 of scale[j+4] in bits 6-7        (j = 0..3)
        bytes 4-7:  min[j]   in bits 0-5, bits 4-5 of min[j+4]   in bits 6-7
        bytes 8-11: bits 0-3 of scale[j+4] in the low nibble, of min[j+4] in the high nibble
    """
    lo_sc, lo_min, hi = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([lo_sc & 63, (hi & 0x0F) | ((lo_sc >> 6) << 4)], dim=1)  # (n, 8)
    mins = torch.cat([lo_min & 63, (hi >> 4) | ((lo_min >> 6) << 4)], dim=1)  # (n, 8)
    return scales.float(), mins.float()


def dequantize_q8_0(blocks: Tensor) -> Tensor:
    """Q8_0, 32 values in 34 bytes: d (fp16) | q[32] (int8).  x = d * q."""
    q = blocks[:, 2:34].contiguous().view(torch.int8).float()  # (n, 32)
    return q * _fp16(blocks, 0)


def dequantize_q4_0(blocks: Tensor) -> Tensor:
    """Q4_0, 32 values in 18 bytes: d (fp16) | qs[16], value j in the low nibble of qs[j], value j+16 in the high
    nibble.  x = d * (q - 8)."""
    q = _nibbles(blocks[:, 2:18]).float() - 8  # (n, 32)
    return _fp16(blocks, 0) * q


def dequantize_q4_1(blocks: Tensor) -> Tensor:
    """Q4_1, 32 values in 20 bytes: d (fp16) | m (fp16) | qs[16] (nibbles as in Q4_0).  x = d * q + m."""
    q = _nibbles(blocks[:, 4:20]).float()  # (n, 32)
    return _fp16(blocks, 0) * q + _fp16(blocks, 2)


def dequantize_q5_0(blocks: Tensor) -> Tensor:
    """Q5_0, 32 values in 22 bytes: d (fp16) | qh (32 bits: bit j = 5th bit of value j) | qs[16] (low 4 bits, nibbles
    as in Q4_0).  x = d * (q - 16)."""
    q = _nibbles(blocks[:, 6:22]) | (_bits(blocks[:, 2:6], 32) << 4)  # (n, 32) in 0..31
    return _fp16(blocks, 0) * (q.float() - 16)


def dequantize_q5_1(blocks: Tensor) -> Tensor:
    """Q5_1, 32 values in 24 bytes: d (fp16) | m (fp16) | qh (32 bits) | qs[16], bits as in Q5_0.  x = d * q + m."""
    q = _nibbles(blocks[:, 8:24]) | (_bits(blocks[:, 4:8], 32) << 4)  # (n, 32) in 0..31
    return _fp16(blocks, 0) * q.float() + _fp16(blocks, 2)


def dequantize_q4_k(blocks: Tensor) -> Tensor:
    """Q4_K, 256 values (8 sub-blocks of 32) in 144 bytes: d (fp16) | dmin (fp16) | 6-bit scales and mins (12 bytes,
    see _k_scales) | qs[128]. qs is 4 chunks of 32 bytes; chunk c holds sub-block 2c in its low nibbles and sub-block
    2c+1 in its high nibbles.  x = (d * scale[s]) * q - (dmin * min[s]) for sub-block s."""
    n = blocks.shape[0]
    scales, mins = _k_scales(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return ((_fp16(blocks, 0) * scales)[:, :, None] * q - (_fp16(blocks, 2) * mins)[:, :, None]).reshape(n, 256)


def dequantize_q5_k(blocks: Tensor) -> Tensor:
    """Q5_K, 256 values in 176 bytes: d (fp16) | dmin (fp16) | scales and mins (12 bytes, as Q4_K) | qh[32] | qs[128].
    The low 4 bits come from qs as in Q4_K; the 5th bit of value l of sub-block s is bit s of qh[l].
    x = (d * scale[s]) * q - (dmin * min[s])."""
    n = blocks.shape[0]
    scales, mins = _k_scales(blocks[:, 4:16])
    low = _nibbles(blocks[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = (blocks[:, 16:48, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # (n, 32 [l], 8 [s])
    q = (low | (high.transpose(1, 2) << 4)).float()  # (n, 8, 32)
    return ((_fp16(blocks, 0) * scales)[:, :, None] * q - (_fp16(blocks, 2) * mins)[:, :, None]).reshape(n, 256)


def dequantize_q6_k(blocks: Tensor) -> Tensor:
    """Q6_K, 256 values in 210 bytes: ql[128] (low 4 bits) | qh[64] (high 2 bits) | scales[16] (int8, one per 16
    values) | d (fp16). Two halves of 128 values, each from 64 bytes of ql and 32 of qh: value 32g + l of a half
    (g = 0..3, l = 0..31) takes its low bits from nibble g // 2 of ql[l + 32 * (g % 2)] and its high bits from bits
    2g, 2g+1 of qh[l].  x = (d * scale[k]) * (q - 32) for the k-th run of 16 values."""
    n = blocks.shape[0]
    low = _nibbles(blocks[:, 0:128].reshape(n, 2, 64))  # (n, 2 halves, 128): g = 0, 1 low nibbles; g = 2, 3 high
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]) & 3
    q = (low | (high.reshape(n, 2, 128) << 4)).float() - 32  # (n, 2, 128)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16)
    d = _fp16(blocks, 208) * scales  # (n, 16)
    return (d[:, :, None] * q.reshape(n, 16, 16)).reshape(n, 256)


# ggml type -> (values per block, bytes per block, dequantiser)
DEQUANTIZERS: dict[QT, tuple[int, int, Callable[[Tensor], Tensor]]] = {
    QT.Q8_0: (32, 34, dequantize_q8_0),
    QT.Q4_0: (32, 18, dequantize_q4_0),
    QT.Q4_1: (32, 20, dequantize_q4_1),
    QT.Q5_0: (32, 22, dequantize_q5_0),
    QT.Q5_1: (32, 24, dequantize_q5_1),
    QT.Q4_K: (256, 144, dequantize_q4_k),
    QT.Q5_K: (256, 176, dequantize_q5_k),
    QT.Q6_K: (256, 210, dequantize_q6_k),
}
FLOAT_TYPES: dict[QT, torch.dtype] = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
SUPPORTED_TYPES = tuple(t.name for t in (*FLOAT_TYPES, *DEQUANTIZERS))


def _check_type(ggml_type: int, what: str) -> QT:
    try:
        qtype = QT(ggml_type)
    except ValueError:
        qtype = None
    if qtype not in FLOAT_TYPES and qtype not in DEQUANTIZERS:
        name = qtype.name if qtype is not None else f"unknown type id {ggml_type}"
        raise ValueError(f"{what} is stored as {name}, which nanoforge cannot dequantise "
                         f"(supported: {', '.join(SUPPORTED_TYPES)})")
    return qtype


def dequantize(raw: Tensor, ggml_type: int, shape: tuple[int, ...]) -> Tensor:
    """Raw little-endian bytes (flat uint8) of one tensor of a ggml type -> its values as float32, in torch `shape`
    (ggml's dimensions reversed, so blocks run along the last dimension). Float types are reinterpreted, exactly."""
    qtype = _check_type(ggml_type, "a tensor")
    if qtype in FLOAT_TYPES:
        return raw.view(FLOAT_TYPES[qtype]).reshape(shape).float()
    block_elems, block_bytes, fn = DEQUANTIZERS[qtype]
    if shape[-1] % block_elems != 0:
        raise ValueError(f"a {qtype.name} tensor's rows must hold whole blocks of {block_elems}; shape {shape}")
    return fn(raw.reshape(-1, block_bytes)).reshape(shape)


def unpermute_qk(weight: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's permutation of q_proj / k_proj rows (n_heads = query heads for q, key/value heads for k).

    Within a head of h = head_dim output rows, HF's rotate-half RoPE rotates the pairs (i, i + h/2), i < h/2;
    llama.cpp's rope rotates adjacent pairs (2i, 2i + 1). Its converter therefore stores HF row j * h/2 + i of each
    head at row 2i + j (j = 0, 1), i.e. views the rows as (n_heads, 2, h/2) and swaps the last two axes. The inverse,
    done here, views the GGUF rows as (n_heads, h/2, 2) and swaps them back:

        hf[head, j * h/2 + i, :] = gguf[head, 2i + j, :]

    Both layouts give identical attention scores: the pairs rotated together are the same rows, only renumbered.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    w = weight.reshape(n_heads, head_dim // 2, 2, in_features)  # (heads, i, j, in): GGUF row 2i + j
    return w.transpose(1, 2).reshape(out_features, in_features)  # (heads, j, i, in): HF row j * h/2 + i


# ---------------------------------------------------------------------------------------------------------------------
# Reading a file
# ---------------------------------------------------------------------------------------------------------------------

def open_gguf(path: str | Path) -> GGUFReader:
    """Parse a GGUF file's header (tensor data stays memory-mapped); raise ValueError unless it is a little-endian
    GGUF of a supported architecture."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    reader = GGUFReader(path)
    if reader.endianess != GGUFEndian.LITTLE:
        raise ValueError(f"{path} is a big-endian GGUF; only little-endian files are supported")
    arch = _meta(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    return reader


def _reader(source: "str | Path | GGUFReader") -> GGUFReader:
    return source if isinstance(source, GGUFReader) else open_gguf(source)


_MISSING = object()


def _meta(reader: GGUFReader, key: str, default=_MISSING):
    """One metadata value (int, float, bool, str or list), or default; KeyError naming the key if absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise KeyError(f"{reader.data.filename}: GGUF metadata has no {key!r}")
        return default
    return field.contents()


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-5, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def gguf_config(source: "str | Path | GGUFReader", dtype: torch.dtype = torch.float32) -> dict:
    """The Hugging Face config.json dict (LlamaForCausalLM) described by the file's `llama.*` metadata."""
    r = _reader(source)
    a = _meta(r, "general.architecture")
    dim, n_heads = _meta(r, f"{a}.embedding_length"), _meta(r, f"{a}.attention.head_count")
    head_dim = _meta(r, f"{a}.attention.key_length", dim // n_heads)
    rope_dim = _meta(r, f"{a}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"{a}.rope.dimension_count = {rope_dim} != head_dim {head_dim}: partial rotary embeddings "
                         f"are not supported")
    tensors = {t.name: t for t in r.tensors}
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise ValueError(f"{r.data.filename} has no token_embd.weight tensor")
    rope_scaling = None
    kind = _meta(r, f"{a}.rope.scaling.type", "none")
    if kind == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _f32(_meta(r, f"{a}.rope.scaling.factor"))}
    elif kind != "none":
        raise ValueError(f"{a}.rope.scaling.type {kind!r} is not supported (supported: none, linear)")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(embedding.shape[1]),  # ggml shape (dim, vocab)
        "hidden_size": dim,
        "intermediate_size": _meta(r, f"{a}.feed_forward_length"),
        "num_hidden_layers": _meta(r, f"{a}.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": _meta(r, f"{a}.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": _meta(r, f"{a}.context_length", 2048),
        "rms_norm_eps": _f32(_meta(r, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(_meta(r, f"{a}.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        token_id = _meta(r, f"tokenizer.ggml.{gguf_key}", None)
        if token_id is not None:
            config[hf_key] = token_id
    return config


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor a LlamaForCausalLM of this config holds."""
    dim, ffn, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], dim), "model.norm.weight": (dim,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], dim)
    per_layer = {"input_layernorm.weight": (dim,), "self_attn.q_proj.weight": (q, dim),
                 "self_attn.k_proj.weight": (kv, dim), "self_attn.v_proj.weight": (kv, dim),
                 "self_attn.o_proj.weight": (dim, q), "post_attention_layernorm.weight": (dim,),
                 "mlp.gate_proj.weight": (ffn, dim), "mlp.up_proj.weight": (ffn, dim),
                 "mlp.down_proj.weight": (dim, ffn)}
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


@dataclass
class _PlannedTensor:
    hf_name: str
    shape: tuple[int, ...]  # torch order
    ggml_type: QT
    offset: int  # of its bytes in the file
    n_bytes: int
    unpermute_heads: int | None  # q_proj: n_heads, k_proj: n_kv_heads, else None


def _plan(r: GGUFReader, config: dict) -> list[_PlannedTensor]:
    """Every tensor's HF name, shape and type, checked against the config before anything is dequantised."""
    rename = key_mapper(GGUF_KEY_MAP)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    plan, unknown = [], []
    for t in r.tensors:
        hf_name = rename(t.name)
        if hf_name == t.name:  # the map does not know it, e.g. llama-3.1's rope_freqs.weight
            unknown.append(t.name)
            continue
        proj = hf_name.split(".")[-2]
        plan.append(_PlannedTensor(hf_name, tuple(int(d) for d in reversed(t.shape)),
                                   _check_type(t.tensor_type, f"tensor {t.name}"), int(t.data_offset),
                                   int(t.n_bytes), heads.get(proj)))
    if unknown:
        raise ValueError(f"{r.data.filename}: GGUF tensors not known to nanoforge's llama map: {', '.join(unknown)}")
    check_tensors(_expected_shapes(config), {p.hf_name: p.shape for p in plan}, str(r.data.filename))
    return plan


def load_gguf_state_dict(source: "str | Path | GGUFReader",
                         dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, Tensor]]:
    """(HF name, tensor) for every weight, dequantised (in fp32, then cast to dtype) and un-permuted one tensor at a
    time from the memory-mapped file, so at most one tensor exists beyond what the caller keeps. Names and shapes are
    checked against the config first (a WeightMismatchError lists any difference)."""
    r = _reader(source)
    plan = _plan(r, gguf_config(r))
    for p in plan:
        raw = torch.from_numpy(np.array(r.data[p.offset:p.offset + p.n_bytes]))  # a copy of this tensor's bytes
        tensor = dequantize(raw, p.ggml_type, p.shape)
        if p.unpermute_heads is not None:
            tensor = unpermute_qk(tensor, p.unpermute_heads)
        yield p.hf_name, tensor.to(dtype)
        del raw, tensor


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer: tokenizer.json (HF `tokenizers` format, byte-level BPE) from tokenizer.ggml.* metadata
# ---------------------------------------------------------------------------------------------------------------------

def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre (llama.cpp's name for how text is split before BPE) -> (HF pre_tokenizer, BPE ignore_merges).
# "default"/"gpt2": GPT-2's regex. "smollm" (also StarCoder, Refact): llama.cpp first isolates every \p{N} character,
# then applies GPT-2's regex; HF writes that as Digits(individual_digits) before ByteLevel. "llama-bpe" (Llama 3):
# its own regex, and whole pieces found in the vocabulary are taken without merging (ignore_merges).
PRE_TOKENIZERS: dict[str, tuple[dict, bool]] = {
    "default": (_byte_level(True), False),
    "gpt2": (_byte_level(True), False),
    "smollm": ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                      _byte_level(True)]}, False),
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        _byte_level(False)]}, True),
}
PRE_TOKENIZERS["starcoder"] = PRE_TOKENIZERS["refact"] = PRE_TOKENIZERS["smollm"]

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4


def gguf_tokenizer(source: "str | Path | GGUFReader") -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) dicts rebuilt from the file's byte-level BPE tokenizer.

    The vocabulary and merges are stored as HF writes them (bytes spelled with GPT-2's byte-to-unicode alphabet), so
    they carry over unchanged. Tokens typed CONTROL become special added tokens (`<|im_start|>`), USER_DEFINED ones
    plain added tokens; both are matched whole before BPE. A file that asks for a BOS token gets a post-processor that
    prepends it.
    """
    r = _reader(source)
    model = _meta(r, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{r.data.filename}: tokenizer.ggml.model {model!r} is not supported (supported: gpt2, "
                         f"byte-level BPE)")
    pre = _meta(r, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{r.data.filename}: tokenizer.ggml.pre {pre!r} is not supported (supported: "
                         f"{', '.join(sorted(PRE_TOKENIZERS))})")
    pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]
    tokens = _meta(r, "tokenizer.ggml.tokens")
    types = _meta(r, "tokenizer.ggml.token_type", [1] * len(tokens))
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a duplicated string keeps its first id
    merges = [merge.split(" ") for merge in _meta(r, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{r.data.filename}: a tokenizer.ggml.merges entry is not two tokens separated by a space")
    added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == _CONTROL}
             for i, token in enumerate(tokens) if types[i] in (_CONTROL, _USER_DEFINED)]

    def token(name: str) -> str | None:
        token_id = _meta(r, f"tokenizer.ggml.{name}_token_id", None)
        return None if token_id is None else tokens[token_id]

    byte_level_post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    bos_id = _meta(r, "tokenizer.ggml.bos_token_id", None)
    add_bos = bool(_meta(r, "tokenizer.ggml.add_bos_token", False))
    post_processor = byte_level_post
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        post_processor = {"type": "Sequence", "processors": [byte_level_post, {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }]}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": bool(_meta(r, "tokenizer.ggml.add_eos_token", False)),
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": _meta(r, f"{_meta(r, 'general.architecture')}.context_length", 2048),
    }
    tokenizer_config = {k: v for k, v in tokenizer_config.items() if v is not None}
    chat_template = _meta(r, "tokenizer.chat_template", None)
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    return tokenizer_json, tokenizer_config


# ---------------------------------------------------------------------------------------------------------------------
# Writing an HF directory
# ---------------------------------------------------------------------------------------------------------------------

def gguf_to_hf(source: "str | Path | GGUFReader", out_dir: str | Path, dtype: torch.dtype = torch.float32,
               overwrite: bool = False, protect: Iterable[str | Path] = ()) -> Path:
    """Convert a GGUF file (a path, or a reader from open_gguf) into a Hugging Face model directory; return its path.

    Writes config.json, generation_config.json, model.safetensors (HF names, weights in `dtype`: fp32 holds every
    dequantised value exactly), tokenizer.json and tokenizer_config.json (with the chat template). The directory is
    assembled in a temp sibling of out_dir and renamed into place (model.files.output_dir), so it appears complete
    or not at all. out_dir must be new or empty, or, with overwrite=True, an earlier HF directory of ours; it may
    not be, contain or lie inside the GGUF file or any `protect` path (OutputError otherwise, nothing changed).
    Peak memory is one tensor.
    """
    if dtype not in DTYPES.values():
        raise ValueError(f"gguf_to_hf: dtype {dtype} not supported (float32, float16, bfloat16)")
    r = _reader(source)
    protect = [*protect, r.data.filename]  # never write over, around or into the file being read
    check_output_dir(out_dir, HF_MODEL_KIND, overwrite, protect)  # refuse before any work
    config = gguf_config(r, dtype)
    plan = _plan(r, config)
    tokenizer_json, tokenizer_config = gguf_tokenizer(r)
    generation_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    with output_dir(out_dir, HF_MODEL_KIND, overwrite, protect) as tmp:
        for name, content in (("config.json", config), ("generation_config.json", generation_config),
                              ("tokenizer_config.json", tokenizer_config), ("tokenizer.json", tokenizer_json)):
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        write_safetensors(tmp / "model.safetensors", {p.hf_name: (p.shape, dtype) for p in plan},
                          load_gguf_state_dict(r, dtype))
    return Path(out_dir)
