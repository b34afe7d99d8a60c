"""pairwise_loss (DESIGN primitive 3), every kind, against the N x N sum it
replaces: values and gradients (student, teacher where allowed, RKD's mu),
the symmetric case against rectangular row blocks with global ids (the DDP
case), label-sorted rows (EKD), gradcheck, opcheck, determinism, and double
backward (gradgradcheck)."""
import math
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import relkd
from relkd import _second_order as second_order
from relkd import ops, reference

from helpers import (LABEL_PATTERNS, assert_bounded_error, correlated, embeddings, labels,
                     num_threads, requires_extension)

pytestmark = requires_extension
KINDS = ("cckd", "ekd_pos", "rkd_dist_sum", "rkd_distance")


def unit(x):
    return reference.normalize(x, x.dtype)


def inputs(kind, n, d, seed, dtype, pattern="random"):
    """(xs, xt, labels, params) as the losses pass them to the op."""
    xs = embeddings(n, d, seed, dtype)
    xt = correlated(xs, seed + 1, 0.7)
    y = labels(pattern, n, seed)
    if kind == "cckd":
        coef = reference.cckd_coefficients("gaussian", 0.4, 3)
        return unit(xs), unit(xt), None, torch.tensor(coef, dtype=dtype)
    if kind == "ekd_pos":
        anchors = torch.linspace(-0.3, 0.6, 6, dtype=dtype)
        params = torch.cat([torch.tensor([0.2], dtype=dtype), anchors, anchors + 0.05])
        return unit(xs), unit(xt), y, params
    if kind == "rkd_dist_sum":
        return xs, None, None, xs.new_empty(0)
    return xs, xt, None, torch.tensor([1.3, 0.9], dtype=dtype)


def direct(kind, xs, xt, y, params):
    """The same sum over the full N x N matrices, in plain PyTorch."""
    n = xs.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    if kind == "cckd":
        coef = params.tolist()
        diff = reference.polynomial(coef, xs @ xs.T) - reference.polynomial(coef, xt @ xt.T)
        return (diff * diff).sum()
    if kind == "ekd_pos":
        a = (params.numel() - 1) // 2
        t, s_anchor, t_anchor = params[0].item(), params[1:1 + a], params[1 + a:]
        iu = torch.triu_indices(n, n, 1)
        pos = y[iu[0]] == y[iu[1]]
        s = (xs @ xs.T)[iu[0], iu[1]][pos]
        tt = (xt @ xt.T)[iu[0], iu[1]][pos]
        diff = reference.ekd_rank(s, s_anchor, t) - reference.ekd_rank(tt, t_anchor, t)
        return (diff * diff).sum()
    if kind == "rkd_dist_sum":
        return reference.rkd_pdist(xs)[off].sum()
    psi_s = reference.rkd_pdist(xs) / params[0]
    psi_t = reference.rkd_pdist(xt) / params[1]  # both means are differentiated
    return torch.nn.functional.smooth_l1_loss(psi_s[off], psi_t[off], reduction="sum")


def grads_of(fn, kind, xs, xt, y, params):
    """(value, d/dxs, d/dxt or None, d/dparams or None)."""
    xs = xs.detach().clone().requires_grad_()
    xt = None if xt is None else xt.detach().clone().requires_grad_(kind == "cckd")
    params = params.detach().clone().requires_grad_(kind == "rkd_distance")
    value = fn(kind, xs, xt, y, params)
    wrt = [xs] + ([xt] if kind == "cckd" else []) + ([params] if kind == "rkd_distance" else [])
    got = torch.autograd.grad(value, wrt)
    return [value.detach()] + list(got)


def fused(kind, xs, xt, y, params):
    return ops.pairwise_loss(kind, xs, xt, labels_r=y, params=params)


@given(kind=st.sampled_from(KINDS), n=st.integers(1, 300), d=st.integers(1, 130),
       pattern=st.sampled_from(LABEL_PATTERNS), dtype=st.sampled_from([torch.float32,
                                                                       torch.float64]),
       seed=st.integers(0, 2**16))
def test_matches_the_full_matrix(kind, n, d, pattern, dtype, seed):
    args = inputs(kind, n, d, seed, dtype, pattern)
    got = grads_of(fused, kind, *args)
    same = grads_of(direct, kind, *args)
    exact = grads_of(direct, kind, *(None if a is None else a.double() if a.is_floating_point()
                                     else a for a in args))
    for g, s, e, what in zip(got, same, exact, ("loss", "grad xs", "grad 2", "grad 3")):
        assert g.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12, msg=f"{kind} {what}")
        else:
            assert_bounded_error(g, s, e, f"{kind} {what}", factor=4.0)


def rect_in_chunks(kind, xs, xt, y, params, bounds):
    """Sum over row blocks of (rows x all columns) calls with global row ids,
    as one DDP rank per block computes it."""
    total = 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        ids = torch.arange(lo, hi)
        total = total + ops.pairwise_loss(
            kind, xs[lo:hi], None if xt is None else xt[lo:hi], xs,
            None if xt is None else xt, None if y is None else y[lo:hi], y, ids, None, params)
    return total


@pytest.mark.parametrize("kind", KINDS)
def test_row_blocks_with_global_ids_sum_to_the_whole(kind):
    args = inputs(kind, 300, 20, seed=3, dtype=torch.float64)
    whole = grads_of(fused, kind, *args)
    blocks = grads_of(lambda *a: rect_in_chunks(*a, bounds=[0, 37, 290, 300]), kind, *args)
    for w, b in zip(whole, blocks):
        torch.testing.assert_close(b, w, rtol=1e-10, atol=1e-12)


def test_ekd_pos_is_invariant_to_sorting_rows_by_label():
    xs, xt, y, params = inputs("ekd_pos", 280, 9, seed=4, dtype=torch.float64)
    perm = torch.argsort(y, stable=True)
    plain = grads_of(fused, "ekd_pos", xs, xt, y, params)
    xs_p = xs.detach().clone().requires_grad_()
    value = ops.pairwise_loss("ekd_pos", xs_p[perm], xt[perm], labels_r=y[perm], params=params)
    (grad,) = torch.autograd.grad(value, xs_p)
    torch.testing.assert_close(value, plain[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, plain[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    xs, xt, y, params = inputs(kind, 9, 4, seed=5, dtype=torch.float64)
    xs.requires_grad_()
    if kind == "cckd":
        xt.requires_grad_()
    # Only rkd_distance is differentiable in params (both means).
    params = params.clone().requires_grad_(kind in ops.PARAMS_GRAD_KINDS)
    assert torch.autograd.gradcheck(
        lambda a, b, p: ops.pairwise_loss(kind, a, b, labels_r=y, params=p), (xs, xt, params))


@pytest.mark.parametrize("kind", ["cckd", "ekd_pos"])
def test_params_gradient_is_refused_where_undefined(kind):
    xs, xt, y, params = inputs(kind, 12, 4, seed=5, dtype=torch.float64)
    params.requires_grad_()
    with pytest.raises(ValueError, match=r"^params: kind .* defines no gradient"):
        ops.pairwise_loss(kind, xs, xt, labels_r=y, params=params)
    # The raw op, called directly, raises in backward instead of returning zeros.
    out = torch.ops.relkd.pairwise_loss(kind, xs.requires_grad_(), xt, None, None, y, None,
                                        None, None, params, True, False)[0]
    with pytest.raises(RuntimeError, match="defines no gradient with respect to params"):
        torch.autograd.grad(out, params)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rect", [False, True])
def test_opcheck(kind, rect):
    xs, xt, y, params = inputs(kind, 40, 6, seed=6, dtype=torch.float32)
    xs.requires_grad_()
    teacher_grad = kind == "cckd"
    if teacher_grad:
        xt.requires_grad_()
    if kind == "rkd_distance":
        params.requires_grad_()
    if rect:
        cols = (xs.detach().clone().requires_grad_(), None if xt is None else xt.detach().clone())
        args = (kind, xs[:10].detach().requires_grad_(), None if xt is None else xt[:10], cols[0],
                cols[1], None if y is None else y[:10], y, torch.arange(10) + 5, None, params,
                True, teacher_grad)
    else:
        args = (kind, xs, xt, None, None, y, None, None, None, params, True, teacher_grad)
    torch.library.opcheck(torch.ops.relkd.pairwise_loss.default, args)


@pytest.mark.parametrize("kind", KINDS)
def test_bitwise_identical_for_any_thread_count(kind):
    # Tiles run in waves (csrc/tile_plan.h): each gradient row is summed in
    # the same order whatever the number of threads.
    args = inputs(kind, 700, 32, seed=7, dtype=torch.float32)
    runs = []
    for threads in (1, 2, 3, 2):
        with num_threads(threads):
            runs.append(grads_of(fused, kind, *args))
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


# Double backward (create_graph=True) differentiates the op's PyTorch
# transcription (relkd/_second_order.py): its gradient must be the kernel's,
# and its second derivatives those of finite differences.
def second_order_case(kind, rect):
    """(fn of the differentiable inputs, those inputs): symmetric, or rows
    20..31 against all columns with global ids (a DDP rank's call)."""
    xs, xt, y, params = inputs(kind, 32, 4, seed=9, dtype=torch.float64)
    teacher = kind in ops.TEACHER_GRAD_KINDS
    params = params.clone().requires_grad_(kind in ops.PARAMS_GRAD_KINDS)
    wrt = [xs] + ([xt] if teacher else []) + ([params] if params.requires_grad else [])
    wrt = [w.detach().clone().requires_grad_() for w in wrt]

    def fn(*args):
        a = list(args)
        x = a.pop(0)
        z = a.pop(0) if teacher else xt
        p = a.pop(0) if params.requires_grad else params
        with relkd.double_backward():
            if not rect:
                return ops.pairwise_loss(kind, x, z, labels_r=y, params=p)
            rows = slice(20, 32)
            return ops.pairwise_loss(kind, x[rows], None if z is None else z[rows], x, z,
                                     None if y is None else y[rows], y, torch.arange(20, 32),
                                     None, p)
    return fn, wrt


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rect", [False, True])
def test_double_backward_gradient_is_the_kernels(kind, rect):
    fn, wrt = second_order_case(kind, rect)
    first = torch.autograd.grad(fn(*wrt), wrt)
    graphed = torch.autograd.grad(fn(*wrt), wrt, create_graph=True)
    assert all(g.requires_grad for g in graphed)
    for a, b in zip(graphed, first):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rect", [False, True])
def test_gradgradcheck(kind, rect):
    fn, wrt = second_order_case(kind, rect)
    assert torch.autograd.gradgradcheck(fn, tuple(wrt))


def test_double_backward_of_a_param_that_depends_on_the_rows():
    # RKD's mu is the student's mean distance: the partial derivatives must
    # not count the path through mu twice (once inside the recompute, once
    # by the caller's graph).
    xs, xt, _, _ = inputs("rkd_distance", 24, 5, seed=10, dtype=torch.float64)
    mu_t = ops.pairwise_loss("rkd_dist_sum", xt) / (24 * 23)

    def loss(x, impl):
        mu = impl("rkd_dist_sum", x, None, x.new_empty(0)) / (24 * 23)
        return impl("rkd_distance", x, xt, torch.stack([mu, mu_t]))

    def fused_impl(kind, x, t, p):
        with relkd.double_backward():
            return ops.pairwise_loss(kind, x, t, params=p)

    def direct_impl(kind, x, t, p):
        return direct(kind, x, t, None, p)

    v = embeddings(24, 5, seed=11, dtype=torch.float64)
    hvps = []
    for impl in (fused_impl, direct_impl):
        x = xs.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(x, impl), x, create_graph=True)
        hvps.append(torch.autograd.grad((g * v).sum(), x)[0])
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_third_derivative_matches_the_full_matrix(kind):
    # A constant direction v: the Hessian-vector product is differentiated
    # again, through the blocks' graphs (and mu's path for RKD).
    xs, xt, y, params = inputs(kind, 16, 3, seed=12, dtype=torch.float64)
    v = embeddings(16, 3, seed=13, dtype=torch.float64)
    params = params.clone().requires_grad_(kind in ops.PARAMS_GRAD_KINDS)

    def third(loss):
        x = xs.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(x), x, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), x, create_graph=True)
        return torch.autograd.grad((h * h).sum() + h.sum(), (x, params) if params.requires_grad
                                   else (x,))

    with relkd.double_backward():
        got = third(lambda x: ops.pairwise_loss(kind, x, xt, labels_r=y, params=params))
    want = third(lambda x: direct(kind, x, xt, y, params))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale,size", [(2e-8, 1e4), (1.0, 1.0), (65536.0, 1e-3)])
def test_hessian_vector_product_of_16_bit_embeddings_rounds_once(scale, size):
    # CUDA passes 16-bit embeddings with float32 params and float32 kernel
    # gradients. The product must be float32 until its final rounding: in
    # float16, CCKD's 1 / N^2 at N = 8192 (1.5e-8) made it 0 and
    # GradScaler's 2^16 made it inf. (CPU: the product is plain PyTorch.)
    # The direction's size keeps the exact product a normal float16.
    xs, xt, _, params = inputs("cckd", 48, 8, seed=14, dtype=torch.float32)
    v = size * embeddings(48, 8, seed=15, dtype=torch.float32)
    grad_loss = torch.tensor(scale)
    products = []
    for dtype in (torch.float16, torch.float32):
        x = xs.to(torch.float16).to(dtype).requires_grad_()
        z = xt.to(torch.float16).to(dtype)
        leaf = x.detach().float().requires_grad_()
        first = torch.autograd.grad(second_order.pairwise_loss(
            "cckd", leaf, z, None, None, None, None, None, None, params), leaf)[0]
        (g,) = second_order.gradients_with_graph(
            second_order.pairwise_blocks("cckd", 48, 48),
            [x, z, None, None, None, None, None, None, params],
            [True] + [False] * 8, grad_loss, [first])[:1]
        assert g.dtype == dtype
        products.append(torch.autograd.grad((g.float() * v).sum(), x)[0].float())
    half, full = products
    assert torch.isfinite(half).all() and half.abs().max() > 0
    assert (half - full).norm() <= 2e-3 * full.norm()


def test_double_backward_memory_is_one_block_at_a_time(monkeypatch):
    # The Hessian-vector product sums row blocks: tiny blocks give the
    # same product as one block.
    fn, wrt = second_order_case("rkd_distance", rect=True)
    products = []
    for entries in (second_order.BLOCK_ENTRIES, 40):
        monkeypatch.setattr(second_order, "BLOCK_ENTRIES", entries)
        grads = torch.autograd.grad(fn(*wrt), wrt, create_graph=True)
        products.append(torch.autograd.grad(sum((g * g).sum() for g in grads), wrt))
    assert len(second_order.row_blocks(12, 32)) == 12  # one row per block above
    for a, b in zip(*products):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_first_order_keeps_no_inputs_and_double_backward_asks_for_them():
    # Outside relkd.double_backward() the op saves only its gradient (no
    # O(N D) inputs held from forward to backward), and create_graph=True
    # raises, naming the context; inside it, the inputs are saved.
    xs, xt, _, coef = inputs("cckd", 40, 6, seed=16, dtype=torch.float64)
    xs.requires_grad_()
    saved = {}
    for keep in (False, True):
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t,
                                                      lambda t: t):
            if keep:
                with relkd.double_backward():
                    loss = ops.pairwise_loss("cckd", xs, xt, params=coef)
            else:
                loss = ops.pairwise_loss("cckd", xs, xt, params=coef)
        saved[keep] = sum(t.numel() for t in packed)
        if not keep:
            with pytest.raises(RuntimeError, match=r"relkd\.double_backward\(\)"):
                torch.autograd.grad(loss, xs, create_graph=True)
    assert saved[False] == xs.numel()  # the gradient
    assert saved[True] == 3 * xs.numel() + coef.numel()  # + xs, xt, params


def test_double_backward_block_is_seen_by_checkpointing_and_threads():
    # Activation checkpointing reruns the forward during backward (on CUDA
    # in autograd's device thread): the block is process-wide, so the rerun
    # saves what the forward saved.
    xs, xt, _, coef = inputs("cckd", 16, 3, seed=17, dtype=torch.float64)

    def f(x):
        return ops.pairwise_loss("cckd", x * 1.0, xt, params=coef)

    x = xs.detach().clone().requires_grad_()
    want = torch.autograd.grad(direct("cckd", x, xt, None, coef), x)[0]
    for create_graph in (False, True):
        with relkd.double_backward():
            loss = torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False)
            (g,) = torch.autograd.grad(loss, x, create_graph=create_graph)
        assert g.requires_grad == create_graph
        torch.testing.assert_close(g.detach(), want, rtol=1e-10, atol=1e-13)
    seen = []
    with relkd.double_backward():
        thread = threading.Thread(target=lambda: seen.append(second_order.keeping_inputs()))
        thread.start()
        thread.join()
    assert seen == [True] and not second_order.keeping_inputs()


def test_double_backward_refuses_a_teacher_gradient_the_kind_lacks():
    xs, xt, y, params = inputs("ekd_pos", 20, 4, seed=8, dtype=torch.float64)
    xs.requires_grad_()
    xt.requires_grad_()
    out = torch.ops.relkd.pairwise_loss("ekd_pos", xs, xt, None, None, y, None, None, None,
                                        params, True, False)[0]
    with pytest.raises(RuntimeError, match="passes no gradient to the teacher"):
        torch.autograd.grad(out, (xs, xt), create_graph=True)


def test_taylor_coefficients_sum_to_the_kernel():
    # phi(1) = exp(-2g) * sum_p (2g)^p / p! -> 1 as the order grows.
    coef = reference.cckd_coefficients("gaussian", 0.4, 30)
    assert math.isclose(sum(coef), 1.0, rel_tol=1e-12)
    # The fused path computes them on its own (recursively): the same numbers.
    from relkd import fused
    for order in (0, 1, 2, 5, 30):
        ours = fused._taylor_rbf_coefficients("gaussian", 0.4, order)
        assert ours == pytest.approx(reference.cckd_coefficients("gaussian", 0.4, order),
                                     rel=1e-14)
