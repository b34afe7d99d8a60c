"""pair_dot (DESIGN primitive 2) and pair_list_dot (its form for a list of
(row, column) pairs, EKD's hard negatives): gathered dot products and their
gradients against the gathers they replace; gradcheck, gradgradcheck,
opcheck, argument errors, determinism."""
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


# ------------------------------------------------------------ pair_list_dot
def listed(a, b, rows, cols):
    """The gathering form: (a[rows] * b[cols]).sum(1), 0 where either is -1."""
    other = a if b is None else b
    zero = a.new_zeros(1, a.shape[1])  # index -1 reads this appended zero row
    out = (torch.cat([a, zero])[rows] * torch.cat([other, zero])[cols]).sum(1)
    return torch.where((rows >= 0) & (cols >= 0), out, torch.zeros_like(out))


def random_pairs(count, n, m, seed, pad_fraction):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, max(n, 1), (count,), generator=g)
    cols = torch.randint(0, max(m, 1), (count,), generator=g)
    rows = torch.where((torch.rand(count, generator=g) < pad_fraction) | (n == 0), -1, rows)
    cols = torch.where((torch.rand(count, generator=g) < pad_fraction) | (m == 0), -1, cols)
    return rows, cols


def list_values_and_grads(fn, a, b, rows, cols, weights):
    leaves = [t.detach().clone().requires_grad_() for t in (a, b) if t is not None]
    out = fn(leaves[0], leaves[1] if b is not None else None, rows, cols)
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    return (out.detach(), *grads)


@given(count=st.integers(0, 600), n=st.integers(0, 200), m=st.integers(0, 200),
       d=st.integers(1, 130), shared=st.booleans(), pad=st.sampled_from([0.0, 0.2, 1.0]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_pair_list_dot_matches_the_gather(count, n, m, d, shared, pad, dtype, seed):
    a = embeddings(n, d, seed, dtype)
    b = None if shared else embeddings(m, d, seed + 1, dtype)
    rows, cols = random_pairs(count, n, n if shared else m, seed, pad)
    w = embeddings(count, 1, seed + 2, dtype).reshape(-1)
    fused = list_values_and_grads(ops.pair_list_dot, a, b, rows, cols, w)
    same = list_values_and_grads(listed, a, b, rows, cols, w)
    exact = list_values_and_grads(listed, a.double(), None if shared else b.double(), rows,
                                  cols, w.double())
    for f, s, e, what in zip(fused, same, exact, ("out", "grad_a", "grad_b")):
        assert f.dtype == dtype
        assert_bounded_error(f, s, e, what)
    # The form other devices run (two index_selects) agrees too.
    other_devices = list_values_and_grads(ops.pair_list_dot_gathered, a, b, rows, cols, w)
    for f, s, e, what in zip(other_devices, same, exact, ("out", "grad_a", "grad_b")):
        assert_bounded_error(f, s, e, "gathered " + what)


@pytest.mark.parametrize("shared", [False, True])
def test_pair_list_dot_derivatives_of_every_order(shared):
    a = embeddings(7, 5, seed=1, dtype=torch.float64).requires_grad_()
    b = embeddings(9, 5, seed=2, dtype=torch.float64).requires_grad_()
    rows, cols = random_pairs(25, 7, 7 if shared else 9, seed=3, pad_fraction=0.2)
    rows[:4], cols[:4] = 2, 3  # repeated pairs accumulate

    def fn(a_, b_):
        return ops.pair_list_dot(a_, None if shared else b_, rows, cols)

    assert torch.autograd.gradcheck(fn, (a, b))
    assert torch.autograd.gradgradcheck(fn, (a, b))
    g = embeddings(25, 1, seed=4, dtype=torch.float64).reshape(-1).requires_grad_()
    backward = torch.ops.relkd.pair_list_dot_backward
    assert torch.autograd.gradcheck(
        lambda g_, a_, b_: backward(g_, a_, None if shared else b_, rows, cols, True, True),
        (g, a, b))


@pytest.mark.parametrize("shared", [False, True])
def test_pair_list_dot_opcheck(shared):
    a = embeddings(20, 6, seed=4).requires_grad_()
    b = None if shared else embeddings(30, 6, seed=5).requires_grad_()
    rows, cols = random_pairs(40, 20, 20 if shared else 30, seed=6, pad_fraction=0.2)
    torch.library.opcheck(torch.ops.relkd.pair_list_dot.default, (a, b, rows, cols))
    g = embeddings(40, 1, seed=7).reshape(-1)
    torch.library.opcheck(torch.ops.relkd.pair_list_dot_backward.default,
                          (g, a.detach(), None if shared else b.detach(), rows, cols, True, True))


def test_pair_list_dot_rejects_bad_arguments():
    a, b = embeddings(4, 3, seed=1), embeddings(5, 3, seed=2)
    ok = torch.tensor([0, 1])
    bad = [
        ((a, b, torch.tensor([0, 4]), ok), r"rows values must lie in \[-1, 4\)"),
        ((a, b, ok, torch.tensor([-2, 0])), r"cols values must lie in \[-1, 5\)"),
        ((a, None, ok, torch.tensor([0, 4])), r"cols values must lie in \[-1, 4\)"),
        ((a, b, ok, torch.tensor([0, 1, 2])), "cols must have shape"),
        ((a, b, ok.int(), ok), "rows must be int64"),
        ((a, b.double(), ok, ok), "same dtype"),
        ((a, embeddings(5, 4, seed=3), ok, ok), "same dim"),
        ((a[0], b, ok, ok), "a must be 2-D"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            torch.ops.relkd.pair_list_dot(*args)
    with pytest.raises(ValueError, match="grad must have the shape of rows"):
        torch.ops.relkd.pair_list_dot_backward(torch.ones(3), a, b, ok, ok, True, True)


@pytest.mark.parametrize("shared", [False, True])
def test_pair_list_dot_gradients_are_the_same_bits_for_any_thread_count(shared):
    # Many pairs on few rows: the scatter-add case, summed in pair order.
    a = embeddings(300, 33, seed=8).requires_grad_()
    b = None if shared else embeddings(3, 33, seed=9).requires_grad_()
    g = torch.Generator().manual_seed(10)
    rows = torch.randint(0, 300, (5000,), generator=g)
    cols = torch.randint(0, 300 if shared else 3, (5000,), generator=g)
    leaves = [t for t in (a, b) if t is not None]
    results = []
    for threads in (1, 2, 3, 1, 2):
        with num_threads(threads):
            out = ops.pair_list_dot(a, b, rows, cols)
            grads = torch.autograd.grad((out * 0.37).sum(), leaves)
            results.append((out, *grads))
    for r in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(r, results[0]))
