"""kernels/rope.py: the Triton RoPE kernel (q and k in one launch) against its eager reference rope_ref.

The reference is kernels.rope_ref.apply_rope_ref (which is also the model's eager path, model.rope.apply_rope) in
fp32 on the kernel's own inputs upcast to fp32 (so input rounding is not counted as error), with its gradients from
autograd for a random upstream gradient. Kernel outputs and the gradients of q and k must match, elementwise,
within:

| dtype | atol | rtol | why                                                                                      |
|-------|------|------|------------------------------------------------------------------------------------------|
| fp32  | 1e-6 | 1e-5 | the same fp32 products and sums as the reference; a GPU may fuse them (FMA), ~1 ulp     |
| bf16  | 1e-5 | 4e-3 | fp32 result rounded once to bf16 (round to nearest even): half an ulp, 2^-8 = 3.9e-3    |
| bf16  | 1e-5 | 8e-3 | the same under TRITON_INTERPRET=1, whose fp32 -> bf16 cast truncates (Triton 3.6's       |
|       |      |      | interpreter casts without rounding): up to a whole ulp, 2^-7 = 7.8e-3                    |
| fp16  | 1e-5 | 5e-4 | fp32 result rounded once to fp16 (nearest even, also in the interpreter): 2^-11 = 4.9e-4 |

atol only absorbs the fp32 rounding of results that cancel to near zero (|x| ~ 1, so ~1e-7). Layout changes
(non-contiguous views, a broadcast batch-1 table) and packed documents against each document alone must give
bit-identical results: each output element depends only on its own token's inputs and cos/sin.

Kernels run on the GPU when there is one, else on the CPU under TRITON_INTERPRET=1 (conftest.py).
"""

import ast
from pathlib import Path

import pytest
import torch

import kernels
import model.rope
from kernels.rope_ref import apply_rope_ref
from model.rope import RopeScaling, rope_cos_sin, rope_inv_freq_for

rope_kernels = pytest.importorskip("kernels.rope", reason="triton is not installed")
rope, rope_ref = rope_kernels.rope, rope_kernels.rope_ref
rope_forward, rope_backward = rope_kernels.rope_forward, rope_kernels.rope_backward

DTYPES = [  # (dtype, atol, rtol): see the table above
    (torch.float32, 1e-6, 1e-5),
    (torch.bfloat16, 1e-5, 8e-3 if kernels.INTERPRET else 4e-3),
    (torch.float16, 1e-5, 5e-4),
]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

SHAPES = [  # (B, T, Hq, Hk, D)
    (1, 1, 1, 1, 2),  # tiny: one token, one pair
    (3, 7, 6, 2, 6),  # GQA 3:1, D/2 = 3 (padded to 4)
    (2, 5, 3, 3, 10),  # MHA, D/2 = 5
    (2, 3, 2, 3, 34),  # more k heads than q heads, neither divides the other; D/2 = 17
    (1, 3, 40, 5, 128),  # many heads: two head blocks per token (MAX_TILE), k split 4 + 1
    (2, 64, 8, 2, 128),  # larger: Llama-like head_dim
]

VARIANTS = {
    "none": RopeScaling(),
    "linear": RopeScaling("linear", factor=4.0),
    "llama3": RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=16),
    "yarn": RopeScaling("yarn", factor=4.0, original_max_seq_len=16),  # cos_sin_scale = 0.1 ln 4 + 1
}

PACKED = [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]  # three documents of 5, 3 and 9 tokens in one row


def tables(head_dim: int, positions: torch.Tensor, scaling: RopeScaling = RopeScaling(), device="cpu"):
    """cos, sin (B, T, D/2) fp32 for position_ids (B, T), as the model builds them."""
    inv_freq = rope_inv_freq_for(head_dim, 10000.0, scaling, device=device)  # (D/2,)
    return rope_cos_sin(inv_freq, positions.to(device), scaling.cos_sin_scale())


def make_qk(shape, dtype, device, seed=0):
    B, T, Hq, Hk, D = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g).to(device, dtype).requires_grad_()  # (B, T, Hq, D)
    k = torch.randn(B, T, Hk, D, generator=g).to(device, dtype).requires_grad_()  # (B, T, Hk, D)
    return q, k


def kernel_and_ref(q, k, cos, sin, seed=1):
    """(q_out, k_out, grad_q, grad_k) of the kernel and of rope_ref in fp32 on the same values upcast; q and k may
    be non-leaf views (their gradients are taken directly)."""
    g = torch.Generator().manual_seed(seed)
    grad_q_out = torch.randn(q.shape, generator=g).to(q.device, q.dtype)  # (B, T, Hq, D)
    grad_k_out = torch.randn(k.shape, generator=g).to(k.device, k.dtype)  # (B, T, Hk, D)
    q_out, k_out = rope(q, k, cos, sin)
    got = (q_out, k_out, *torch.autograd.grad((q_out, k_out), (q, k), (grad_q_out, grad_k_out)))

    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    ref_q, ref_k = rope_ref(q32, k32, cos, sin)
    want = (ref_q, ref_k, *torch.autograd.grad((ref_q, ref_k), (q32, k32), (grad_q_out.float(), grad_k_out.float())))
    return got, want


def assert_matches_ref(q, k, cos, sin, atol, rtol):
    got, want = kernel_and_ref(q, k, cos, sin)
    for name, g, w in zip(("q_out", "k_out", "grad_q", "grad_k"), got, want):
        assert g.dtype == q.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g.float(), w, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    assert got[0].is_contiguous() and got[1].is_contiguous()
    return got


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(kernel_device, shape, dtype, atol, rtol):
    B, T, _, _, D = shape
    q, k = make_qk(shape, dtype, kernel_device)
    positions = torch.arange(T)[None, :] + 5 * torch.arange(B)[:, None]  # (B, T): each row its own offset
    cos, sin = tables(D, positions, device=kernel_device)
    assert_matches_ref(q, k, cos, sin, atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[:2], ids=DTYPE_IDS[:2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rope_variants(kernel_device, variant, dtype, atol, rtol):
    """Every scaling's table, with a packed row (positions restart) and a row running past the original 16."""
    shape = (2, len(PACKED), 4, 2, 16)
    q, k = make_qk(shape, dtype, kernel_device)
    positions = torch.stack([torch.tensor(PACKED), 3 * torch.arange(len(PACKED))])  # (2, T), up to 48
    cos, sin = tables(16, positions, VARIANTS[variant], device=kernel_device)
    if variant != "none":  # the test means something only if the scaling changes the table
        plain_cos, _ = tables(16, positions, device=kernel_device)
        assert not torch.allclose(cos, plain_cos)
    assert_matches_ref(q, k, cos, sin, atol, rtol)


def test_packed_documents_restart(kernel_device):
    """Each document in a packed row is rotated exactly as the same document alone, starting at position 0."""
    q, k = make_qk((1, len(PACKED), 6, 2, 10), torch.float32, kernel_device)
    q_out, k_out = rope(q, k, *tables(10, torch.tensor([PACKED]), device=kernel_device))
    start = 0
    for n in (5, 3, 9):
        doc = slice(start, start + n)
        alone_q, alone_k = rope(q[:, doc], k[:, doc], *tables(10, torch.arange(n)[None], device=kernel_device))
        assert torch.equal(q_out[:, doc], alone_q) and torch.equal(k_out[:, doc], alone_k)
        start += n


def test_batch1_tables_broadcast(kernel_device):
    """A (1, T, D/2) table serves every row: same as the table repeated, and as it expanded (stride 0)."""
    B, T, D = 3, 5, 12
    q, k = make_qk((B, T, 4, 2, D), torch.float32, kernel_device)
    cos, sin = tables(D, torch.arange(T)[None], device=kernel_device)  # (1, T, D/2)
    got = assert_matches_ref(q, k, cos, sin, 1e-6, 1e-5)
    for c, s in ((cos.repeat(B, 1, 1), sin.repeat(B, 1, 1)), (cos.expand(B, T, -1), sin.expand(B, T, -1))):
        q_out, k_out = rope(q, k, c, s)
        assert torch.equal(q_out, got[0]) and torch.equal(k_out, got[1])


@pytest.mark.parametrize("layout", ["fused_qkv", "transposed", "last_dim_strided", "strided_tables"])
def test_non_contiguous_inputs(kernel_device, layout):
    """Views as the model makes them give the results (and gradients) of contiguous copies, bit for bit."""
    B, T, Hq, Hk, D = 2, 5, 6, 2, 10
    g = torch.Generator().manual_seed(0)
    cos, sin = tables(D, torch.arange(T)[None] + torch.arange(B)[:, None], device=kernel_device)  # (B, T, D/2)
    if layout == "fused_qkv":  # slices of one (B, T, (Hq + 2 Hk) D) projection
        qkv = torch.randn(B, T, (Hq + 2 * Hk) * D, generator=g).to(kernel_device).requires_grad_()
        q = qkv[..., : Hq * D].view(B, T, Hq, D)  # (B, T, Hq, D), stride T: (Hq + 2 Hk) D
        k = qkv[..., Hq * D : (Hq + Hk) * D].view(B, T, Hk, D)  # (B, T, Hk, D)
    elif layout == "transposed":  # stored (B, H, T, D)
        q = torch.randn(B, Hq, T, D, generator=g).to(kernel_device).requires_grad_().transpose(1, 2)
        k = torch.randn(B, Hk, T, D, generator=g).to(kernel_device).requires_grad_().transpose(1, 2)
    elif layout == "last_dim_strided":  # stored (B, T, D, H): the host makes it contiguous
        q = torch.randn(B, T, D, Hq, generator=g).to(kernel_device).requires_grad_().transpose(2, 3)
        k = torch.randn(B, T, D, Hk, generator=g).to(kernel_device).requires_grad_().transpose(2, 3)
    else:  # contiguous q, k; cos/sin stored (B, D/2, T), and sin a slice of a wider table
        q, k = make_qk((B, T, Hq, Hk, D), torch.float32, kernel_device)
        cos = cos.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, D/2), strides (T D/2, 1, T)
        sin = torch.cat([sin, sin], dim=-1)[..., : D // 2]  # (B, T, D/2), strides (T D, D, 1)
    assert not (q.is_contiguous() and k.is_contiguous() and cos.is_contiguous() and sin.is_contiguous())
    got = assert_matches_ref(q, k, cos, sin, 1e-6, 1e-5)

    q_c, k_c = q.detach().contiguous().requires_grad_(), k.detach().contiguous().requires_grad_()
    want = kernel_and_ref(q_c, k_c, cos.contiguous(), sin.contiguous())[0]
    for g_, w in zip(got, want):
        assert torch.equal(g_, w)


def test_unused_output_and_expanded_gradient(kernel_device):
    """loss = q_out.sum(): k's gradient is zero, and q's comes from an expanded (all strides 0) upstream gradient."""
    q, k = make_qk((2, 3, 4, 2, 8), torch.float32, kernel_device)
    cos, sin = tables(8, torch.arange(3)[None], device=kernel_device)
    q_out, _ = rope(q, k, cos, sin)
    q_out.sum().backward()
    q32 = q.detach().requires_grad_()
    rope_ref(q32, k.detach(), cos, sin)[0].sum().backward()
    torch.testing.assert_close(q.grad, q32.grad, atol=1e-6, rtol=1e-5)
    assert torch.equal(k.grad, torch.zeros_like(k))


def poisoned_like(x: torch.Tensor, pad: int = 64):
    """A NaN-filled contiguous buffer shaped like x, followed in memory by `pad` sentinels (-7) that must survive."""
    storage = torch.full((x.numel() + pad,), float("nan"), dtype=x.dtype, device=x.device)
    storage[x.numel():] = -7.0
    return storage[: x.numel()].view(x.shape), storage[x.numel():]


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[4]], ids=lambda s: "x".join(map(str, s)))
def test_poisoned_output_buffers(kernel_device, shape):
    """Every output element is written (no NaN left), nothing past the end is, and the buffers are returned."""
    B, T, _, _, D = shape
    q, k = (x.detach() for x in make_qk(shape, torch.float32, kernel_device))
    grad_q_out, grad_k_out = (x.detach() for x in make_qk(shape, torch.float32, kernel_device, seed=1))
    cos, sin = tables(D, torch.arange(T)[None].expand(B, T), device=kernel_device)
    ref_q, ref_k = rope_ref(q, k, cos, sin)

    (q_out, q_tail), (k_out, k_tail) = poisoned_like(q), poisoned_like(k)
    got = rope_forward(q, k, cos, sin, q_out=q_out, k_out=k_out)
    assert got[0] is q_out and got[1] is k_out
    (grad_q, gq_tail), (grad_k, gk_tail) = poisoned_like(q), poisoned_like(k)
    got = rope_backward(grad_q_out, grad_k_out, cos, sin, grad_q=grad_q, grad_k=grad_k)
    assert got[0] is grad_q and got[1] is grad_k

    for out in (q_out, k_out, grad_q, grad_k):
        assert not out.isnan().any()
    for tail in (q_tail, k_tail, gq_tail, gk_tail):
        assert (tail == -7.0).all()
    torch.testing.assert_close(q_out, ref_q, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(k_out, ref_k, atol=1e-6, rtol=1e-5)
    # backward = forward by the negative angle, so rotating the gradients back forward restores them
    torch.testing.assert_close(rope_ref(grad_q, grad_k, cos, sin)[0], grad_q_out, atol=1e-5, rtol=1e-5)


def bad_inputs(case: str):
    B, T, D = 2, 3, 8
    q, k = torch.randn(B, T, 4, D), torch.randn(B, T, 2, D)  # (B, T, Hq, D), (B, T, Hk, D)
    cos, sin = tables(D, torch.arange(T)[None])  # (1, T, D/2)
    if case == "3-D q":
        q = q.flatten(2)
    elif case == "k batch":
        k = torch.randn(B + 1, T, 2, D)
    elif case == "k length":
        k = torch.randn(B, T + 1, 2, D)
    elif case == "k head_dim":
        k = torch.randn(B, T, 2, D + 2)
    elif case == "odd head_dim":
        q, k = torch.randn(B, T, 4, 7), torch.randn(B, T, 2, 7)
    elif case == "table length":
        cos, sin = tables(D, torch.arange(T + 1)[None])
    elif case == "table batch":
        cos, sin = tables(D, torch.arange(T)[None].expand(B + 1, T))
    elif case == "table width":
        cos, sin = tables(2 * D, torch.arange(T)[None])
    elif case == "cos vs sin":
        sin = sin.expand(B, T, -1)
    elif case == "integer q":
        q, k = q.long(), k.long()
    elif case == "dtypes differ":
        k = k.bfloat16()
    elif case == "devices differ":
        k = k.to("meta")
    elif case == "bad out buffer":
        return (q, k, cos, sin), {"q_out": torch.empty(B, T, 4, D, dtype=torch.bfloat16)}
    return (q, k, cos, sin), {}


BAD_INPUTS = {  # case: the message it must raise
    "3-D q": r"must be 4-D \(B, T, heads, head_dim\)",
    "k batch": "must agree in batch, sequence length and head_dim",
    "k length": "must agree in batch, sequence length and head_dim",
    "k head_dim": "must agree in batch, sequence length and head_dim",
    "odd head_dim": "head_dim must be a positive even number.*got 7",
    "table length": r"cos/sin must have shape \(2 or 1, 3, 4\).*got \(1, 4, 4\)",
    "table batch": r"cos/sin must have shape \(2 or 1, 3, 4\).*got \(3, 3, 4\)",
    "table width": r"cos/sin must have shape \(2 or 1, 3, 4\).*got \(1, 3, 8\)",
    "cos vs sin": "cos and sin must have the same shape",
    "integer q": "q and k must be floating point.*cast them",
    "dtypes differ": r"q and k must have the same dtype.*k.to\(q.dtype\)",
    "devices differ": "must be on the same device",
    "bad out buffer": "q_out must be a contiguous torch.float32 tensor of shape",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise(kernel_device, case):
    args, kwargs = bad_inputs(case)
    with pytest.raises(ValueError, match=BAD_INPUTS[case]):
        rope_forward(*args, **kwargs)
    if not kwargs:  # the autograd entry point checks the same way
        with pytest.raises(ValueError, match=BAD_INPUTS[case]):
            rope(*args)


def test_kernels_do_not_import_model():
    """kernels/ is below model/: the eager reference lives beside the kernel, and the model's eager RoPE is that one
    function, not a copy."""
    for path in sorted((Path(kernels.__file__).parent).glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        modules += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
        assert not [m for m in modules if m.split(".")[0] == "model"], f"{path.name} imports model/"
    assert model.rope.apply_rope is apply_rope_ref
