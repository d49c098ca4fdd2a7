"""kernels/fused_linear_cross_entropy.py against the unfused fp64 reference: loss, n_correct and the gradients of
the hidden states, the weight and the bias, through both chunk paths (PyTorch; Triton on kernel_device).

Tolerances (absolute, relative), loss and gradients alike:
    fp32 inputs, fp32 compute      1e-5, 1e-5    fp32 products and fp32 loss math, chunked vs whole
    fp32 master weights under
        bf16 autocast              vs a reference fed the same bf16-rounded inputs and bf16-rounded logits:
                                   loss 1e-4, 1e-4 (fp32 math on identical logits); gradients 2e-2, 2e-2 (the
                                   products' bf16 outputs round at 2^-8 relative; fp32 accumulation)
    bf16 weights                   gradients accumulated in bf16 across chunks: 3e-2, 3e-2 against the fp64
                                   gradient of the same bf16 inputs
"""

import pytest
import torch

from kernels.fused_linear_cross_entropy import (chunk_loss_and_grad, fused_linear_cross_entropy,
                                                fused_linear_cross_entropy_ref)

OPTIONS = [
    dict(),
    dict(label_smoothing=0.1),
    dict(softcap=3.0),
    dict(z_loss=1e-2),
    dict(label_smoothing=0.1, softcap=3.0, z_loss=1e-2),
]


def make(N, H, V, dtype=torch.float32, bias=False, ignore=0.25, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H**-0.5 * 3).to(device, dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).to(device, dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignore] = -100
    return hidden, weight, b, labels.to(device)


def grads_of(loss, tensors, upstream=None):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, tensors, upstream)


def reference(hidden, weight, bias, labels, reduction, upstream=None, **opts):
    """Loss, n_correct and gradients in fp64 from the unfused reference (leaves re-made in fp64)."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss, n_correct = fused_linear_cross_entropy_ref(leaves[0], leaves[1], labels, leaves[2],
                                                     reduction=reduction, **opts)
    return loss, n_correct, grads_of(loss, leaves, upstream)


def check(got, want, atol, rtol):
    (loss, n_correct, grads), (loss_ref, n_correct_ref, grads_ref) = got, want
    torch.testing.assert_close(loss.double().cpu(), loss_ref.cpu(), atol=atol, rtol=rtol)
    assert int(n_correct) == int(n_correct_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g.double().cpu(), r.cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_pytorch_chunks_equal_the_unfused_loss(opts, reduction, bias):
    hidden, weight, b, labels = make(37, 16, 53, bias=bias)  # 37 rows in chunks of 8: the last one is short
    upstream = torch.randn(37) if reduction == "none" else None
    loss, n_correct = fused_linear_cross_entropy(hidden, weight, labels, b, reduction=reduction, chunk_rows=8, **opts)
    got = loss, n_correct, grads_of(loss, (hidden, weight, b), upstream)
    check(got, reference(hidden, weight, b, labels, reduction, upstream, **opts), 1e-5, 1e-5)


@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, softcap=3.0, z_loss=1e-2)],
                         ids=["plain", "all-options"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_chunks_equal_the_unfused_loss(kernel_device, opts, reduction, dtype):
    hidden, weight, b, labels = make(21, 24, 131, dtype=dtype, bias=True, device=kernel_device)
    upstream = torch.randn(21, device=kernel_device) if reduction == "none" else None
    loss, n_correct = fused_linear_cross_entropy(hidden, weight, labels, b, reduction=reduction, chunk_rows=8,
                                                 use_triton=True, **opts)
    got = loss, n_correct, grads_of(loss, (hidden, weight, b), upstream)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    check(got, reference(hidden, weight, b, labels, reduction, upstream, **opts), tol, tol)


def test_triton_and_pytorch_chunks_agree(kernel_device):
    hidden, weight, b, labels = make(40, 32, 300, bias=True, device=kernel_device)
    opts = dict(label_smoothing=0.05, softcap=5.0, z_loss=1e-3, reduction="sum", chunk_rows=16)
    outs = []
    for use_triton in (False, True):
        loss, n_correct = fused_linear_cross_entropy(hidden, weight, labels, b, use_triton=use_triton, **opts)
        outs.append((loss, n_correct, grads_of(loss, (hidden, weight, b))))
    check(outs[1], [outs[0][0].double(), outs[0][1], [g.double() for g in outs[0][2]]], 1e-5, 1e-5)


def test_autocast_bf16_with_fp32_master_weights():
    hidden, weight, _, labels = make(33, 16, 70)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, n_correct = fused_linear_cross_entropy(hidden, weight, labels, chunk_rows=8)
    got = loss, n_correct, grads_of(loss, (hidden, weight))
    assert got[2][1].dtype == torch.float32  # the fp32 master weight gets an fp32 gradient
    # the reference sees what autocast computes: bf16-rounded inputs, a bf16 product, then fp32 loss math
    h16, w16 = (t.detach().bfloat16().double().requires_grad_() for t in (hidden, weight))
    logits = (h16 @ w16.T).bfloat16().double()
    from kernels.cross_entropy import cross_entropy_ref

    loss_ref, n_correct_ref = cross_entropy_ref(logits, labels)
    assert int(n_correct) == int(n_correct_ref)
    torch.testing.assert_close(loss.double(), loss_ref, atol=1e-4, rtol=1e-4)
    grads_ref = grads_of(fused_linear_cross_entropy_ref(h16, w16, labels)[0], (h16, w16))
    for g, r in zip(got[2], grads_ref):
        torch.testing.assert_close(g.double(), r, atol=2e-2, rtol=2e-2)


def test_bf16_weights_accumulate_in_bf16():
    hidden, weight, _, labels = make(64, 16, 90, dtype=torch.bfloat16)
    loss, n_correct = fused_linear_cross_entropy(hidden, weight, labels, reduction="sum", chunk_rows=8)
    got = loss, n_correct, grads_of(loss, (hidden, weight))
    assert all(g.dtype == torch.bfloat16 for g in got[2])
    check(got, reference(hidden, weight, None, labels, "sum"), 3e-2, 3e-2)


def test_tied_embedding_gets_both_gradients():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 12)
    idx, labels = torch.randint(0, 50, (3, 9)), torch.randint(0, 50, (3, 9))
    hidden = torch.tanh(emb(idx))  # (3, 9, 12): the table feeds the input side too
    loss, _ = fused_linear_cross_entropy(hidden, emb.weight, labels, chunk_rows=4)
    (grad,) = torch.autograd.grad(loss, emb.weight)
    loss_ref, _ = fused_linear_cross_entropy_ref(torch.tanh(emb(idx)), emb.weight, labels)
    (grad_ref,) = torch.autograd.grad(loss_ref, emb.weight)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-5)


def test_no_learnable_row_gives_zero_loss_and_gradients():
    hidden, weight, b, labels = make(9, 8, 20, bias=True, ignore=1.0)
    for reduction in ("mean", "sum"):
        loss, n_correct = fused_linear_cross_entropy(hidden, weight, labels, b, reduction=reduction, chunk_rows=4)
        assert float(loss) == 0.0 and int(n_correct) == 0
        assert all(float(g.abs().max()) == 0.0 for g in grads_of(loss, (hidden, weight, b)))


def test_under_no_grad_nothing_is_computed_for_backward():
    hidden, weight, _, labels = make(17, 8, 30)
    with torch.no_grad():
        loss, n_correct = fused_linear_cross_entropy(hidden, weight, labels, chunk_rows=4)
    assert loss.grad_fn is None
    loss_ref, n_correct_ref = fused_linear_cross_entropy_ref(hidden.detach(), weight.detach(), labels)
    torch.testing.assert_close(loss, loss_ref.float(), atol=1e-6, rtol=1e-6)
    assert int(n_correct) == int(n_correct_ref)


def test_poisoned_buffers_are_fully_written(monkeypatch):
    """Every buffer the pass allocates starts as NaN (True for the bool ones): an unwritten row would show."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(True) if t.dtype == torch.bool else t.fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    hidden, weight, b, labels = make(29, 8, 40, bias=True)
    loss, n_correct = fused_linear_cross_entropy(hidden, weight, labels, b, reduction="sum", chunk_rows=8)
    got = loss, n_correct, grads_of(loss, (hidden, weight, b))
    monkeypatch.undo()
    check(got, reference(hidden, weight, b, labels, "sum"), 1e-5, 1e-5)


def test_chunk_function_matches_its_own_reference_per_row():
    logits = torch.randn(6, 11) * 4
    labels = torch.tensor([0, 10, -100, 3, 3, 7])
    scale = torch.tensor([0.5])
    loss, correct = chunk_loss_and_grad(logits.clone(), labels, ignore_index=-100, label_smoothing=0.1, softcap=2.0,
                                        z_loss=1e-2, grad_scale=None, write_grad=False)
    from kernels.cross_entropy import cross_entropy_ref

    loss_ref, _ = cross_entropy_ref(logits, labels, reduction="none", label_smoothing=0.1, softcap=2.0, z_loss=1e-2)
    torch.testing.assert_close(loss, loss_ref.float(), atol=1e-6, rtol=1e-6)
    assert correct[2].item() is False  # an ignored row is never counted correct
    g = logits.clone()
    chunk_loss_and_grad(g, labels, ignore_index=-100, label_smoothing=0.1, softcap=2.0, z_loss=1e-2, grad_scale=scale,
                        write_grad=True)
    x = logits.clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(cross_entropy_ref(x, labels, reduction="sum", label_smoothing=0.1, softcap=2.0,
                                                        z_loss=1e-2)[0] * 0.5, x)
    torch.testing.assert_close(g, grad_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case, match", [
    ("hidden-weight", "do not match"), ("labels-shape", "labels"), ("bias-shape", "bias"),
    ("float-labels", "integer"), ("label-range", "is outside"),
    ("reduction", "reduction"),
])
def test_bad_input_is_a_clear_error(case, match):
    hidden, weight, b, labels = make(10, 8, 20, bias=True, ignore=0.0)
    kwargs = {}
    if case == "hidden-weight":
        weight = torch.randn(20, 9)
    elif case == "labels-shape":
        labels = labels[:-1]
    elif case == "bias-shape":
        b = torch.randn(19)
    elif case == "float-labels":
        labels = labels.float()
    elif case == "label-range":
        labels[3] = 20
    elif case == "reduction":
        kwargs["reduction"] = "avg"
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(hidden, weight, labels, b, chunk_rows=4, **kwargs)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's, under the interpreter
@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_non_finite_hidden_gives_non_finite_loss(use_triton, request):
    """A NaN or inf in the hidden states is divergence, not bad input: no exception, the rows' losses are
    non-finite (never a finite wrong value) on both chunk paths, and the other rows are unchanged."""
    device = request.getfixturevalue("kernel_device") if use_triton else "cpu"
    hidden, weight, _, labels = make(10, 8, 20, ignore=0.0, device=device)
    hidden = hidden.detach().clone()
    clean, _ = fused_linear_cross_entropy(hidden, weight, labels, reduction="none", chunk_rows=4,
                                          use_triton=use_triton)
    hidden[4, 2], hidden[7, 0] = float("nan"), float("inf")
    hidden.requires_grad_()
    rows, _ = fused_linear_cross_entropy(hidden, weight, labels, reduction="none", chunk_rows=4, use_triton=use_triton)
    assert not torch.isfinite(rows[[4, 7]]).any()
    others = [i for i in range(10) if i not in (4, 7)]
    torch.testing.assert_close(rows[others], clean[others], atol=0, rtol=0)
    loss, _ = fused_linear_cross_entropy(hidden, weight, labels, reduction="sum", chunk_rows=4, use_triton=use_triton)
    assert not torch.isfinite(loss)
    loss.backward()
    assert not torch.isfinite(weight.grad).all()  # the step's gradient norm is non-finite too: on_nan sees it


def test_second_backward_is_refused():
    hidden, weight, _, labels = make(8, 8, 20)
    loss, _ = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
