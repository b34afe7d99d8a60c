"""pair_select (DESIGN primitive 4): EKD's order statistics and top-k over all
negative pairs, exact (the values sorting gives), without materialising the
pairs; ties to the smaller (i, j); row blocks combined as under DDP; opcheck."""
import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from relkd import ops, reference

from helpers import LABEL_PATTERNS, dyadic, embeddings, labels, requires_extension

pytestmark = requires_extension


def negative_pairs(x, y):
    """(values, i, j) of the negative pairs i < j in row-major order."""
    iu = torch.triu_indices(len(x), len(x), 1)
    neg = y[iu[0]] != y[iu[1]]
    return (x @ x.T)[iu[0], iu[1]][neg], iu[0][neg], iu[1][neg]


def sorted_reference(x, y, divisors, topk):
    values, rows, cols = negative_pairs(x, y)
    order = reference.sort_desc_nan_last(values)
    n = len(values)
    thresholds = values[order][[n // q for q in divisors]] if n else None
    hard = order[:topk]
    return thresholds, values[hard], rows[hard], cols[hard], n


@contextlib.contextmanager
def first_pass_collection(min_rows, cap=None):
    """negative_pair_select's first-pass key collection from `min_rows` rows
    up (a huge value turns it off), with an optional smaller key cap."""
    saved = ops.COLLECT_MIN_ROWS, ops.COLLECT_CAP
    ops.COLLECT_MIN_ROWS = min_rows
    ops.COLLECT_CAP = saved[1] if cap is None else cap
    try:
        yield
    finally:
        ops.COLLECT_MIN_ROWS, ops.COLLECT_CAP = saved


@contextlib.contextmanager
def top_pairs_by(strategy):
    """negative_pair_select's way to the top-k pairs on CPU tensors: "bar"
    (the CPU's running bar) or "bins" (CUDA's: the pairs in the first-pass
    bins a row sample predicts to hold them, checked by the histogram)."""
    saved = ops.top_by_running_bar
    ops.top_by_running_bar = lambda device: strategy == "bar"
    try:
        yield
    finally:
        ops.top_by_running_bar = saved


@given(n=st.integers(2, 300), d=st.integers(1, 130), pattern=st.sampled_from(LABEL_PATTERNS),
       topk=st.integers(0, 3000), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**16), collect=st.sampled_from([None, 0, 40, 1 << 21]),
       top=st.sampled_from(["bar", "bins"]))
def test_matches_sorting(n, d, pattern, topk, dtype, seed, collect, top):
    """collect: None = radix passes only; else the first pass keeps the
    predicted bins' keys up to that cap (0 and 40 force the fallback).
    top: the CPU's or CUDA's way to the top-k pairs."""
    x = reference.normalize(embeddings(n, d, seed, dtype), dtype)
    y = labels(pattern, n, seed)
    divisors = [10, 100, 1000, 7]
    with first_pass_collection(10**9 if collect is None else 0, collect), top_pairs_by(top):
        thr, top_v, top_i, top_j, n_neg = ops.negative_pair_select(x, y, divisors, topk, None,
                                                                   None, 0, "")
    ref_thr, ref_v, ref_i, ref_j, ref_n = sorted_reference(x, y, divisors, topk)
    assert int(n_neg) == ref_n
    if ref_n == 0:
        assert (thr == 0).all() and (top_i == -1).all()
        return
    # The selected values are the kernel's own tile products: equal to the full
    # product's up to rounding.
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(thr, ref_thr, atol=tol, rtol=0)
    kept = min(topk, ref_n)
    torch.testing.assert_close(top_v[:kept], ref_v, atol=tol, rtol=0)
    assert (top_i[kept:] == -1).all() and (top_j[kept:] == -1).all()
    pairs = set(zip(top_i[:kept].tolist(), top_j[:kept].tolist()))
    assert len(pairs) == kept and all(y[i] != y[j] and i < j for i, j in pairs)
    if dtype == torch.float64:
        assert torch.equal(top_i[:kept], ref_i) and torch.equal(top_j[:kept], ref_j)


def test_ties_go_to_the_smaller_pair():
    # One-hot rows: every negative similarity is exactly 0 or 1.
    x = torch.eye(3).repeat(4, 1)  # rows r and r + 3k are equal
    y = torch.arange(12)
    _, top_v, top_i, top_j, _ = ops.negative_pair_select(x, y, [10], 20, None, None, 0, "")
    _, ref_v, ref_i, ref_j, _ = sorted_reference(x, y, [10], 20)
    assert torch.equal(top_v, ref_v) and torch.equal(top_i, ref_i) and torch.equal(top_j, ref_j)
    assert (top_i[:3].tolist(), top_j[:3].tolist()) == ([0, 0, 0], [3, 6, 9])


def test_nan_ranks_below_every_number():
    x = reference.normalize(embeddings(30, 5, seed=1), torch.float32)
    x[4] = float("nan")
    y = torch.arange(30)
    _, top_v, top_i, top_j, n_neg = ops.negative_pair_select(x, y, [10], 435, None, None, 0, "")
    finite = torch.isfinite(top_v)
    assert finite[:406].all() and not finite[406:].any()  # 29 pairs touch row 4
    assert ((top_i[406:] == 4) | (top_j[406:] == 4)).all()


def test_row_blocks_combine_like_ddp_ranks():
    """Per-block histograms summed and per-block candidates merged give the
    same selection as one process: what the DDP path does with all_reduce."""
    x = reference.normalize(embeddings(250, 12, seed=2, dtype=torch.float64), torch.float64)
    y = labels("random", 250, 3)
    whole = ops.negative_pair_select(x, y, [10, 100], 500, None, None, 0, "")
    bounds = [0, 60, 61, 250]
    blocks = [(torch.arange(lo, hi), x[lo:hi], y[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]

    def histogram(prefixes, shift):
        return sum(torch.ops.relkd.pair_histogram(xb, x, yb, y, ids, None, prefixes, shift)
                   for ids, xb, yb in blocks)

    keys, n_above = ops.radix_select(histogram, [int(whole[4]) // 10, int(whole[4]) // 100, 499],
                                     64)
    values = torch.tensor([ops.key_to_value(k, 64) for k in keys[:2]], dtype=torch.float64)
    torch.testing.assert_close(values, whole[0], atol=1e-14, rtol=0)  # tiles round differently
    parts = [torch.ops.relkd.pair_topk(xb, x, yb, y, ids, None, ops.as_int64(keys[2]),
                                       500 - n_above[2], 500) for ids, xb, yb in blocks]
    merged = ops.merge_top_pairs(*(torch.cat(p) for p in zip(*parts)), 500)
    torch.testing.assert_close(merged[0], whole[1], atol=1e-14, rtol=0)
    assert torch.equal(merged[1], whole[2]) and torch.equal(merged[2], whole[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("topk", [0, 1, 37, 5000])
def test_histogram_topk_equals_histogram_then_topk(dtype, topk):
    """The CPU path's first pass (histogram + running top-k) gives what the
    two-pass path gives (histogram, radix threshold, pair_topk), also per row
    block as under DDP; rows 0-2 repeat so that values tie."""
    x = reference.normalize(embeddings(300, 9, seed=6, dtype=dtype), dtype)
    x[100:103] = x[0:3]
    y = labels("random", 300, 7)
    bits = ops.key_bits(dtype)
    whole = torch.zeros(1, dtype=torch.long)
    for ids, xb, yb, x_c, y_c in [(None, x, y, None, None),
                                  (torch.arange(120, 300), x[120:], y[120:], x, y)]:
        hist, *top, kept = torch.ops.relkd.pair_histogram_topk(xb, x_c, yb, y_c, ids, None,
                                                               whole, bits - 16, topk)
        assert kept.numel() == 0  # no bins to collect
        assert torch.equal(hist, torch.ops.relkd.pair_histogram(xb, x_c, yb, y_c, ids, None,
                                                                whole, bits - 16))
        n_neg = int(hist.sum())
        k_eff = min(topk, n_neg)
        if k_eff == 0:
            assert all(len(t) == topk for t in top) and (top[1] == -1).all()
            continue
        keys, n_above = ops.radix_select(
            lambda p, s: torch.ops.relkd.pair_histogram(xb, x_c, yb, y_c, ids, None, p, s),
            [k_eff - 1], bits)
        want = torch.ops.relkd.pair_topk(xb, x_c, yb, y_c, ids, None, ops.as_int64(keys[0]),
                                         k_eff - n_above[0], topk)
        for got_t, want_t in zip(top, want):
            assert torch.equal(got_t, want_t)


def order_keys(values, bits):
    """SPEC §9's order keys of a float tensor, as Python ints."""
    import struct
    fmt, ifmt = ("<f", "<I") if bits == 32 else ("<d", "<Q")
    sign, mask = 1 << (bits - 1), (1 << bits) - 1
    keys = []
    for v in values.tolist():
        if v != v:
            keys.append(0)
            continue
        raw = struct.unpack(ifmt, struct.pack(fmt, 0.0 if v == 0 else v))[0]
        keys.append((~raw & mask) if raw & sign else (raw | sign))
    return keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_later_pass_histograms_count_exactly_the_keys_under_their_prefixes(dtype):
    """pair_histogram at every shift below the top against a count over the
    materialised pairs, with prefixes that hold pairs, that hold none, and
    that lie next to held ones (later passes skip chunks of values outside
    the prefixes' range); a few exact zeros, +-0 and infinities included."""
    x = reference.normalize(embeddings(150, 5, seed=11, dtype=dtype), dtype)
    x[10], x[11] = torch.zeros(5, dtype=dtype), -x[12]
    x[20, 0] = float("inf")
    y = labels("random", 150, 12)
    values, _, _ = negative_pairs(x, y)
    bits = ops.key_bits(dtype)
    keys = order_keys(values, bits)
    g = torch.Generator().manual_seed(13)
    for shift in range(bits - 32, -1, -16):
        highs = sorted({k >> (shift + 16) for k in keys})
        picks = {highs[int(i)] for i in torch.randint(0, len(highs), (3,), generator=g)}
        picks |= {p + 1 for p in list(picks)} | {highs[0], highs[-1]}
        middle = highs[len(highs) // 2]
        for prefixes in (sorted(picks), [highs[0]], [middle], [highs[-1]], [middle, highs[-1]]):
            hist = torch.ops.relkd.pair_histogram(
                x, None, y, None, None, None, torch.tensor([ops.as_int64(p) for p in prefixes]),
                shift)
            want = torch.zeros(len(prefixes), 1 << 16, dtype=torch.long)
            row = {p: r for r, p in enumerate(prefixes)}
            for k in keys:
                r = row.get(k >> (shift + 16))
                if r is not None:
                    want[r, (k >> shift) & 0xFFFF] += 1
            assert torch.equal(hist, want), f"shift {shift}, prefixes {prefixes}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_pass_collects_the_whole_keys_of_the_chosen_bins(dtype):
    """The collected keys are exactly the pairs' keys whose top 16 bits lie
    in the ranges, descending, and nothing once there are more than the cap;
    the histogram and top pairs do not change."""
    x = reference.normalize(embeddings(200, 6, seed=21, dtype=dtype), dtype)
    x[30] = x[31]  # exact ties
    y = labels("random", 200, 22)
    bits = ops.key_bits(dtype)
    keys = order_keys(negative_pairs(x, y)[0], bits)
    bins = sorted({k >> (bits - 16) for k in keys})
    ranges = [(bins[0], bins[0]), (bins[len(bins) // 2] - 1, bins[len(bins) // 2] + 2),
              (bins[-3], 65535)]
    want = sorted((k for k in keys if any(lo <= k >> (bits - 16) <= hi for lo, hi in ranges)),
                  reverse=True)
    whole = torch.zeros(1, dtype=torch.long)
    plain = torch.ops.relkd.pair_histogram_topk(x, None, y, None, None, None, whole, bits - 16, 9)
    for cap, expect in [(len(want), want), (10**6, want), (len(want) - 1, [])]:
        got = torch.ops.relkd.pair_histogram_topk(x, None, y, None, None, None, whole, bits - 16,
                                                  9, torch.tensor(ranges), cap)
        assert [k & ((1 << bits) - 1) for k in got[4].tolist()] == expect
        assert all(torch.equal(a, b) for a, b in zip(got[:4], plain[:4]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rect", [False, True])
def test_top_pairs_at_and_above_top_min_key(dtype, rect):
    """With top_min_key the top pairs are the best topk among the pairs whose
    order key is >= top_min_key (all of them when fewer), by value and then
    (i, j), in the first pass and a later one; dyadic embeddings: exact
    products and many ties."""
    x, y = dyadic(160, 12, seed=27).to(dtype), labels("random", 160, 28)
    bits = ops.key_bits(dtype)
    values, rows, cols = negative_pairs(x, y)
    keys = order_keys(values, bits)
    order = sorted(range(len(keys)), key=lambda e: (-keys[e], int(rows[e]), int(cols[e])))
    ids = torch.arange(50, 120)
    args = (x[50:120], x, y[50:120], y, ids, None) if rect else (x, None, y, None, None, None)
    if rect:  # the pairs whose smaller id is a row's: 50..119
        order = [e for e in order if 50 <= rows[e] < 120]
    for nth_best in (0, 30, 700):
        min_key = keys[order[nth_best]]
        above = [e for e in order if keys[e] >= min_key]
        for topk in (1, 25, len(above) + 10):
            for prefixes, shift in ((torch.zeros(1, dtype=torch.long), bits - 16),
                                    (torch.tensor([min_key >> (bits - 16)]), bits - 32)):
                _, got_v, got_i, got_j, _ = torch.ops.relkd.pair_histogram_topk(
                    *args, prefixes, shift, topk, None, 0, ops.as_int64(min_key))
                best = above[:topk]
                assert got_v[:len(best)].tolist() == values[best].tolist()
                assert got_i[:len(best)].tolist() == rows[best].tolist()
                assert got_j[:len(best)].tolist() == cols[best].tolist()
                assert (got_i[len(best):] == -1).all()
                assert (got_v[len(best):] == -float("inf")).all()


def one_pass_case(dtype, pattern):
    """700 rows (above COLLECT_MIN_ROWS), labels by pattern ("duplicates":
    random labels, the second half of the rows equal to the first: many
    exact ties) and five FPR divisors."""
    n = 700
    x = reference.normalize(embeddings(n, 32, seed=23, dtype=dtype), dtype)
    if pattern == "duplicates":
        x[n // 2:] = x[:n - n // 2]
    y = labels("random" if pattern == "duplicates" else pattern, n, 24)
    return x, y, [10, 100, 1000, 10000, 100000]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pattern", ["random", "distinct", "duplicates"])
def test_top_pairs_from_predicted_bins_in_the_same_pass(dtype, pattern, monkeypatch):
    """CUDA's way to the top pairs (run here on CPU tensors): from the bins a
    row sample predicts, in the one pass that also resolves every
    threshold, bitwise the radix passes' result; a wrong prediction (too
    few pairs in the bins) is caught and the passes decide."""
    x, y, divisors = one_pass_case(dtype, pattern)
    with first_pass_collection(10**9):
        radix = ops.negative_pair_select(x, y, divisors, 300, None, None, 0, "")
    shifts = count_histogram_passes(monkeypatch)
    predicted, predict = [], ops.predicted_top_key
    monkeypatch.setattr(ops, "predicted_top_key",
                        lambda *args: predicted.append(predict(*args)) or predicted[-1])
    with first_pass_collection(0), top_pairs_by("bins"):
        one_pass = ops.negative_pair_select(x, y, divisors, 300, None, None, 0, "")
        assert predicted[0] > 0 and shifts == [ops.key_bits(dtype) - 16]
        assert all(torch.equal(a, b) for a, b in zip(one_pass, radix))
        shifts.clear()
        # The largest key: fewer than topk pairs at or above it.
        monkeypatch.setattr(ops, "predicted_top_key", lambda *args: (1 << args[-1]) - 1)
        caught = ops.negative_pair_select(x, y, divisors, 300, None, None, 0, "")
        assert len(shifts) > 1  # the k-th key's radix passes ran
        assert all(torch.equal(a, b) for a, b in zip(caught, radix))


def count_histogram_passes(monkeypatch):
    """Replaces ops.radix_select by one that records the shift of every
    histogram pass it runs."""
    shifts, radix_select = [], ops.radix_select

    def counting(histogram, *args, **kwargs):
        return radix_select(lambda p, s: shifts.append(s) or histogram(p, s), *args, **kwargs)

    monkeypatch.setattr(ops, "radix_select", counting)
    return shifts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pattern", ["random", "distinct", "duplicates"])
def test_collected_keys_resolve_every_threshold_in_one_pass(dtype, pattern, monkeypatch):
    """Above COLLECT_MIN_ROWS rows the thresholds and hard negatives come out
    of one pass over the pairs, bitwise equal to the radix passes' result."""
    x, y, divisors = one_pass_case(dtype, pattern)
    shifts = count_histogram_passes(monkeypatch)
    with first_pass_collection(10**9):
        radix = ops.negative_pair_select(x, y, divisors, 300, None, None, 0, "")
    assert len(shifts) == ops.key_bits(dtype) // 16
    shifts.clear()
    with first_pass_collection(0):
        collected = ops.negative_pair_select(x, y, divisors, 300, None, None, 0, "")
    assert shifts == [ops.key_bits(dtype) - 16]
    assert all(torch.equal(a, b) for a, b in zip(collected, radix))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_collected_resolver_returns_the_radix_passes_keys_and_ranks(dtype):
    """radix_select resolved from collected keys returns the same keys and
    counts of larger pairs as the full radix passes, ties included (the
    count stops at the first copy of a key)."""
    x = reference.normalize(embeddings(300, 5, seed=25, dtype=dtype), dtype)
    x[100:160] = x[:60]  # many exact ties
    x[7] = -x[8]  # the sign bit both ways
    y = labels("random", 300, 26)
    bits = ops.key_bits(dtype)
    n_neg = len(negative_pairs(x, y)[0])
    targets = sorted({0, 1, 5, n_neg // 3, n_neg // 2, n_neg - 2, n_neg - 1})
    whole = torch.zeros(1, dtype=torch.long)

    def histogram(prefixes, shift):
        return torch.ops.relkd.pair_histogram(x, None, y, None, None, None, prefixes, shift)

    want = ops.radix_select(histogram, targets, bits)
    ranges = [(0, 65535)]
    hist, *_, kept = torch.ops.relkd.pair_histogram_topk(
        x, None, y, None, None, None, whole, bits - 16, 0, torch.tensor(ranges), 10**6)
    resolve = ops.collected_resolver(hist, kept, ranges, bits, 10**6)
    assert resolve is not None
    assert ops.radix_select(histogram, targets, bits, resolve=resolve) == want


def test_positive_pair_count():
    y = torch.tensor([3, 1, 3, 3, 1, 7])
    assert int(ops.positive_pair_count(y)) == 3 + 1  # three 3s, two 1s
    for n, classes in ((0, 1), (1, 1), (2, 1), (300, 1), (300, 7), (300, 1000)):
        y = torch.randint(-3, classes, (n,), generator=torch.Generator().manual_seed(n))
        same = (y[:, None] == y[None, :]).triu(1).sum()
        assert int(ops.positive_pair_count(y.int())) == int(same)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    x = reference.normalize(embeddings(60, 7, seed=4, dtype=dtype), dtype)
    y = labels("random", 60, 5)
    ids = torch.arange(20) + 40
    bits = ops.key_bits(dtype)
    prefixes = torch.tensor([0, 5], dtype=torch.long)
    for args in [(x, None, y, None, None, None, prefixes, bits - 16),
                 (x[40:], x, y[40:], y, ids, None, prefixes, 0)]:
        torch.library.opcheck(torch.ops.relkd.pair_histogram.default, args)
    key = ops.as_int64((1 << (bits - 1)) + 5)
    for args in [(x, None, y, None, None, None, key, 3, 50),
                 (x[40:], x, y[40:], y, ids, None, key, 0, 10)]:
        torch.library.opcheck(torch.ops.relkd.pair_topk.default, args)
    collect = torch.tensor([[0, 40000], [50000, 65535]])
    for args in [(x, None, y, None, None, None, prefixes, bits - 16, 25),
                 (x[40:], x, y[40:], y, ids, None, prefixes, 0, 7),
                 (x, None, y, None, None, None, prefixes[:1], bits - 16, 3, collect, 10**6),
                 (x[40:], x, y[40:], y, ids, None, prefixes[:1], bits - 16, 9, collect, 10,
                  ops.as_int64(1 << (bits - 2)))]:
        torch.library.opcheck(torch.ops.relkd.pair_histogram_topk.default, args)
    torch.library.opcheck(ops.negative_pair_select, (x, y, [10, 100], 30, None, None, 0, ""))


def test_op_arguments_are_checked():
    x = reference.normalize(embeddings(20, 4, seed=1), torch.float32)
    y = labels("random", 20, 2)
    with pytest.raises(ValueError, match="prefixes must be distinct"):
        torch.ops.relkd.pair_histogram(x, None, y, None, None, None,
                                       torch.tensor([3, 3]), 0)
    with pytest.raises(ValueError, match="threshold_key must be a 32-bit order key"):
        torch.ops.relkd.pair_topk(x, None, y, None, None, None, 1 << 40, 0, 5)
    whole = torch.zeros(1, dtype=torch.long)
    for ranges, shift, cap, match in [
            (torch.tensor([[5, 70000]]), 16, 10, r"0 <= lo <= hi < 65536"),
            (torch.tensor([[9, 5]]), 16, 10, r"0 <= lo <= hi < 65536"),
            (torch.tensor([5, 9]), 16, 10, r"collect_ranges must be a CPU int64 tensor"),
            (torch.tensor([[5.0, 9.0]]), 16, 10, r"collect_ranges must be a CPU int64 tensor"),
            (torch.tensor([[5, 9]]), 0, 10, r"collected in the first pass only"),
            (torch.tensor([[5, 9]]), 16, -1, r"collect_cap must be >= 0")]:
        with pytest.raises(ValueError, match=match):
            torch.ops.relkd.pair_histogram_topk(x, None, y, None, None, None, whole, shift, 0,
                                                ranges, cap)
    for top_min_key in (-1, 1 << 32):
        with pytest.raises(ValueError, match="top_min_key must be a 32-bit order key"):
            torch.ops.relkd.pair_histogram_topk(x, None, y, None, None, None, whole, 16, 5,
                                                None, 0, top_min_key)
    with pytest.raises(ValueError, match="prefixes must hold at least one prefix"):
        torch.ops.relkd.pair_histogram_topk(x, None, y, None, None, None,
                                            torch.zeros(0, dtype=torch.long), 16, 5)
