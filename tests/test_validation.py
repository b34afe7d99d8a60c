"""Bad input (SPEC §9): one test per row of the table, for every loss it
applies to, on both backends. A ValueError must name the argument."""
import warnings

import pytest
import torch

import relkd
from relkd import functional as Fn

from helpers import embeddings, requires_extension

BACKENDS = ["reference", pytest.param("fused", marks=requires_extension)]
ANCHORS = torch.zeros(6)


def y_of(n):
    return torch.arange(n) % 3


# Each loss as fn(fs, ft, y, backend); y is ignored where the loss has no labels.
LOSSES = {
    "fcd": lambda fs, ft, y, b: Fn.fcd_loss(fs, ft, backend=b),
    "rad": lambda fs, ft, y, b: Fn.rad_loss(fs, ft, y, k=3, backend=b),
    "coupleface": lambda fs, ft, y, b: Fn.coupleface_loss(fs, ft, y, k=3, backend=b),
    "ekd": lambda fs, ft, y, b: Fn.ekd_loss(fs, ft, y, ANCHORS, ANCHORS, backend=b)[0],
    "cckd": lambda fs, ft, y, b: Fn.cckd_loss(fs, ft, backend=b),
    "sp": lambda fs, ft, y, b: Fn.sp_loss(fs, ft, backend=b),
    "rkd": lambda fs, ft, y, b: Fn.rkd_loss(fs, ft, angle_weight=0.0, backend=b),
}
WITH_LABELS = ["rad", "coupleface", "ekd"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [n for n in LOSSES if n != "sp"])
@pytest.mark.parametrize("shape", [(8,), (2, 4, 3)])
def test_wrong_rank(name, shape, backend):
    fs = torch.randn(*shape)
    with pytest.raises(ValueError, match=r"fs: expected shape \(N, D\)"):
        LOSSES[name](fs, torch.randn(*shape), y_of(shape[0]), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sp_flattens_but_needs_rows(backend):
    with pytest.raises(ValueError, match=r"fs: expected shape \(N, D\)"):
        Fn.sp_loss(torch.randn(8), torch.randn(8), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_n_mismatch(name, backend):
    with pytest.raises(ValueError, match=r"ft: expected 8 rows"):
        LOSSES[name](torch.randn(8, 4), torch.randn(7, 4), y_of(8), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["fcd", "coupleface"])
def test_d_mismatch_where_features_are_compared(name, backend):
    with pytest.raises(ValueError, match=r"ft: expected dim D=4"):
        LOSSES[name](torch.randn(8, 4), torch.randn(8, 5), y_of(8), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_dim_mismatch(backend):
    with pytest.raises(ValueError, match=r"bank: expected shape \(M, 4\)"):
        Fn.rad_loss(torch.randn(8, 4), torch.randn(8, 4), bank=torch.randn(20, 5),
                    backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["cckd", "sp", "rkd", "ekd", "rad"])
def test_relation_losses_accept_a_different_teacher_dim(name, backend):
    # Relations are N x N in both spaces, so a wider teacher is fine (documented).
    loss = LOSSES[name](torch.randn(8, 4), torch.randn(8, 6), y_of(8), backend)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", WITH_LABELS)
def test_float_labels(name, backend):
    with pytest.raises(ValueError, match=r"y: expected integer labels"):
        LOSSES[name](torch.randn(8, 4), torch.randn(8, 4), y_of(8).float(), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", WITH_LABELS)
def test_label_length(name, backend):
    with pytest.raises(ValueError, match=r"y: expected shape \(8,\)"):
        LOSSES[name](torch.randn(8, 4), torch.randn(8, 4), y_of(7), backend)


def test_int32_labels_are_accepted():
    fs, ft = torch.randn(8, 4), torch.randn(8, 4)
    a = Fn.rad_loss(fs, ft, y_of(8).int(), k=3)
    b = Fn.rad_loss(fs, ft, y_of(8), k=3)
    assert torch.equal(a, b)


def test_ekd_needs_labels():
    with pytest.raises(ValueError, match=r"y: EKD needs identity labels"):
        Fn.ekd_loss(torch.randn(8, 4), torch.randn(8, 4), None, ANCHORS, ANCHORS)


@pytest.mark.parametrize("k", [0, -3, 1.5, True])
def test_k_below_one(k):
    with pytest.raises(ValueError, match=r"k: expected an int >= 1"):
        relkd.RADLoss(k=k)
    with pytest.raises(ValueError, match=r"k: expected an int >= 1"):
        Fn.rad_loss(torch.randn(8, 4), torch.randn(8, 4), k=k)
    with pytest.raises(ValueError, match=r"k: expected an int >= 1"):
        relkd.similarity_topk(torch.randn(8, 4), k=k)


@pytest.mark.parametrize("make", [
    lambda: relkd.RADLoss(metric="cosine"),
    lambda: relkd.RADLoss(mine_by="random"),
    lambda: relkd.FCDLoss(metric="l3"),
    lambda: relkd.CCKDLoss(kernel="laplace"),
    lambda: relkd.CCKDLoss(backend="cuda"),
    lambda: relkd.EKDLoss(fpr_levels=(0.1, 2.0)),
    lambda: relkd.EKDLoss(temperature=0.0),
])
def test_unknown_or_invalid_option(make):
    with pytest.raises(ValueError, match=r"^(metric|mine_by|kernel|backend|fpr_levels|"
                                         r"temperature):"):
        make()


def test_unknown_metric_in_functional():
    with pytest.raises(ValueError, match=r"metric: expected one of 'hinge', 'l2', 'l1'"):
        Fn.rad_loss(torch.randn(8, 4), torch.randn(8, 4), metric="huber")


@pytest.mark.parametrize("name", list(LOSSES))
def test_mixed_devices(name):
    # The meta device stands in for a second device on a CPU-only machine.
    fs, ft = torch.randn(8, 4), torch.randn(8, 4, device="meta")
    with pytest.raises(ValueError, match=r"one device.*fs on cpu.*ft on meta"):
        LOSSES[name](fs, ft, y_of(8), "reference")


def test_mixed_devices_labels():
    with pytest.raises(ValueError, match=r"y on meta"):
        Fn.rad_loss(torch.randn(8, 4), torch.randn(8, 4), y_of(8).to("meta"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,n", [(name, n) for name in LOSSES for n in (0, 1)
                                    # one row still has a feature-consistency term
                                    if n == 0 or name not in ("fcd", "coupleface")])
def test_fewer_than_two_rows_is_zero_with_zero_grad(name, n, backend):
    fs = torch.randn(n, 4, requires_grad=True)
    loss = LOSSES[name](fs, torch.randn(n, 4), y_of(n), backend)
    loss.backward()
    assert loss.item() == 0.0 and loss.dim() == 0
    assert fs.grad is not None and torch.equal(fs.grad, torch.zeros_like(fs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["rad", "coupleface"])
def test_no_valid_candidate_is_zero_rad(name, backend):
    fs = torch.randn(6, 4, requires_grad=True)
    ft = fs.detach().clone()  # FCD part is 0 too
    loss = LOSSES[name](fs, ft, torch.zeros(6, dtype=torch.long), backend)  # all same label
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(fs.grad, torch.zeros_like(fs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_with_every_candidate_excluded(backend):
    fs = torch.randn(4, 3, requires_grad=True)
    loss = Fn.rad_loss(fs, torch.randn(4, 3), torch.zeros(4, dtype=torch.long),
                       torch.randn(5, 3), torch.zeros(5, dtype=torch.long), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(fs.grad, torch.zeros_like(fs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_topk_pads_missing_candidates(backend):
    a = torch.randn(5, 3)
    values, idx = relkd.similarity_topk(a, k=8, a_labels=torch.tensor([0, 0, 1, 1, 1]),
                                        backend=backend)
    assert (idx[:, 3:] == -1).all() and torch.isinf(values[:, 3:]).all()
    assert (idx[0, :3] >= 2).all() and (idx[0, :3] != -1).all()
    assert (idx[2, :2] >= 0).all() and (idx[2, 2:] == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_zero_rows_give_no_nan(name, backend):
    fs = embeddings(8, 4, seed=1)
    ft = embeddings(8, 4, seed=2)
    fs[3] = 0
    ft[5] = 0
    loss, = [LOSSES[name](fs.requires_grad_(), ft, y_of(8), backend)]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(fs.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_nan_input_propagates(name, backend):
    fs = embeddings(8, 4, seed=3)
    fs[2, 1] = float("nan")
    loss = LOSSES[name](fs, embeddings(8, 4, seed=4), y_of(8), backend)
    assert torch.isnan(loss)


@pytest.mark.parametrize("name", list(LOSSES))
def test_check_finite_env_turns_nan_into_value_error(name, monkeypatch):
    monkeypatch.setenv("RELKD_CHECK_FINITE", "1")
    ft = embeddings(8, 4, seed=5)
    ft[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"ft: contains NaN or Inf"):
        LOSSES[name](embeddings(8, 4, seed=6), ft, y_of(8), "reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_float16_saturating_inputs_do_not_overflow(name, backend):
    # |x|^2 of these rows is ~1e10, far beyond float16's 65504.
    fs = (embeddings(8, 64, seed=7) * 3e4).clamp(-6e4, 6e4).half()
    ft = (embeddings(8, 64, seed=8) * 3e4).clamp(-6e4, 6e4).half()
    loss = LOSSES[name](fs, ft, y_of(8), backend)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@requires_extension
def test_ops_reject_bad_input_without_crashing():
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="idx values must lie in"):
        relkd.ops.pair_dot(a, b, torch.tensor([[0, 5]] * 4))
    with pytest.raises(ValueError, match="k must be >= 1"):
        relkd.ops.topk_sim(a, b, 0)
    with pytest.raises(ValueError, match="q_labels must have shape"):
        relkd.ops.topk_sim(a, b, 2, torch.zeros(3, dtype=torch.long),
                           torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown pairwise_loss kind"):
        relkd.ops.pairwise_loss("mse", a, a)
    with pytest.raises(ValueError, match="must have the same dim"):
        relkd.ops.topk_sim(a, torch.randn(5, 2), 1)


# ------------------------------------------------------ arguments that act or raise
@pytest.mark.parametrize("levels", [(0.7,), (1.0,), (0.1, 0.9), (0.0,), (-0.1,), ()])
def test_fpr_levels_need_a_divisor_of_at_least_two(levels):
    # round(1/f) must be >= 2 (SPEC §3.2), or the rank position n_neg // q
    # would lie past the last negative pair.
    with pytest.raises(ValueError, match=r"^fpr_levels: expected .*round\(1/f\) >= 2"):
        relkd.EKDLoss(fpr_levels=levels)
    with pytest.raises(ValueError, match=r"^fpr_levels:"):
        Fn.ekd_loss(torch.randn(8, 4), torch.randn(8, 4), y_of(8), torch.zeros(len(levels)),
                    torch.zeros(len(levels)), fpr_levels=levels)


@requires_extension
def test_selection_rejects_a_rank_position_past_the_last_negative():
    x = torch.nn.functional.normalize(torch.randn(6, 3), dim=1)
    with pytest.raises(ValueError, match=r"divisors: every rank position"):
        relkd.ops.negative_pair_select(x, y_of(6), [10, 1], 3, None, None, 0, "")


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_topk_labels_come_in_pairs(backend):
    a, b = torch.randn(5, 3), torch.randn(7, 3)
    with pytest.raises(ValueError, match=r"^b_labels: a_labels and b_labels .* both or neither"):
        relkd.similarity_topk(a, b, 2, a_labels=y_of(5), backend=backend)
    with pytest.raises(ValueError, match=r"^a_labels: a_labels and b_labels"):
        relkd.similarity_topk(a, b, 2, b_labels=y_of(7), backend=backend)
    with pytest.raises(ValueError, match=r"^exclude_self: only applies when b is None"):
        relkd.similarity_topk(a, b, 2, exclude_self=False, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rad_indices_must_match_k(backend):
    fs, ft = torch.randn(8, 4), torch.randn(8, 4)
    idx = torch.randint(0, 8, (8, 5))
    with pytest.raises(ValueError, match=r"^indices: expected k=3 columns .* got 5"):
        Fn.rad_loss(fs, ft, indices=idx, k=3, backend=backend)
    with pytest.raises(ValueError, match=r"^indices: expected k=16 columns"):
        relkd.RADLoss()(fs, ft, indices=idx)
    loss = relkd.RADLoss(k=5, backend=backend)(fs, ft, indices=idx)  # matching k acts
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rad_bank_labels_with_indices_is_an_error(backend):
    fs, ft, bank = torch.randn(8, 4), torch.randn(8, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"^bank_labels: only used to mine the bank"):
        Fn.rad_loss(fs, ft, y_of(8), bank, y_of(6), torch.zeros(8, 3, dtype=torch.long), k=3,
                    backend=backend)


def test_numpy_scalars_are_accepted_as_options():
    np = pytest.importorskip("numpy")
    assert relkd.RADLoss(k=np.int64(4), margin=np.float32(0.5)).k == 4
    loss = relkd.CCKDLoss(gamma=np.float64(0.3), order=np.int32(3))
    assert loss.order == 3 and isinstance(loss.gamma, float)
    values, _ = relkd.similarity_topk(torch.randn(6, 3), k=np.int16(2))
    assert values.shape == (6, 2)
    with pytest.raises(ValueError, match=r"^k: expected an int >= 1"):
        relkd.RADLoss(k=np.bool_(True))
    with pytest.raises(ValueError, match=r"^k: expected an int >= 1"):
        relkd.RADLoss(k=np.float64(4.0))


FLAG_OPTIONS = [
    (relkd.FCDLoss, "normalize"), (relkd.FCDLoss, "detach_teacher"),
    (relkd.RADLoss, "detach_teacher"), (relkd.CoupleFaceLoss, "detach_teacher"),
    (relkd.CCKDLoss, "detach_teacher"), (relkd.SPLoss, "detach_teacher"),
    (relkd.CCKDLoss, "gather"), (relkd.EKDLoss, "gather"), (relkd.RKDLoss, "gather"),
]


@pytest.mark.parametrize("module,option", FLAG_OPTIONS)
@pytest.mark.parametrize("value", ["False", "no", 0, 1, None, torch.tensor(True)])
def test_flags_take_only_bools(module, option, value):
    # bool("False") is True: a coerced flag would silently mean the opposite.
    with pytest.raises(ValueError, match=rf"^{option}: expected True or False"):
        module(**{option: value})
    assert getattr(module(**{option: False}), option) is False


@pytest.mark.parametrize("call,option", [
    (lambda v: Fn.fcd_loss(torch.randn(4, 3), torch.randn(4, 3), normalize=v), "normalize"),
    (lambda v: Fn.rad_loss(torch.randn(4, 3), torch.randn(4, 3), detach_teacher=v),
     "detach_teacher"),
    (lambda v: Fn.cckd_loss(torch.randn(4, 3), torch.randn(4, 3), detach_teacher=v),
     "detach_teacher"),
    (lambda v: Fn.sp_loss(torch.randn(4, 3), torch.randn(4, 3), detach_teacher=v),
     "detach_teacher"),
    (lambda v: Fn.ekd_loss(torch.randn(4, 3), torch.randn(4, 3), y_of(4), ANCHORS, ANCHORS,
                           training=v)[0], "training"),
    (lambda v: Fn.rkd_loss(torch.randn(4, 3), torch.randn(4, 3), gather=v), "gather"),
    (lambda v: relkd.similarity_topk(torch.randn(4, 3), k=2, exclude_self=v), "exclude_self"),
])
def test_functional_flags_take_only_bools(call, option):
    with pytest.raises(ValueError, match=rf"^{option}: expected True or False, got 'False'"):
        call("False")
    call(False)


@pytest.mark.parametrize("make,option", [
    (lambda v: relkd.RADLoss(margin=v), "margin"),
    (lambda v: relkd.CoupleFaceLoss(alpha=v), "alpha"),
    (lambda v: relkd.EKDLoss(temperature=v), "temperature"),
    (lambda v: relkd.EKDLoss(neg_weight=v), "neg_weight"),
    (lambda v: relkd.CCKDLoss(gamma=v), "gamma"),
    (lambda v: relkd.RKDLoss(angle_weight=v), "angle_weight"),
    (lambda v: relkd.ECKDLoss(lam=v), "lam"),
    (lambda v: Fn.rad_loss(torch.randn(4, 3), torch.randn(4, 3), margin=v), "margin"),
])
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan"), 10 ** 400])
def test_numbers_must_be_finite(make, option, value):
    # RADLoss(metric="l2", margin=inf) used to pass the constructor and then
    # raise in the fused kernel only (the reference ignored it).
    with pytest.raises(ValueError, match=rf"^{option}: expected a number"):
        make(value)


@pytest.mark.parametrize("level", [1e-20, 1e-320, 2.0 ** -63])
def test_fpr_levels_below_two_to_the_minus_62_are_refused(level):
    # round(1/f) would overflow the kernels' int64 (1e-320: 1/f is inf).
    with pytest.raises(ValueError, match=r"^fpr_levels: expected .*2\^-62 <= f"):
        relkd.EKDLoss(fpr_levels=(level,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_smallest_fpr_level_reads_the_hardest_negative(backend):
    fs, ft = embeddings(10, 4, seed=11), embeddings(10, 4, seed=12)
    ekd = relkd.EKDLoss(fpr_levels=(2.0 ** -62,), momentum=1.0, backend=backend)
    ekd(fs, ft, y_of(10))
    x = torch.nn.functional.normalize(fs, dim=1)
    s = x @ x.T
    neg = (y_of(10)[:, None] != y_of(10)[None, :]) & ~torch.eye(10, dtype=torch.bool)
    assert ekd.s_anchor.item() == pytest.approx(s[neg].max().item(), abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rad_bank_y_without_bank_labels_warns_once(backend, monkeypatch):
    # SPEC §2: without bank_labels every bank row is mined, y excludes
    # nothing; a caller who meant y to exclude each row's own prototype is
    # told once. The result is SPEC's: the same as with y=None.
    monkeypatch.setattr(Fn, "_WARNED_Y_WITHOUT_BANK_LABELS", [])
    fs, ft, bank = torch.randn(8, 4), torch.randn(8, 4), torch.randn(6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # y beside indices=: nothing to mine, no warning
        Fn.rad_loss(fs, ft, y_of(8), bank, indices=torch.zeros(8, 3, dtype=torch.long), k=3,
                    backend=backend)
    with pytest.warns(UserWarning, match=r"^y: in bank mode the labels exclude") as record:
        got = Fn.rad_loss(fs, ft, y_of(8), bank, k=3, backend=backend)
    assert record[0].filename == __file__  # the caller's line, not relkd's
    assert torch.equal(got, Fn.rad_loss(fs, ft, None, bank, k=3, backend=backend))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        relkd.CoupleFaceLoss(k=3, backend=backend)(fs, ft, y_of(8), bank=bank)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["mined", "labels", "indices"])
def test_rad_empty_bank_is_zero_with_zero_grad(backend, mode):
    # PrototypeBank.active() before the first update: no candidate at all.
    bank, ids = relkd.PrototypeBank(10, 4).active()
    fs = torch.randn(6, 4, requires_grad=True)
    ft = torch.randn(6, 4, requires_grad=True)
    kw = {"mined": dict(y=None), "labels": dict(y=y_of(6), bank_labels=ids),
          "indices": dict(y=None, indices=torch.full((6, 4), -1))}[mode]
    loss = relkd.RADLoss(k=4, detach_teacher=False, backend=backend)(fs, ft, bank=bank, **kw)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(fs.grad, torch.zeros_like(fs)) and torch.equal(ft.grad, torch.zeros_like(ft))


@pytest.mark.parametrize("call,name", [
    (lambda w: relkd.ExclusivityLoss()(w), "weights"),
    (lambda w: relkd.PrototypeBank(4, 3).update(w, torch.tensor([0, 1, 2, 3])), "ft"),
    (lambda w: relkd.hardest_identities(w, 2), "prototypes"),
])
def test_check_finite_env_covers_weights_banks_and_prototypes(call, name, monkeypatch):
    w = torch.randn(4, 3)
    w[1, 2] = float("nan")
    monkeypatch.setenv("RELKD_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match=rf"^{name}(\[0\])?: contains NaN or Inf"):
        call(w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3), (0, 2, 2), (1, 5)])
def test_exclusivity_of_fewer_than_two_filters_is_zero(shape, backend):
    w = torch.randn(*shape, requires_grad=True)
    loss = Fn.exclusivity_loss(w, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(w.grad, torch.zeros_like(w))
