"""sp_gram_forward / sp_gram_backward (CPU): SP's Gram identity as C++ ops,
against the same identity written with PyTorch ops (relkd.fused, the path of
the other devices) and against autograd through it; the same bits for any
thread count; opcheck. SPLoss as a whole is tested in test_losses_fused.py."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relkd import fused

from helpers import embeddings, num_threads, requires_extension

pytestmark = requires_extension


def features(n, d_s, d_t, seed, dtype=torch.float64):
    return embeddings(n, d_s, seed, dtype), embeddings(n, d_t, seed + 1, dtype)


def backward_by_autograd(f_s, f_t, a_s, a_t, w_s, w_t, u):
    """Gradients of sum w_s r_s + w_t r_t + u c through the PyTorch form."""
    leaves = [t.detach().double().requires_grad_() for t in (f_s, f_t)]
    batch = [] if a_s is None else [t.detach().double().requires_grad_() for t in (a_s, a_t)]
    out = fused._sp_gram_forward_torch(*leaves, *(batch or (None, None)))
    total = (w_s * out[3]).sum() + (w_t * out[4]).sum() + (u * out[5]).sum()
    return torch.autograd.grad(total, leaves + batch)


@settings(deadline=None, max_examples=25)
@given(n=st.integers(0, 700), m=st.integers(1, 700), d_s=st.integers(1, 40),
       d_t=st.integers(1, 40), rect=st.booleans(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_matches_the_pytorch_form_and_its_gradient(n, m, d_s, d_t, rect, seed, dtype):
    f_s, f_t = features(n, d_s, d_t, seed, dtype)
    a_s, a_t = features(m, d_s, d_t, seed + 7, dtype) if rect else (None, None)
    got = torch.ops.relkd.sp_gram_forward(f_s, f_t, a_s, a_t)
    want = fused._sp_gram_forward_torch(f_s, f_t, a_s, a_t)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)

    g = torch.Generator().manual_seed(seed)
    w_s, w_t, u = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3))
    grads = torch.ops.relkd.sp_gram_backward(f_s, f_t, a_s, a_t, *got[:3], w_s, w_t, u,
                                             True, True)
    want = backward_by_autograd(f_s, f_t, a_s, a_t, w_s, w_t, u)
    if not rect:  # the batch is the rows: its part is added to theirs
        assert grads[2].numel() == 0 and grads[3].numel() == 0
        grads = grads[:2]
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for got_g, want_g, like in zip(grads, want, (f_s, f_t, a_s, a_t)):
        assert got_g.dtype == like.dtype
        torch.testing.assert_close(got_g.double(), want_g, rtol=tol, atol=tol)


def test_skips_the_gradients_not_needed():
    f_s, f_t = features(300, 8, 5, seed=3)
    a_s, a_t = features(500, 8, 5, seed=4)
    grams = torch.ops.relkd.sp_gram_forward(f_s, f_t, a_s, a_t)[:3]
    w = torch.ones(300, dtype=torch.float64)
    g_fs, g_ft, g_as, g_at = torch.ops.relkd.sp_gram_backward(f_s, f_t, a_s, a_t, *grams, w, w,
                                                              w, True, False)
    assert g_fs.shape == f_s.shape and g_as.shape == a_s.shape
    assert g_ft.numel() == 0 and g_at.numel() == 0


@pytest.mark.parametrize("rect", [False, True])
def test_same_bits_for_any_thread_count(rect):
    """Grams are summed per group of rows fixed by the row count, then in
    group order; rows are independent."""
    f_s, f_t = features(3000, 24, 16, seed=5, dtype=torch.float32)
    a_s, a_t = features(2000, 24, 16, seed=6, dtype=torch.float32) if rect else (None, None)
    w = torch.linspace(-1, 1, 3000, dtype=torch.float64)
    results = []
    for threads in (1, 2, 3):
        with num_threads(threads):
            fwd = torch.ops.relkd.sp_gram_forward(f_s, f_t, a_s, a_t)
            bwd = torch.ops.relkd.sp_gram_backward(f_s, f_t, a_s, a_t, *fwd[:3], w, w.flip(0),
                                                   w * 0.5, True, True)
        results.append(fwd + bwd)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_arguments_are_checked():
    f_s, f_t = features(10, 4, 3, seed=1)
    with pytest.raises(ValueError, match="a_s and a_t must be given together"):
        torch.ops.relkd.sp_gram_forward(f_s, f_t, f_s, None)
    with pytest.raises(ValueError, match="rows must match"):
        torch.ops.relkd.sp_gram_forward(f_s, f_t[:9], None, None)
    with pytest.raises(ValueError, match="same dims"):
        torch.ops.relkd.sp_gram_forward(f_s, f_t, f_s[:, :3], f_t)
    grams = torch.ops.relkd.sp_gram_forward(f_s, f_t, None, None)[:3]
    w = torch.ones(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="row weights must be float64 of length 10"):
        torch.ops.relkd.sp_gram_backward(f_s, f_t, None, None, *grams, w[:9], w, w, True, True)


@pytest.mark.parametrize("rect", [False, True])
def test_opcheck(rect):
    f_s, f_t = features(40, 6, 4, seed=2, dtype=torch.float32)
    a_s, a_t = features(30, 6, 4, seed=8, dtype=torch.float32) if rect else (None, None)
    torch.library.opcheck(torch.ops.relkd.sp_gram_forward.default, (f_s, f_t, a_s, a_t))
    grams = torch.ops.relkd.sp_gram_forward(f_s, f_t, a_s, a_t)[:3]
    w = torch.linspace(0, 1, 40, dtype=torch.float64)
    torch.library.opcheck(torch.ops.relkd.sp_gram_backward.default,
                          (f_s, f_t, a_s, a_t, *grams, w, w, w, True, rect))
