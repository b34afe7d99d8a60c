"""The fused operators, as torch.library sees them: a fake (meta) kernel and an
autograd formula for every op of csrc/ops.cpp, so the ops work under
torch.compile(fullgraph=True) and pass torch.library.opcheck; plus thin
Python wrappers with keyword arguments, and `negative_pair_select`, the
driver of EKD's exact global order statistics.
"""
from __future__ import annotations

import importlib
import importlib.util
import struct
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _second_order as second_order
from . import distributed as relkd_dist
from ._common import normalize


class FallbackWarning(UserWarning):
    """backend="auto" ran the N x N reference instead of a fused kernel."""


class ExtensionWarning(UserWarning):
    """relkd._C exists but could not be loaded."""


def _load_extension() -> Tuple[str, Optional[str]]:
    """('loaded', None), ('not built', why) or ('failed to load', why)."""
    name = f"{__package__}._C"
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        spec, find_error = None, exc
    else:
        find_error = None
    if spec is None:
        return "not built", (
            f"the compiled extension {name} is not built{f' ({find_error})' if find_error else ''}"
            "; build it with `pip install .` (or `make build` in a source tree)")
    rebuild = "rebuild it with `pip install --force-reinstall --no-deps .`"
    try:
        importlib.import_module(name)  # loading it registers torch.ops.relkd.*
    except Exception as exc:  # noqa: BLE001  (any loader error: ABI mismatch, bad file)
        return "failed to load", (
            f"the compiled extension {spec.origin} exists but failed to load: {exc}. It was "
            f"probably built against another torch than this one ({torch.__version__}); "
            f"{rebuild}")
    built = _info_of(torch.ops.relkd.build_info()).get("torch", "unknown")
    running = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if built not in (running, "unknown"):  # its C++ ABI is that torch's: do not use it
        return "failed to load", (
            f"the compiled extension {spec.origin} was built against torch {built}, but this "
            f"is torch {torch.__version__}; {rebuild}")
    return "loaded", None


def _info_of(text: str) -> dict:
    return dict(part.split("=", 1) for part in text.split())


EXTENSION_STATE, EXTENSION_ERROR = _load_extension()
HAS_EXTENSION = EXTENSION_STATE == "loaded"
if EXTENSION_STATE == "failed to load":
    warnings.warn(f"relkd: {EXTENSION_ERROR}. Until then every loss runs the N x N reference "
                  "(backend='auto') or raises (backend='fused').", ExtensionWarning, stacklevel=2)
DIGITS = 1 << 16  # radix of the order-statistics passes (csrc/cpu/pair_select.cpp)
PARAMS_GRAD_KINDS = ("rkd_distance",)  # pairwise_loss kinds differentiable in params
TEACHER_GRAD_KINDS = ("cckd",)  # pairwise_loss kinds differentiable in the teacher
HALF_DTYPES = (torch.float16, torch.bfloat16)  # run as float32 copies on CUDA (csrc/cuda/ops.cpp)


def _compiled_devices() -> Tuple[str, ...]:
    if not HAS_EXTENSION:
        return ()
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key("relkd::topk_sim", "CUDA")
    return ("cpu", "cuda") if cuda else ("cpu",)


FUSED_DEVICES = _compiled_devices()  # fixed at import: a constant to torch.compile


def fused_devices() -> Tuple[str, ...]:
    """Device types that have compiled relkd kernels."""
    return FUSED_DEVICES


def build_info() -> dict:
    """What the loaded extension was built with: torch (major.minor),
    cuda_archs, cudart, mma_staging (the tensor-core kernels' units per
    staging step x steps staged, e.g. "64x2"), mma_wide (the sub-tile
    and warp tile of the top-k and the rows pass, e.g. "64x128/32x32") and
    mma_select (EKD's selection passes', e.g. "64x128/32x32" or
    "128x128/32x64"); the last three empty for a CPU-only build; {}
    without an extension."""
    if not HAS_EXTENSION:
        return {}
    return _info_of(torch.ops.relkd.build_info())


_WARNED = set()


def _warn_once(key: Tuple[str, str], message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, FallbackWarning, stacklevel=4)


def _warn_while_tracing(ctx) -> None:
    """Run by torch.compile at trace time in warn_fallback's frame (comptime
    functions read the frame's locals; they may not close over them)."""
    local = lambda name: ctx.get_local(name).as_python_constant()  # noqa: E731
    _warn_once((local("what"), local("reason")), local("message"))


def warn_fallback(what: str, reason: str, cost: str) -> None:
    """One FallbackWarning per (what, reason) and process: `what` fell back to
    the reference for `reason`, which costs `cost` memory. Under
    torch.compile the warning is issued while the graph is traced."""
    message = (f"{what}: backend='auto' runs the pure-PyTorch reference because {reason}; it "
               f"materialises {cost}. Pass backend='reference' to silence this, or "
               "backend='fused' to make it an error.")
    if torch.compiler.is_compiling():
        try:
            from torch._dynamo.comptime import comptime
        except ImportError:  # no trace-time hook in this torch: the eager call warns
            return
        comptime(_warn_while_tracing)
    else:
        _warn_once((what, reason), message)


# ------------------------------------------------------------- fake kernels
if HAS_EXTENSION:

    @torch.library.register_fake("relkd::topk_sim")
    def _topk_sim_fake(q, c, k, q_labels=None, c_labels=None, c_scale=None,
                       exclude_self=False, self_offset=0):
        n = q.shape[0]  # 16-bit operands (CUDA): float32 values
        values = torch.float32 if q.dtype in HALF_DTYPES else q.dtype
        return q.new_empty(n, k, dtype=values), q.new_empty(n, k, dtype=torch.long)

    @torch.library.register_fake("relkd::topk_sim_symmetric")
    def _topk_sim_symmetric_fake(x, k, labels=None):
        return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.long)

    @torch.library.register_fake("relkd::pair_dot")
    def _pair_dot_fake(a, b, idx):
        return a.new_empty(idx.shape)

    @torch.library.register_fake("relkd::pair_dot_backward")
    def _pair_dot_backward_fake(grad, a, b, idx, need_a, need_b):
        return (torch.empty_like(a) if need_a else a.new_empty(0),
                torch.empty_like(b) if need_b else b.new_empty(0))

    @torch.library.register_fake("relkd::pair_list_dot")
    def _pair_list_dot_fake(a, b, rows, cols):
        return a.new_empty(rows.shape[0])

    @torch.library.register_fake("relkd::pair_list_dot_backward")
    def _pair_list_dot_backward_fake(grad, a, b, rows, cols, need_a, need_b):
        grad_b = b.new_empty(b.shape) if b is not None and need_b else a.new_empty(0)
        return a.new_empty(a.shape) if need_a else a.new_empty(0), grad_b

    @torch.library.register_fake("relkd::relation_penalty")
    def _relation_penalty_fake(s, t, indices, metric, margin):
        return s.new_empty(()), indices.new_empty(())

    @torch.library.register_fake("relkd::relation_penalty_backward")
    def _relation_penalty_backward_fake(grad, s, t, indices, metric, margin):
        return torch.empty_like(s), torch.empty_like(s)

    @torch.library.register_fake("relkd::pairwise_loss")
    def _pairwise_loss_fake(kind, xs_r, xt_r, xs_c, xt_c, labels_r, labels_c, ids_r, ids_c,
                            params, grad_student, grad_teacher):
        rect = xs_c is not None

        def grad_or_placeholder(like, computed):
            # float32 for 16-bit embeddings (CUDA): _pairwise_backward rounds
            # grad_loss * gradient to their dtype.
            dtype = torch.float32 if like is not None and like.dtype in HALF_DTYPES else None
            return torch.empty_like(like, dtype=dtype) if computed else xs_r.new_empty(0)

        # The loss and the parameters' gradient have the params' dtype: the
        # embeddings' (float32 / float64), or float32 for 16-bit embeddings.
        return (
            params.new_empty(()),
            grad_or_placeholder(xs_r, grad_student),
            grad_or_placeholder(xs_c, grad_student and rect),
            grad_or_placeholder(xt_r, grad_teacher),
            grad_or_placeholder(xt_c, grad_teacher and rect),
            torch.empty_like(params) if grad_student and kind in PARAMS_GRAD_KINDS
            else params.new_empty(0),
        )

    @torch.library.register_fake("relkd::pair_histogram")
    def _pair_histogram_fake(x_r, x_c, labels_r, labels_c, ids_r, ids_c, prefixes, shift):
        return prefixes.new_empty(prefixes.shape[0], DIGITS)

    @torch.library.register_fake("relkd::pair_histogram_topk")
    def _pair_histogram_topk_fake(x_r, x_c, labels_r, labels_c, ids_r, ids_c, prefixes, shift,
                                  topk, collect_ranges=None, collect_cap=0, top_min_key=0):
        n_collected = torch.library.get_ctx().new_dynamic_size()
        return (prefixes.new_empty(prefixes.shape[0], DIGITS), x_r.new_empty(topk),
                x_r.new_empty(topk, dtype=torch.long), x_r.new_empty(topk, dtype=torch.long),
                prefixes.new_empty(n_collected))

    @torch.library.register_fake("relkd::rkd_angle_loss")
    def _rkd_angle_loss_fake(es_r, et_r, es_c, et_c, grad_student, anchors_per_group=0):
        return (es_r.new_empty(()),
                torch.empty_like(es_r) if grad_student else es_r.new_empty(0),
                torch.empty_like(es_c) if grad_student and es_c is not None
                else es_r.new_empty(0))

    @torch.library.register_fake("relkd::sp_gram_forward")
    def _sp_gram_forward_fake(f_s, f_t, a_s, a_t):
        ds, dt, n = f_s.shape[1], f_t.shape[1], f_s.shape[0]

        def f64(*shape):
            return f_s.new_empty(shape, dtype=torch.float64)

        return f64(ds, ds), f64(dt, dt), f64(ds, dt), f64(n), f64(n), f64(n)

    @torch.library.register_fake("relkd::sp_gram_backward")
    def _sp_gram_backward_fake(f_s, f_t, a_s, a_t, gram_ss, gram_tt, gram_st, w_s, w_t, u,
                               need_s, need_t):
        rect = a_s is not None
        return (torch.empty_like(f_s) if need_s else f_s.new_empty(0),
                torch.empty_like(f_t) if need_t else f_t.new_empty(0),
                torch.empty_like(a_s) if need_s and rect else f_s.new_empty(0),
                torch.empty_like(a_t) if need_t and rect else f_t.new_empty(0))

    @torch.library.register_fake("relkd::normalize_rows")
    def _normalize_rows_fake(x, eps):
        return torch.empty_like(x), x.new_empty(x.shape[0])

    @torch.library.register_fake("relkd::normalize_rows_backward")
    def _normalize_rows_backward_fake(grad, y, norm, eps):
        return torch.empty_like(y)

    @torch.library.register_fake("relkd::pair_topk")
    def _pair_topk_fake(x_r, x_c, labels_r, labels_c, ids_r, ids_c, threshold_key, n_equal, topk):
        return (x_r.new_empty(topk), x_r.new_empty(topk, dtype=torch.long),
                x_r.new_empty(topk, dtype=torch.long))

    # ------------------------------------------------------------ autograd
    # pair_dot is bilinear in (a, b) and its backward is linear in (grad, a)
    # and in (grad, b), so both derivatives are written with the two ops
    # themselves: derivatives of every order are exact.
    def _pair_dot_setup(ctx, inputs, output):
        a, b, idx = inputs
        ctx.save_for_backward(a, b, idx)

    def _pair_dot_backward(ctx, grad):
        a, b, idx = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_a, grad_b = torch.ops.relkd.pair_dot_backward(grad.contiguous(), a, b, idx,
                                                           need_a, need_b)
        return (grad_a if need_a else None, grad_b if need_b else None, None)

    torch.library.register_autograd("relkd::pair_dot", _pair_dot_backward,
                                    setup_context=_pair_dot_setup)

    def _pair_dot_backward_setup(ctx, inputs, output):
        grad, a, b, idx, need_a, need_b = inputs
        ctx.save_for_backward(grad, a, b, idx)
        ctx.computed = (need_a, need_b)

    def _cotangents_used(ctx, bar_a, bar_b, a, b):
        """Which of a backward op's two outputs (gradients for a and b) were
        computed and received a cotangent (an empty placeholder gets none)."""
        use_a = ctx.computed[0] and bar_a is not None and bar_a.shape == a.shape
        use_b = ctx.computed[1] and bar_b is not None and b is not None and bar_b.shape == b.shape
        return use_a, use_b

    def _pair_dot_backward_backward(ctx, bar_a, bar_b):
        # Outputs: grad_a_i = sum_s g_is b_idx(i,s), grad_b_j = sum_{idx(i,s)=j} g_is a_i.
        grad, a, b, idx = ctx.saved_tensors
        use_a, use_b = _cotangents_used(ctx, bar_a, bar_b, a, b)
        need_g, need_a, need_b = ctx.needs_input_grad[:3]
        d_grad = d_a = d_b = None
        if need_g:
            d_grad = torch.zeros_like(grad)
            if use_a:
                d_grad = d_grad + pair_dot(bar_a.contiguous(), b, idx)
            if use_b:
                d_grad = d_grad + pair_dot(a, bar_b.contiguous(), idx)
        if need_a and use_b:
            d_a = torch.ops.relkd.pair_dot_backward(grad, a, bar_b.contiguous(), idx, True,
                                                    False)[0]
        if need_b and use_a:
            d_b = torch.ops.relkd.pair_dot_backward(grad, bar_a.contiguous(), b, idx, False,
                                                    True)[1]
        return d_grad, d_a, d_b, None, None, None

    torch.library.register_autograd("relkd::pair_dot_backward", _pair_dot_backward_backward,
                                    setup_context=_pair_dot_backward_setup)

    # pair_list_dot likewise: bilinear in (a, b), its backward linear in
    # (grad, a) and (grad, b); with b None (b = a) the backward's a-gradient
    # is the same sum with a in place of b, hence the shared form below.
    def _pair_list_dot_setup(ctx, inputs, output):
        a, b, rows, cols = inputs
        ctx.save_for_backward(a, b, rows, cols)

    def _pair_list_dot_backward(ctx, grad):
        a, b, rows, cols = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_a, grad_b = torch.ops.relkd.pair_list_dot_backward(grad.contiguous(), a, b, rows,
                                                                cols, need_a, need_b)
        return (grad_a if need_a else None, grad_b if need_b else None, None, None)

    torch.library.register_autograd("relkd::pair_list_dot", _pair_list_dot_backward,
                                    setup_context=_pair_list_dot_setup)

    def _pair_list_dot_backward_setup(ctx, inputs, output):
        grad, a, b, rows, cols, need_a, need_b = inputs
        ctx.save_for_backward(grad, a, b, rows, cols)
        ctx.computed = (need_a, need_b and b is not None)

    def _pair_list_dot_backward_backward(ctx, bar_a, bar_b):
        # Outputs: grad_a_r = sum_{rows_p = r} g_p b_{cols_p} (b None: plus
        # sum_{cols_p = r} g_p a_{rows_p}), grad_b_c = sum_{cols_p = c} g_p a_{rows_p}.
        grad, a, b, rows, cols = ctx.saved_tensors
        use_a, use_b = _cotangents_used(ctx, bar_a, bar_b, a, b)
        need_g, need_a, need_b = ctx.needs_input_grad[:3]
        d_grad = d_a = d_b = None
        if need_g:
            d_grad = torch.zeros_like(grad)
            if use_a:
                d_grad = d_grad + pair_list_dot(bar_a.contiguous(), a if b is None else b,
                                                rows, cols)
                if b is None:
                    d_grad = d_grad + pair_list_dot(a, bar_a.contiguous(), rows, cols)
            if use_b:
                d_grad = d_grad + pair_list_dot(a, bar_b.contiguous(), rows, cols)
        if need_a and b is None and use_a:
            d_a = torch.ops.relkd.pair_list_dot_backward(grad, bar_a.contiguous(), None, rows,
                                                         cols, True, False)[0]
        elif need_a and use_b:
            d_a = torch.ops.relkd.pair_list_dot_backward(grad, a, bar_b.contiguous(), rows,
                                                         cols, True, False)[0]
        if need_b and use_a:
            d_b = torch.ops.relkd.pair_list_dot_backward(grad, bar_a.contiguous(), b, rows,
                                                         cols, False, True)[1]
        return d_grad, d_a, d_b, None, None, None, None

    torch.library.register_autograd("relkd::pair_list_dot_backward",
                                    _pair_list_dot_backward_backward,
                                    setup_context=_pair_list_dot_backward_setup)

    # relation_penalty: total = sum_e m_e phi(s_e - t_e); its backward
    # g_s = grad phi'(d) m = -g_t is linear in grad, and its own derivatives
    # involve phi'' (2 for l2, 0 for hinge and l1, almost everywhere).
    def _relation_penalty_setup(ctx, inputs, output):
        s, t, indices, metric, margin = inputs
        ctx.save_for_backward(s, t, indices)
        ctx.metric, ctx.margin = metric, margin

    def _relation_penalty_grad(ctx, grad_total, _grad_count):
        s, t, indices = ctx.saved_tensors
        grad_s, grad_t = torch.ops.relkd.relation_penalty_backward(
            grad_total, s, t, indices, ctx.metric, ctx.margin)
        return grad_s, grad_t, None, None, None

    torch.library.register_autograd("relkd::relation_penalty", _relation_penalty_grad,
                                    setup_context=_relation_penalty_setup)

    def _relation_penalty_backward_setup(ctx, inputs, output):
        grad, s, t, indices, metric, margin = inputs
        ctx.save_for_backward(grad, s, t, indices)
        ctx.metric, ctx.margin = metric, margin

    def _relation_penalty_backward_backward(ctx, bar_s, bar_t):
        grad, s, t, indices = ctx.saved_tensors
        mined = indices >= 0
        bar = torch.zeros_like(s)
        for b, sign in ((bar_s, 1.0), (bar_t, -1.0)):
            if b is not None:
                bar = bar + sign * b
        bar = torch.where(mined, bar, torch.zeros_like(bar))
        # d grad: sum_e bar_e phi'(d_e), phi' read off the backward op at grad = 1.
        slope = torch.ops.relkd.relation_penalty_backward(
            torch.ones_like(grad), s, t, indices, ctx.metric, ctx.margin)[0]
        d_grad = (bar * slope).sum()
        curvature = 2.0 if ctx.metric == "l2" else 0.0
        d_s = grad * curvature * bar
        return d_grad, d_s, -d_s, None, None, None

    torch.library.register_autograd("relkd::relation_penalty_backward",
                                    _relation_penalty_backward_backward,
                                    setup_context=_relation_penalty_backward_setup)

    # pairwise_loss returns the gradient of its scalar output with respect to
    # each input, computed in the same tile pass (csrc/cpu/pairwise_loss.cpp);
    # backward scales them by the incoming gradient.
    _PAIRWISE_GRAD_SLOTS = {1: 1, 2: 3, 3: 2, 4: 4, 9: 5}  # input index -> output index

    def _pairwise_setup(ctx, inputs, output):
        # The inputs too inside relkd.double_backward(): a gradient with
        # create_graph=True differentiates the op again.
        ctx.kept_inputs = second_order.keeping_inputs()
        ctx.save_for_backward(*output[1:], *(inputs[1:10] if ctx.kept_inputs else [None] * 9))
        ctx.kind = inputs[0]
        ctx.input_dims = {i: inputs[i].dim() for i in _PAIRWISE_GRAD_SLOTS if inputs[i] is not None}
        ctx.input_dtypes = {i: inputs[i].dtype for i in _PAIRWISE_GRAD_SLOTS
                            if inputs[i] is not None}
        # Only the loss output takes a gradient: no zeros for the other five
        # (N x D each, a parallel fill apiece).
        ctx.set_materialize_grads(False)

    def _pairwise_backward(ctx, grad_loss, *_):
        grads: List[Optional[Tensor]] = [None] * 12
        if grad_loss is None:  # only the returned gradients were used
            return tuple(grads)
        saved = ctx.saved_tensors
        wanted = [False] * 12
        for inp in _PAIRWISE_GRAD_SLOTS:
            wanted[inp] = ctx.needs_input_grad[inp]
        if wanted[9] and ctx.kind not in PARAMS_GRAD_KINDS:
            raise RuntimeError(f"relkd::pairwise_loss: kind '{ctx.kind}' defines no "
                               "gradient with respect to params (params must not require "
                               f"grad; only {', '.join(PARAMS_GRAD_KINDS)} define one)")
        if (wanted[2] or wanted[4]) and ctx.kind not in TEACHER_GRAD_KINDS:
            raise RuntimeError(f"relkd::pairwise_loss: kind '{ctx.kind}' passes no gradient "
                               "to the teacher (xt_r, xt_c must not require grad)")
        firsts = {}  # input index -> the gradient the forward computed
        for inp, out in _PAIRWISE_GRAD_SLOTS.items():
            if not wanted[inp]:
                continue
            firsts[inp] = saved[out - 1]
            if firsts[inp].dim() != ctx.input_dims[inp]:  # an empty placeholder: not computed
                raise RuntimeError(
                    "relkd::pairwise_loss: a gradient was requested that the forward did not "
                    "compute; call it with grad_student / grad_teacher set for inputs that "
                    "require grad (relkd.ops.pairwise_loss does this)")
        if torch.is_grad_enabled():
            # create_graph=True: the same gradients, with a graph whose
            # backward is the Hessian-vector product, block by block.
            if not ctx.kept_inputs:
                raise RuntimeError(second_order.NOT_KEPT.format(op="pairwise_loss"))
            xs_r, xs_c = saved[5], saved[7]
            blocks = second_order.pairwise_blocks(
                ctx.kind, xs_r.shape[0], xs_r.shape[0] if xs_c is None else xs_c.shape[0])
            grads[1:10] = second_order.gradients_with_graph(
                blocks, saved[5:], wanted[1:10], grad_loss, [firsts[i] for i in sorted(firsts)])
            return tuple(grads)
        for inp, grad in firsts.items():
            # 16-bit embeddings have float32 gradients (see the fake), rounded
            # after the chain rule: a loss scale applies before float16 rounding.
            grads[inp] = (grad_loss * grad).to(ctx.input_dtypes[inp])
        return tuple(grads)

    torch.library.register_autograd("relkd::pairwise_loss", _pairwise_backward,
                                    setup_context=_pairwise_setup)

    # rkd_angle_loss returns its gradients with the loss, as pairwise_loss.
    def _rkd_angle_setup(ctx, inputs, output):
        ctx.kept_inputs = second_order.keeping_inputs()  # as pairwise_loss
        ctx.save_for_backward(*output[1:], *(inputs[:4] if ctx.kept_inputs else [None] * 4))
        ctx.set_materialize_grads(False)

    def _rkd_angle_backward(ctx, grad_loss, *_):
        grads: List[Optional[Tensor]] = [None] * 6
        if grad_loss is None:
            return tuple(grads)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            raise RuntimeError("relkd::rkd_angle_loss has no gradient for the teacher "
                               "(et_r, et_c must not require grad)")
        # Unpacked once: non-reentrant checkpointing refuses a second unpack.
        saved = ctx.saved_tensors
        firsts = {}  # input index (es_r, es_c) -> the gradient the forward computed
        for inp, grad in ((0, saved[0]), (2, saved[1])):
            if not ctx.needs_input_grad[inp]:
                continue
            if grad.dim() != 2:
                raise RuntimeError("relkd::rkd_angle_loss: a gradient was requested that the "
                                   "forward did not compute; call it with grad_student=True "
                                   "(relkd.ops.rkd_angle_loss does this)")
            firsts[inp] = grad
        if torch.is_grad_enabled():  # create_graph=True: as pairwise_loss
            if not ctx.kept_inputs:
                raise RuntimeError(second_order.NOT_KEPT.format(op="rkd_angle_loss"))
            es_r, es_c = saved[2], saved[4]
            blocks = second_order.rkd_angle_blocks(
                es_r.shape[0], es_r.shape[0] if es_c is None else es_c.shape[0])
            grads[:4] = second_order.gradients_with_graph(
                blocks, saved[2:], [i in firsts for i in range(4)], grad_loss,
                [firsts[i] for i in sorted(firsts)])
            return tuple(grads)
        for inp, grad in firsts.items():
            grads[inp] = grad_loss * grad
        return tuple(grads)

    torch.library.register_autograd("relkd::rkd_angle_loss", _rkd_angle_backward,
                                    setup_context=_rkd_angle_setup)


    # normalize_rows: first derivatives by its backward op (one pass); a
    # graph for higher orders (create_graph=True) by F.normalize's own.
    def _normalize_rows_setup(ctx, inputs, output):
        x, eps = inputs
        y, norm = output
        ctx.save_for_backward(x, y, norm)
        ctx.eps = eps
        ctx.set_materialize_grads(False)

    def _normalize_rows_backward(ctx, grad_y, grad_norm):
        x, y, norm = ctx.saved_tensors
        if torch.is_grad_enabled():
            with torch.enable_grad():  # x requires grad, or this was not called
                outs, grads = [], []
                if grad_y is not None:
                    outs.append(normalize(x, x.dtype, ctx.eps))
                    grads.append(grad_y)
                if grad_norm is not None:
                    outs.append(torch.linalg.vector_norm(x, dim=1))
                    grads.append(grad_norm)
                if not outs:
                    return None, None
                return torch.autograd.grad(outs, x, grads, create_graph=True)[0], None
        grad_x = None
        if grad_y is not None:
            grad_x = torch.ops.relkd.normalize_rows_backward(grad_y.contiguous(), y, norm,
                                                             ctx.eps)
        if grad_norm is not None:  # d|x|/dx = x / |x| (0 at x = 0, as torch's norm)
            unit = torch.where(norm[:, None] > 0, x / norm[:, None], torch.zeros_like(x))
            term = grad_norm[:, None] * unit
            grad_x = term if grad_x is None else grad_x + term
        return grad_x, None

    torch.library.register_autograd("relkd::normalize_rows", _normalize_rows_backward,
                                    setup_context=_normalize_rows_setup)


def require_extension(what: str) -> None:
    if not HAS_EXTENSION:
        raise RuntimeError(f"{what} needs relkd's compiled kernels, but {EXTENSION_ERROR}. "
                           "Or use backend='reference'.")


# --------------------------------------------------------------- wrappers
def topk_sim(q: Tensor, c: Tensor, k: int, q_labels: Optional[Tensor] = None,
             c_labels: Optional[Tensor] = None, c_scale: Optional[Tensor] = None,
             exclude_self: bool = False, self_offset: int = 0) -> Tuple[Tensor, Tensor]:
    """Per row of q, the k largest c_scale[j] * q_i . c_j over valid j
    (csrc/ops.cpp). No gradient."""
    return torch.ops.relkd.topk_sim(q, c, k, q_labels, c_labels, c_scale, exclude_self,
                                    self_offset)


def topk_sim_symmetric(x: Tensor, k: int, labels: Optional[Tensor] = None
                       ) -> Tuple[Tensor, Tensor]:
    """Per row of x, the k largest x_i . x_j over the other rows (those of
    another label when labels are given), each product computed once
    (csrc/cpu/topk_sim.cpp; CPU only). No gradient."""
    return torch.ops.relkd.topk_sim_symmetric(x, k, labels)


def topk_sim_self(x: Tensor, k: int, labels: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Per row of x, the k largest x_i . x_j over the other rows (of another
    label when labels are given): the symmetric search on the CPU, where it
    computes each product once; topk_sim(x, x, ...) elsewhere. No gradient."""
    if x.device.type == "cpu":
        return topk_sim_symmetric(x, k, labels)
    return topk_sim(x, x, k, labels, labels, None, True, 0)


def pair_dot(a: Tensor, b: Tensor, idx: Tensor) -> Tensor:
    """out[i, s] = a_i . b_{idx[i, s]} (0 where idx is -1), differentiable."""
    return torch.ops.relkd.pair_dot(a, b, idx)


def pair_list_dot(a: Tensor, b: Optional[Tensor], rows: Tensor, cols: Tensor) -> Tensor:
    """out[p] = a_{rows[p]} . b_{cols[p]} (b None: a_{cols[p]}), 0 where
    rows[p] or cols[p] is -1; differentiable. One pass forward and backward
    on the CPU (csrc/cpu/pair_dot.cpp); two gathers elsewhere."""
    if a.device.type == "cpu":
        return torch.ops.relkd.pair_list_dot(a, b, rows, cols)
    return pair_list_dot_gathered(a, b, rows, cols)


def pair_list_dot_gathered(a: Tensor, b: Optional[Tensor], rows: Tensor, cols: Tensor) -> Tensor:
    """pair_list_dot by index_select (the devices without the op)."""
    other = a if b is None else b
    if a.shape[0] == 0 or other.shape[0] == 0:  # every pair is padding
        return (a.sum() + other.sum()) * a.new_zeros(rows.shape)
    valid = (rows >= 0) & (cols >= 0)
    dots = (a.index_select(0, rows.clamp(min=0)) * other.index_select(0, cols.clamp(min=0))).sum(1)
    return torch.where(valid, dots, torch.zeros_like(dots))


def relation_penalty(s: Tensor, t: Tensor, indices: Tensor, metric: str,
                     margin: float) -> Tuple[Tensor, Tensor]:
    """(sum over the entries with indices >= 0 of phi(s - t), their count):
    RAD's epilogue (SPEC §2; phi by metric "hinge", "l2" or "l1"),
    differentiable twice. One serial pass forward and backward on the CPU
    (csrc/cpu/relation_penalty.cpp); tensor ops elsewhere."""
    if s.device.type == "cpu":
        return torch.ops.relkd.relation_penalty(s, t, indices, metric, margin)
    mined = indices >= 0
    d = s - t
    phi = d.square() if metric == "l2" else d.abs() if metric == "l1" else \
        (d - margin).clamp(min=0)
    return torch.where(mined, phi, torch.zeros_like(phi)).sum(), mined.sum()


def normalize_rows(x: Tensor, eps: float) -> Tensor:
    """x_i / max(|x_i|, eps) row by row (F.normalize(x, dim=1, eps=eps)'s
    values, without its overflow to zero rows), in one pass forward and
    backward on the CPU (csrc/cpu/normalize.cpp); PyTorch ops elsewhere.
    x: 2-D float32/float64."""
    if x.device.type == "cpu" and x.dim() == 2:
        return torch.ops.relkd.normalize_rows(x.contiguous(), eps)[0]
    return normalize(x, x.dtype, eps)


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def pairwise_loss(kind: str, xs_r: Tensor, xt_r: Optional[Tensor] = None,
                  xs_c: Optional[Tensor] = None, xt_c: Optional[Tensor] = None,
                  labels_r: Optional[Tensor] = None, labels_c: Optional[Tensor] = None,
                  ids_r: Optional[Tensor] = None, ids_c: Optional[Tensor] = None,
                  params: Optional[Tensor] = None) -> Tensor:
    """Differentiable sum of a pair loss over all masked (row, column) pairs;
    columns default to the rows. See csrc/cpu/pair_kinds.h for the kinds."""
    if params is None:  # the loss's dtype: float32 for 16-bit embeddings (CUDA)
        params = xs_r.new_empty(0, dtype=torch.float32 if xs_r.dtype in HALF_DTYPES
                                else xs_r.dtype)
    if params.requires_grad and kind not in PARAMS_GRAD_KINDS:
        raise ValueError(f"params: kind '{kind}' defines no gradient with respect to params, "
                         "so params must not require grad")
    grad_s = _needs_grad(xs_r, xs_c, params)
    grad_t = _needs_grad(xt_r, xt_c)
    return torch.ops.relkd.pairwise_loss(kind, xs_r, xt_r, xs_c, xt_c, labels_r, labels_c,
                                         ids_r, ids_c, params, grad_s, grad_t)[0]


def rkd_angle_loss(es_r: Tensor, et_r: Tensor, es_c: Optional[Tensor] = None,
                   et_c: Optional[Tensor] = None) -> Tensor:
    """Differentiable sum of RKD's angle term (SPEC §6) over the angles
    whose vertex is a row and whose other two points are columns (default:
    the rows): sum smoothL1(psi_s - psi_t), psi_abc = normalize(x_b - x_a) .
    normalize(x_c - x_a); the teacher (et_*) takes no gradient. Anchors go a
    few at a time (csrc/cpu/rkd_angle.cpp): O(N D + N^2) memory per anchor
    instead of the reference's N x N x D and N x N x N."""
    if _needs_grad(et_r, et_c):
        raise ValueError("et_r, et_c: the teacher's embeddings must not require grad "
                         "(RKD's teacher side has no gradient)")
    return torch.ops.relkd.rkd_angle_loss(es_r, et_r, es_c, et_c,
                                          _needs_grad(es_r, es_c))[0]


# ------------------------------------------------- EKD order statistics
def positive_pair_count(labels: Tensor) -> Tensor:
    """Number of unordered pairs i < j with equal labels (0-dim int64). In
    sorted order, each entry pairs with the earlier entries of its run; static
    shapes throughout (torch.unique's data-dependent output size broke
    torch.compile's graph, five times per EKD call)."""
    n = labels.shape[0]
    if n == 0:
        return torch.zeros((), dtype=torch.long, device=labels.device)
    ordered = torch.sort(labels).values
    position = torch.arange(n, device=labels.device)
    starts = torch.cat([ordered.new_ones(1, dtype=torch.bool), ordered[1:] != ordered[:-1]])
    run_start = torch.cummax(torch.where(starts, position, 0), 0).values
    return (position - run_start).sum()


def key_bits(dtype: torch.dtype) -> int:
    return 64 if dtype == torch.float64 else 32


def key_to_value(key: int, bits: int) -> float:
    """Inverse of order_key (csrc/pair_math.h)."""
    sign = 1 << (bits - 1)
    mask = (1 << bits) - 1
    if key == 0:
        return float("nan")
    raw = (key & ~sign) if key & sign else (~key & mask)
    if bits == 32:
        return struct.unpack("<f", struct.pack("<I", raw))[0]
    return struct.unpack("<d", struct.pack("<Q", raw))[0]


def as_int64(key: int) -> int:
    """A 64-bit key's bit pattern as a signed int (the schema's `int`)."""
    return key - (1 << 64) if key >= 1 << 63 else key


def digit_at(at_or_below: Tensor, position: int) -> Tuple[int, int]:
    """The digit holding the 0-based descending `position` among keys counted
    as at_or_below[d] = number of keys with digit <= d (a 1-D CPU cumsum),
    and how many keys have a larger digit."""
    total = int(at_or_below[-1])
    # The digit is the smallest d with at_or_below[d] >= total - position:
    # fewer than total - position keys lie below it, so it holds the position.
    d = int(torch.searchsorted(at_or_below, torch.tensor([total - position])))
    d = min(d, DIGITS - 1)  # only reachable if the counts were inconsistent
    return d, total - int(at_or_below[d])


def radix_select(histogram, targets: Sequence[int], bits: int, all_reduce=None, resolve=None):
    """Exact keys at the given 0-based descending positions among the pairs
    that `histogram(prefixes, shift)` counts, 16 bits per pass (`all_reduce`,
    if given, returns the histogram summed over DDP ranks). After the first
    pass, `resolve(bin, position)` may finish a target from keys collected
    in that pass: it returns (key, n_above within the bin) or None. Returns
    (keys, n_above) with n_above[t] = number of pairs with a larger key."""
    prefix = [0] * len(targets)
    remaining = list(targets)
    active = list(range(len(targets)))
    for shift in range(bits - 16, -1, -16):
        if not active:
            break
        uniq = sorted({prefix[t] for t in active})
        hist = histogram(torch.tensor(uniq, dtype=torch.long), shift)
        if all_reduce is not None:
            hist = all_reduce(hist)
        # Ascending 1-D cumsums on the host: a 2-D or flipped one is a
        # parallel region of its own (costly beside a busy process).
        hist = hist.cpu()
        at_or_below = {p: hist[i].cumsum(0) for i, p in enumerate(uniq)}
        for t in list(active):
            digit, above = digit_at(at_or_below[prefix[t]], remaining[t])
            remaining[t] -= above
            prefix[t] = (prefix[t] << 16) | digit
            found = resolve(prefix[t], remaining[t]) if resolve and shift == bits - 16 else None
            if found is not None:
                prefix[t], remaining[t] = found[0], remaining[t] - found[1]
                active.remove(t)
            elif shift == 0:
                active.remove(t)
    if active:  # cannot happen: the last pass (shift 0) resolves every target
        raise AssertionError(f"radix_select left targets {active} unresolved")
    return prefix, [t - r for t, r in zip(targets, remaining)]


# EKD's first pass also keeps the whole keys of the pairs in the bins where
# a row sample predicts each threshold; a target whose exact bin was kept is
# resolved from them, so the later passes over all pairs (one for float32,
# three for float64) are skipped for it. On CUDA it also keeps the pairs in
# the bins predicted to hold the top-k, which saves pair_topk's pass. Under
# DDP the sample histograms are summed and the kept keys gathered from
# every rank.
COLLECT_CAP = 1 << 21        # kept keys (16 MiB of int64), else the radix passes
COLLECT_MIN_ROWS = 256       # below this the passes are cheap: no sample
COLLECT_SAMPLE_STRIDE = 16   # every 16th row against all columns (~1/16 of the pairs)
COLLECT_MARGIN_SIGMAS = 5.0  # sample rank uncertainty covered, in binomial standard deviations


def count_in(at_or_below: Tensor, lo: int, hi: int) -> int:
    """Keys in the inclusive bin range [lo, hi] from their 1-D cumsum (0 if empty)."""
    if lo > hi:
        return 0
    return int(at_or_below[hi]) - (int(at_or_below[lo - 1]) if lo > 0 else 0)


def bin_range_of(at_or_below: Tensor, position: float) -> Tuple[int, int]:
    """The inclusive first-pass bins (bottom, top) that hold the key at the
    descending `position` of a row sample (its keys counted as at_or_below,
    a 1-D cumsum) with high probability: the position's binomial
    uncertainty, COLLECT_MARGIN_SIGMAS standard deviations either side."""
    n_sample = int(at_or_below[-1])
    margin = COLLECT_MARGIN_SIGMAS * (position + 1) ** 0.5 + 2
    lo_pos, hi_pos = position - margin, position + margin
    top_bin = DIGITS - 1 if lo_pos <= 0 else digit_at(at_or_below, int(lo_pos))[0]
    bottom_bin = 0 if hi_pos >= n_sample - 1 else digit_at(at_or_below, int(hi_pos))[0]
    return bottom_bin, top_bin


def predicted_bins(at_or_below: Tensor, targets: Sequence[int], n_pairs: int,
                   cap: int) -> List[Tuple[int, int]]:
    """Inclusive first-pass bin ranges that hold each target's key with high
    probability, judged from a row sample's first-pass counts (at_or_below,
    their 1-D cumsum); targets whose predicted bins would hold more than the
    cap are left out."""
    n_sample = int(at_or_below[-1])
    if n_sample == 0:
        return []
    scale = n_pairs / n_sample
    ranges = [bin_range_of(at_or_below, t / scale) for t in targets]
    merged: List[Tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    # Keep the ranges whose expected key count fits, smallest first.
    expected_keys = [scale * count_in(at_or_below, lo, hi) for lo, hi in merged]
    kept, total = [], 0.0
    for i in sorted(range(len(merged)), key=lambda i: expected_keys[i]):
        if total + expected_keys[i] <= cap / 2:
            kept.append(merged[i])
            total += expected_keys[i]
    return sorted(kept)


def predicted_top_key(at_or_below: Tensor, k: int, n_pairs: int, bits: int) -> int:
    """The lowest order key of the first-pass bin that, with high probability,
    lies at or below the k-th largest key, judged from a row sample's
    first-pass counts as predicted_bins judges a target; 0 (every pair) when
    the sample cannot tell. A bin near the k-th pair holds few pairs beside
    the k (benchmarks/ekd_top_key.py)."""
    n_sample = int(at_or_below[-1])
    if n_sample == 0:
        return 0
    return bin_range_of(at_or_below, (k - 1) * n_sample / n_pairs)[0] << (bits - 16)


def device_collect_cap(at_or_below: Tensor, ranges: Sequence[Tuple[int, int]],
                       n_pairs: int) -> int:
    """The keys a CUDA first pass makes room for (its buffer is allocated
    whole): twice the row sample's estimate of the keys in `ranges`, plus
    slack, at most COLLECT_CAP. More keys make the collection give up, not
    fail."""
    n_sample = int(at_or_below[-1])
    if n_sample == 0 or not ranges:
        return 0
    expected = sum(count_in(at_or_below, lo, hi) for lo, hi in ranges) * n_pairs / n_sample
    return int(min(COLLECT_CAP, 2 * expected + (1 << 16)))


def collected_resolver(hist: Tensor, collected: Tensor, ranges: Sequence[Tuple[int, int]],
                       bits: int, cap: int):
    """radix_select's `resolve` over the keys a first pass collected in
    `ranges` (descending); None if the pass gave up (more than cap keys)."""
    # Counts of bin ranges as differences of one cumsum: a sum over 65,536
    # bins is a parallel region of its own, a 1-D cumsum is not.
    at_or_below = hist.reshape(-1).cpu().cumsum(0)
    in_ranges = sum(count_in(at_or_below, lo, hi) for lo, hi in ranges)
    if not ranges or in_ranges > cap or len(collected) != in_ranges:
        return None
    collected = collected.cpu()  # one copy, not a device sync per key read below
    mask = (1 << bits) - 1
    # A bin's keys share their top bits (the sign bit included), so they are
    # one run of the descending list, as long as the bin's count; it starts
    # after the keys of the kept bins above it (no pass over the keys).
    starts, total = {}, 0
    for lo, hi in sorted(ranges, reverse=True):
        starts[(lo, hi)] = total
        total += count_in(at_or_below, lo, hi)

    def run_of(bin_: int) -> Tuple[int, int]:
        for (lo, hi), start in starts.items():
            if lo <= bin_ <= hi:
                return (start + count_in(at_or_below, bin_ + 1, hi),
                        count_in(at_or_below, bin_, bin_))
        return 0, 0  # only bins in `ranges` were kept

    def resolve(bin_: int, position: int):
        start, length = run_of(bin_)
        if position >= length:
            return None
        key = int(collected[start + position])
        # Keys above it in its bin: the run is descending, so find the first
        # position holding `key` by bisection.
        lo, hi = 0, position
        while lo < hi:
            mid = (lo + hi) // 2
            if int(collected[start + mid]) > key:
                lo = mid + 1
            else:
                hi = mid
        return key & mask, lo

    return resolve


def _process_group(name: str):
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def merge_top_pairs(values: Tensor, rows: Tensor, cols: Tensor, topk: int):
    """Best `topk` of candidate pairs: value descending (NaN last), then (i, j)."""
    keep = rows >= 0
    values, rows, cols = values[keep], rows[keep], cols[keep]
    order = torch.sort(cols, stable=True).indices
    order = order[torch.sort(rows[order], stable=True).indices]
    key = values[order]
    key = torch.where(torch.isnan(key), torch.full_like(key, -float("inf")), key)
    order = order[torch.sort(key, descending=True, stable=True).indices][:topk]
    pad = topk - len(order)
    return (torch.cat([values[order], values.new_full((pad,), -float("inf"))]),
            torch.cat([rows[order], rows.new_full((pad,), -1)]),
            torch.cat([cols[order], cols.new_full((pad,), -1)]))


@torch.library.custom_op("relkd::negative_pair_select", mutates_args=())
def negative_pair_select(x: Tensor, labels: Tensor, divisors: List[int], topk: int,
                         x_cols: Optional[Tensor], labels_cols: Optional[Tensor],
                         row_offset: int, group_name: str
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """EKD's selection over the negative pairs (i < j, labels differ) of the
    similarities x_i . x_j (SPEC §3.2-3.3, 3.7), exact, without N x N memory.

    Rows are x (global ids row_offset + r); columns are x_cols (global ids =
    positions), or x itself when x_cols is None. Under DDP (group_name set)
    every pass's histograms are all-reduced and top-k candidates all-gathered,
    so every rank returns the same global result.

    Returns (thresholds, top_values, top_i, top_j, n_neg): the values at the
    descending positions n_neg // q for q in divisors; the `topk` pairs with
    the largest similarity (ties to the smaller (i, j)), padded with
    (-inf, -1, -1); the number of negative pairs. With no negative pair the
    thresholds are 0.
    """
    group = _process_group(group_name)
    all_labels = labels if labels_cols is None else labels_cols
    n = all_labels.shape[0]
    n_neg = n * (n - 1) // 2 - int(positive_pair_count(all_labels))
    thresholds = x.new_zeros(len(divisors))
    top = (x.new_full((topk,), -float("inf")), labels.new_full((topk,), -1, dtype=torch.long),
           labels.new_full((topk,), -1, dtype=torch.long))
    n_neg_t = torch.tensor(n_neg, dtype=torch.long, device=x.device)
    if n_neg == 0:
        return (thresholds, *top, n_neg_t)

    rect = x_cols is not None
    ids_r = (row_offset + torch.arange(len(x), device=x.device)) if rect else None
    common = (x, x_cols, labels.long(), None if labels_cols is None else labels_cols.long(),
              ids_r, None)
    summed = None if group is None else (lambda t: relkd_dist.all_reduce_sum(t, group))
    first_summed = []  # under DDP, the first pass's histogram summed over the ranks

    def all_reduce(hist: Tensor) -> Tensor:
        out = summed(hist)
        if not first_summed:
            first_summed.append(out)
        return out

    bits = key_bits(x.dtype)
    k_eff = min(topk, n_neg)
    by_bar = top_by_running_bar(x.device)
    targets = [n_neg // q for q in divisors]
    if any(not 0 <= t < n_neg for t in targets):  # SPEC §3.2 needs every q >= 2
        raise ValueError(f"divisors: every rank position n_neg // q must lie in [0, {n_neg}), "
                         f"got divisors {list(divisors)}")
    # A row sample predicts the first-pass bins of each target (and on CUDA
    # those holding the top-k pairs); `n` (global), not len(x): every rank
    # must decide alike.
    sample = _sample_counts(common, bits, summed) if n >= COLLECT_MIN_ROWS else None
    ranges = [] if sample is None else predicted_bins(sample, targets, n_neg, COLLECT_CAP)
    # The top-k pairs come from the first pass: on CPU by a running bar; on
    # CUDA from the bins predicted to hold them (checked below). Else the
    # radix passes find the k-th key and pair_topk collects the pairs.
    top_min_key = 0
    if k_eff > 0 and not by_bar and sample is not None:
        top_min_key = predicted_top_key(sample, k_eff, n_neg, bits)
    top_in_first_pass = k_eff > 0 and (by_bar or top_min_key > 0)
    cap = COLLECT_CAP if by_bar or sample is None else device_collect_cap(sample, ranges, n_neg)
    if k_eff > 0 and not top_in_first_pass:
        targets.append(k_eff - 1)
    first_top, first_pass = [], []
    resolvers = []

    def histogram(prefixes: Tensor, shift: int) -> Tensor:
        prefixes = prefixes.to(x.device)
        if (top_in_first_pass or ranges) and shift == bits - 16 and not first_pass:
            collect = torch.tensor(ranges, dtype=torch.long).reshape(-1, 2)
            hist, *found, kept = torch.ops.relkd.pair_histogram_topk(
                *common, prefixes, shift, topk if top_in_first_pass else 0, collect, cap,
                as_int64(top_min_key))
            first_top.append(tuple(found))
            first_pass.append((hist, kept))
            return hist
        return torch.ops.relkd.pair_histogram(*common, prefixes, shift)

    def resolve(bin_: int, position: int):
        # Built at the first call, which comes after the first pass's
        # histogram was summed over the ranks (on every rank at once).
        if not resolvers:
            hist, kept = first_pass[0] if first_pass and ranges else (None, None)
            if kept is not None and group is not None:  # every rank's keys, one order
                hist = first_summed[0]
                kept = keys_descending(relkd_dist.gather_rows(kept, group), bits)
            resolvers.append(None if kept is None else
                             collected_resolver(hist, kept, ranges, bits, cap))
        return resolvers[0](bin_, position) if resolvers[0] else None

    reduce = all_reduce if summed else None
    keys, n_above = radix_select(histogram, targets, bits, reduce, resolve)
    thresholds = torch.tensor([key_to_value(k, bits) for k in keys[:len(divisors)]],
                              dtype=x.dtype, device=x.device)
    if top_in_first_pass and not first_pass:  # no divisors: the first pass for the pairs alone
        hist = histogram(torch.zeros(1, dtype=torch.long), bits - 16)
        if reduce is not None:
            reduce(hist)

    def top_pairs(candidates):  # under DDP every rank's, merged the same way
        if group is None:
            return candidates
        return merge_top_pairs(*(relkd_dist.gather_rows(t, group) for t in candidates), topk)

    def top_by_passes(key: int, n_above: int):
        return top_pairs(torch.ops.relkd.pair_topk(*common, as_int64(key), k_eff - n_above, topk))

    if k_eff > 0 and not top_in_first_pass:
        top = top_by_passes(keys[-1], n_above[-1])
    elif top_in_first_pass:
        top = top_pairs(first_top[0])
        # The pairs at and above the predicted key hold the top k_eff only
        # if there are k_eff of them (of every rank): else the passes decide.
        if not by_bar and int((top[1] >= 0).sum()) < k_eff:
            found, above = radix_select(histogram, [k_eff - 1], bits, reduce, resolve)
            top = top_by_passes(found[0], above[0])
    return (thresholds, *top, n_neg_t)


def keys_descending(keys: Tensor, bits: int) -> Tensor:
    """Collected keys (int64 bit patterns of unsigned keys) sorted in
    descending unsigned order, as pair_histogram_topk returns them: 64-bit
    keys with the top bit set are negative as int64, so they sort with that
    bit flipped."""
    order = keys ^ torch.iinfo(torch.int64).min if bits == 64 else keys
    return keys[torch.sort(order, descending=True, stable=True).indices]


def top_by_running_bar(device: torch.device) -> bool:
    """Whether the selection's first pass finds the top-k pairs by a running
    bar (the CPU kernel) or, on CUDA, from the bins a row sample predicts
    to hold them (tests run the CUDA strategy on CPU tensors through this)."""
    return device.type == "cpu"


def _sample_counts(common, bits: int, all_reduce=None) -> Tensor:
    """The first-pass counts of every COLLECT_SAMPLE_STRIDE-th row against
    all columns as at_or_below[d] = keys with digit <= d (a 1-D cumsum on
    the host; under DDP of every rank's rows: `all_reduce` sums the sample
    histograms)."""
    x, x_cols, labels, labels_cols, ids_r, _ = common
    n = len(x)
    ids = ids_r if ids_r is not None else torch.arange(n, device=x.device)
    pick = slice(0, n, COLLECT_SAMPLE_STRIDE)
    sample = torch.ops.relkd.pair_histogram(
        x[pick], x if x_cols is None else x_cols, labels[pick],
        labels if labels_cols is None else labels_cols, ids[pick], None,
        torch.zeros(1, dtype=torch.long, device=x.device), bits - 16)
    if all_reduce is not None:
        sample = all_reduce(sample)
    return sample.reshape(-1).cpu().cumsum(0)


@negative_pair_select.register_fake
def _negative_pair_select_fake(x, labels, divisors, topk, x_cols, labels_cols, row_offset,
                               group_name):
    return (x.new_empty(len(divisors)), x.new_empty(topk),
            x.new_empty(topk, dtype=torch.long), x.new_empty(topk, dtype=torch.long),
            x.new_empty((), dtype=torch.long))
