"""Every loss, fused against the reference (SPEC is the oracle): property
tests over shapes, dtypes, k and label patterns; float64 to tight tolerance,
float32 by the FlashAttention pattern (fused error <= 2x the same-precision
reference's error against float64). Where a loss has a discrete choice
(RAD's mining, EKD's top-k), float32 cases fix that choice so that a
near-tie cannot flip it differently in the two paths. Also: EKD over five
training steps, teacher gradients, and bitwise determinism."""
import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import given
from hypothesis import strategies as st

import relkd
from relkd import functional as Fn

from helpers import (LABEL_PATTERNS, assert_bounded_error, correlated, embeddings, labels,
                     num_threads, requires_extension, value_and_grad)

pytestmark = requires_extension
F32, F64 = torch.float32, torch.float64


def compare(fn, fs, *args, **kwargs):
    """fused vs reference for loss and d/dfs; float64 tightly, float32 by the pattern."""
    fused = value_and_grad(fn, fs, *args, backend="fused", **kwargs)
    if fs.shape[1] == 1 and fn in NORMALIZING:
        # Unit rows of dimension 1 are +-1 whatever fs is: the exact gradient is
        # 0, and both paths leave only the rounding of normalize's backward,
        # which scales as 1 / |fs_i|.
        ref = value_and_grad(fn, fs, *args, backend="reference", **kwargs)
        torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-7)
        for grad in (fused[1], ref[1]):
            assert (grad * fs).abs().max() < 1e-5
        return
    if fs.dtype == F64:
        ref = value_and_grad(fn, fs, *args, backend="reference", **kwargs)
        for f, r, what in zip(fused, ref, ("loss", "grad")):
            torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-13, msg=what)
        return
    same = value_and_grad(fn, fs, *args, backend="reference", **kwargs)
    wide = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]
    exact = value_and_grad(fn, fs.double(), *wide, backend="reference", **kwargs)
    for f, s, e, what in zip(fused, same, exact, ("loss", "grad")):
        assert f.dtype == F32
        assert_bounded_error(f, s, e, what)


NORMALIZING = (Fn.cckd_loss, Fn.rad_loss, Fn.coupleface_loss, Fn.ekd_loss)
shapes = dict(n=st.integers(1, 300), d=st.integers(1, 130), seed=st.integers(0, 2**16))
dtypes = st.sampled_from([F32, F64])


@given(**shapes, d_t=st.integers(1, 130), dtype=dtypes,
       kernel=st.sampled_from(["gaussian", "bilinear"]), order=st.integers(0, 4))
def test_cckd(n, d, seed, d_t, dtype, kernel, order):
    fs, ft = embeddings(n, d, seed, dtype), embeddings(n, d_t, seed + 1, dtype)
    compare(Fn.cckd_loss, fs, ft, kernel=kernel, order=order)


@given(**shapes, d_t=st.integers(1, 130), dtype=dtypes)
def test_sp_both_regimes(n, d, seed, d_t, dtype):
    # D < N takes the Gram identity, D >= N the direct form.
    fs, ft = embeddings(n, d, seed, dtype), embeddings(n, d_t, seed + 1, dtype)
    compare(Fn.sp_loss, fs, ft)


@given(**shapes, dtype=dtypes, scale=st.sampled_from([0.01, 1.0, 30.0]))
def test_rkd_distance(n, d, seed, dtype, scale):
    fs = scale * embeddings(n, d, seed, dtype)
    ft = correlated(fs, seed + 1)
    compare(Fn.rkd_loss, fs, ft, angle_weight=0.0)


@given(n=st.integers(1, 60), d=st.integers(1, 40), seed=st.integers(0, 2**16), dtype=dtypes,
       scale=st.sampled_from([0.01, 1.0, 30.0]), distance_weight=st.sampled_from([0.0, 25.0]))
def test_rkd_with_angles(n, d, seed, dtype, scale, distance_weight):
    """The default angle weight (50): the angle term fused (its reference
    holds N x N x D differences and N^3 angles, hence the smaller N)."""
    fs = scale * embeddings(n, d, seed, dtype)
    ft = correlated(fs, seed + 1)
    if d == 1 and n > 1 and dtype == F64:
        # In one dimension every unit difference is +-1: the angle term's
        # exact gradient is 0 and both paths keep only the rounding of its
        # normalisation, which grows as 1 / |x_b - x_a| (found by 300
        # examples: 2e-13 apart at scale 0.01, above the float64 atol).
        gaps = (fs - fs.T).abs()
        atol = 1e-12 * n / gaps[gaps > 0].min().item()
        fused, ref = (value_and_grad(Fn.rkd_loss, fs, ft, backend=b,
                                     distance_weight=distance_weight)
                      for b in ("fused", "reference"))
        torch.testing.assert_close(fused[0], ref[0], rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(fused[1], ref[1], rtol=1e-9, atol=atol)
        return
    compare(Fn.rkd_loss, fs, ft, distance_weight=distance_weight)


rad_options = dict(k_extra=st.integers(-300, 5), pattern=st.sampled_from(LABEL_PATTERNS),
                   mine_by=st.sampled_from(["teacher", "student"]))


@given(**shapes, **rad_options, metric=st.sampled_from(["hinge", "l2", "l1"]),
       coupleface=st.booleans())
def test_rad_float64_end_to_end(n, d, seed, k_extra, pattern, mine_by, metric, coupleface):
    fs = embeddings(n, d, seed, F64)
    ft, y = correlated(fs, seed + 1), labels(pattern, n, seed)
    fn = Fn.coupleface_loss if coupleface else Fn.rad_loss
    compare(fn, fs, ft, y, k=max(1, n + k_extra), metric=metric, margin=0.01, mine_by=mine_by)


@given(**shapes, **rad_options)
def test_rad_float32_with_fixed_mining(n, d, seed, k_extra, pattern, mine_by):
    # Mining by the fused kernel once, then the loss by both paths on those pairs.
    fs = embeddings(n, d, seed, F32)
    ft, y = correlated(fs, seed + 1), labels(pattern, n, seed)
    k = max(1, n + k_extra)
    _, idx = relkd.similarity_topk(ft if mine_by == "teacher" else fs, k=k, a_labels=y)
    compare(Fn.rad_loss, fs, ft, y, None, None, idx, k=k, metric="l2")


@given(n=st.integers(1, 40), m=st.integers(1, 4000), d=st.integers(1, 130),
       k=st.integers(1, 60), seed=st.integers(0, 2**16), with_labels=st.booleans(),
       metric=st.sampled_from(["hinge", "l2", "l1"]))
def test_rad_bank_float64(n, m, d, k, seed, with_labels, metric):
    fs = embeddings(n, d, seed, F64)
    ft = correlated(fs, seed + 1)
    bank = 2.0 * embeddings(m, d, seed + 2, F64)
    y = labels("random", n, seed) if with_labels else None
    bank_labels = labels("random", m, seed + 3) if with_labels else None
    compare(Fn.rad_loss, fs, ft, y, bank, bank_labels, k=k, metric=metric, margin=0.0)


def test_rad_bank_float32_with_fixed_mining():
    fs = embeddings(64, 32, seed=1)
    ft = correlated(fs, seed=2)
    bank = embeddings(20_000, 32, seed=3)
    _, idx = relkd.similarity_topk(ft, bank, k=30)
    compare(Fn.rad_loss, fs, ft, None, bank, None, idx, k=30, metric="l2")


def ekd_args(n, seed, dtype, pattern):
    fs = embeddings(n, 16, seed, dtype)
    ft = correlated(fs, seed + 1, 0.8)
    anchors = torch.tensor([0.6, 0.45, 0.3, 0.2, 0.1, 0.05], dtype=dtype)
    return fs, ft, labels(pattern, n, seed), anchors, anchors + 0.03


@given(n=st.integers(1, 300), seed=st.integers(0, 2**16), pattern=st.sampled_from(LABEL_PATTERNS),
       topk=st.integers(0, 3000), training=st.booleans(),
       temperature=st.sampled_from([0.01, 0.1]))
def test_ekd_float64_end_to_end(n, seed, pattern, topk, training, temperature):
    compare(Fn.ekd_loss, *ekd_args(n, seed, F64, pattern), topk=topk, training=training,
            temperature=temperature)


@given(n=st.integers(2, 300), seed=st.integers(0, 2**16), pattern=st.sampled_from(LABEL_PATTERNS))
def test_ekd_float32_all_negatives_selected(n, seed, pattern):
    # topk >= the number of negative pairs: no top-k boundary to flip.
    compare(Fn.ekd_loss, *ekd_args(n, seed, F32, pattern), topk=n * n, temperature=0.1)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_ekd_five_training_steps_with_anchors(dtype):
    fused_mod = relkd.EKDLoss(topk=300 if dtype == F64 else 10**6, temperature=0.05,
                              momentum=0.2, backend="fused")
    ref_mod = relkd.EKDLoss(topk=fused_mod.topk, temperature=0.05, momentum=0.2,
                            backend="reference")
    y = labels("random", 200, 1)
    for step in range(5):
        fs = embeddings(200, 24, 10 + step, dtype)
        ft = correlated(fs, 20 + step, 0.6)
        got = value_and_grad(fused_mod, fs, ft, y)
        want = value_and_grad(ref_mod, fs, ft, y)
        tol = dict(rtol=1e-9, atol=1e-13) if dtype == F64 else dict(rtol=2e-4, atol=1e-7)
        torch.testing.assert_close(got[0], want[0], **tol)
        torch.testing.assert_close(got[1], want[1], **tol)
        torch.testing.assert_close(fused_mod.s_anchor, ref_mod.s_anchor, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(fused_mod.t_anchor, ref_mod.t_anchor, rtol=1e-6, atol=1e-7)
    assert (fused_mod.s_anchor != 0).all()


@pytest.mark.parametrize("name", ["cckd", "sp", "rad"])
def test_teacher_gradient_when_not_detached(name):
    fs = embeddings(120, 20, seed=5, dtype=F64)
    ft = correlated(fs, seed=6)
    y = labels("random", 120, 7)
    fns = {"cckd": lambda t, backend: Fn.cckd_loss(fs, t, detach_teacher=False, backend=backend),
           "sp": lambda t, backend: Fn.sp_loss(fs, t, detach_teacher=False, backend=backend),
           "rad": lambda t, backend: Fn.rad_loss(fs, t, y, k=7, metric="l2",
                                                 detach_teacher=False, backend=backend)}
    got = value_and_grad(fns[name], ft, backend="fused")
    want = value_and_grad(fns[name], ft, backend="reference")
    assert want[1].abs().max() > 0
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-13)


DETERMINISM_CASES = {
    "rad": lambda fs, ft, y: Fn.rad_loss(fs, ft, y, k=20),
    "coupleface": lambda fs, ft, y: Fn.coupleface_loss(fs, ft, y, k=20),
    "ekd": lambda fs, ft, y: Fn.ekd_loss(fs, ft, y, torch.zeros(6), torch.zeros(6))[0],
    "cckd": lambda fs, ft, y: Fn.cckd_loss(fs, ft),
    "sp": lambda fs, ft, y: Fn.sp_loss(fs, ft),
    "rkd": lambda fs, ft, y: Fn.rkd_loss(fs, ft, angle_weight=0.0),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(DETERMINISM_CASES))
def test_bitwise_deterministic(name, threads):
    fs = embeddings(600, 48, seed=8)
    ft = correlated(fs, seed=9)
    y = labels("random", 600, 10)
    with num_threads(threads):
        first = value_and_grad(DETERMINISM_CASES[name], fs, ft, y)
        second = value_and_grad(DETERMINISM_CASES[name], fs, ft, y)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_auto_picks_fused():
    fs, ft = embeddings(50, 8, seed=11), embeddings(50, 8, seed=12)
    auto = Fn.rkd_loss(fs, ft)  # angle_weight=50: the angle term fused too
    assert torch.equal(auto, Fn.rkd_loss(fs, ft, backend="fused"))
    torch.testing.assert_close(auto, Fn.rkd_loss(fs, ft, backend="reference"))
    for fn in (Fn.cckd_loss, Fn.sp_loss):
        assert torch.equal(fn(fs, ft), fn(fs, ft, backend="fused"))


GRADCHECK_CASES = {
    "rad": lambda fs, ft, y: Fn.rad_loss(fs, ft, y, k=3, metric="l2", backend="fused"),
    "rad_bank": lambda fs, ft, y: Fn.rad_loss(fs, ft, y, ft.flip(0) + 0.2, y.flip(0), k=2,
                                              metric="l1", backend="fused"),
    "ekd_eval": lambda fs, ft, y: Fn.ekd_loss(fs, ft, y, torch.tensor([0.2, -0.1]).double(),
                                              torch.tensor([0.1, 0.0]).double(),
                                              training=False, topk=6, temperature=0.5,
                                              fpr_levels=(0.5, 0.1), backend="fused")[0],
    "cckd": lambda fs, ft, y: Fn.cckd_loss(fs, ft, detach_teacher=False, backend="fused"),
    "sp_gram": lambda fs, ft, y: Fn.sp_loss(fs, ft, detach_teacher=False, backend="fused"),
    "sp_direct": lambda fs, ft, y: Fn.sp_loss(fs.repeat(1, 4), ft.repeat(1, 4),
                                              detach_teacher=False, backend="fused"),
    "rkd": lambda fs, ft, y: Fn.rkd_loss(fs, ft, angle_weight=0.0, backend="fused"),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_fused_gradcheck(name):
    fs = embeddings(8, 3, seed=13, dtype=F64).requires_grad_()
    ft = correlated(fs.detach(), seed=14).requires_grad_(name in ("cckd", "sp_gram",
                                                                  "sp_direct"))
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
    fn = GRADCHECK_CASES[name]
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, y), (fs, ft))


# Double backward (create_graph=True) through each fused loss equals the
# reference's: FCD, RAD and CoupleFace by pair_dot_backward's own derivative,
# the others by differentiating their ops' PyTorch transcriptions
# (relkd/_second_order.py) or, for SP, the Gram identity in PyTorch ops.
# Hessian-vector products with respect to the student and, where the
# teacher takes a gradient, the teacher.
DOUBLE_BACKWARD = {
    "fcd": lambda fs, ft, y, b: Fn.fcd_loss(fs, ft, backend=b),
    "rad": lambda fs, ft, y, b: Fn.rad_loss(fs, ft, y, k=4, metric="l2", backend=b),
    "rad_bank": lambda fs, ft, y, b: Fn.rad_loss(fs, ft, y, 2 * ft.flip(0), y.flip(0), k=3,
                                                 metric="l2", backend=b),
    "coupleface": lambda fs, ft, y, b: Fn.coupleface_loss(fs, ft, y, k=4, metric="l2",
                                                          backend=b),
    "ekd": lambda fs, ft, y, b: Fn.ekd_loss(fs, ft, y, torch.zeros(2, dtype=F64),
                                            torch.zeros(2, dtype=F64), topk=10,
                                            temperature=0.5, fpr_levels=(0.5, 0.1),
                                            backend=b)[0],
    "cckd": lambda fs, ft, y, b: Fn.cckd_loss(fs, ft, detach_teacher=False, backend=b),
    "sp": lambda fs, ft, y, b: Fn.sp_loss(fs, ft, detach_teacher=False, backend=b),
    "rkd": lambda fs, ft, y, b: Fn.rkd_loss(fs, ft, angle_weight=0.0, backend=b),
    "rkd_angle": lambda fs, ft, y, b: Fn.rkd_loss(fs, ft, backend=b),
}


def hessian_vector(fn, fs, ft, y, backend, direction):
    """d/d(fs, ft) of <d loss / d fs, direction>."""
    fs = fs.detach().clone().requires_grad_()
    ft = ft.detach().clone().requires_grad_()
    with relkd.double_backward():
        loss = fn(fs, ft, y, backend)
    (grad,) = torch.autograd.grad(loss, fs, create_graph=True)
    hv = torch.autograd.grad((grad * direction).sum(), (fs, ft), allow_unused=True)
    return [torch.zeros_like(x) if h is None else h for x, h in zip((fs, ft), hv)]


@pytest.mark.parametrize("name", list(DOUBLE_BACKWARD))
def test_double_backward_matches_the_reference(name):
    fn = DOUBLE_BACKWARD[name]
    fs = embeddings(24, 5, seed=31, dtype=F64)
    ft = correlated(fs, seed=32)
    y = torch.arange(24) % 6
    direction = embeddings(24, 5, seed=33, dtype=F64)
    want = hessian_vector(fn, fs, ft, y, "reference", direction)
    got = hessian_vector(fn, fs, ft, y, "fused", direction)
    assert want[0].abs().max() > 0
    for g, w, what in zip(got, want, ("student", "teacher")):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=f"{name}: {what}")


@pytest.mark.parametrize("name", list(DOUBLE_BACKWARD))
def test_activation_checkpointing_first_and_second_order(name):
    # Non-reentrant checkpointing unpacks each saved tensor once only: a
    # backward that read ctx.saved_tensors twice (RKD's angle term, SP's
    # Gram identity) raised CheckpointError. It reruns the forward during
    # backward, so a double backward keeps the backward inside the block.
    from torch.utils.checkpoint import checkpoint
    fn = DOUBLE_BACKWARD[name]
    fs = embeddings(16, 5, seed=37, dtype=F64)
    ft, y = correlated(fs, seed=38), torch.arange(16) % 4
    v = embeddings(16, 5, seed=39, dtype=F64)

    def loss_of(x, checkpointed):
        if checkpointed:
            return checkpoint(lambda a: fn(a, ft, y, "fused"), x, use_reentrant=False)
        return fn(x, ft, y, "fused")

    def grad_and_hvp(checkpointed):
        x = fs.detach().clone().requires_grad_()
        (first,) = torch.autograd.grad(loss_of(x, checkpointed), x)
        with relkd.double_backward():
            (g,) = torch.autograd.grad(loss_of(x, checkpointed), x, create_graph=True)
            (h,) = torch.autograd.grad((g * v).sum(), x)
        return first, g.detach(), h

    for got, want in zip(grad_and_hvp(True), grad_and_hvp(False)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["ekd", "cckd", "sp", "rkd", "rkd_angle"])
def test_third_derivative_matches_the_reference(name):
    # The Hessian-vector product along a constant direction, differentiated
    # once more (its graph runs through every block and RKD's mu).
    fn = DOUBLE_BACKWARD[name]
    fs = embeddings(12, 4, seed=34, dtype=F64)
    ft, y = correlated(fs, seed=35), torch.arange(12) % 4
    v = embeddings(12, 4, seed=36, dtype=F64)

    def third(backend):
        x = fs.detach().clone().requires_grad_()
        with relkd.double_backward():
            loss = fn(x, ft, y, backend)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), x, create_graph=True)
        return torch.autograd.grad((h * h).sum(), x)[0]

    want = third("reference")
    assert want.abs().max() > 0
    torch.testing.assert_close(third("fused"), want, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("name", ["fcd", "rad", "cckd", "ekd", "sp"])
@pytest.mark.parametrize("dtype,scale", [(F32, 1e20), (F32, 1e37), (F64, 1e160)])
def test_huge_embeddings_match_the_reference(name, dtype, scale):
    # Rows whose squared norm overflows the dtype: F.normalize made them zero
    # vectors (the reference's loss 0); SP's Gram identity overflowed float64
    # from |f| ~ 1e37 in sqrt(m_s m_t) (loss 2/N). Normalised losses and SP are scale-free, so
    # both paths must give the loss of the unscaled rows.
    if name == "sp" and dtype == F64 and scale > 1e70:
        pytest.skip("SP's Gram identity squares |f|^4 N D^2 in float64: beyond |f| ~ 1e77 "
                    "it overflows (a NaN loss), as the direct form's F F^T does beyond 1e154")
    fs, ft = embeddings(24, 8, 31, dtype), embeddings(24, 8, 32, dtype)
    y = labels("random", 24, 3)
    call = {"fcd": lambda f, t, b: Fn.fcd_loss(f, t, backend=b),
            "rad": lambda f, t, b: Fn.rad_loss(f, t, y, k=4, backend=b),
            "cckd": lambda f, t, b: Fn.cckd_loss(f, t, backend=b),
            "ekd": lambda f, t, b: Fn.ekd_loss(f, t, y, torch.zeros(6, dtype=dtype),
                                               torch.zeros(6, dtype=dtype), backend=b)[0],
            "sp": lambda f, t, b: Fn.sp_loss(f, t, backend=b)}[name]
    if name == "sp" and scale > torch.finfo(dtype).max ** 0.5:
        backends = ["fused"]  # the reference's F F^T itself overflows: NaN, loud
    else:
        backends = ["fused", "reference"]
    want = call(fs.double(), ft.double(), "reference").to(dtype)
    for backend in backends:
        got = call(fs * scale, ft * scale, backend)
        torch.testing.assert_close(got, want, rtol=1e-4 if dtype == F32 else 1e-12, atol=0)


def test_ekd_topk_beyond_the_pairs_allocates_only_the_pairs():
    # topk sizes the selection's outputs: 10**12 would ask for terabytes.
    fs, ft, y = embeddings(8, 4, 1, F64), embeddings(8, 4, 2, F64), labels("random", 8, 1)
    got = Fn.ekd_loss(fs, ft, y, torch.zeros(6, dtype=F64), torch.zeros(6, dtype=F64),
                      topk=10**12, backend="fused")[0]
    want = Fn.ekd_loss(fs, ft, y, torch.zeros(6, dtype=F64), torch.zeros(6, dtype=F64),
                       topk=10**12, backend="reference")[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_ekd_anchors_that_require_grad_are_constants_on_both_paths():
    fs, ft, y = embeddings(12, 4, 3, F64), embeddings(12, 4, 4, F64), labels("random", 12, 2)
    anchors = torch.full((6,), 0.1, dtype=F64, requires_grad=True)
    got = Fn.ekd_loss(fs, ft, y, anchors, anchors.detach(), backend="fused")
    want = Fn.ekd_loss(fs, ft, y, anchors, anchors.detach(), backend="reference")
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
    assert not got[1].requires_grad and not want[1].requires_grad


def test_cckd_orders_beyond_float_factorials_match_the_reference():
    # 171! overflows a float; the reference's coefficients come from log space.
    fs, ft = embeddings(16, 6, 5, F64), embeddings(16, 6, 6, F64)
    compare(Fn.cckd_loss, fs, ft, order=200, gamma=3.0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_ekd_module_refuses_a_checkpointed_training_forward(reentrant):
    # Recomputed in backward, the forward would move the anchors twice and
    # differentiate with the moved ones (6.9 % off), silently.
    from torch.utils.checkpoint import checkpoint
    fs = embeddings(24, 8, seed=40, dtype=F64).requires_grad_()
    ft, y = correlated(fs.detach(), seed=41), torch.arange(24) % 6
    ekd = relkd.EKDLoss(topk=50, temperature=0.05)
    loss = checkpoint(lambda f: ekd(f, ft, y), fs, use_reentrant=reentrant)
    with pytest.raises(RuntimeError, match="EKDLoss: its forward runs inside a backward"):
        loss.backward()
    # The functional form with the anchors passed in is pure: checkpointing it
    # gives the plain gradient.
    anchors = torch.full((6,), 0.2, dtype=F64)

    def fn(f):
        return Fn.ekd_loss(f, ft, y, anchors, anchors, topk=50, temperature=0.05)[0]

    x = fs.detach().clone().requires_grad_()
    checkpoint(fn, x, use_reentrant=reentrant).backward()
    want = torch.autograd.grad(fn(fs), fs)[0]
    torch.testing.assert_close(x.grad, want, rtol=1e-12, atol=1e-15)
    ekd.eval()  # eval mode reads the anchors only: recomputation is harmless
    x.grad = None
    checkpoint(lambda f: ekd(f, ft, y), x, use_reentrant=reentrant).backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(ekd(fs, ft, y), fs)[0])


@pytest.mark.parametrize("name", list(DOUBLE_BACKWARD))
def test_function_transforms_fall_back_or_raise(name, monkeypatch):
    # relkd's ops have no forward-mode rule and torch's custom-op autograd
    # drops the tangent: jvp gave 0 on the fused path, silently. "auto" now
    # takes the reference (with a FallbackWarning), "fused" raises.
    fn = DOUBLE_BACKWARD[name]
    fs = embeddings(16, 5, seed=42, dtype=F64)
    ft, y = correlated(fs, seed=43), torch.arange(16) % 4
    tangent = embeddings(16, 5, seed=44, dtype=F64)
    monkeypatch.setattr(relkd.ops, "_WARNED", set())  # warned once per process otherwise
    x = fs.clone().requires_grad_()
    want = (torch.autograd.grad(fn(x, ft, y, "reference"), x)[0] * tangent).sum()
    assert want.abs() > 0
    with pytest.warns(relkd.FallbackWarning, match="forward-mode AD") if name != "fcd" else \
            contextlib.nullcontext():
        _, got = torch.func.jvp(lambda f: fn(f, ft, y, "auto"), (fs,), (tangent,))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    with fwAD.dual_level():
        dual = fwAD.make_dual(fs, tangent)
        got = fwAD.unpack_dual(fn(dual, ft, y, "auto")).tangent
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            fn(dual, ft, y, "fused")
    # torch.func.grad: torch's custom-op autograd refuses the transform
    # (loudly); "auto" takes the reference for it too.
    got = torch.func.grad(lambda f: fn(f, ft, y, "auto"))(fs)
    torch.testing.assert_close((got * tangent).sum(), want, rtol=1e-10, atol=1e-14)
    # A grad level below a vmap level: the custom ops still see functorch's grad.
    got = torch.func.grad(lambda f: torch.func.vmap(lambda g: fn(g, ft, y, "auto"))(
        f[None]).sum())(fs)
    torch.testing.assert_close((got * tangent).sum(), want, rtol=1e-10, atol=1e-14)
    with pytest.raises(NotImplementedError, match="torch.func.grad"):
        torch.func.grad(lambda f: fn(f, ft, y, "fused"))(fs)
    # vmap: the kernels once per batch entry (SP's autograd.Function, which
    # vmap refuses: the reference).
    batch = torch.stack([fs, fs.flip(0)]), torch.stack([ft, ft.roll(1, 0)])
    got = torch.func.vmap(lambda f, t: fn(f, t, y, "auto"))(*batch)
    want = torch.stack([fn(f, t, y, "reference") for f, t in zip(*batch)])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
