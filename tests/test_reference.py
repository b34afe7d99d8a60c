"""The reference path against small cases computed independently (numpy
loops written from SPEC.md, or numbers derived by hand), and fp64 gradcheck
of every reference loss. The reference is the oracle of every fused kernel,
so it is itself checked against something that does not share its code."""
import itertools
import math

import numpy as np
import pytest
import torch

import relkd
from relkd import reference

from helpers import embeddings


def unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# ------------------------------------------------------------------- FCD
def test_fcd_by_hand():
    fs = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    ft = torch.tensor([[0.0, 3.0], [0.0, 1.0]], dtype=torch.float64)
    # unit rows: x = [(1,0), (0,1)], z = [(0,1), (0,1)]: |x-z|^2 = 2 and 0.
    assert reference.fcd_loss(fs, ft, "l2").item() == pytest.approx(1.0)
    assert reference.fcd_loss(fs, ft, "cosine").item() == pytest.approx(0.5)
    # raw: |(1,-3)|^2 = 10, |(0,1)|^2 = 1
    assert reference.fcd_loss(fs, ft, "l2", normalize_features=False).item() == pytest.approx(5.5)


# ------------------------------------------------------------- mining / RAD
def np_topk(sim: np.ndarray, valid: np.ndarray, k: int):
    values, indices = [], []
    for i in range(sim.shape[0]):
        cand = [j for j in range(sim.shape[1]) if valid[i, j]]
        cand.sort(key=lambda j: (-sim[i, j], j))
        chosen = cand[:k] + [-1] * (k - len(cand[:k]))
        indices.append(chosen)
        values.append([sim[i, j] if j >= 0 else -np.inf for j in chosen])
    return np.array(values), np.array(indices)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_similarity_topk_batch_with_labels(k):
    a = embeddings(6, 4, seed=1, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    x = unit_rows(as_np(a))
    sim = x @ x.T
    valid = (y[:, None] != y[None, :]).numpy() & ~np.eye(6, dtype=bool)
    want_v, want_i = np_topk(sim, valid, k)
    got_v, got_i = reference.similarity_topk(a, None, k, y)
    np.testing.assert_array_equal(got_i.numpy(), want_i)
    np.testing.assert_allclose(got_v.numpy(), want_v, rtol=1e-12)


def test_similarity_topk_ties_go_to_smaller_index():
    # Rows 1..4 are equally similar to row 0: the smaller indices win.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, -1.0], [0.0, -1.0]])
    _, idx = reference.similarity_topk(a, None, 3)
    assert idx[0].tolist() == [1, 2, 3]


def np_rad(fs, ft, y, k, metric, margin, mine_by, bank=None, bank_labels=None):
    x, z = unit_rows(fs), unit_rows(ft)
    cols = x if bank is None else unit_rows(bank)
    tcols = z if bank is None else unit_rows(bank)
    s, t = x @ cols.T, z @ tcols.T
    terms = []
    for i in range(len(x)):
        cand = []
        for j in range(len(cols)):
            if bank is None and (j == i or (y is not None and y[j] == y[i])):
                continue
            if bank is not None and bank_labels is not None and bank_labels[j] == y[i]:
                continue
            cand.append(j)
        score = t if mine_by == "teacher" else s
        cand.sort(key=lambda j: (-score[i, j], j))
        for j in cand[:k]:
            d = s[i, j] - t[i, j]
            terms.append(max(0.0, d - margin) if metric == "hinge" else d * d if metric == "l2"
                         else abs(d))
    return float(np.mean(terms)) if terms else 0.0


@pytest.mark.parametrize("metric,mine_by", [("hinge", "teacher"), ("l2", "student"),
                                            ("l1", "teacher")])
def test_rad_batch(metric, mine_by):
    fs = embeddings(6, 5, seed=2, dtype=torch.float64)
    ft = embeddings(6, 3, seed=3, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    got = reference.rad_loss(fs, ft, y, k=2, metric=metric, margin=-0.2, mine_by=mine_by)
    want = np_rad(as_np(fs), as_np(ft), y.numpy(), 2, metric, -0.2, mine_by)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_rad_bank_with_label_exclusion():
    fs = embeddings(5, 4, seed=4, dtype=torch.float64)
    ft = embeddings(5, 4, seed=5, dtype=torch.float64)
    bank = embeddings(9, 4, seed=6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4])
    bank_labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8])
    got = reference.rad_loss(fs, ft, y, bank, bank_labels, k=3, metric="l2")
    want = np_rad(as_np(fs), as_np(ft), y.numpy(), 3, "l2", 0.0, "teacher",
                  as_np(bank), bank_labels.numpy())
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_rad_precomputed_indices_with_padding():
    fs = embeddings(4, 3, seed=7, dtype=torch.float64)
    ft = embeddings(4, 3, seed=8, dtype=torch.float64)
    idx = torch.tensor([[1, -1], [0, 3], [-1, -1], [2, 0]])
    x, z = unit_rows(as_np(fs)), unit_rows(as_np(ft))
    pairs = [(0, 1), (1, 0), (1, 3), (3, 2), (3, 0)]  # the -1 slots count nowhere
    want = np.mean([(x[i] @ x[j] - z[i] @ z[j]) ** 2 for i, j in pairs])
    got = reference.rad_loss(fs, ft, indices=idx, metric="l2")
    assert got.item() == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------- EKD
def np_ekd_step(fs, ft, y, s_anchor, t_anchor, *, training, topk, temperature, fpr, momentum,
                pos_w, neg_w):
    x, z = unit_rows(fs), unit_rows(ft)
    n = len(x)
    pos, neg = [], []
    for i, j in itertools.combinations(range(n), 2):
        (pos if y[i] == y[j] else neg).append((x[i] @ x[j], z[i] @ z[j]))
    s_anchor, t_anchor = np.array(s_anchor, float), np.array(t_anchor, float)
    if neg and training:
        positions = [len(neg) // int(round(1 / f)) for f in fpr]
        s_sorted = sorted((p[0] for p in neg), reverse=True)
        t_sorted = sorted((p[1] for p in neg), reverse=True)
        s_anchor = momentum * np.array([s_sorted[p] for p in positions]) + (1 - momentum) * s_anchor
        t_anchor = momentum * np.array([t_sorted[p] for p in positions]) + (1 - momentum) * t_anchor

    def rank(v, anchors):
        return sum(1 / (1 + math.exp(min(50, max(-50, -(v - a) / temperature)))) for a in anchors)

    def term(pairs):
        if not pairs:
            return 0.0
        return float(np.mean([(rank(s, s_anchor) - rank(t, t_anchor)) ** 2 for s, t in pairs]))

    hard = sorted(range(len(neg)), key=lambda e: (-neg[e][0], e))[:topk]
    loss = pos_w * term(pos) + neg_w * term([neg[e] for e in hard])
    return loss, s_anchor, t_anchor


EKD_OPTIONS = dict(topk=4, temperature=0.1, fpr=(0.5, 0.2, 0.1), momentum=0.3, pos_w=0.7,
                   neg_w=0.4)


def run_ekd(fs, ft, y, s_anchor, t_anchor, training):
    o = EKD_OPTIONS
    return reference.ekd_loss(fs, ft, y, s_anchor, t_anchor, training=training, topk=o["topk"],
                              temperature=o["temperature"], fpr_levels=o["fpr"],
                              momentum=o["momentum"], pos_weight=o["pos_w"],
                              neg_weight=o["neg_w"])


def test_ekd_anchor_ema_over_steps_then_eval():
    y = torch.tensor([0, 0, 1, 1, 2, 3])
    s_anchor = t_anchor = torch.zeros(3, dtype=torch.float64)
    np_s = np_t = np.zeros(3)
    for step in range(4):
        fs = embeddings(6, 4, seed=10 + step, dtype=torch.float64)
        ft = embeddings(6, 5, seed=20 + step, dtype=torch.float64)
        loss, s_anchor, t_anchor = run_ekd(fs, ft, y, s_anchor, t_anchor, training=True)
        want, np_s, np_t = np_ekd_step(as_np(fs), as_np(ft), y.numpy(), np_s, np_t,
                                       training=True, **EKD_OPTIONS)
        assert loss.item() == pytest.approx(want, rel=1e-10)
        np.testing.assert_allclose(s_anchor.numpy(), np_s, rtol=1e-12)
        np.testing.assert_allclose(t_anchor.numpy(), np_t, rtol=1e-12)
    # Eval mode reads the anchors and leaves them where they are.
    fs = embeddings(6, 4, seed=99, dtype=torch.float64)
    ft = embeddings(6, 5, seed=98, dtype=torch.float64)
    loss, s_after, t_after = run_ekd(fs, ft, y, s_anchor, t_anchor, training=False)
    want, _, _ = np_ekd_step(as_np(fs), as_np(ft), y.numpy(), np_s, np_t, training=False,
                             **EKD_OPTIONS)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert torch.equal(s_after, s_anchor) and torch.equal(t_after, t_anchor)


def test_ekd_positives_only_leaves_anchors():
    fs = embeddings(5, 4, seed=30, dtype=torch.float64)
    ft = embeddings(5, 4, seed=31, dtype=torch.float64)
    y = torch.zeros(5, dtype=torch.long)  # no negative pair at all
    anchors = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    loss, s_a, t_a = run_ekd(fs, ft, y, anchors, anchors, training=True)
    want, _, _ = np_ekd_step(as_np(fs), as_np(ft), y.numpy(), anchors.numpy(), anchors.numpy(),
                             training=True, **EKD_OPTIONS)
    assert loss.item() == pytest.approx(want, rel=1e-10) and want > 0
    assert torch.equal(s_a, anchors) and torch.equal(t_a, anchors)


def test_ekd_negatives_only():
    fs = embeddings(5, 4, seed=32, dtype=torch.float64)
    ft = embeddings(5, 4, seed=33, dtype=torch.float64)
    y = torch.arange(5)  # every pair is negative: L_pos is empty and counts 0
    zero = torch.zeros(3, dtype=torch.float64)
    loss, _, _ = run_ekd(fs, ft, y, zero, zero, training=True)
    want, _, _ = np_ekd_step(as_np(fs), as_np(ft), y.numpy(), np.zeros(3), np.zeros(3),
                             training=True, **EKD_OPTIONS)
    assert loss.item() == pytest.approx(want, rel=1e-10) and want > 0


def test_ekd_rank_positions_use_rounded_divisors():
    # 1/1e-5 is 99999.99.. in floating point: SPEC §3.2 divides by round(1/fpr).
    assert reference.fpr_divisors((1e-1, 1e-5, 1e-6)) == [10, 100000, 1000000]


# ------------------------------------------------------------------ CCKD
def np_cckd(fs, ft, gamma, order, kernel):
    x, z = unit_rows(fs), unit_rows(ft)

    def phi(u):
        if kernel == "bilinear":
            return u
        return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * u ** p
                   for p in range(order + 1))

    n = len(x)
    return sum((phi(x[i] @ x[j]) - phi(z[i] @ z[j])) ** 2
               for i in range(n) for j in range(n)) / n ** 2


@pytest.mark.parametrize("kernel,order", [("gaussian", 2), ("gaussian", 4), ("bilinear", 2)])
def test_cckd(kernel, order):
    fs = embeddings(5, 4, seed=40, dtype=torch.float64)
    ft = embeddings(5, 6, seed=41, dtype=torch.float64)
    got = reference.cckd_loss(fs, ft, kernel=kernel, gamma=0.4, order=order)
    assert got.item() == pytest.approx(np_cckd(as_np(fs), as_np(ft), 0.4, order, kernel),
                                       rel=1e-12)


def test_cckd_high_order_is_the_gaussian_rbf():
    # On unit vectors exp(-gamma |x_i - x_j|^2) = exp(-2 gamma (1 - s_ij)): the
    # Taylor series converges to it, so a high order matches the kernel itself.
    fs = embeddings(5, 4, seed=42, dtype=torch.float64)
    ft = embeddings(5, 4, seed=43, dtype=torch.float64)
    x, z = unit_rows(as_np(fs)), unit_rows(as_np(ft))
    rbf = lambda a: np.exp(-0.4 * ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1))  # noqa: E731
    want = ((rbf(x) - rbf(z)) ** 2).mean()
    got = reference.cckd_loss(fs, ft, gamma=0.4, order=25)
    assert got.item() == pytest.approx(want, rel=1e-10)


# -------------------------------------------------------------------- SP
def test_sp_against_numpy_and_gram_identity():
    fs = embeddings(6, 3, seed=50, dtype=torch.float64)
    ft = embeddings(6, 2, seed=51, dtype=torch.float64)
    gs, gt = as_np(fs) @ as_np(fs).T, as_np(ft) @ as_np(ft).T
    gs, gt = unit_rows(gs), unit_rows(gt)
    want = ((gs - gt) ** 2).sum() / 36
    assert reference.sp_loss(fs, ft).item() == pytest.approx(want, rel=1e-12)
    # SPEC §5's identity, written out here independently of relkd.fused:
    a, b = as_np(fs), as_np(ft)
    r_s = np.sqrt(np.einsum("id,de,ie->i", a, a.T @ a, a))
    r_t = np.sqrt(np.einsum("id,de,ie->i", b, b.T @ b, b))
    c = np.einsum("id,de,ie->i", a, a.T @ b, b)
    identity = (2 * 6 - 2 * (c / (r_s * r_t)).sum()) / 36
    assert identity == pytest.approx(want, rel=1e-10)
    fused_form = relkd.functional.sp_loss(fs, ft, backend="fused")
    assert fused_form.item() == pytest.approx(want, rel=1e-10)


def test_sp_flattens_feature_maps():
    fs = embeddings(4, 12, seed=52, dtype=torch.float64)
    ft = embeddings(4, 8, seed=53, dtype=torch.float64)
    flat = reference.sp_loss(fs, ft)
    maps = reference.sp_loss(fs.view(4, 3, 2, 2), ft.view(4, 2, 2, 2))
    assert maps.item() == pytest.approx(flat.item(), rel=1e-14)


# ------------------------------------------------------------------- RKD
def np_rkd(fs, ft, dw, aw):
    def dist(e):
        n = len(e)
        d = np.array([[0.0 if i == j else max(((e[i] - e[j]) ** 2).sum(), 1e-12) ** 0.5
                       for j in range(n)] for i in range(n)])
        return d / d[~np.eye(n, dtype=bool)].mean()

    def angles(e):
        n = len(e)
        out = np.zeros((n, n, n))
        for a, b, c in itertools.product(range(n), repeat=3):
            u, v = e[b] - e[a], e[c] - e[a]
            u = u / max(np.linalg.norm(u), 1e-12)
            v = v / max(np.linalg.norm(v), 1e-12)
            out[a, b, c] = u @ v
        return out

    def smooth_l1(p, q):
        d = np.abs(p - q)
        return np.where(d < 1, 0.5 * d * d, d - 0.5).mean()

    return dw * smooth_l1(dist(fs), dist(ft)) + aw * smooth_l1(angles(fs), angles(ft))


def test_rkd_distance_and_angle():
    fs = embeddings(5, 3, seed=60, dtype=torch.float64)
    ft = 3 * embeddings(5, 4, seed=61, dtype=torch.float64)
    got = reference.rkd_loss(fs, ft, distance_weight=25.0, angle_weight=50.0)
    assert got.item() == pytest.approx(np_rkd(as_np(fs), as_np(ft), 25.0, 50.0), rel=1e-10)


def test_rkd_repeated_rows_use_the_clamped_distance():
    # Equal rows sit 1e-6 apart (sqrt of the 1e-12 clamp), as in the official code.
    fs = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    d = reference.rkd_pdist(fs)
    assert d[0, 1].item() == pytest.approx(1e-6) and d[0, 0].item() == 0.0


# -------------------------------------------------------------- EC-KD
def test_exclusivity_pair_form_matches_numpy_and_identity():
    w1 = embeddings(4, 6, seed=70, dtype=torch.float64)
    w2 = embeddings(3, 8, seed=71, dtype=torch.float64).view(3, 2, 2, 2)
    want = 0.0
    for w in (as_np(w1), as_np(w2).reshape(3, -1)):
        w = unit_rows(w)
        f = len(w)
        want += sum(np.abs(w[i]) @ np.abs(w[j]) for i in range(f) for j in range(f)
                    if i != j) / (f * (f - 1))
    assert reference.exclusivity_loss([w1, w2]).item() == pytest.approx(want, rel=1e-12)
    fast = relkd.functional.exclusivity_loss([w1, w2], backend="fused")
    assert fast.item() == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------ gradcheck
def gradcheck_student(fn, n=6, d=4, seed=80):
    fs = embeddings(n, d, seed, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (fs,), eps=1e-6, atol=1e-6)


FT = embeddings(6, 4, seed=81, dtype=torch.float64)
Y = torch.tensor([0, 0, 1, 1, 2, 3])


@pytest.mark.parametrize("name,fn", [
    ("fcd_l2", lambda f: reference.fcd_loss(f, FT, "l2")),
    ("fcd_cosine", lambda f: reference.fcd_loss(f, FT, "cosine")),
    ("rad_l2", lambda f: reference.rad_loss(f, FT, Y, k=3, metric="l2")),
    ("rad_hinge", lambda f: reference.rad_loss(f, FT, Y, k=3, metric="hinge", margin=-0.5)),
    ("rad_bank", lambda f: reference.rad_loss(f, FT, Y, FT.flip(0) + 0.3, k=2, metric="l1")),
    ("coupleface", lambda f: reference.coupleface_loss(f, FT, Y, k=3, metric="l2")),
    ("ekd_eval", lambda f: reference.ekd_loss(
        f, FT, Y, torch.tensor([0.1, -0.2], dtype=torch.float64),
        torch.tensor([0.0, -0.1], dtype=torch.float64), training=False, topk=5,
        temperature=0.5, fpr_levels=(0.5, 0.1))[0]),
    ("cckd", lambda f: reference.cckd_loss(f, FT)),
    ("sp", lambda f: reference.sp_loss(f, FT)),
    ("rkd", lambda f: reference.rkd_loss(f, FT)),
    ("exclusivity", lambda f: reference.exclusivity_loss([f])),
])
def test_reference_gradcheck(name, fn):
    gradcheck_student(fn)


def test_the_spec_in_the_repository_is_the_shared_one():
    """docs/SPEC.md (what the docstrings' "SPEC §n" refer to) is kept equal to
    the project's shared specification wherever that is checked out beside."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours = os.path.join(root, "docs", "SPEC.md")
    shared = os.path.join(root, "..", "shared", "SPEC.md")
    assert os.path.exists(ours)
    if not os.path.exists(shared):
        pytest.skip("no ../shared/SPEC.md beside this checkout")
    assert open(ours).read() == open(shared).read(), "docs/SPEC.md differs from ../shared/SPEC.md"
