"""Gemma2, GPT-OSS and GraniteMoE (model/gemma2.py, gpt_oss.py, granite_moe.py) against transformers, a test-only
oracle: loading, export, packed documents, the KV cache, MXFP4 checkpoints, bad input and the published sizes.

Tiny random models: hidden 64, 2-3 layers, 4 query heads of head_dim 16 over 2 kv heads, vocab 96, 4 experts top-2,
and a sliding window of 5 keys so that every sequence (T = 16) is longer than the window. Every parameter is random:
norm weights 1 + 0.1 randn (Gemma2 stores an offset from 1: 0.1 randn), GPT-OSS sinks randn, the rest 0.1 randn.
Gemma2 runs with query_pre_attn_scalar 24 (not head_dim) and softcaps small enough to bend (attention 1, logits 2);
GPT-OSS with YaRN and swiglu_limit 1 (about a tenth of the gate/up values are clamped); GraniteMoE with
multipliers embedding 3, attention 0.2, residual 0.5 and logits_scaling 2, tied and untied.

Tolerances (fp32 throughout):
- logits: max abs diff <= 1e-5 (LOGITS_ATOL), against transformers and between our own code paths (packed vs one
  document at a time, KV-cache decode vs full forward, export then reload in transformers)
- loss: within 1e-5 relative of transformers'; every parameter gradient: max|ours - theirs| / max|theirs| <= 1e-5
- MXFP4: dequantised expert weights exactly equal (torch.equal) to transformers' own dequantisation, in fp32 and
  bf16 (every FP4 value times a power of two is exact in both)
- parameter counts: exactly transformers' counts; the published sizes within 2% (GraniteMoE's "a400m"/"a800m"
  active counts are rounded names: within 10%)

transformers builds nn.Embedding with padding_idx = pad_token_id, which zeroes that row's gradient (a training-time
choice, not part of the architecture; we train every row): the oracle configs set pad_token_id=None.
"""

import dataclasses
import json

import pytest
import torch
import transformers  # test-only oracle (requirements-test.txt)
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from model import GEMMA2_CONFIGS, GPT_OSS_CONFIGS, GRANITE_MOE_CONFIGS, build_model, gemma2, gpt_oss, granite_moe
from model.gemma2 import Gemma2Config
from model.gpt_oss import GptOssConfig
from model.granite_moe import GraniteMoeConfig
from model.hf import from_pretrained, save_pretrained
from model.mxfp4 import quantize
from model.rope import RopeScaling
from model.weights import WeightMismatchError, key_mapper, transform_finder

LOGITS_ATOL = 1e-5
GRAD_RTOL = 1e-5  # max |ours - theirs| / max |theirs|, per tensor
VOCAB, B, T, WINDOW = 96, 2, 16, 5
YARN_HF = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "original_max_position_embeddings": 32,
           "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
COMMON_HF = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=128, pad_token_id=None, attn_implementation="eager")

# transformers >= 5 renames GraniteMoE's expert tensors in memory (conversion_mapping.py) and back on save; our key
# map reads the on-disk names. In-memory name fragment -> on-disk one, to match gradients by name.
GRANITE_ON_DISK = {"block_sparse_moe.experts.gate_up_proj": "block_sparse_moe.input_linear.weight",
                   "block_sparse_moe.experts.down_proj": "block_sparse_moe.output_linear.weight",
                   "block_sparse_moe.router.weight": "block_sparse_moe.router.layer.weight"}


# --------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These tensors are tiny: intra-op threads buy nothing, and on a busy 2-core machine their spin-waits made
    this file ~6x slower (85 s vs 13 s). Restored afterwards for the other test files."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def hf_model(variant: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random transformers model in fp32 with eager attention, configured independently of our code."""
    if variant == "gemma2":
        config = transformers.Gemma2Config(**COMMON_HF, num_hidden_layers=3, head_dim=16, intermediate_size=96,
                                           query_pre_attn_scalar=24, sliding_window=WINDOW,
                                           attn_logit_softcapping=1.0, final_logit_softcapping=2.0,
                                           rope_parameters={"rope_type": "default", "rope_theta": 20000.0})
        cls = transformers.Gemma2ForCausalLM
    elif variant == "gpt_oss":
        config = transformers.GptOssConfig(**COMMON_HF, num_hidden_layers=3, head_dim=16, intermediate_size=64,
                                           num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                                           swiglu_limit=1.0, rope_parameters=dict(YARN_HF))
        cls = transformers.GptOssForCausalLM
    else:  # granite-tied, granite-untied
        config = transformers.GraniteMoeConfig(**COMMON_HF, num_hidden_layers=2, intermediate_size=48,
                                               num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=3.0,
                                               attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=2.0,
                                               tie_word_embeddings=variant == "granite-tied")
        cls = transformers.GraniteMoeForCausalLM
    torch.manual_seed(seed)
    model = cls(config).float()
    randomise_(model, norm_center=0.0 if variant == "gemma2" else 1.0)
    return model


def randomise_(model: torch.nn.Module, norm_center: float) -> None:
    """Every parameter random: norms norm_center + 0.1 randn, sinks randn, everything else 0.1 randn."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn_like(p))
            elif "norm" in name:
                p.copy_(norm_center + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))


# Our own tiny configs (for the tests that need no oracle), the same shapes as hf_model's
OURS = {
    "gemma2": Gemma2Config(vocab_size=VOCAB, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                           max_seq_len=128, rope_theta=20000.0, query_pre_attn_scalar=24, sliding_window=WINDOW,
                           attn_softcap=1.0, final_softcap=2.0),
    "gpt_oss": GptOssConfig(vocab_size=VOCAB, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64,
                            n_experts=4, top_k=2, max_seq_len=128, sliding_window=WINDOW, swiglu_limit=1.0,
                            rope_scaling=RopeScaling("yarn", factor=4.0, original_max_seq_len=32, truncate=False)),
    "granite-tied": GraniteMoeConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                     n_experts=4, top_k=2, max_seq_len=128, rope_theta=20000.0,
                                     embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.5,
                                     logits_scaling=2.0, tie_embeddings=True),
}
OURS["granite-untied"] = dataclasses.replace(OURS["granite-tied"], tie_embeddings=False)
MODULE = {"gemma2": gemma2, "gpt_oss": gpt_oss, "granite-tied": granite_moe, "granite-untied": granite_moe}
# attention backends each family can run: softcap (Gemma2) and sinks (GPT-OSS) rule out sdpa
BACKEND_CASES = [("gemma2", "eager"), ("gpt_oss", "eager"), ("granite-tied", "eager"), ("granite-tied", "sdpa"),
                 ("granite-untied", "eager"), ("granite-untied", "sdpa")]


def our_model(variant: str, backend: str = "eager", seed: int = 0) -> torch.nn.Module:
    """Our model for OURS[variant], built on meta, materialised and randomised like hf_model."""
    model = build_model(dataclasses.replace(OURS[variant], attn_backend=backend))
    model.to_empty(device="cpu")
    model.init_weights()
    torch.manual_seed(seed)
    randomise_(model, norm_center=0.0 if variant == "gemma2" else 1.0)
    return model.eval()


def tokens(seed: int, shape=(B, T)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def max_rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------- 1. parity


@pytest.mark.parametrize("variant,backend", BACKEND_CASES, ids=[f"{v}-{b}" for v, b in BACKEND_CASES])
def test_parity_with_transformers(variant, backend, tmp_path):
    """HF save_pretrained -> our from_pretrained: logits, the loss (labels with ignored positions) and every
    parameter gradient, matched through the key map and the family's layout transforms."""
    hf = hf_model(variant)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, attn_backend=backend).train()
    assert ours.config.attn_backend == backend
    assert (ours.output.weight is ours.tok_embeddings.weight) == (variant in ("gemma2", "granite-tied"))

    idx = tokens(1)  # (B, T)
    labels = torch.full((B, T), -100)  # aligned with the inputs, as the loader gives them
    labels[:, :-1] = idx[:, 1:]
    labels[0, :4] = -100
    labels[1, 7] = -100
    hf_labels = torch.full((B, T), -100)  # HF shifts internally: hf_labels[:, t + 1] == labels[:, t]
    hf_labels[:, 1:] = labels[:, :-1]

    ours_logits = ours(idx)  # (B, T, V)
    hf_logits = hf(idx).logits  # (B, T, V)
    assert ours_logits.shape == (B, T, VOCAB)
    assert max_abs_diff(ours_logits, hf_logits) <= LOGITS_ATOL

    out = ours(idx, labels=labels)
    assert out.n_tokens.item() == (labels != -100).sum().item() == 2 * (T - 1) - 5
    ours_loss = out.loss_sum / out.n_tokens
    hf_loss = hf(idx, labels=hf_labels).loss
    assert abs(ours_loss.item() - hf_loss.item()) <= GRAD_RTOL * abs(hf_loss.item())
    ours_loss.backward()
    hf_loss.backward()

    family = MODULE[variant]
    rename = key_mapper(family.HF_KEY_MAP)
    find_transform = transform_finder(getattr(family, "HF_TRANSFORMS", None))

    def our_name(hf_name: str) -> str:
        for in_memory, on_disk in GRANITE_ON_DISK.items():
            hf_name = hf_name.replace(in_memory, on_disk)
        return rename(hf_name)

    ours_params = dict(ours.named_parameters())
    hf_params = dict(hf.named_parameters())  # a tied lm_head appears once, as model.embed_tokens.weight
    assert sorted(our_name(n) for n in hf_params) == sorted(ours_params)
    n_transformed = 0
    for hf_name, p in hf_params.items():
        name = our_name(hf_name)
        ours_grad = ours_params[name].grad
        assert ours_grad is not None and p.grad is not None, hf_name
        transform = find_transform(name)
        theirs = p.grad if transform is None else transform.load(p.grad)
        n_transformed += transform is not None
        assert max_rel_diff(ours_grad, theirs) <= GRAD_RTOL, hf_name
    assert n_transformed == (3 * ours.config.n_layers if variant == "gpt_oss" else 0)


# --------------------------------------------------------------------------------------- 2. export, reload


@pytest.mark.parametrize("variant", list(OURS))
def test_export_loads_in_transformers_with_the_same_logits(variant, tmp_path):
    """Ours -> save_pretrained -> AutoModelForCausalLM: every tensor found (GPT-OSS experts re-interleaved into
    HF's layout), the same logits; and back through our loader, the same tensors."""
    ours = our_model(variant)
    save_pretrained(ours, tmp_path / "hf")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                                 dtype=torch.float32, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert type(hf).__name__ == {"gemma2": "Gemma2ForCausalLM", "gpt_oss": "GptOssForCausalLM"}.get(
        variant, "GraniteMoeForCausalLM")
    idx = tokens(2)
    with torch.no_grad():
        assert max_abs_diff(ours(idx), hf(idx).logits) <= LOGITS_ATOL
    back = from_pretrained(tmp_path / "hf", attn_backend="eager")
    assert back.config == ours.config
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


# -------------------------------------------------------------------------------------- 3. packed documents


DOCS = (5, 7, 4)  # one row; the 7-token document is longer than the window
DOCS_2 = ((5, 7, 4), (9, 7))  # two rows; cu_seqlens over the flattened 2 * T tokens


def packed(rows: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (len(rows), T) restarting at 0 at every document, cu_seqlens over the flattened rows."""
    positions = torch.tensor([[p for n in row for p in range(n)] for row in rows])
    offsets = [0]
    for row in rows:
        for n in row:
            offsets.append(offsets[-1] + n)
    return positions, torch.tensor(offsets, dtype=torch.int32)


@pytest.mark.parametrize("variant,backend", BACKEND_CASES, ids=[f"{v}-{b}" for v, b in BACKEND_CASES])
def test_packed_documents_equal_each_document_alone(variant, backend):
    model = our_model(variant, backend)
    for rows in ((DOCS,), DOCS_2):
        idx = tokens(3, (len(rows), T))
        positions, cu_seqlens = packed(rows)
        assert cu_seqlens[-1].item() == len(rows) * T
        with torch.no_grad():
            logits = model(idx, position_ids=positions, cu_seqlens=cu_seqlens)  # (rows, T, V)
            whole = model(idx)  # without the document boundaries: must differ after the first document
            for r, row in enumerate(rows):
                start = 0
                for n in row:
                    alone = model(idx[r:r + 1, start:start + n])  # (1, n, V) positions from 0
                    assert max_abs_diff(logits[r:r + 1, start:start + n], alone) <= LOGITS_ATOL, (rows, r, start)
                    start += n
        assert max_abs_diff(logits[:, DOCS[0]:], whole[:, DOCS[0]:]) > 1e-2  # the test can tell


# ------------------------------------------------------------------------------------------ 4. MXFP4 checkpoints


def write_mxfp4(hf: transformers.PreTrainedModel, out_dir) -> dict[str, torch.Tensor]:
    """An MXFP4 checkpoint of `hf` as OpenAI stores it: each expert matrix quantised by our quantiser with output
    features as rows, `X_blocks` (E, out, in / 32, 16) and `X_scales` (E, out, in / 32) in place of X (E, in, out);
    config.json with quantization_config mxfp4. Returns the checkpoint's tensors."""
    hf.save_pretrained(out_dir)
    tensors = {}
    for name, t in load_file(out_dir / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize(t.transpose(1, 2).contiguous())  # (E, out, in) rows = output features
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        else:
            tensors[name] = t
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (out_dir / "config.json").write_text(json.dumps(config))
    return tensors


def test_mxfp4_checkpoint_loads_as_transformers_dequantises_it(tmp_path):
    hf = hf_model("gpt_oss")
    assert hf.config.hidden_size % 32 == 0 and hf.config.intermediate_size % 32 == 0
    tensors = write_mxfp4(hf, tmp_path)
    ours = from_pretrained(tmp_path, attn_backend="eager")
    ours_bf16 = from_pretrained(tmp_path, attn_backend="eager", dtype=torch.bfloat16)
    load_gate_up = gpt_oss.HF_TRANSFORMS["layers.{i}.moe.w_gate_up"].load
    load_down = gpt_oss.HF_TRANSFORMS["layers.{i}.moe.w_down"].load
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            for hf_name, ours_name, load in (("gate_up_proj", "w_gate_up", load_gate_up),
                                             ("down_proj", "w_down", load_down)):
                stem = f"model.layers.{i}.mlp.experts.{hf_name}"
                dense = convert_moe_packed_tensors(tensors[stem + "_blocks"], tensors[stem + "_scales"],
                                                   dtype=torch.float32)  # (E, in, out), HF's parameter layout
                original = getattr(layer.mlp.experts, hf_name)
                assert dense.shape == original.shape
                err = (dense - original).abs().max() / original.abs().max()
                assert 0 < err < 0.25, stem  # really quantised, and still the same matrix
                assert torch.equal(getattr(ours.layers[i].moe, ours_name), load(dense)), stem
                # bf16: the same values exactly (FP4 times a power of two is exact in bf16)
                dense16 = convert_moe_packed_tensors(tensors[stem + "_blocks"], tensors[stem + "_scales"],
                                                     dtype=torch.bfloat16)
                assert torch.equal(dense16.float(), dense), stem
                w16 = getattr(ours_bf16.layers[i].moe, ours_name)
                assert w16.dtype == torch.bfloat16 and torch.equal(w16, load(dense16)), stem
                original.copy_(dense)  # the oracle now holds the dequantised experts
        idx = tokens(4)
        assert max_abs_diff(ours(idx), hf(idx).logits) <= LOGITS_ATOL
        assert torch.isfinite(ours_bf16(idx)).all()


# ------------------------------------------------------------------------------------------------ 5. bad input


def test_gpt_oss_checkpoint_without_sinks_is_named(tmp_path):
    hf_model("gpt_oss").save_pretrained(tmp_path)
    tensors = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if not k.endswith("sinks")}
    assert len(tensors) == len(load_file(tmp_path / "model.safetensors")) - 3
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightMismatchError, match="sinks") as info:
        from_pretrained(tmp_path, attn_backend="eager")
    assert info.value.missing == [f"layers.{i}.attn.sinks" for i in range(3)]


def test_mxfp4_scales_of_the_wrong_shape_are_named(tmp_path):
    tensors = write_mxfp4(hf_model("gpt_oss"), tmp_path)
    name = "model.layers.1.mlp.experts.down_proj_scales"
    tensors[name] = tensors[name][..., :1].contiguous()  # (E, dim, 1): one scale short per row
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=name):
        from_pretrained(tmp_path, attn_backend="eager")


@pytest.mark.parametrize("variant", ["gemma2", "gpt_oss"])
def test_sliding_window_larger_than_the_context_is_an_error(variant, tmp_path):
    too_wide = dataclasses.replace(OURS[variant], sliding_window=300)
    for make in (too_wide.validate, lambda: build_model(too_wide)):
        with pytest.raises(ValueError, match=r"sliding_window \(300\) is larger than the context max_seq_len \(128\)"):
            make()
    save_pretrained(our_model(variant), tmp_path)
    with pytest.raises(ValueError, match="sliding_window"):  # a context shortened when loading
        from_pretrained(tmp_path, max_seq_len=4)


@pytest.mark.parametrize("variant,feature", [("gemma2", "softcap"), ("gpt_oss", "sinks")])
def test_sdpa_refuses_softcap_and_sinks(variant, feature):
    model = our_model(variant, backend="sdpa")
    with pytest.raises(ValueError, match=f"'sdpa' does not support {feature}"):
        model(tokens(5))


UNSUPPORTED = [
    ("gemma2", {"hidden_activation": "relu"}, "hidden_activation 'relu'"),
    ("gemma2", {"attention_bias": True}, "attention_bias"),
    ("gemma2", {"model_type": "gemma"}, "model_type"),
    ("granite-tied", {"attention_bias": True}, "attention_bias"),
    ("granite-tied", {"hidden_act": "gelu"}, "hidden_act"),
    ("granite-tied", {"head_dim": 32}, "head_dim"),
    ("gpt_oss", {"quantization_config": {"quant_method": "gptq"}}, "gptq"),
    ("gpt_oss", {"attention_bias": False}, "attention_bias"),
    ("gpt_oss", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "dynamic"),
]


@pytest.mark.parametrize("variant,change,match", UNSUPPORTED,
                         ids=[f"{v}-{'-'.join(c)}" for v, c, _ in UNSUPPORTED])
def test_unsupported_hf_config_features_are_errors(variant, change, match):
    family = MODULE[variant]
    hf_config = family.config_to_hf(OURS[variant])
    assert family.config_from_hf(hf_config) == OURS[variant]  # the round trip is exact before the change
    with pytest.raises(ValueError, match=match):
        family.config_from_hf({**hf_config, **change})


# ----------------------------------------------------------------------------------------------- 6. named sizes


NAMED = [(gemma2, name) for name in GEMMA2_CONFIGS if name != "debug"] + \
        [(gpt_oss, name) for name in GPT_OSS_CONFIGS if name != "debug"] + \
        [(granite_moe, name) for name in GRANITE_MOE_CONFIGS if name != "debug"]
HF_CLASSES = {gemma2: (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
              gpt_oss: (transformers.GptOssConfig, transformers.GptOssForCausalLM),
              granite_moe: (transformers.GraniteMoeConfig, transformers.GraniteMoeForCausalLM)}
# published (total, active) in billions and the relative tolerance of the active count. Active counts leave out the
# embedding lookup (the output head is counted), as GPT-OSS's model card does (5.13B = 5.71B - 201088 * 2880);
# GraniteMoE's a400m / a800m are rounded names (we count 378M and 807M).
PUBLISHED = {"gemma-2-2b": (2.61, None, 0), "gemma-2-9b": (9.24, None, 0), "gemma-2-27b": (27.2, None, 0),
             "gpt-oss-20b": (20.91, 3.61, 0.02), "gpt-oss-120b": (116.83, 5.13, 0.02),
             "granite-3.0-1b-a400m": (1.33, 0.4, 0.10), "granite-3.0-3b-a800m": (3.3, 0.8, 0.10)}


@pytest.mark.parametrize("family,name", NAMED, ids=[n for _, n in NAMED])
def test_named_sizes_match_transformers_and_the_published_counts(family, name):
    configs = {gemma2: GEMMA2_CONFIGS, gpt_oss: GPT_OSS_CONFIGS, granite_moe: GRANITE_MOE_CONFIGS}[family]
    config = configs[name]
    ours = build_model(config)
    assert all(p.is_meta for p in ours.parameters())
    hf_config_class, hf_class = HF_CLASSES[family]
    with torch.device("meta"):
        hf = hf_class(hf_config_class(**family.config_to_hf(config)))
    assert all(p.is_meta for p in hf.parameters())
    hf_params = dict(hf.named_parameters())  # unique: a tied head is listed once
    hf_total = sum(p.numel() for p in hf_params.values())
    assert ours.num_params() == sum({id(p): p.numel() for p in ours.parameters()}.values()) == hf_total
    total, active, active_rtol = PUBLISHED[name]
    assert abs(hf_total / 1e9 - total) <= 0.02 * total
    if family is gemma2:
        return
    n_experts, top_k = config.n_experts, config.top_k
    hf_experts = sum(p.numel() for n, p in hf_params.items() if ".experts." in n)
    assert hf_experts > 0.8 * hf_total  # every expert tensor (and bias) was found
    assert ours.num_params(active=True) == hf_total - hf_experts * (n_experts - top_k) // n_experts
    assert abs(ours.num_params(active=True, non_embedding=True) / 1e9 - active) <= active_rtol * active


# ------------------------------------------------------------------------------------- 7. KV-cache generation


@pytest.mark.parametrize("variant,backend", BACKEND_CASES, ids=[f"{v}-{b}" for v, b in BACKEND_CASES])
def test_kv_cache_decode_equals_the_full_forward(variant, backend):
    """Prefill 9 tokens (past the window of 5), then decode one token at a time to T: every step's logits equal
    the full-sequence forward at that position."""
    model = our_model(variant, backend)
    idx = tokens(6)  # (B, T)
    prefill = 9
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        cache = model.new_cache(B, T)
        logits = model(idx[:, :prefill], cache=cache)
        assert max_abs_diff(logits, full[:, :prefill]) <= LOGITS_ATOL
        for t in range(prefill, T):
            step = model(idx[:, t:t + 1], cache=cache)  # (B, 1, V)
            assert max_abs_diff(step[:, 0], full[:, t]) <= LOGITS_ATOL, t
        assert cache.length == T


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_flops_per_token_counts_active_experts_and_windows(top_k):
    """6 * (every Linear + top_k experts' weights per layer) + 12 * n_heads * head_dim * keys seen, where a
    sliding-window layer sees min(window, seq) keys: written out by hand for the GPT-OSS debug shape."""
    c = dataclasses.replace(GPT_OSS_CONFIGS["debug"], top_k=top_k)
    model = build_model(c)
    seq = 100  # longer than the debug window (16): layer 0 sees 16 keys, layer 1 all 100
    attn_linear = c.dim * c.n_heads * c.head_dim * 2 + c.dim * c.n_kv_heads * c.head_dim * 2
    router = c.dim * c.n_experts
    expert = 3 * c.dim * c.ffn_dim
    head = c.dim * c.vocab_size
    n_matmul = c.n_layers * (attn_linear + router + top_k * expert) + head
    expected = 6.0 * n_matmul + 12.0 * c.n_heads * c.head_dim * (16 + seq)
    assert model.flops_per_token(seq) == expected
