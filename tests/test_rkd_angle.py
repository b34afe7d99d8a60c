"""rkd_angle_loss (csrc/cpu/rkd_angle.cpp): RKD's angle term with its
vertices a few at a time, against the SPEC §6 transcription below (the
reference's N x N x D differences and N x N x N angles) and its autograd
gradient, over shapes, dtypes, rows x columns, groups of vertices and
duplicate rows; fp64 gradcheck; opcheck. RKDLoss as a whole: the end of
this file, test_losses_fused.py and test_distributed.py."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import relkd
from relkd import functional as Fn
from relkd import ops, reference

from helpers import embeddings, num_threads, requires_extension

pytestmark = requires_extension
F64 = torch.float64


def angle_sum(es_r, et_r, es_c=None, et_c=None):
    """sum over vertices a (rows) and points b, c (columns) of
    smoothL1(psi_s - psi_t), psi_abc = normalize(x_b - x_a) . normalize(x_c -
    x_a), materialised as the reference does (rkd_angles)."""
    def angles(rows, cols):
        unit = F.normalize(cols[None, :, :] - rows[:, None, :], p=2.0, dim=2,
                           eps=reference.EPS)
        return torch.bmm(unit, unit.transpose(1, 2))
    es_c = es_r if es_c is None else es_c
    et_c = et_r if et_c is None else et_c
    return F.smooth_l1_loss(angles(es_r, es_c), angles(et_r, et_c).detach(), reduction="sum")


def case(n_r, n_c, d_s, d_t, rect, duplicates, seed, dtype):
    """Rows (and columns: the rows plus n_c others when rect), with the
    first rows repeated among the others when `duplicates` (zero
    differences: F.normalize's eps clamp)."""
    es = embeddings(n_r + (n_c if rect else 0), d_s, seed, dtype)
    et = embeddings(es.shape[0], d_t, seed + 1, dtype)
    if duplicates and es.shape[0] > 2:
        es[-1] = es[0]
        et[-2] = et[1]
    if not rect:
        return es, et, None, None
    return es[:n_r].clone(), et[:n_r].clone(), es, et


def value_and_grads(fn, es_r, et_r, es_c, et_c):
    leaves = [t.detach().clone().requires_grad_() for t in (es_r, es_c) if t is not None]
    loss = fn(leaves[0], et_r, leaves[1] if es_c is not None else None, et_c)
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves))


@settings(deadline=None, max_examples=40)
@given(n_r=st.integers(1, 30), n_c=st.integers(0, 20), d_s=st.integers(1, 12),
       d_t=st.integers(1, 12), rect=st.booleans(), duplicates=st.booleans(),
       group=st.sampled_from([0, 1, 2, 7]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, F64]))
def test_matches_the_transcription(n_r, n_c, d_s, d_t, rect, duplicates, group, seed, dtype):
    """The loss and the student's gradients (rows; columns when given) of
    the transcription in float64, the fused path's error within four times
    the transcription's own in `dtype`, plus 1e-6 (float32) or 1e-13
    (float64) of the output's scale or of the number of angles per vertex,
    whatever the vertices per group."""
    es_r, et_r, es_c, et_c = case(n_r, n_c, d_s, d_t, rect, duplicates, seed, dtype)

    def fused(a, b, c, d):
        return torch.ops.relkd.rkd_angle_loss(a, b, c, d, True, group)[0]

    got = value_and_grads(fused, es_r, et_r, es_c, et_c)
    same = value_and_grads(angle_sum, es_r, et_r, es_c, et_c)
    exact = value_and_grads(angle_sum, *(t if t is None else t.double()
                                         for t in (es_r, et_r, es_c, et_c)))
    columns = (es_r if es_c is None else es_c).shape[0]
    for g, s, e in zip(got, same, exact):
        assert g.dtype == dtype and g.shape == e.shape
        scale = max(float(e.abs().max()), columns ** 2)
        slack = (1e-13 if dtype == F64 else 1e-6) * scale
        error = float((g.double() - e).abs().max())
        assert error <= 4 * float((s.double() - e).abs().max()) + slack


@pytest.mark.parametrize("rect", [False, True])
def test_gradcheck(rect):
    """(Columns other than the rows: a vertex among the columns has a zero
    difference to itself, where normalize is not differentiable.)"""
    es_r, et_r, es_c, et_c = case(5, 3, 3, 2, rect, False, seed=3, dtype=F64)
    if rect:
        es_c, et_c = es_c[5:].clone(), et_c[5:].clone()
    inputs = [es_r.requires_grad_()] + ([es_c.requires_grad_()] if rect else [])

    def loss(*x):
        return torch.ops.relkd.rkd_angle_loss(x[0], et_r, x[1] if rect else None, et_c, True,
                                              2)[0]

    assert torch.autograd.gradcheck(loss, inputs)


@pytest.mark.parametrize("rect", [False, True])
def test_double_backward(rect):
    """create_graph=True differentiates relkd/_second_order.py's
    transcription: its gradient is the kernel's, and its second derivatives
    match finite differences (finite also where a difference is zero: the
    vertex against itself)."""
    es_r, et_r, es_c, et_c = case(5, 3, 3, 2, rect, False, seed=4, dtype=F64)
    if rect:
        es_c, et_c = es_c[5:].clone(), et_c[5:].clone()
    inputs = [es_r.requires_grad_()] + ([es_c.requires_grad_()] if rect else [])

    def loss(*x):
        with relkd.double_backward():
            return ops.rkd_angle_loss(x[0], et_r, x[1] if rect else None, et_c)

    with pytest.raises(RuntimeError, match="double_backward"):  # outside it: loud
        torch.autograd.grad(ops.rkd_angle_loss(es_r, et_r, es_c if rect else None, et_c),
                            inputs, create_graph=True)
    first = torch.autograd.grad(loss(*inputs), inputs)
    graphed = torch.autograd.grad(loss(*inputs), inputs, create_graph=True)
    for a, b in zip(graphed, first):
        assert a.requires_grad
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-13)
    assert torch.autograd.gradgradcheck(loss, inputs)


@pytest.mark.parametrize("rect", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck(rect, grad):
    es_r, et_r, es_c, et_c = case(6, 4, 3, 5, rect, False, seed=5, dtype=F64)
    es_r.requires_grad_(grad)
    if rect:
        es_c.requires_grad_(grad)
    torch.library.opcheck(torch.ops.relkd.rkd_angle_loss.default,
                          (es_r, et_r, es_c, et_c, grad, 2))


def test_groups_of_vertices_give_the_same_result():
    """One vertex per group, a few, or all at once: the same sums up to
    float64 rounding (each group adds its share in turn)."""
    es_r, et_r, es_c, et_c = case(23, 9, 6, 4, True, True, seed=8, dtype=F64)
    results = [torch.ops.relkd.rkd_angle_loss(es_r, et_r, es_c, et_c, True, g)
               for g in (0, 1, 5, 23, 100)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_same_bits_for_any_thread_count():
    es_r, et_r, es_c, et_c = case(40, 30, 8, 5, True, False, seed=9, dtype=torch.float32)
    with num_threads(1):
        one = torch.ops.relkd.rkd_angle_loss(es_r, et_r, es_c, et_c, True, 3)
    with num_threads(2):
        two = torch.ops.relkd.rkd_angle_loss(es_r, et_r, es_c, et_c, True, 3)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_bad_input_raises_value_error():
    es, et = embeddings(5, 3, seed=1, dtype=F64), embeddings(5, 2, seed=2, dtype=F64)
    with pytest.raises(ValueError, match="et_r, et_c"):
        ops.rkd_angle_loss(es, et.requires_grad_())
    et = et.detach()
    with pytest.raises(ValueError, match="es_c and et_c"):
        torch.ops.relkd.rkd_angle_loss(es, et, es, None, False)
    with pytest.raises(ValueError, match="teacher's rows"):
        torch.ops.relkd.rkd_angle_loss(es, et[:4], None, None, False)
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.relkd.rkd_angle_loss(es, et.float(), None, None, False)
    with pytest.raises(ValueError, match="anchors_per_group"):
        torch.ops.relkd.rkd_angle_loss(es, et, None, None, False, -1)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_rkd_loss_with_the_angle_term_runs_fused(dtype):
    """RKDLoss's default weights (25, 50) on the fused path: the reference's
    loss and gradient; backend="auto" takes it without a FallbackWarning."""
    fs = embeddings(40, 12, seed=2, dtype=dtype).requires_grad_()
    ft = embeddings(40, 9, seed=3, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = relkd.RKDLoss()(fs, ft)
    assert torch.equal(fused, Fn.rkd_loss(fs, ft, backend="fused"))
    want = Fn.rkd_loss(fs, ft, backend="reference")
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(fused, want, rtol=tol, atol=tol)
    g_fused, = torch.autograd.grad(fused, fs)
    g_want, = torch.autograd.grad(want, fs)
    torch.testing.assert_close(g_fused, g_want, rtol=tol, atol=tol * float(g_want.abs().max()))
    only_angles = Fn.rkd_loss(fs, ft, distance_weight=0.0, backend="fused")
    torch.testing.assert_close(only_angles, reference.rkd_loss(fs, ft, distance_weight=0.0),
                               rtol=tol, atol=tol)
