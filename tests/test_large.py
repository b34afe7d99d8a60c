"""Scale beyond 32-bit pair counts (`make test-large`, not CI): EKD over
N = 66,560 rows (2.2e9 > 2^31 unordered pairs; 65,536 rows give 2^31 - 2^17)
and top-k search with N * M > 2^31, each checked against a chunked
computation that never holds N x N either."""
import pytest
import torch

import relkd
from relkd import functional as Fn

from helpers import embeddings, requires_extension

pytestmark = [requires_extension, pytest.mark.large]


def negative_counts(x, y, thresholds, chunk=2048):
    """For each threshold t: (#negative pairs i < j with s_ij > t, with s_ij >= t),
    in float64, a chunk of rows at a time."""
    n = x.shape[0]
    xd = x.double()
    above = torch.zeros(len(thresholds), dtype=torch.long)
    at_least = torch.zeros(len(thresholds), dtype=torch.long)
    cols = torch.arange(n)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        s = xd[lo:hi] @ xd.T
        valid = (cols[None, :] > torch.arange(lo, hi)[:, None]) & (y[lo:hi, None] != y[None, :])
        v = s[valid]
        for a, t in enumerate(thresholds):
            above[a] += int((v > t).sum())
            at_least[a] += int((v >= t).sum())
    return above, at_least


def test_ekd_over_two_billion_pairs():
    n, d = 66_560, 16
    fs = embeddings(n, d, seed=1)
    ft = fs + 0.5 * embeddings(n, d, seed=2)
    y = torch.arange(n) // 4
    levels = (1e-1, 1e-3, 1e-5, 1e-7)
    zeros = torch.zeros(len(levels))
    fs.requires_grad_()
    # momentum 1: the new anchors are exactly this batch's thresholds.
    loss, s_anchor, _ = Fn.ekd_loss(fs, ft, y, zeros, zeros, momentum=1.0, topk=2000,
                                    fpr_levels=levels, backend="fused")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(fs.grad).all()
    n_neg = n * (n - 1) // 2 - n // 4 * 6
    assert n_neg > 2**31
    x = torch.nn.functional.normalize(fs.detach(), dim=1)
    # The float32 products of a tile and of a chunk may differ in the last
    # bits: the threshold at position r must be the r-th value within 1e-6.
    tol = 1e-6
    above, _ = negative_counts(x, y, [float(t) + tol for t in s_anchor])
    _, at_least = negative_counts(x, y, [float(t) - tol for t in s_anchor])
    for a, level in enumerate(levels):
        r = n_neg // round(1 / level)
        assert above[a] <= r < at_least[a], (level, r, int(above[a]), int(at_least[a]))


def test_topk_search_beyond_int32_products():
    n, m, d, k = 4096, 600_000, 4, 20
    assert n * m > 2**31
    a = embeddings(n, d, seed=3, dtype=torch.float64)
    b = embeddings(m, d, seed=4, dtype=torch.float64)
    values, indices = relkd.similarity_topk(a, b, k, backend="fused")
    x = torch.nn.functional.normalize(a, dim=1)
    c = torch.nn.functional.normalize(b, dim=1)
    best = torch.full((n, k), -float("inf"), dtype=torch.float64)
    for lo in range(0, m, 8192):
        chunk = x @ c[lo:lo + 8192].T
        best = torch.topk(torch.cat([best, chunk], 1), k, dim=1).values
    torch.testing.assert_close(values, best, rtol=0, atol=1e-12)
    gathered = (x[:, None, :] * c[indices]).sum(-1)
    torch.testing.assert_close(gathered, values, rtol=0, atol=1e-12)
    assert int(indices.max()) > 2**16 and len(set(indices[0].tolist())) == k
