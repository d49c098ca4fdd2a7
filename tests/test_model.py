"""model/: parity with Hugging Face transformers (a test-only oracle), the loss, init, counts and safetensors I/O.

Parity: a tiny random LlamaForCausalLM / Qwen2ForCausalLM is saved with save_pretrained, loaded into ours through
model.hf.from_pretrained, and compared in fp32: logits max abs diff <= 1e-5, then one backward
pass: the loss and every parameter gradient (matched through the key map) within 1e-5 relative.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers  # test-only oracle (requirements-test.txt)
from safetensors import safe_open
from safetensors.torch import save_file

from model import LLAMA_CONFIGS, Llama, LlamaConfig, build_model
from model import loss as loss_module
from model.hf import from_pretrained
from model.llama import HF_KEY_MAP, RopeScaling, config_from_hf
from model.loss import lm_loss, lm_loss_ref
from model.rope import rope_inv_freq, rope_inv_freq_for
from model.weights import WeightMismatchError, check_tensors, key_mapper, load_safetensors, save_safetensors

LOGITS_ATOL = 1e-5
GRAD_RTOL = 1e-5  # max |ours - theirs| / max |theirs|, per tensor
VOCAB, B, T = 96, 2, 16

ROPE = {
    "none": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    # original_max_position_embeddings=64 with head_dim 16 puts the 8 frequencies in all three llama3 regimes
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}


def hf_model(family: str, tied: bool, rope: str, n_kv_heads: int, seed: int = 0):
    """A tiny HF model in fp32 with every tensor randomised (norm weights around 1, biases nonzero)."""
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=n_kv_heads, max_position_embeddings=128, rms_norm_eps=1e-6,
                  tie_word_embeddings=tied, rope_parameters=dict(ROPE[rope]), attn_implementation="sdpa")
    if family == "llama":
        config, cls = transformers.LlamaConfig(**kwargs), transformers.LlamaForCausalLM
    else:
        config, cls = transformers.Qwen2Config(**kwargs), transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = cls(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def load_ours(hf, tmp_path, backend: str) -> Llama:
    """Through our loader, as a user would: HF's save_pretrained directory -> model.hf.from_pretrained."""
    hf.save_pretrained(tmp_path)
    return from_pretrained(tmp_path, attn_backend=backend).train()


def max_rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


PARITY_CASES = {
    # id: (family, tied, rope, n_kv_heads, backend, positions)
    "llama-tied-gqa-sdpa": ("llama", True, "none", 2, "sdpa", None),
    "llama-untied-linear-mha-eager": ("llama", False, "linear", 4, "eager", "offset"),
    "llama-untied-llama3-mqa-sdpa-packed": ("llama", False, "llama3", 1, "sdpa", "packed"),
    "llama-tied-llama3-gqa-eager-packed": ("llama", True, "llama3", 2, "eager", "packed"),
    "qwen2-tied-bias-gqa-eager": ("qwen2", True, "none", 2, "eager", "offset"),
    "qwen2-untied-bias-gqa-sdpa-packed": ("qwen2", False, "none", 2, "sdpa", "packed"),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_parity_with_transformers(case, tmp_path):
    family, tied, rope, n_kv_heads, backend, positions = PARITY_CASES[case]
    hf = hf_model(family, tied, rope, n_kv_heads)
    ours = load_ours(hf, tmp_path, backend)
    assert ours.config.tie_embeddings == tied and ours.config.qkv_bias == (family == "qwen2")
    assert ours.config.rope_scaling.type == {"none": "none", "linear": "linear", "llama3": "llama3"}[rope]

    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (B, T), generator=g)  # (B, T)
    hf_kwargs, position_ids = {}, None
    if positions == "offset":  # each row starts at its own position, far enough to exercise the llama3 bands
        position_ids = torch.arange(T)[None, :] + torch.tensor([[5], [90]])  # (B, T)
    elif positions == "packed":  # documents restart at 0 inside a row (RoPE only; attention stays causal)
        position_ids = torch.tensor([list(range(6)) + list(range(10)), list(range(3)) + list(range(13))])
        # an explicit all-ones mask stops HF from inferring document boundaries from the restarts
        hf_kwargs["attention_mask"] = torch.ones(B, T, dtype=torch.long)
    if position_ids is not None:
        hf_kwargs["position_ids"] = position_ids

    # labels as the loader gives them: aligned with the inputs, some positions ignored
    labels = torch.full((B, T), -100)
    labels[:, :-1] = idx[:, 1:]
    labels[0, :4] = -100
    hf_labels = torch.full((B, T), -100)  # HF shifts internally: hf_labels[:, t + 1] == labels[:, t]
    hf_labels[:, 1:] = labels[:, :-1]

    ours_logits = ours(idx, position_ids=position_ids)  # (B, T, V)
    hf_logits = hf(idx, **hf_kwargs).logits  # (B, T, V)
    assert ours_logits.shape == hf_logits.shape == (B, T, VOCAB)
    assert (ours_logits - hf_logits).abs().max().item() <= LOGITS_ATOL

    out = ours(idx, labels=labels, position_ids=position_ids)
    assert out.n_tokens.item() == (labels != -100).sum().item()
    ours_loss = out.loss_sum / out.n_tokens
    hf_loss = hf(idx, labels=hf_labels, **hf_kwargs).loss
    assert abs(ours_loss.item() - hf_loss.item()) <= GRAD_RTOL * abs(hf_loss.item())
    ours_loss.backward()
    hf_loss.backward()

    rename = key_mapper(HF_KEY_MAP)
    ours_params = dict(ours.named_parameters())
    hf_params = dict(hf.named_parameters())  # a tied lm_head appears once, as model.embed_tokens.weight
    assert sorted(rename(n) for n in hf_params) == sorted(ours_params)
    for hf_name, p in hf_params.items():
        ours_grad = ours_params[rename(hf_name)].grad
        assert ours_grad is not None, hf_name
        assert max_rel_diff(ours_grad, p.grad) <= GRAD_RTOL, hf_name


@pytest.mark.parametrize("rope", ["none", "linear", "llama3", "yarn", "yarn-truncated"])
def test_rope_inv_freq_matches_transformers(rope):
    """Llama 3.2's own rope settings (head_dim 64, theta 5e5, llama3 factor 32) and GPT-OSS's yarn (factor 32,
    beta 32/1, original 4096, not truncated): bit-identical inverse frequencies and the same cos/sin factor."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"none": {"rope_type": "default"}, "linear": {"rope_type": "linear", "factor": 8.0},
              "llama3": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
              "yarn": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                       "original_max_position_embeddings": 4096},
              "yarn-truncated": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}}[rope]
    hf_config = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072,
                                         rope_parameters={"rope_theta": 500000.0, **params})
    if rope == "none":
        theirs, theirs_scale = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config).inv_freq, 1.0
    else:
        theirs, theirs_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config)
    ours_config = config_from_hf(hf_config.to_dict())
    ours = rope_inv_freq_for(64, ours_config.rope_theta, ours_config.rope_scaling)
    assert ours_config.rope_scaling.cos_sin_scale() == pytest.approx(theirs_scale, rel=1e-12)
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)


def test_config_from_hf_legacy_format_and_unsupported_features():
    legacy = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
              "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": True,
              "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    assert config_from_hf(legacy) == LLAMA_CONFIGS["llama-3.2-1b"]
    old_linear = dict(legacy, rope_scaling={"type": "linear", "factor": 2.0})
    assert config_from_hf(old_linear).rope_scaling == RopeScaling("linear", factor=2.0)
    for bad, match in [({"model_type": "gpt2"}, "model_type"), ({"hidden_act": "gelu"}, "hidden_act"),
                       ({"attention_bias": True}, "attention_bias"), ({"head_dim": 128}, "head_dim"),
                       ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "dynamic")]:
        with pytest.raises(ValueError, match=match):
            config_from_hf(dict(legacy, **bad))


def test_config_validate_names_the_bad_field():
    for change, match in [({"attn_backend": "flash9"}, "attn_backend"), ({"dim": 100}, "n_heads"),
                          ({"n_kv_heads": 5}, "n_kv_heads"), ({"rope_scaling": RopeScaling("dynamic")}, "rope_scaling")]:
        with pytest.raises(ValueError, match=match):
            LlamaConfig(**{**LLAMA_CONFIGS["debug"].__dict__, **change}).validate()
    for config in LLAMA_CONFIGS.values():
        config.validate()


# ---------------------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("rows_per_chunk", [1, 7, None])  # None: the real chunking (one chunk at this size)
@pytest.mark.parametrize("reuse_logits", [False, True])
def test_lm_loss_matches_cross_entropy_and_ignores_masked_positions(rows_per_chunk, reuse_logits, monkeypatch):
    if rows_per_chunk is not None:
        monkeypatch.setattr(loss_module, "_rows_per_chunk", lambda logits: rows_per_chunk)
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 11, 37, generator=g)  # (B, T, V)
    labels = torch.randint(0, 37, (3, 11), generator=g)
    labels[0, :5] = -100
    labels[2, 3] = -100
    # every ignored position "correct" by its argmax and with a huge loss: neither may leak into the sums
    logits[labels == -100] = 0.0
    logits[..., 0][labels == -100] = 1000.0
    labels[1, 2] = logits[1, 2].argmax()  # at least one learnable hit
    keep = labels != -100

    x = logits.clone().requires_grad_()
    out = lm_loss(x * 1.0, labels, reuse_logits=reuse_logits)  # x * 1.0: a non-leaf, as the model's logits are
    out.loss_sum.backward()
    x64 = logits.double().requires_grad_()
    reference = F.cross_entropy(x64[keep], labels[keep], reduction="sum")
    reference.backward()
    assert out.loss_sum.dtype == torch.float32 and out.n_tokens.dtype == out.n_correct.dtype == torch.int64
    assert out.n_tokens.item() == keep.sum().item() == 27
    assert abs(out.loss_sum.item() - reference.item()) <= 1e-6 * reference.item()
    assert out.n_correct.item() == (logits[keep].argmax(-1) == labels[keep]).sum().item() >= 1
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-6, rtol=0)
    assert (x.grad[~keep] == 0).all()
    ref = lm_loss_ref(logits, labels)  # the plain F.cross_entropy version agrees too
    assert abs(ref.loss_sum.item() - reference.item()) <= 1e-6 * reference.item()
    assert (ref.n_tokens.item(), ref.n_correct.item()) == (out.n_tokens.item(), out.n_correct.item())


@pytest.mark.parametrize("rows_per_chunk", [5, None])
def test_lm_loss_bf16_logits_computed_in_fp32(rows_per_chunk, monkeypatch):
    if rows_per_chunk is not None:
        monkeypatch.setattr(loss_module, "_rows_per_chunk", lambda logits: rows_per_chunk)
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(2, 9, 300, generator=g)).bfloat16()  # (B, T, V)
    labels = torch.randint(0, 300, (2, 9), generator=g)
    labels[1, -3:] = -100
    x = logits.clone().requires_grad_()
    out = lm_loss(x * 1, labels, reuse_logits=True)
    out.loss_sum.backward()
    x32 = logits.float().requires_grad_()  # reference: fp32 on the same (bf16-rounded) values
    reference = F.cross_entropy(x32.reshape(-1, 300), labels.reshape(-1), reduction="sum")
    reference.backward()
    assert out.loss_sum.dtype == torch.float32
    assert abs(out.loss_sum.item() - reference.item()) <= 1e-5 * reference.item()
    assert x.grad.dtype == torch.bfloat16  # the gradient is only rounded to bf16 at the end: <= 2^-9 relative
    torch.testing.assert_close(x.grad.float(), x32.grad, atol=1e-6, rtol=2**-8)


def test_lm_loss_accuracy_is_argmax_with_ties_going_to_the_first_index():
    logits = torch.zeros(1, 4, 5)
    logits[0, :, 1] = logits[0, :, 3] = 2.0  # tied maximum at ids 1 and 3: argmax is 1
    out = lm_loss(logits, torch.tensor([[1, 3, 3, 0]]))
    assert out.n_correct.item() == 1 == lm_loss_ref(logits, torch.tensor([[1, 3, 3, 0]])).n_correct.item()


def test_lm_loss_all_ignored_is_zero_with_zero_finite_grad():
    for reuse_logits in (False, True):
        logits = torch.randn(2, 5, 13, requires_grad=True)
        out = lm_loss(logits * 1.0, torch.full((2, 5), -100), reuse_logits=reuse_logits)
        assert out.loss_sum.item() == 0.0 and out.n_tokens.item() == 0 and out.n_correct.item() == 0
        out.loss_sum.backward()
        assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


def test_lm_loss_custom_ignore_index_and_no_grad():
    logits = torch.zeros(1, 4, 5)
    logits[0, :, 3] = 5.0  # argmax 3 everywhere
    with torch.no_grad():
        out = lm_loss(logits, torch.tensor([[3, 3, 1, 2]]), ignore_index=3)
    assert out.n_tokens.item() == 2 and out.n_correct.item() == 0 and out.loss_sum.grad_fn is None


def test_lm_loss_reuse_logits_refuses_a_second_backward():
    logits = torch.randn(1, 3, 7, requires_grad=True)
    out = lm_loss(logits * 1.0, torch.tensor([[1, 2, 3]]), reuse_logits=True)
    out.loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss_sum.backward()


# ------------------------------------------------------------------------------------------ init and counting


@pytest.mark.parametrize("tied", [True, False])
def test_meta_build_then_init_weights(tied):
    config = LlamaConfig(vocab_size=1000, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=256,
                         tie_embeddings=tied, qkv_bias=True)
    model = build_model(config)
    assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    assert all(torch.isfinite(p).all() for p in model.parameters())
    std, residual_std = 0.02, 0.02 / math.sqrt(2 * 3)
    expected = {"tok_embeddings.weight": std, "output.weight": std}
    for i in range(3):
        for name in ("attn.wq", "attn.wk", "attn.wv", "mlp.w_gate", "mlp.w_up"):
            expected[f"layers.{i}.{name}.weight"] = std
        expected[f"layers.{i}.attn.wo.weight"] = residual_std
        expected[f"layers.{i}.mlp.w_down.weight"] = residual_std
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:  # >= 16k samples each: the sample std is within 3% of sigma with overwhelming probability
            assert abs(p.mean().item()) < 0.05 * expected[name], name
            assert abs(p.std().item() / expected[name] - 1) < 0.03, name
    torch.testing.assert_close(model.inv_freq, rope_inv_freq(32), rtol=0, atol=0)
    logits = model(torch.randint(0, 1000, (2, 8)))
    assert logits.shape == (2, 8, 1000) and torch.isfinite(logits).all()


def test_dtype_cast_keeps_tie_and_fp32_rope_and_build_model_rejects_unknown_configs():
    model = small_model(tied=True)
    idx = torch.randint(0, 50, (2, 12))
    logits32 = model(idx)
    model.to(torch.bfloat16)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, rope_inv_freq(8))
    logits16 = model(idx)
    assert logits16.dtype == torch.bfloat16
    assert (logits16.float() - logits32).abs().max().item() <= 0.05 * logits32.abs().max().item()
    with pytest.raises(TypeError, match="no model for config type"):
        build_model(RopeScaling())


@pytest.mark.parametrize("family,tied", [("llama", True), ("llama", False), ("qwen2", True)])
def test_num_params_matches_transformers(family, tied, tmp_path):
    hf = hf_model(family, tied, "none", 2)
    ours = load_ours(hf, tmp_path, "sdpa")
    unique = {id(p): p.numel() for p in ours.parameters()}
    assert ours.num_params() == sum(unique.values()) == hf.num_parameters()
    assert ours.num_params(non_embedding=True) == ours.num_params() - VOCAB * 64


def test_flops_per_token_by_hand():
    # dim 8, 2 heads of head_dim 4, 1 kv head (4 wide), ffn 12, vocab 10, 2 layers
    # per layer: wq 8*8 + wk 8*4 + wv 8*4 + wo 8*8 = 192; MLP 3 * 8*12 = 288 -> 480; 2 layers -> 960
    # output head 10*8 = 80 (tied or not; the embedding lookup itself is not a matmul) -> N_matmul = 1040
    # 6 * 1040 + 12 * L(2) * H(2) * Q(4) * T(16) = 6240 + 3072 = 9312
    for tied in (True, False):
        config = LlamaConfig(vocab_size=10, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=12, tie_embeddings=tied)
        assert build_model(config).flops_per_token(16) == 9312
    # qkv biases are not matmul weights
    config = LlamaConfig(vocab_size=10, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=12, qkv_bias=True)
    assert build_model(config).flops_per_token(16) == 9312


# ------------------------------------------------------------------------------------------------ safetensors


def small_model(tied: bool = True, seed: int = 0) -> Llama:
    config = LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, tie_embeddings=tied)
    model = build_model(config)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip(tied, tmp_path):
    model = small_model(tied)
    path = str(tmp_path / "model.safetensors")
    save_safetensors(model, path)
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
    assert ("output.weight" in keys) != tied  # a tied head is stored once, as the embedding
    fresh = build_model(model.config)
    fresh.to_empty(device="cpu")
    load_safetensors(fresh, [path])
    assert (fresh.output.weight is fresh.tok_embeddings.weight) == tied
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(fresh.inv_freq, model.inv_freq)
    idx = torch.randint(0, 50, (2, 9))
    assert torch.equal(model(idx), fresh(idx))


def test_tied_model_loads_checkpoint_that_also_stores_the_head(tmp_path):
    """HF-style checkpoints of tied models sometimes carry lm_head.weight as well (or only it)."""
    model = small_model(tied=True)
    tensors = {k: v.clone() for k, v in model.state_dict().items()}  # holds both names
    both, head_only = tmp_path / "both.safetensors", tmp_path / "head_only.safetensors"
    save_file(tensors, str(both))
    save_file({k: v for k, v in tensors.items() if k != "tok_embeddings.weight"}, str(head_only))
    for path in (both, head_only):
        fresh = build_model(model.config)
        fresh.to_empty(device="cpu")
        load_safetensors(fresh, [str(path)])
        assert torch.equal(fresh.tok_embeddings.weight, model.tok_embeddings.weight)
        assert fresh.output.weight is fresh.tok_embeddings.weight


def test_load_names_missing_unexpected_and_misshaped_tensors_before_copying(tmp_path):
    model = small_model(tied=False)
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    del tensors["layers.1.mlp.w_up.weight"]
    tensors["layers.0.attn.wq.bias"] = torch.zeros(32)
    tensors["layers.0.attn.wk.weight"] = torch.zeros(32, 32)  # model has (16, 32)
    path = str(tmp_path / "bad.safetensors")
    save_file(tensors, path)
    target = small_model(tied=False, seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightMismatchError) as info:
        load_safetensors(target, [path])
    message = str(info.value)
    assert "layers.1.mlp.w_up.weight" in message and "missing" in message
    assert "layers.0.attn.wq.bias" in message and "unexpected" in message
    assert "mis-shaped" in message and "layers.0.attn.wk.weight: checkpoint [32, 32] vs model [16, 32]" in message
    assert info.value.missing == ["layers.1.mlp.w_up.weight"]
    assert info.value.unexpected == ["layers.0.attn.wq.bias"]
    assert [m[0] for m in info.value.mismatched] == ["layers.0.attn.wk.weight"]
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing was copied
    with pytest.raises(WeightMismatchError):
        check_tensors({"a": (1,)}, {"a": (2,)}, "x")
    check_tensors({"a": (1, 2)}, {"a": (1, 2)}, "x")


def test_load_refuses_a_meta_model(tmp_path):
    model = small_model()
    path = str(tmp_path / "m.safetensors")
    save_safetensors(model, path)
    with pytest.raises(ValueError, match="to_empty"):
        load_safetensors(build_model(model.config), [path])


def test_key_map_round_trips_and_exports_hf_names(tmp_path):
    hf = hf_model("qwen2", False, "none", 2)
    to_ours, to_hf = key_mapper(HF_KEY_MAP), key_mapper(HF_KEY_MAP, inverse=True)
    for name in hf.state_dict():
        assert to_hf(to_ours(name)) == name
    ours = load_ours(hf, tmp_path, "sdpa")
    assert sorted(to_hf(n) for n in ours.state_dict()) == sorted(hf.state_dict())
    assert to_ours("model.layers.3.self_attn.rotary_emb.inv_freq") is None
    assert to_ours("model.layers.3.unknown.weight") == "model.layers.3.unknown.weight"
