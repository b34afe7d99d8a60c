"""Fixed cases at the kernels' tile boundaries, beside the random property
tests: rows 255/256/257/513 (pair tiles and top-k row blocks are 256) and
columns 1023/1024/1025 (top-k column tiles are 1024), for every op, in
float64 against the materialising computation."""
import pytest
import torch

from relkd import ops

from helpers import embeddings, labels, requires_extension
from test_pair_select import sorted_reference
from test_pairwise_loss import KINDS, direct, fused, grads_of, inputs, rect_in_chunks

pytestmark = requires_extension
ROWS = [255, 256, 257, 513]
COLS = [1023, 1024, 1025]
F64 = torch.float64


def exact(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("rows", ROWS)
def test_topk_sim(rows, cols):
    q, c = embeddings(rows, 8, seed=rows, dtype=F64), embeddings(cols, 8, seed=cols, dtype=F64)
    ql, cl = labels("random", rows, 1), labels("random", cols, 2)
    sim = q @ c.T
    masked = torch.where(ql[:, None] != cl[None, :], sim, torch.full_like(sim, -torch.inf))
    for k in (1, 40, cols + 3):
        values, indices = ops.topk_sim(q, c, k, ql, cl)
        want = torch.sort(masked, dim=1, descending=True).values[:, :min(k, cols)]
        want = torch.cat([want, want.new_full((rows, k - want.shape[1]), -torch.inf)], 1)
        exact(values, want)  # excluded and missing candidates are -inf padding
        found = indices >= 0
        assert torch.equal(found, torch.isfinite(want))
        exact(sim.gather(1, indices.clamp(min=0))[found], values[found])


@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("rows", ROWS)
def test_pair_dot(rows, cols):
    a, b = embeddings(rows, 6, seed=rows, dtype=F64), embeddings(cols, 6, seed=cols, dtype=F64)
    idx = torch.randint(-1, cols, (rows, 9), generator=torch.Generator().manual_seed(3))
    want = torch.where(idx >= 0, (a[:, None] * b[idx.clamp(min=0)]).sum(-1), 0.0)
    exact(ops.pair_dot(a, b, idx), want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", ROWS)
def test_pairwise_loss_symmetric(kind, n):
    args = inputs(kind, n, 5, seed=n, dtype=F64)
    for got, want in zip(grads_of(fused, kind, *args), grads_of(direct, kind, *args)):
        exact(got, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cols", COLS)
def test_pairwise_loss_row_blocks_against_many_columns(kind, cols):
    # Row blocks of 255 / 256 / 257 / 255 rows against all `cols` columns,
    # as DDP ranks compute them.
    args = inputs(kind, cols, 5, seed=cols, dtype=F64)
    bounds = [0, 255, 511, 768, cols]
    whole = grads_of(direct, kind, *args)
    blocks = grads_of(lambda *a: rect_in_chunks(*a, bounds=bounds), kind, *args)
    for got, want in zip(blocks, whole):
        exact(got, want)


@pytest.mark.parametrize("n", ROWS + COLS[:1])
def test_pair_selection(n):
    x = torch.nn.functional.normalize(embeddings(n, 6, seed=n, dtype=F64), dim=1)
    y = labels("random", n, 4)
    divisors, topk = [10, 1000], 700
    thr, top_v, top_i, top_j, n_neg = ops.negative_pair_select(x, y, divisors, topk, None,
                                                               None, 0, "")
    ref_thr, ref_v, ref_i, ref_j, ref_n = sorted_reference(x, y, divisors, topk)
    assert int(n_neg) == ref_n
    exact(thr, ref_thr)
    exact(top_v, ref_v)
    assert torch.equal(top_i, ref_i) and torch.equal(top_j, ref_j)
    # The rows of one DDP rank (255 rows from 257 on) against all columns.
    rows = slice(257, min(n, 512))
    sel = ops.negative_pair_select(x[rows], y[rows], divisors, topk, x, y, rows.start, "")
    local = (ref_i >= rows.start) & (ref_i < rows.stop)
    got_pairs = set(zip(sel[2].tolist(), sel[3].tolist())) - {(-1, -1)}
    assert set(zip(ref_i[local].tolist(), ref_j[local].tolist())) <= got_pairs
