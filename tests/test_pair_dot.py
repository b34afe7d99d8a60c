"""pair_dot (DESIGN primitive 2): gathered dot products and their gradients
against the N x k x D gather they replace; gradcheck, opcheck, determinism."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from relkd import ops

from helpers import assert_bounded_error, embeddings, num_threads, requires_extension

pytestmark = requires_extension


def gathered(a, b, idx):
    """The materialising form: (a[:, None] * b[idx]).sum(-1), 0 at padding."""
    out = (a[:, None, :] * b[idx.clamp(min=0)]).sum(-1)
    return torch.where(idx >= 0, out, torch.zeros_like(out))


def random_index(n, k, m, seed, pad_fraction):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, max(m, 1), (n, k), generator=g)
    pad = torch.rand(n, k, generator=g) < pad_fraction
    return torch.where(pad | (m == 0), torch.full_like(idx, -1), idx)


def value_and_grads(fn, a, b, idx, weights):
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    out = fn(a, b, idx)
    ga, gb = torch.autograd.grad((out * weights).sum(), (a, b))
    return out.detach(), ga, gb


@given(n=st.integers(1, 300), m=st.integers(1, 400), k=st.integers(1, 40),
       d=st.integers(1, 130), pad=st.sampled_from([0.0, 0.3, 1.0]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_matches_the_gather(n, m, k, d, pad, dtype, seed):
    a, b = embeddings(n, d, seed, dtype), embeddings(m, d, seed + 1, dtype)
    idx = random_index(n, k, m, seed, pad)
    w = embeddings(n, k, seed + 2, dtype)
    fused = value_and_grads(ops.pair_dot, a, b, idx, w)
    same = value_and_grads(gathered, a, b, idx, w)
    exact = value_and_grads(gathered, a.double(), b.double(), idx, w.double())
    for f, s, e, what in zip(fused, same, exact, ("out", "grad_a", "grad_b")):
        assert f.dtype == dtype
        assert_bounded_error(f, s, e, what)


def test_gradcheck():
    a = embeddings(7, 5, seed=1, dtype=torch.float64).requires_grad_()
    b = embeddings(9, 5, seed=2, dtype=torch.float64).requires_grad_()
    idx = random_index(7, 4, 9, seed=3, pad_fraction=0.25)
    assert torch.autograd.gradcheck(lambda a_, b_: ops.pair_dot(a_, b_, idx), (a, b))


def test_second_derivatives_are_exact():
    # pair_dot_backward has its own (bilinear) autograd formula, so the
    # double backward of RAD / CoupleFace is exact, not silently zero.
    a = embeddings(7, 5, seed=1, dtype=torch.float64).requires_grad_()
    b = embeddings(9, 5, seed=2, dtype=torch.float64).requires_grad_()
    idx = random_index(7, 4, 9, seed=3, pad_fraction=0.25)
    assert torch.autograd.gradgradcheck(lambda a_, b_: ops.pair_dot(a_, b_, idx), (a, b))
    g = embeddings(7, 4, seed=4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda g_, a_, b_: torch.ops.relkd.pair_dot_backward(g_, a_, b_, idx, True, True),
        (g, a, b))


def test_opcheck():
    a = embeddings(20, 6, seed=4).requires_grad_()
    b = embeddings(30, 6, seed=5).requires_grad_()
    idx = random_index(20, 5, 30, seed=6, pad_fraction=0.2)
    torch.library.opcheck(torch.ops.relkd.pair_dot.default, (a, b, idx))
    g = embeddings(20, 5, seed=7)
    torch.library.opcheck(torch.ops.relkd.pair_dot_backward.default,
                          (g, a.detach(), b.detach(), idx, True, True))


def test_repeated_columns_accumulate_in_a_fixed_order():
    # Every row points at column 0 many times: the scatter-add case.
    a = embeddings(500, 33, seed=8).requires_grad_()
    b = embeddings(3, 33, seed=9).requires_grad_()
    idx = torch.zeros(500, 16, dtype=torch.long)
    results = []
    for threads in (1, 2, 1, 2):
        with num_threads(threads):
            a.grad = b.grad = None
            (ops.pair_dot(a, b, idx) * 0.37).sum().backward()
            results.append((a.grad.clone(), b.grad.clone()))
    for ga, gb in results[1:]:
        assert torch.equal(ga, results[0][0]) and torch.equal(gb, results[0][1])
