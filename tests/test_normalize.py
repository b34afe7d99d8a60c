"""normalize_rows / normalize_rows_backward (CPU): every fused loss's row
normalisation in one pass, against F.normalize (values and gradients, bounded
by F.normalize's own float32 error against float64), zero, tiny and NaN rows,
derivatives of every order, the same bits for any thread count, opcheck."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from relkd import ops

from helpers import embeddings, num_threads, requires_extension

pytestmark = requires_extension

EPS = 1e-12


def rows(n, d, seed, dtype, scale_exponents=None):
    x = embeddings(n, d, seed, dtype)
    if scale_exponents is not None:  # rows from tiny (clamped) to large norms
        x = x * torch.pow(10.0, scale_exponents.to(dtype))[:, None]
    return x


def max_abs(t):
    return t.abs().max().item() if t.numel() else 0.0


def values_and_grad(fn, x, g):
    leaf = x.detach().requires_grad_()
    y = fn(leaf)
    y.backward(g)
    return y.detach(), leaf.grad


@settings(deadline=None, max_examples=40)
@given(n=st.integers(0, 300), d=st.integers(1, 300), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]), scaled=st.booleans())
def test_matches_f_normalize_and_its_gradient(n, d, seed, dtype, scaled):
    gen = torch.Generator().manual_seed(seed)
    exponents = torch.randint(-16, 4, (n,), generator=gen) if scaled else None
    x = rows(n, d, seed, dtype, exponents)
    g = torch.randn(n, d, generator=gen, dtype=dtype)
    got_y, got_g = values_and_grad(lambda t: ops.normalize_rows(t, EPS), x, g)
    want_y, want_g = values_and_grad(lambda t: F.normalize(t, dim=1, eps=EPS), x, g)
    assert got_y.dtype == dtype and got_g.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(got_y, want_y, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(got_g, want_g, rtol=1e-12, atol=1e-12 * (1 + max_abs(want_g)))
        return
    # float32: no further from the float64 truth than F.normalize's own float32
    # result is (plus a few units in the last place).
    true_y, true_g = values_and_grad(lambda t: F.normalize(t, dim=1, eps=EPS), x.double(),
                                     g.double())
    ulp_y = 4 * torch.finfo(dtype).eps
    assert max_abs(got_y.double() - true_y) <= max_abs(want_y.double() - true_y) + ulp_y
    scale_g = true_g.abs().amax(1, keepdim=True).clamp(min=1)  # per row: g/|x| can be huge
    err_got = max_abs((got_g.double() - true_g) / scale_g)
    err_want = max_abs((want_g.double() - true_g) / scale_g)
    assert err_got <= 2 * err_want + 16 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_tiny_and_nan_rows_behave_as_f_normalize(dtype):
    x = embeddings(5, 7, 0, dtype)
    x[1] = 0                          # zero row: y = 0, gradient g / eps
    x[2] = x[2] * 1e-15               # below eps: clamped
    x[3, 4] = float("nan")            # NaN row stays NaN (never silently finite)
    g = embeddings(5, 7, 1, dtype)
    got_y, got_g = values_and_grad(lambda t: ops.normalize_rows(t, EPS), x, g)
    want_y, want_g = values_and_grad(lambda t: F.normalize(t, dim=1, eps=EPS), x, g)
    torch.testing.assert_close(got_y, want_y, equal_nan=True)
    assert got_y[3].isnan().all() and got_g[3].isnan().all()
    keep = torch.tensor([0, 1, 2, 4])
    torch.testing.assert_close(got_g[keep], want_g[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_g[1], g[1] / EPS)


def test_gradients_of_every_order_and_of_the_norm_output():
    x = embeddings(6, 5, 2, torch.float64).requires_grad_()
    torch.autograd.gradcheck(lambda t: torch.ops.relkd.normalize_rows(t, EPS), (x,))
    torch.autograd.gradgradcheck(lambda t: torch.ops.relkd.normalize_rows(t, EPS), (x,))
    torch.autograd.gradcheck(lambda t: torch.ops.relkd.normalize_rows(t, EPS)[1], (x,))


def test_same_bits_for_any_thread_count():
    x = embeddings(3000, 96, 3, torch.float32)
    g = embeddings(3000, 96, 4, torch.float32)
    results = []
    for threads in (1, 2, 3):
        with num_threads(threads):
            results.append(values_and_grad(lambda t: ops.normalize_rows(t, EPS), x, g))
    for y, grad in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(grad, results[0][1])


def test_arguments_are_checked():
    x = embeddings(4, 3, 0, torch.float32)
    with pytest.raises(ValueError, match="x must be a 2-D"):
        torch.ops.relkd.normalize_rows(x[0], EPS)
    with pytest.raises(ValueError, match="x must be a 2-D float32/float64"):
        torch.ops.relkd.normalize_rows(x.half(), EPS)
    with pytest.raises(ValueError, match="eps must be positive"):
        torch.ops.relkd.normalize_rows(x, 0.0)
    y, norm = torch.ops.relkd.normalize_rows(x, EPS)
    with pytest.raises(ValueError, match="grad and y must match"):
        torch.ops.relkd.normalize_rows_backward(x[:3], y, norm, EPS)
    with pytest.raises(ValueError, match="norm must be a CPU vector"):
        torch.ops.relkd.normalize_rows_backward(x, y, norm[:3], EPS)


@pytest.mark.parametrize("n", [0, 1, 70])
def test_opcheck(n):
    x = embeddings(n, 9, 5, torch.float64).requires_grad_()
    torch.library.opcheck(torch.ops.relkd.normalize_rows.default, (x, EPS))
    y, norm = torch.ops.relkd.normalize_rows(x.detach(), EPS)
    torch.library.opcheck(torch.ops.relkd.normalize_rows_backward.default,
                          (torch.randn_like(y), y, norm, EPS))


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 8e37), (torch.float64, 1e160),
                                         (torch.float64, 1e300)])
def test_rows_whose_norm_overflows_still_become_unit_rows(dtype, scale):
    # |x|^2 overflows (float64 from about 1e154; float32's norm itself from
    # about 3.4e38, so these float32 rows, |x| ~ 4 * 8e37): y = x / inf would
    # be a zero vector, silently.
    unit = embeddings(6, 16, 7, torch.float64)
    factor = scale * 3 / unit.abs().amax().item()  # float32: entries up to 2.4e38 < its max
    x = (unit * factor).to(dtype)
    g = embeddings(6, 16, 8, dtype)
    got_y, got_g = values_and_grad(lambda t: ops.normalize_rows(t, EPS), x, g)
    want = unit / unit.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got_y.double(), want, rtol=0, atol=4 * torch.finfo(dtype).eps)
    assert torch.isfinite(got_g).all()
    _, norm = torch.ops.relkd.normalize_rows(x, EPS)
    if dtype == torch.float32:
        assert torch.isinf(norm).any()  # beyond float32: the rescaled path ran
    elif scale < 1e300:
        torch.testing.assert_close(norm, unit.norm(dim=1) * factor, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_python_normalisation_equals_f_normalize_and_survives_overflow(dtype):
    # relkd._common.normalize (the reference's and the non-CPU path's): the
    # bits of F.normalize, values and gradients, over norms from 1e-15 to
    # 1e3; and unit rows where F.normalize returns zero vectors.
    from relkd._common import normalize, row_norms
    x = rows(60, 9, 3, dtype, torch.linspace(-15, 3, 60))
    x[4] = 0
    g = embeddings(60, 9, 4, dtype)
    got_y, got_g = values_and_grad(lambda t: normalize(t, dtype), x, g)
    want_y, want_g = values_and_grad(lambda t: F.normalize(t, dim=1, eps=EPS), x, g)
    assert torch.equal(got_y, want_y) and torch.equal(got_g, want_g)
    big = embeddings(5, 9, 5, dtype) * (1e30 if dtype == torch.float32 else 1e200)
    assert (F.normalize(big, dim=1) == 0).all()  # what the reference did before
    torch.testing.assert_close(normalize(big, dtype).norm(dim=1), torch.ones(5, dtype=dtype))
    torch.testing.assert_close(row_norms(big).double(), big.double().norm(dim=1) if
                               dtype == torch.float32 else embeddings(5, 9, 5, dtype).norm(
                                   dim=1) * 1e200, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bank_norms_survive_overflow_compiled_and_under_vmap(dtype):
    # row_norms cannot branch on data there: every row takes its scale, and
    # the result equals eager's (torch's norm's bits where it is finite).
    from relkd._common import row_norms
    x = embeddings(7, 9, 6, dtype)
    x[2] *= 1e30 if dtype == torch.float32 else 1e200
    x[5] = 0
    want = row_norms(x)
    assert torch.isfinite(want).all() and want[2] > 1e29
    torch._dynamo.reset()
    got = torch.compile(row_norms, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=4 * torch.finfo(dtype).eps, atol=0)
    vmapped = torch.vmap(lambda b: row_norms(b))(torch.stack([x, x.flip(0)]))
    assert torch.equal(vmapped[0], want) and torch.equal(vmapped[1], want.flip(0))
