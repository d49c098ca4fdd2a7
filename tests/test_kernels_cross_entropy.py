"""kernels/cross_entropy.py against cross_entropy_ref (F.cross_entropy), computed in float64 from the same values.

Tolerances (atol, rtol), elementwise (torch.testing.assert_close), in TOLERANCES below:
- loss, fp32 and bf16 logits alike: (1e-5, 1e-5). The kernel accumulates in fp32 whatever the input dtype, and the
  reference upcasts the very same values (bf16 -> fp64 is exact), so bf16 input rounding is not counted as error.
  Measured (interpreter) <= 1e-6 relative, at most 0.07 of the tolerance; the largest absolute error, 1e-4, is on
  a summed loss of ~ 2000 (softcap 30 on logits ~ N(0, 40^2)).
- gradient, fp32: (1e-6, 1e-5), fp32 rounding of exp, log and the softcap's 1 - (z / c)^2, which cancels near
  |z| = c (hence the atol). Measured <= 4e-7 absolute, at most 0.27 of the tolerance.
- gradient, bf16: the gradient is stored in bf16, one rounding to an 8-bit significand. Natively that rounds to
  nearest, relative error <= 2^-8 (3.9e-3): (1e-7, 4e-3). Triton 3.6's interpreter truncates instead (its fp32 ->
  bf16 cast takes no rounding mode), error < 2^-7: (1e-7, 8e-3) there. When the backward then scales rows by an
  upstream gradient other than 1 the result is rounded again: twice those, (1e-7, 8e-3) and (1e-7, 1.6e-2).
  Measured under the interpreter <= 7.8e-3 and 1.5e-2 relative: the truncation bounds, which hold exactly.
Integer outputs (n_correct, correct rows) and the zeros of ignored rows are compared exactly.

Rows span several blocks of the online sweep: the tests lower kernels.cross_entropy.MAX_BLOCK_BYTES so that
V = 37 ... 4099 takes 2 to 5 blocks with a ragged tail. The file runs in about 40 s under TRITON_INTERPRET=1 on two
CPU cores.
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (requirements-test.txt installs it)")

import kernels.cross_entropy as ce  # noqa: E402
from kernels import INTERPRET  # noqa: E402
from kernels.cross_entropy import (  # noqa: E402
    cross_entropy, cross_entropy_forward, cross_entropy_ref, scale_rows_)

IGNORE = -100
BF16_STORE = 8e-3 if INTERPRET else 4e-3  # relative error of one fp32 -> bf16 store: truncated, or rounded to nearest
TOLERANCES = {  # dtype: {quantity: (atol, rtol)}
    torch.float32: {"loss": (1e-5, 1e-5), "grad": (1e-6, 1e-5), "grad_rescaled": (1e-6, 1e-5)},
    torch.bfloat16: {"loss": (1e-5, 1e-5), "grad": (1e-7, BF16_STORE), "grad_rescaled": (1e-7, 2 * BF16_STORE)},
}
DTYPES = [torch.float32, torch.bfloat16]
OPTIONS = {  # name: (cross_entropy options, scale of the random logits)
    "plain": ({}, 1.0),
    "smoothing": ({"label_smoothing": 0.1}, 1.0),
    "softcap": ({"softcap": 30.0}, 40.0),  # logits ~ N(0, 40^2): most are well into tanh's curve
    "z_loss_small": ({"z_loss": 1e-4}, 1.0),
    "z_loss_large": ({"z_loss": 1e-2}, 3.0),  # w * lse^2 ~ 0.1 of a loss of ~ 8: a wrong term shows
    "all": ({"label_smoothing": 0.1, "softcap": 30.0, "z_loss": 1e-2}, 40.0),
}


@pytest.fixture
def block_bytes(monkeypatch):
    """Set the kernels' block size in input bytes (e.g. 1024: 256 fp32 or 512 bf16 columns)."""
    return lambda n: monkeypatch.setattr(ce, "MAX_BLOCK_BYTES", n)


def make_inputs(n, v, dtype, device, *, scale=1.0, ignored=(), seed=0):
    """Random logits (n, v) and labels (n,): even rows labelled with their argmax, so accuracy is not always 0."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::2] = logits.float().argmax(dim=-1)[::2]
    labels[list(ignored)] = IGNORE
    return logits.to(device), labels.to(device)


def check_against_ref(logits, labels, *, reduction="mean", upstream=None, inplace_grad=False, **options):
    """Loss, n_correct and the gradient of cross_entropy against cross_entropy_ref in fp64.

    upstream: None backpropagates loss itself (grad_output exactly 1), a float a scalar multiple, a tensor a
    per-row upstream gradient (reduction "none").
    """
    tol = TOLERANCES[logits.dtype]
    base = logits.detach().clone().requires_grad_()
    x = base.clone()  # a non-leaf, as the model's logits are: inplace_grad overwrites its memory
    loss, n_correct = cross_entropy(x, labels, reduction=reduction, inplace_grad=inplace_grad, **options)
    base_ref = logits.detach().double().requires_grad_()
    loss_ref, n_correct_ref = cross_entropy_ref(base_ref, labels, reduction=reduction, **options)

    assert loss.dtype == torch.float32 and loss.shape == loss_ref.shape
    torch.testing.assert_close(loss.double(), loss_ref, atol=tol["loss"][0], rtol=tol["loss"][1])
    assert n_correct.dtype == torch.int64 and n_correct.shape == () and int(n_correct) == int(n_correct_ref)

    if upstream is None:
        grad_out, rescaled = torch.ones_like(loss), False
    else:
        grad_out = torch.as_tensor(upstream, dtype=torch.float32, device=loss.device).expand_as(loss)
        rescaled = True
    loss.backward(grad_out)
    loss_ref.backward(grad_out.double())
    atol, rtol = tol["grad_rescaled" if rescaled else "grad"]
    assert base.grad.dtype == logits.dtype
    torch.testing.assert_close(base.grad.double(), base_ref.grad, atol=atol, rtol=rtol)
    learnable = labels != IGNORE
    assert (base.grad[~learnable] == 0).all()  # exactly
    return loss, base.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, v, ignored", [
    (1, 2, ()),  # tiny
    (7, 37, (1, 4)),  # odd, with a mix of ignored rows
    (5, 1000, (3,)),  # a vocabulary that is not a power of two
    (1, 37, ()),  # a single row
    (6, 37, range(6)),  # every row ignored
], ids=["1x2", "7x37", "5x1000", "1x37", "all_ignored"])
def test_shapes(kernel_device, block_bytes, dtype, n, v, ignored):
    block_bytes(64)  # 16 fp32 or 32 bf16 columns: several blocks per row and a ragged tail
    logits, labels = make_inputs(n, v, dtype, kernel_device, ignored=ignored)
    check_against_ref(logits, labels)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", ["plain", "all"])
def test_long_rows(kernel_device, block_bytes, dtype, options):
    block_bytes(4096)  # V = 4099 in 5 fp32 or 3 bf16 blocks, the last holding 3 columns
    opts, scale = OPTIONS[options]
    logits, labels = make_inputs(64, 4099, dtype, kernel_device, scale=scale, ignored=range(5, 64, 7))
    check_against_ref(logits, labels, **opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_options(kernel_device, block_bytes, dtype, reduction, options):
    block_bytes(1024)  # V = 1000 in 4 fp32 or 2 bf16 blocks
    opts, scale = OPTIONS[options]
    logits, labels = make_inputs(40, 1000, dtype, kernel_device, scale=scale, ignored=(0, 7, 8, 30))
    # "none" gets a random upstream gradient per row: each row must be scaled by its own
    upstream = torch.randn(40, generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
    check_against_ref(logits, labels, reduction=reduction, upstream=upstream, **opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("upstream", [None, 2.5], ids=["grad_1", "grad_2.5"])
def test_backward_scale(kernel_device, block_bytes, dtype, reduction, upstream):
    block_bytes(128)
    logits, labels = make_inputs(9, 100, dtype, kernel_device, ignored=(2,))
    check_against_ref(logits, labels, reduction=reduction, upstream=upstream, label_smoothing=0.1, z_loss=1e-2)


def test_flattens_leading_dims(kernel_device):
    logits, labels = make_inputs(6, 37, torch.float32, kernel_device, ignored=(5,))
    loss, _ = check_against_ref(logits.view(2, 3, 37), labels.view(2, 3), reduction="none",
                                upstream=torch.randn(2, 3))
    assert loss.shape == (2, 3) and loss[1, 2] == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_grad(kernel_device, block_bytes, dtype, reduction):
    block_bytes(256)
    logits, labels = make_inputs(12, 300, dtype, kernel_device, scale=40.0, ignored=(3,))
    opts = OPTIONS["all"][0]
    upstream = torch.rand(12) + 0.5 if reduction == "none" else None
    _, grad_inplace = check_against_ref(logits, labels, reduction=reduction, upstream=upstream, inplace_grad=True,
                                        **opts)
    _, grad = check_against_ref(logits, labels, reduction=reduction, upstream=upstream, **opts)
    assert torch.equal(grad_inplace, grad)  # the same arithmetic, only the buffer differs

    x = logits.clone().requires_grad_().clone()
    cross_entropy(x, labels, reduction="sum", inplace_grad=True)
    assert not torch.equal(x.detach(), logits)  # the forward pass has overwritten the logits with the gradient


def test_inplace_grad_refuses_other_uses_of_the_logits(kernel_device):
    logits, labels = make_inputs(4, 37, torch.float32, kernel_device)
    x = logits.clone().requires_grad_().clone()
    other = (x * x).sum()  # saves x for its backward
    loss, _ = cross_entropy(x, labels, inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_second_backward_fails(kernel_device):
    logits, labels = make_inputs(4, 37, torch.float32, kernel_device)
    x = logits.clone().requires_grad_()
    loss, _ = cross_entropy(x, labels)
    (loss * 2.0).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # the stored gradient was scaled in place: a second pass would scale it again


def test_no_grad_computes_no_gradient(kernel_device):
    logits, labels = make_inputs(5, 37, torch.bfloat16, kernel_device)
    x = logits.clone().requires_grad_()
    with torch.no_grad():
        loss, n_correct = cross_entropy(x, labels, inplace_grad=True)
    assert loss.grad_fn is None and torch.equal(x.detach(), logits)  # the logits were not overwritten
    loss_ref, n_correct_ref = cross_entropy_ref(logits.double(), labels)
    torch.testing.assert_close(loss.double(), loss_ref, atol=1e-5, rtol=1e-5)
    assert n_correct == n_correct_ref
    loss, _ = cross_entropy(logits, labels)  # logits not requiring grad: no gradient either
    assert loss.grad_fn is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(kernel_device, reduction):
    logits, labels = make_inputs(4, 37, torch.float32, kernel_device, ignored=range(4))
    x = logits.clone().requires_grad_()
    loss, n_correct = cross_entropy(x, labels, reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
    loss.sum().backward()
    assert (loss == 0).all() and n_correct == 0  # 0, not the NaN of 0 / 0
    assert (x.grad == 0).all()


def test_accuracy_ties_take_the_first_index(kernel_device, block_bytes):
    block_bytes(64)  # 16 fp32 columns a block: V = 40 in blocks [0, 16), [16, 32), [32, 40)
    logits = torch.rand(5, 40)
    logits[0, [3, 10]] = 5.0  # tie inside one block
    logits[1, [3, 10]] = 5.0
    logits[2, [5, 37]] = 5.0  # tie across blocks 0 and 2
    logits[3, [20, 37]] = 5.0  # tie across blocks 1 and 2
    logits[4, [20, 37]] = 5.0
    labels = torch.tensor([10, 3, 37, 20, IGNORE])
    expected = [False, True, False, True, False]  # torch.argmax: the first maximal index, ignored rows never count
    assert (logits.argmax(dim=-1) == torch.tensor([3, 3, 5, 20, 20])).all()
    logits, labels = logits.to(kernel_device), labels.to(kernel_device)
    _, _, correct = cross_entropy_forward(logits, labels)
    assert correct.dtype == torch.bool and correct.tolist() == expected
    assert cross_entropy(logits, labels)[1] == 2 == cross_entropy_ref(logits, labels)[1]


def test_masked_vocabulary(kernel_device, block_bytes):
    block_bytes(64)  # 16 fp32 columns a block
    logits, labels = make_inputs(3, 40, torch.float32, kernel_device)
    logits[0, :16] = float("-inf")  # the whole first block: the running max starts at -inf
    labels[0] = 20
    logits[1, -5:] = float("-inf")  # padding at the end of the vocabulary, as tied embeddings are padded
    labels[1] = 2
    _, grad = check_against_ref(logits, labels, reduction="sum")
    assert (grad[0, :16] == 0).all() and (grad[1, -5:] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True], ids=["buffer", "inplace"])
def test_poisoned_outputs(kernel_device, block_bytes, dtype, inplace):
    """Every output element is written: NaN-filled buffers keep no NaN, ignored rows are exactly 0."""
    block_bytes(256)
    opts = {"label_smoothing": 0.1, "softcap": 30.0, "z_loss": 1e-2}
    logits, labels = make_inputs(9, 300, dtype, kernel_device, scale=40.0, ignored=(0, 4))
    ignored = labels == IGNORE
    loss_out = torch.full((9,), float("nan"), device=kernel_device)
    grad = logits.clone() if inplace else torch.full_like(logits, float("nan"))
    grad[ignored] = float("nan")  # the kernel must write the zeros of ignored rows, even over the logits
    grad_scale = torch.tensor([0.5], device=kernel_device)
    loss_rows, lse_rows, correct = cross_entropy_forward(logits if not inplace else grad, labels, grad=grad,
                                                         grad_scale=grad_scale, loss_out=loss_out, **opts)
    assert loss_rows.data_ptr() == loss_out.data_ptr()
    assert torch.isfinite(loss_rows).all() and torch.isfinite(grad).all()
    assert (loss_rows[ignored] == 0).all() and (grad[ignored] == 0).all() and not correct[ignored].any()

    x_ref = logits.double().requires_grad_()
    rows_ref, _ = cross_entropy_ref(x_ref, labels, reduction="none", **opts)
    (rows_ref.sum() * 0.5).backward()
    z_ref = 30.0 * torch.tanh(logits.double() / 30.0)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss_rows.double(), rows_ref, atol=tol["loss"][0], rtol=tol["loss"][1])
    lse_ref = torch.logsumexp(z_ref, dim=-1)[~ignored]
    torch.testing.assert_close(lse_rows[~ignored].double(), lse_ref, atol=tol["loss"][0], rtol=tol["loss"][1])
    torch.testing.assert_close(grad.double(), x_ref.grad, atol=tol["grad"][0], rtol=tol["grad"][1])
    assert correct.tolist() == ((logits.float().argmax(dim=-1) == labels) & ~ignored).tolist()


def test_strided_rows(kernel_device, block_bytes):
    """Logits and gradient rows may be slices of wider buffers (row stride > V), each with its own stride."""
    block_bytes(64)
    wide, labels = make_inputs(6, 50, torch.float32, kernel_device)
    logits = wide[:, 3:40]  # (6, 37), row stride 50
    labels = labels % 37
    grad_buffer = torch.full((6, 45), float("nan"), device=kernel_device)
    grad = grad_buffer[:, :37]  # row stride 45
    loss_rows, _, _ = cross_entropy_forward(logits, labels, grad=grad)
    x_ref = logits.double().requires_grad_()
    rows_ref, _ = cross_entropy_ref(x_ref, labels, reduction="none")
    rows_ref.sum().backward()
    torch.testing.assert_close(loss_rows.double(), rows_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), x_ref.grad, atol=1e-6, rtol=1e-5)
    assert grad_buffer[:, 37:].isnan().all()  # nothing written beyond the row


def test_scale_rows(kernel_device):
    grad = torch.randn(4, 37, device=kernel_device)
    scale_rows_(grad, torch.tensor(1.0, device=kernel_device))
    expected = grad.clone()
    scale_rows_(grad, torch.tensor(2.5, device=kernel_device))
    torch.testing.assert_close(grad, expected * 2.5, atol=0, rtol=0)
    per_row = torch.tensor([1.0, -2.0, 0.0, 1.0], device=kernel_device)
    scale_rows_(grad, per_row)
    torch.testing.assert_close(grad, expected * 2.5 * per_row[:, None], atol=0, rtol=0)
    with pytest.raises(ValueError, match="one value per row"):
        scale_rows_(grad, torch.ones(3, device=kernel_device))


def test_int32_labels(kernel_device):
    logits, labels = make_inputs(5, 37, torch.float32, kernel_device, ignored=(2,))
    loss, n_correct = cross_entropy(logits, labels.int())
    loss_ref, n_correct_ref = cross_entropy_ref(logits.double(), labels)
    torch.testing.assert_close(loss.double(), loss_ref, atol=1e-5, rtol=1e-5)
    assert n_correct == n_correct_ref


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("bad_label, match", [
    (37, r"label 37 at row 2 \(of 1 such rows\) is outside \[0, 37\) and is not ignore_index=-100"),
    (-1, r"label -1 at row 2 .* is outside \[0, 37\)"),
])
def test_label_out_of_range(kernel_device, requires_grad, bad_label, match):
    logits, labels = make_inputs(5, 37, torch.float32, kernel_device)
    labels[2] = bad_label
    with pytest.raises(ValueError, match=match):
        cross_entropy(logits.requires_grad_(requires_grad), labels)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's, under the interpreter
@pytest.mark.parametrize("dtype, value", [(torch.bfloat16, float("inf")), (torch.bfloat16, float("-inf")),
                                          (torch.float32, float("nan"))], ids=["bf16_inf", "bf16_label_-inf", "nan"])
def test_non_finite_logits(kernel_device, dtype, value):
    """inf or NaN logits are divergence, not bad input: the row's loss is non-finite (never a finite wrong value, and
    no exception), so that the caller (train.py's on_nan) decides; the other rows keep their loss and gradient."""
    logits, labels = make_inputs(5, 37, dtype, kernel_device)
    logits[3, labels[3]] = value  # -inf only hurts at the label (elsewhere it is a masked entry, see above)
    x = logits.clone().requires_grad_()
    rows, _ = cross_entropy(x, labels, reduction="none")
    assert not torch.isfinite(rows[3]) and torch.isfinite(rows[[0, 1, 2, 4]]).all()
    loss, _ = cross_entropy(x, labels, reduction="sum")
    assert not torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad[[0, 1, 2, 4]]).all()
    with torch.no_grad():
        assert not torch.isfinite(cross_entropy(logits, labels)[0])
    logits[3, labels[3]] = 0.0
    labels[3] = IGNORE  # an ignored row may hold anything
    logits[3] = float("nan")
    cross_entropy(logits, labels)


@pytest.mark.parametrize("make_bad, match", [
    (lambda x, y: (x, y[:-1]), r"labels shape \(4,\) does not match logits \(5, 37\)"),
    (lambda x, y: (x, y.float()), r"labels must be integer token ids, got torch.float32"),
    (lambda x, y: (x.long(), y), r"logits must be floating point"),
    (lambda x, y: (x[None], y), r"labels shape \(5,\) does not match logits \(1, 5, 37\)"),
])
def test_bad_inputs(kernel_device, make_bad, match):
    logits, labels = make_inputs(5, 37, torch.float32, kernel_device)
    with pytest.raises(ValueError, match=match):
        cross_entropy(*make_bad(logits, labels))
    with pytest.raises(ValueError, match="must be 'mean', 'sum' or 'none'"):
        cross_entropy(logits, labels, reduction="avg")
    with pytest.raises(ValueError, match=r"logits must be \(N, V\) after flattening"):
        cross_entropy_forward(logits[None], labels)
