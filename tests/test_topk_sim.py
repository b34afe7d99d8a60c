"""topk_sim (DESIGN primitive 1) and relkd.similarity_topk: fused vs the
reference, by value (near-ties may swap indices in float32), exactly where
ties are exact; label and self exclusion, padding, M >> N, opcheck."""
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import relkd
from relkd import ops, reference

from helpers import LABEL_PATTERNS, embeddings, labels, num_threads, requires_extension

pytestmark = requires_extension


def check_mining(values, indices, a, b, k, valid, atol):
    """Mining is right if each row holds min(k, #valid) distinct valid
    candidates, sorted descending, whose float64 similarities equal the k
    largest valid float64 similarities up to atol, then padding."""
    x = reference.normalize(a.double(), torch.float64)
    c = x if b is None else reference.normalize(b.double(), torch.float64)
    sim = x @ c.T
    want_v, _ = reference.topk_rows(sim, valid, k)
    n_valid = valid.sum(1).clamp(max=k)
    for i in range(len(x)):
        kept = int(n_valid[i])
        idx = indices[i, :kept]
        assert (indices[i, kept:] == -1).all() and torch.isinf(values[i, kept:]).all()
        assert len(set(idx.tolist())) == kept and (idx >= 0).all()
        assert valid[i, idx].all(), f"row {i}: an excluded candidate was mined"
        assert (values[i, :kept].diff() <= atol).all(), f"row {i}: not sorted"
        torch.testing.assert_close(sim[i, idx], want_v[i, :kept], atol=atol, rtol=0)
        torch.testing.assert_close(values[i, :kept].double(), sim[i, idx], atol=atol, rtol=0)


def batch_valid(n, y, exclude_self):
    valid = torch.ones(n, n, dtype=torch.bool)
    if exclude_self:
        valid &= ~torch.eye(n, dtype=torch.bool)
    if y is not None:
        valid &= y[:, None] != y[None, :]
    return valid


@given(n=st.integers(1, 300), d=st.integers(1, 130), k_extra=st.integers(-300, 5),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       pattern=st.sampled_from(LABEL_PATTERNS + ("none",)), exclude_self=st.booleans(),
       seed=st.integers(0, 2**16))
def test_batch_mode_property(n, d, k_extra, dtype, pattern, exclude_self, seed):
    k = max(1, n + k_extra)
    a = embeddings(n, d, seed, dtype)
    y = None if pattern == "none" else labels(pattern, n, seed)
    values, indices = relkd.similarity_topk(a, k=k, a_labels=y, exclude_self=exclude_self,
                                            backend="fused")
    assert values.dtype == dtype and indices.shape == (n, k)
    atol = 1e-12 if dtype == torch.float64 else 2e-6
    check_mining(values, indices, a, None, k, batch_valid(n, y, exclude_self), atol)
    if dtype == torch.float64:  # no near-ties at this precision: indices agree exactly
        ref_v, ref_i = relkd.similarity_topk(a, k=k, a_labels=y, exclude_self=exclude_self,
                                             backend="reference")
        assert torch.equal(indices, ref_i)


@given(n=st.integers(1, 40), m=st.integers(1, 5000), d=st.integers(1, 130),
       k=st.integers(1, 60), dtype=st.sampled_from([torch.float32, torch.float64]),
       with_labels=st.booleans(), scaled=st.booleans(), seed=st.integers(0, 2**16))
def test_bank_mode_property(n, m, d, k, dtype, with_labels, scaled, seed):
    a = embeddings(n, d, seed, dtype)
    b = 3.0 * embeddings(m, d, seed + 1, dtype)  # unnormalised bank rows
    ya = labels("random", n, seed) if with_labels else None
    yb = labels("random", m, seed + 2) if with_labels else None
    # scaled: the path of banks too large to copy (raw rows times inverse
    # norms in the search); otherwise the bank is searched as a normalised copy.
    copy_limit = 0 if scaled else relkd.functional.BANK_COPY_MAX_BYTES
    with mock.patch.object(relkd.functional, "BANK_COPY_MAX_BYTES", copy_limit):
        assert (relkd.functional.bank_operand(b, dtype)[1] is not None) == scaled
        values, indices = relkd.similarity_topk(a, b, k, ya, yb, backend="fused")
    valid = torch.ones(n, m, dtype=torch.bool)
    if with_labels:
        valid &= ya[:, None] != yb[None, :]
    check_mining(values, indices, a, b, k, valid, 1e-12 if dtype == torch.float64 else 2e-6)


def test_bank_much_larger_than_queries():
    a = embeddings(3, 32, seed=1)
    b = embeddings(200_000, 32, seed=2)
    values, indices = relkd.similarity_topk(a, b, k=50, backend="fused")
    check_mining(values, indices, a, b, 50, torch.ones(3, 200_000, dtype=torch.bool), 2e-6)


def test_exact_ties_go_to_the_smaller_index():
    # One-hot rows: every similarity is exactly 0 or 1, whatever the summation order.
    eye = torch.eye(4)
    a = torch.cat([eye, eye, eye])  # rows i, i+4, i+8 are equal
    _, fused = relkd.similarity_topk(a, k=11, backend="fused")
    _, ref = relkd.similarity_topk(a, k=11, backend="reference")
    assert torch.equal(fused, ref)
    assert fused[0].tolist() == [4, 8, 1, 2, 3, 5, 6, 7, 9, 10, 11]


@pytest.mark.parametrize("k", [1, 7, 100, 333])
def test_exact_ties_in_wide_tiles_go_to_the_smaller_index(k):
    # Small-integer vectors: dot products are exact small integers, so each
    # tile row of 1024 values holds long runs of ties at the k-th value; the
    # first tile of a row seeds its selection from the whole row.
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-2, 3, (37, 3), generator=g).double()
    b = torch.randint(-2, 3, (3000, 3), generator=g).double()
    for dtype in (torch.float32, torch.float64):
        values, fused = relkd.ops.topk_sim(q.to(dtype), b.to(dtype), k)
        sims = q @ b.T
        # larger similarity first, ties to the smaller index
        order = torch.argsort(-sims * 4096 + torch.arange(3000, dtype=torch.float64), dim=1)
        assert torch.equal(fused, order[:, :k])
        assert torch.equal(values.double(), sims.gather(1, order[:, :k]))


def test_label_and_self_exclusion_explicit():
    a = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.9, 0.2]])
    y = torch.tensor([0, 0, 1, 1])
    _, idx = relkd.similarity_topk(a, k=3, a_labels=y, backend="fused")
    assert idx[0].tolist() == [3, 2, -1]  # 1 shares row 0's label, 0 is itself
    _, idx = relkd.similarity_topk(a, k=2, exclude_self=False, backend="fused")
    assert idx[0].tolist() == [0, 1]


def test_nan_rows_rank_below_every_number():
    a = embeddings(6, 4, seed=3)
    a[2] = float("nan")
    values, idx = relkd.similarity_topk(a, k=5, backend="fused")
    _, ref = relkd.similarity_topk(a, k=5, backend="reference")
    assert torch.equal(idx, ref)
    assert (idx[[0, 1, 3, 4, 5], 4] == 2).all()  # the NaN row comes last
    assert torch.isnan(values[2]).all()  # its own similarities are NaN, still mined in order


def test_half_inputs_mine_in_float32():
    a = embeddings(50, 16, seed=4).half()
    values, indices = relkd.similarity_topk(a, k=5, backend="fused")
    assert values.dtype == torch.float32
    check_mining(values, indices, a.float(), None, 5, batch_valid(50, None, True), 2e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_deterministic_and_independent_of_threads(threads):
    a, b = embeddings(700, 24, seed=5), embeddings(9000, 24, seed=6)
    with num_threads(threads):
        first = ops.topk_sim(a, b, 17)
        second = ops.topk_sim(a, b, 17)
    with num_threads(3 - threads):
        other = ops.topk_sim(a, b, 17)
    for x, y_, z in zip(first, second, other):
        assert torch.equal(x, y_) and torch.equal(x, z)


def test_column_split_follows_threads_without_changing_results():
    # The bank's columns are split into more ranges the more threads there
    # are (1, 2 and 5 ranges of 1024-column tiles here); the selection is
    # exact under (value, index) order, so every split gives the same pairs.
    a, b = embeddings(600, 16, seed=14), embeddings(9000, 16, seed=15)
    ya, yb = labels("random", 600, 16), labels("random", 9000, 17)
    results = []
    for threads in (1, 2, 7):
        with num_threads(threads):
            results.append(ops.topk_sim(a, b, 40, ya, yb))
    for values, indices in results[1:]:
        assert torch.equal(values, results[0][0]) and torch.equal(indices, results[0][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    a, b = embeddings(40, 8, seed=7, dtype=dtype), embeddings(300, 8, seed=8, dtype=dtype)
    la, lb = labels("random", 40, 1), labels("random", 300, 2)
    scale = torch.rand(300, dtype=dtype) + 0.5
    for args in [(a, b, 5, None, None, None, False, 0),
                 (a, b, 7, la, lb, scale, False, 0),
                 (a, a, 50, la, la, None, True, 0)]:
        torch.library.opcheck(torch.ops.relkd.topk_sim.default, args)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_values_carry_no_gradient_on_either_backend(backend):
    # A search, not a loss: both paths return detached values (documented).
    a = embeddings(30, 6, seed=9).requires_grad_()
    b = embeddings(50, 6, seed=10).requires_grad_()
    for values, indices in (relkd.similarity_topk(a, k=4, backend=backend),
                            relkd.similarity_topk(a, b, 4, backend=backend)):
        assert not values.requires_grad and values.grad_fn is None
        assert not indices.requires_grad


def test_mining_ops_are_registered_non_differentiable():
    a = embeddings(30, 6, seed=11).requires_grad_()
    values, _ = ops.topk_sim(a, a, 3)
    assert not values.requires_grad
    x = torch.nn.functional.normalize(a, dim=1)
    y = labels("random", 30, 3)
    hist = torch.ops.relkd.pair_histogram(x, None, y, None, None, None,
                                          torch.zeros(1, dtype=torch.long), 16)
    assert not hist.requires_grad
    top = torch.ops.relkd.pair_topk(x, None, y, None, None, None, 0, 5, 5)
    assert not top[0].requires_grad


def test_k_far_beyond_the_bank_pads_without_large_buffers():
    # Buffers are sized by min(k, M): k = 10^6 against 7 rows costs nothing.
    a, b = embeddings(4, 3, seed=12), embeddings(7, 3, seed=13)
    values, indices = ops.topk_sim(a, b, 1_000_000)
    assert values.shape == (4, 1_000_000)
    assert (indices[:, 7:] == -1).all() and (indices[:, :7] >= 0).all()
    torch.testing.assert_close(values[:, :7], torch.sort(a @ b.T, dim=1, descending=True).values)


@pytest.mark.parametrize("n", [1, 5, 300])
def test_few_queries_against_a_large_bank_are_split_across_threads(n):
    # Work items are (row block, column range) with the split fixed by the
    # shapes: the result is bitwise the same on 1, 2 or 4 threads.
    a, b = embeddings(n, 16, seed=14), embeddings(40_000, 16, seed=15)
    runs = []
    for threads in (1, 2, 4):
        with num_threads(threads):
            runs.append(ops.topk_sim(a, b, 33))
    for values, indices in runs[1:]:
        assert torch.equal(values, runs[0][0]) and torch.equal(indices, runs[0][1])
    want = torch.topk(a @ b.T, 33, dim=1)
    torch.testing.assert_close(runs[0][0], want.values)


def test_minus_infinity_outranks_nan_even_after_a_nan_bar():
    # Four NaN similarities fill a k=2 selection (its bar is NaN) before a
    # -inf one arrives, which still ranks above NaN (SPEC §9).
    q = torch.ones(1, 1, dtype=torch.float64)
    c = torch.tensor([[float("nan")]] * 4 + [[-float("inf")]], dtype=torch.float64)
    values, indices = ops.topk_sim(q, c, 2)
    assert indices.tolist() == [[4, 0]]
    assert values[0, 0] == -float("inf") and torch.isnan(values[0, 1])


@pytest.mark.parametrize("pattern", [None, "random", "same", "distinct"])
@pytest.mark.parametrize("n,k", [(1, 3), (2, 5), (1500, 7), (2049, 40), (300, 400),
                                 (9000, 3)])
def test_symmetric_equals_a_plain_search(n, k, pattern):
    # topk_sim_symmetric (hardest_identities' and RAD's batch mining on the
    # CPU) computes each product once and feeds both rows' selections;
    # float64 has no near-ties here, so the indices must equal a plain
    # search's exactly, with and without label exclusion.
    x = reference.normalize(embeddings(n, 9, seed=30, dtype=torch.float64), torch.float64)
    y = None if pattern is None else labels(pattern, n, seed=n)
    values, indices = ops.topk_sim_symmetric(x, k, y)
    want_v, want_i = ops.topk_sim(x, x, k, y, y, exclude_self=True)
    assert torch.equal(indices, want_i)
    torch.testing.assert_close(values, want_v, rtol=0, atol=1e-12)


def test_symmetric_opcheck_and_threads():
    x = embeddings(2100, 5, seed=31)
    torch.library.opcheck(torch.ops.relkd.topk_sim_symmetric.default, (x[:300], 6))
    y = labels("random", 300, seed=31)
    torch.library.opcheck(torch.ops.relkd.topk_sim_symmetric.default, (x[:300], 6, y))
    with num_threads(1):
        one = ops.topk_sim_symmetric(x, 6)
    with num_threads(3):
        three = ops.topk_sim_symmetric(x, 6)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])
