"""The CUDA backend (csrc/cuda): every fused path of the CPU tests again on
CUDA tensors. Each op against the float64 reference or the materialising
computation (by value for mining, the tolerance pattern for float32), float64
gradcheck and opcheck on CUDA, hypothesis property tests over shapes, k and
label patterns (bank mode with M >> N), every loss against the reference,
EKD over five steps, bitwise determinism, non-contiguous inputs, N = 0 / 1,
double backward,
bad input, autocast, torch.compile of a training step, and DDP with CUDA
tensors; the opt-in tensor-core pairwise_loss tiles (RELKD_TENSOR_CORES=1)
against the CPU kernels. Skipped without a GPU or without compiled CUDA kernels."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import relkd
from relkd import functional as Fn
from relkd import ops, reference

from helpers import (LABEL_PATTERNS, assert_bounded_error, assert_same_mining, correlated,
                     dyadic, embeddings, finish_rank, first_pass_args_on, first_pass_cases,
                     labels,
                     requires_extension, spread_ties, tensor_cores, tf32_values)
from test_losses_fused import DOUBLE_BACKWARD, GRADCHECK_CASES, compare, hessian_vector
from test_pair_select import sorted_reference
from test_pairwise_loss import KINDS, direct, fused, grads_of, inputs
from test_topk_sim import batch_valid, check_mining

HAS_CUDA = torch.cuda.is_available() and "cuda" in ops.fused_devices()
pytestmark = [requires_extension,
              pytest.mark.skipif(not HAS_CUDA, reason="no GPU, or relkd built without CUDA "
                                                      "kernels (python -m relkd says which)")]
F32, F64 = torch.float32, torch.float64
cuda_settings = settings(max_examples=20)


def gpu(*tensors):
    return [None if t is None else t.cuda() for t in tensors]


def cpu(*tensors):
    return [None if t is None else t.cpu() for t in tensors]


# ------------------------------------------------------------------ topk_sim
@cuda_settings
@given(n=st.integers(1, 300), d=st.integers(1, 130), k_extra=st.integers(-300, 5),
       dtype=st.sampled_from([F32, F64]), pattern=st.sampled_from(LABEL_PATTERNS + ("none",)),
       exclude_self=st.booleans(), seed=st.integers(0, 2**16))
def test_topk_batch_mode(n, d, k_extra, dtype, pattern, exclude_self, seed):
    k = max(1, n + k_extra)
    a = embeddings(n, d, seed, dtype)
    y = None if pattern == "none" else labels(pattern, n, seed)
    values, indices = cpu(*relkd.similarity_topk(*gpu(a), k=k, a_labels=None if y is None
                                                 else y.cuda(), exclude_self=exclude_self,
                                                 backend="fused"))
    atol = 1e-12 if dtype == F64 else 2e-6
    check_mining(values, indices, a, None, k, batch_valid(n, y, exclude_self), atol)
    if dtype == F64:  # no near-ties at this precision: the CPU kernel's indices exactly
        want = relkd.similarity_topk(a, k=k, a_labels=y, exclude_self=exclude_self,
                                     backend="fused")
        assert torch.equal(indices, want[1])


@cuda_settings
@given(n=st.integers(1, 40), m=st.integers(1, 20_000), d=st.integers(1, 130),
       k=st.integers(1, 300), dtype=st.sampled_from([F32, F64]), with_labels=st.booleans(),
       seed=st.integers(0, 2**16))
def test_topk_bank_mode(n, m, d, k, dtype, with_labels, seed):
    a = embeddings(n, d, seed, dtype)
    b = 3.0 * embeddings(m, d, seed + 1, dtype)
    ya = labels("random", n, seed) if with_labels else None
    yb = labels("random", m, seed + 2) if with_labels else None
    values, indices = cpu(*relkd.similarity_topk(*gpu(a, b), k, *gpu(ya, yb), backend="fused"))
    valid = torch.ones(n, m, dtype=torch.bool)
    if with_labels:
        valid &= ya[:, None] != yb[None, :]
    check_mining(values, indices, a, b, k, valid, 1e-12 if dtype == F64 else 2e-6)


@pytest.mark.parametrize("k", [2100, 2700])
@pytest.mark.parametrize("cores", ["0", "1"])
def test_topk_large_k_sorted_by_the_glue(k, cores):
    # Above 2048 pairs per row the finish kernel leaves them unsorted and the
    # glue sorts them (NaN last among values, ties to the smaller column,
    # padding last): the CPU kernel's result exactly, in float64 and bf16.
    dtype = F64 if cores == "0" else F32
    q, c = embeddings(4, 8, seed=50, dtype=dtype), embeddings(2600, 8, seed=51, dtype=dtype)
    if cores == "1":  # bf16-valued unit rows: both paths compute the same values
        q = reference.normalize(q, F32).bfloat16().float()
        c = reference.normalize(c, F32).bfloat16().float()
    c[100:140] = c[60]
    c[7, 3] = float("nan")
    q[2, 0] = float("nan")
    ql, cl = labels("random", 4, 52), labels("random", 2600, 53)
    with tensor_cores(cores):
        got = cpu(*ops.topk_sim(*gpu(q, c), k, *gpu(ql, cl)))
    want = ops.topk_sim(q, c, k, ql, cl)
    torch.testing.assert_close(got[0], want[0], atol=1e-12 if dtype == F64 else 2e-6, rtol=0,
                               equal_nan=True)
    assert torch.equal(got[1], want[1])


def test_topk_bank_far_larger_than_queries():
    a = reference.normalize(embeddings(64, 32, seed=1), F32)
    b = reference.normalize(embeddings(300_000, 32, seed=2), F32)
    values, indices = ops.topk_sim(*gpu(a, b), 100)
    want = ops.topk_sim(a, b, 100)
    torch.testing.assert_close(values.cpu(), want[0], atol=2e-6, rtol=0)
    sim = a.double() @ b.double().T
    torch.testing.assert_close(sim.gather(1, indices.cpu()), values.cpu().double(), atol=2e-6,
                               rtol=0)


@cuda_settings
@given(n=st.integers(1, 300), m=st.integers(1, 40_000), d=st.integers(1, 130),
       k=st.integers(1, 300), with_labels=st.booleans(), scaled=st.booleans(),
       seed=st.integers(0, 2**16))
def test_topk_sim_tensor_cores_match_the_cpu_kernel(n, m, d, k, with_labels, scaled, seed):
    """RELKD_TENSOR_CORES=1: similarities on tensor cores, filtered in
    registers; on bf16-valued unit rows the CPU kernel's selection. Banks
    of 16384+ columns are cut into ranges of 8192+, joined per row."""
    q = reference.normalize(embeddings(n, d, seed), F32).bfloat16().float()
    c = reference.normalize(embeddings(m, d, seed + 1), F32).bfloat16().float()
    ql = labels("random", n, seed) if with_labels else None
    cl = labels("random", m, seed + 2) if with_labels else None
    scale = torch.rand(m, generator=torch.Generator().manual_seed(seed)) + 0.5 if scaled else None
    with tensor_cores():
        got = cpu(*ops.topk_sim(*gpu(q, c), k, *gpu(ql, cl, scale)))
    assert_same_mining(got, ops.topk_sim(q, c, k, ql, cl, scale), q, c, scale)


@pytest.mark.parametrize("d", [512, 1024, 1400, 1600, 4096])
def test_topk_sim_tensor_cores_rows_in_shared_memory_or_not(d):
    """The block's query rows held in shared memory (D = 512, 1024: 65 and
    129 KiB of bf16; D = 1400: 177 KiB, with the columns' 36 KiB staging
    ring and 2.6 KiB of static shared memory just within an H100's 227
    KiB) or, beyond it (D = 1600: 240 KiB; 4096), the tile path: the CPU
    kernel's selection on bf16-valued rows either way."""
    q = reference.normalize(embeddings(130, d, seed=d), F32).bfloat16().float()
    c = reference.normalize(embeddings(20_000, d, seed=d + 1), F32).bfloat16().float()
    with tensor_cores():
        got = cpu(*ops.topk_sim(*gpu(q, c), 64))
    assert_same_mining(got, ops.topk_sim(q, c, 64), q, c, None)


def test_topk_sim_tensor_cores_ties_across_column_ranges():
    q, c = spread_ties(36_000, every=200)  # 4 ranges, 45 ties each
    with tensor_cores():
        got = cpu(*ops.topk_sim(*gpu(q, c), 100))
    want = ops.topk_sim(q, c, 100)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_topk_sim_reads_a_16_bit_bank_without_copying_it(half):
    """The tensor-core kernel reads 16-bit q and c as they are: the extra
    memory of a 1,000,000 x 128 bank (256 MB) stays below half of one
    16-bit copy of it (a float32 copy would be twice its size; the
    selection state of 64 queries x 64 column ranges is about 35 MB), and
    the result is the float32 computation's on the same values."""
    generator = torch.Generator(device="cuda").manual_seed(6)
    q = torch.nn.functional.normalize(
        torch.randn(64, 128, device="cuda", generator=generator), dim=1).to(half)
    c = torch.nn.functional.normalize(
        torch.randn(1_000_000, 128, device="cuda", generator=generator), dim=1).to(half)
    with tensor_cores("auto"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        got = ops.topk_sim(q, c, 50)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
    assert extra < c.numel() * c.element_size() // 2, f"{extra / 2**20:.0f} MiB extra"
    assert got[0].dtype == F32
    want = ops.topk_sim(q.float(), c.float(), 50)  # the float32 tile path
    assert_same_mining(cpu(*got), cpu(*want), q.float().cpu(), c.float().cpu(), None)


def test_topk_ties_nan_and_padding():
    a = torch.eye(4, 6, dtype=F64).repeat(3, 1)  # exact ties: the smaller index first
    values, indices = ops.topk_sim(*gpu(a, a), 7, exclude_self=True)
    want = ops.topk_sim(a, a, 7, exclude_self=True)
    assert torch.equal(indices.cpu(), want[1]) and torch.equal(values.cpu(), want[0])
    x = embeddings(20, 4, seed=3)
    x[5, 1] = float("nan")
    got, want = ops.topk_sim(*gpu(x, x), 30), ops.topk_sim(x, x, 30)
    assert torch.equal(got[1].cpu(), want[1])  # NaN ranks below every number; -1 padding


@pytest.mark.parametrize("dtype", [F32, F64])
def test_topk_opcheck(dtype):
    a, b = gpu(embeddings(40, 8, seed=7, dtype=dtype), embeddings(300, 8, seed=8, dtype=dtype))
    la, lb = gpu(labels("random", 40, 1), labels("random", 300, 2))
    scale = torch.rand(300, dtype=dtype, device="cuda") + 0.5
    for args in [(a, b, 5, None, None, None, False, 0), (a, b, 7, la, lb, scale, False, 0),
                 (a, a, 50, la, la, None, True, 0)]:
        torch.library.opcheck(torch.ops.relkd.topk_sim.default, args)


# ------------------------------------------------------------------ pair_dot
@cuda_settings
@given(n=st.integers(1, 300), m=st.integers(1, 400), k=st.integers(1, 40),
       d=st.integers(1, 130), dtype=st.sampled_from([F32, F64]), seed=st.integers(0, 2**16))
def test_pair_dot_and_its_gradients(n, m, k, d, dtype, seed):
    a, b = embeddings(n, d, seed, dtype), embeddings(m, d, seed + 1, dtype)
    idx = torch.randint(-1, m, (n, k), generator=torch.Generator().manual_seed(seed))
    w = embeddings(n, k, seed + 2, dtype)

    def run(a_, b_, idx_, w_):
        a_, b_ = a_.clone().requires_grad_(), b_.clone().requires_grad_()
        out = ops.pair_dot(a_, b_, idx_)
        return [out] + list(torch.autograd.grad((out * w_).sum(), (a_, b_)))

    got = cpu(*run(*gpu(a, b, idx, w)))
    want = run(a, b, idx, w)
    exact = run(a.double(), b.double(), idx, w.double())
    for g, s, e in zip(got, want, exact):
        assert_bounded_error(g, s, e, "pair_dot", factor=4.0)


def test_pair_dot_gradcheck_gradgradcheck_opcheck():
    a = embeddings(7, 5, seed=1, dtype=F64).cuda().requires_grad_()
    b = embeddings(9, 5, seed=2, dtype=F64).cuda().requires_grad_()
    idx = torch.tensor([[0, 3, -1, 8]] * 7, device="cuda")
    assert torch.autograd.gradcheck(lambda x, y: ops.pair_dot(x, y, idx), (a, b))
    assert torch.autograd.gradgradcheck(lambda x, y: ops.pair_dot(x, y, idx), (a, b))
    torch.library.opcheck(torch.ops.relkd.pair_dot.default, (a, b, idx))
    g = torch.randn(7, 4, dtype=F64, device="cuda")
    torch.library.opcheck(torch.ops.relkd.pair_dot_backward.default,
                          (g, a.detach(), b.detach(), idx, True, True))


# ------------------------------------------------------------- pairwise_loss
def to_cuda_args(args):
    return [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]


def fused_on_cuda(kind, xs, xt, y, params):
    return ops.pairwise_loss(kind, xs, xt, labels_r=y, params=params)


@cuda_settings
@given(kind=st.sampled_from(KINDS), n=st.integers(1, 600), d=st.integers(1, 130),
       pattern=st.sampled_from(LABEL_PATTERNS), dtype=st.sampled_from([F32, F64]),
       seed=st.integers(0, 2**16))
def test_pairwise_loss_matches_the_full_matrix(kind, n, d, pattern, dtype, seed):
    args = inputs(kind, n, d, seed, dtype, pattern)
    got = cpu(*grads_of(fused_on_cuda, kind, *to_cuda_args(args)))
    same = grads_of(direct, kind, *args)
    exact = grads_of(direct, kind, *(None if a is None else a.double() if a.is_floating_point()
                                     else a for a in args))
    for g, s, e, what in zip(got, same, exact, ("loss", "grad xs", "grad 2", "grad 3")):
        assert g.dtype == dtype
        if dtype == F64:
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12, msg=f"{kind} {what}")
        else:
            assert_bounded_error(g, s, e, f"{kind} {what}", factor=4.0)


@pytest.mark.parametrize("kind", KINDS)
def test_pairwise_loss_row_blocks_with_global_ids(kind):
    xs, xt, y, params = inputs(kind, 5000, 12, seed=3, dtype=F64)
    whole = cpu(*grads_of(fused_on_cuda, kind, *to_cuda_args([xs, xt, y, params])))

    def blocks(kind_, xs_, xt_, y_, params_):
        total = 0
        for lo, hi in ((0, 37), (37, 4500), (4500, 5000)):
            ids = torch.arange(lo, hi, device="cuda")
            total = total + ops.pairwise_loss(
                kind_, xs_[lo:hi], None if xt_ is None else xt_[lo:hi], xs_, xt_,
                None if y_ is None else y_[lo:hi], y_, ids, None, params_)
        return total

    got = cpu(*grads_of(blocks, kind, *to_cuda_args([xs, xt, y, params])))
    for g, w in zip(got, whole):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_pairwise_loss_gradcheck_and_opcheck(kind):
    xs, xt, y, params = to_cuda_args(inputs(kind, 9, 4, seed=5, dtype=F64))
    xs.requires_grad_()
    if kind == "cckd":
        xt.requires_grad_()
    params = params.clone().requires_grad_(kind in ops.PARAMS_GRAD_KINDS)
    assert torch.autograd.gradcheck(
        lambda a, b, p: ops.pairwise_loss(kind, a, b, labels_r=y, params=p), (xs, xt, params))
    torch.library.opcheck(torch.ops.relkd.pairwise_loss.default,
                          (kind, xs, xt, None, None, y, None, None, None, params, True,
                           kind == "cckd"))


def bf16_valued(args):
    """The float32 inputs rounded to values bfloat16 represents exactly, so
    that the tensor-core path's rounding changes nothing."""
    return [a.bfloat16().float() if isinstance(a, torch.Tensor) and a.dtype == F32 and a.dim() == 2
            else a for a in args]


def assert_tensor_core_result(got, want, rows_pass, what, atol=2e-5):
    """The loss up to summation order; the gradients too, except after the
    symmetric rows pass (every kind without the teacher's gradient),
    which rounds its derivatives to bf16 (relative 2^-9 each) before they
    multiply the embeddings: then within 1/250 of the gradient's norm."""
    scale = max(float(want[0].abs()), 1.0)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=atol * scale, msg=what)
    for g, w in zip(got[1:], want[1:]):
        if rows_pass:
            assert float((g - w).norm()) <= 4e-3 * float(w.norm()) + 1e-6, what
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=atol * scale, msg=what)


@cuda_settings
@given(kind=st.sampled_from(KINDS), n=st.integers(1, 600), d=st.integers(1, 130),
       pattern=st.sampled_from(LABEL_PATTERNS), seed=st.integers(0, 2**16))
def test_pairwise_loss_tensor_cores_match_the_cpu_kernels(kind, n, d, pattern, seed):
    """On bf16-valued float32 embeddings the mma tiles compute exact products
    with fp32 sums: the CPU kernels' results up to summation order."""
    args = bf16_valued(inputs(kind, n, d, seed, F32, pattern))
    with tensor_cores():
        got = cpu(*grads_of(fused_on_cuda, kind, *to_cuda_args(args)))
    assert_tensor_core_result(got, grads_of(fused, kind, *args), kind != "cckd", kind)


@cuda_settings
@given(kind=st.sampled_from(KINDS), n=st.integers(1, 600), d=st.integers(1, 130),
       pattern=st.sampled_from(LABEL_PATTERNS), seed=st.integers(0, 2**16))
def test_tf32_tensor_cores_at_high_precision(kind, n, d, pattern, seed):
    """RELKD_TENSOR_CORES=auto at matmul precision "high": TF32 mma tiles
    (m16n8k8). On TF32-valued embeddings their products are exact: the CPU
    kernels' loss up to summation order; the gradient products are TF32
    (relative 2^-11 per derivative: torch's GEMMs on the tile path, CCKD
    with the teacher's gradient; the rows pass's own mma for the other
    kinds), within 2^-9 of the gradient's norm."""
    args = [tf32_values(a) if isinstance(a, torch.Tensor) and a.dtype == F32 and a.dim() == 2
            else a for a in inputs(kind, n, d, seed, F32, pattern)]
    with tensor_cores("auto", "high"):
        got = cpu(*grads_of(fused_on_cuda, kind, *to_cuda_args(args)))
    want = grads_of(fused, kind, *args)
    scale = max(float(want[0].abs()), 1.0)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=2e-5 * scale, msg=kind)
    for g, w in zip(got[1:], want[1:]):
        assert float((g - w).norm()) <= 2.0 ** -9 * float(w.norm()) + 1e-6, kind


@cuda_settings
@given(kind=st.sampled_from(KINDS), n=st.integers(1, 600), d=st.integers(1, 130),
       pattern=st.sampled_from(LABEL_PATTERNS), seed=st.integers(0, 2**16))
def test_3xtf32_tensor_cores_at_highest_precision(kind, n, d, pattern, seed):
    """RELKD_TENSOR_CORES=auto at matmul precision "highest": 3xTF32 tiles
    (and the rows pass's 3xTF32 gradient products: every kind but CCKD
    with the teacher's gradient) on any float32 embeddings give the float32
    CPU kernels' results up to float32 rounding, as the float32 tile path
    does."""
    args = inputs(kind, n, d, seed, F32, pattern)
    assert torch.get_float32_matmul_precision() == "highest"
    with tensor_cores("auto"):
        got = cpu(*grads_of(fused_on_cuda, kind, *to_cuda_args(args)))
    assert_tensor_core_result(got, grads_of(fused, kind, *args), False, kind)


@pytest.mark.parametrize("precision", ["medium", "high", "highest"])
@pytest.mark.parametrize("n,d", [(1, 7), (300, 96), (2000, 512)])
def test_pairwise_loss_rows_pass_cckd_student_only(n, d, precision):
    """CCKD with a detached teacher takes the rows pass (gradient products
    inside the kernel) where its shared memory fits: at D = 512, 209 KiB
    with bf16 operands ("medium"), 225 KiB with TF32 or 3xTF32 ones ("high",
    "highest": a float32 G tile), an H100's (227 KiB) but not an A100's
    (163 KiB), which takes the tile path; the same result either way."""
    exact = {"medium": lambda x: x.bfloat16().float(), "high": tf32_values,
             "highest": lambda x: x}[precision]  # values the operand format holds
    xs, xt, y, params = inputs("cckd", n, d, seed=4, dtype=F32)
    xs, xt = exact(xs), exact(xt)

    def value_and_grad(device):
        a = xs.to(device).requires_grad_()
        loss = ops.pairwise_loss("cckd", a, xt.to(device), params=params.to(device))
        return [loss.detach().cpu(), torch.autograd.grad(loss, a)[0].cpu()]

    with tensor_cores("auto", precision):
        got = value_and_grad("cuda")
    assert_tensor_core_result(got, value_and_grad("cpu"), precision != "highest",
                              f"cckd n={n} d={d} {precision}")


@pytest.mark.parametrize("kind", KINDS)
def test_pairwise_loss_tensor_cores_large_deterministic(kind):
    """Many tiles and sub-tiles (N = 5000, D = 512): the same loss as the CPU
    kernels on the rounded embeddings, and bitwise the same on repeat."""
    args = bf16_valued(inputs(kind, 5000, 512, seed=9, dtype=F32))
    with tensor_cores():
        first = cpu(*grads_of(fused_on_cuda, kind, *to_cuda_args(args)))
        again = cpu(*grads_of(fused_on_cuda, kind, *to_cuda_args(args)))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert_tensor_core_result(first, grads_of(fused, kind, *args), kind != "cckd", kind,
                              atol=1e-4)


# ---------------------------------------------------------------- pair_select
@cuda_settings
@given(n=st.integers(2, 600), d=st.integers(1, 130), pattern=st.sampled_from(LABEL_PATTERNS),
       topk=st.integers(0, 3000), dtype=st.sampled_from([F32, F64]), seed=st.integers(0, 2**16))
def test_negative_pair_select(n, d, pattern, topk, dtype, seed):
    x = reference.normalize(embeddings(n, d, seed, dtype), dtype)
    y = labels(pattern, n, seed)
    divisors = [10, 100, 1000, 7]
    thr, top_v, top_i, top_j, n_neg = cpu(*ops.negative_pair_select(
        *gpu(x, y), divisors, topk, None, None, 0, ""))
    ref_thr, ref_v, ref_i, ref_j, ref_n = sorted_reference(x, y, divisors, topk)
    assert int(n_neg) == ref_n
    if ref_n == 0:
        return
    tol = 1e-14 if dtype == F64 else 1e-6
    torch.testing.assert_close(thr, ref_thr, atol=tol, rtol=0)
    kept = min(topk, ref_n)
    torch.testing.assert_close(top_v[:kept], ref_v, atol=tol, rtol=0)
    assert (top_i[kept:] == -1).all()
    if dtype == F64:
        assert torch.equal(top_i[:kept], ref_i) and torch.equal(top_j[:kept], ref_j)


@pytest.mark.parametrize("mode,precision", [("1", "highest"), ("auto", "high"),
                                            ("auto", "highest")])
def test_negative_pair_select_on_tensor_cores(mode, precision):
    """The selection's passes on tensor cores (bf16, TF32, 3xTF32): on
    embeddings of entries k / 8, whose similarities every format computes
    exactly, the CPU kernels' thresholds, pairs and values exactly, ties
    included (N = 3000, several tiles)."""
    x = dyadic(3000, 40, seed=7)
    y = labels("random", 3000, 8)
    want = ops.negative_pair_select(x, y, [10, 100, 1000], 5000, None, None, 0, "")
    with tensor_cores(mode, precision):
        got = cpu(*ops.negative_pair_select(*gpu(x, y), [10, 100, 1000], 5000, None, None, 0,
                                            ""))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("mode", ["0", "1"])
def test_first_pass_collections(dtype, mode):
    """pair_histogram_topk's first pass on CUDA (tile path and, for float32,
    tensor cores): the CPU kernel's histogram, kept keys and top pairs
    exactly (dyadic embeddings: exact products, many ties), from the top
    pairs' buffer and by the passes when it cannot hold them."""
    if dtype == F64 and mode == "1":
        pytest.skip("float64 has no tensor-core path")
    x, y = dyadic(1500, 40, seed=33).to(dtype), labels("random", 1500, 34)
    bits = 64 if dtype == F64 else 32
    with tensor_cores(mode):
        for rows in (None, slice(300, 1100)):
            for args in first_pass_cases(x, y, rows, bits, 60):
                got = torch.ops.relkd.pair_histogram_topk(*first_pass_args_on("cuda", args))
                want = torch.ops.relkd.pair_histogram_topk(*args)
                for g, w in zip(cpu(*got), want):
                    assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_selection_takes_one_pass_over_the_pairs(dtype, monkeypatch):
    """Above COLLECT_MIN_ROWS rows EKD's student selection (thresholds and
    top-k pairs) runs one pass over the pairs on CUDA (plus the row
    sample's), with the CPU's result (dyadic embeddings: exact products)."""
    x, y = dyadic(4000, 64, seed=35).to(dtype), labels("random", 4000, 36)
    divisors = [10, 100, 1000, 10000, 100000]
    want = ops.negative_pair_select(x, y, divisors, 2000, None, None, 0, "")
    shifts, radix_select = [], ops.radix_select
    monkeypatch.setattr(ops, "radix_select", lambda h, *a, **k: radix_select(
        lambda p, s: shifts.append(s) or h(p, s), *a, **k))
    got = cpu(*ops.negative_pair_select(*gpu(x, y), divisors, 2000, None, None, 0, ""))
    assert shifts == [ops.key_bits(dtype) - 16]
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_pair_topk_with_more_ties_than_it_returns():
    # Collapsed embeddings: every similarity is exactly 1, the top-k are the
    # first pairs (i, j) in order, across many tiles.
    x = torch.ones(3000, 4, dtype=F64) / 2
    y = torch.arange(3000) % 7
    got = cpu(*ops.negative_pair_select(*gpu(x, y), [10], 5000, None, None, 0, ""))
    want = ops.negative_pair_select(x, y, [10], 5000, None, None, 0, "")
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_pair_topk_above_threshold_overflow_returns_the_best():
    # Called directly with a threshold below many pairs: the best topk of them.
    x = reference.normalize(embeddings(300, 6, seed=4, dtype=F64), F64)
    y = labels("random", 300, 5)
    got = cpu(*torch.ops.relkd.pair_topk(*gpu(x), None, y.cuda(), None, None, None, 1, 0, 50))
    want = torch.ops.relkd.pair_topk(x, None, y, None, None, None, 1, 0, 50)
    # The same pairs; values from other tile shapes may differ in the last bit.
    torch.testing.assert_close(got[0], want[0], atol=1e-15, rtol=0)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


@pytest.mark.parametrize("dtype", [F32, F64])
def test_pair_select_opcheck(dtype):
    x = gpu(reference.normalize(embeddings(60, 5, seed=9, dtype=dtype), dtype))[0]
    y = labels("random", 60, 1).cuda()
    prefixes = torch.zeros(1, dtype=torch.long, device="cuda")
    bits = 64 if dtype == F64 else 32
    torch.library.opcheck(torch.ops.relkd.pair_histogram.default,
                          (x, None, y, None, None, None, prefixes, bits - 16))
    torch.library.opcheck(torch.ops.relkd.pair_topk.default, (x, None, y, None, None, None, 0, 5, 9))
    collect = torch.tensor([[0, 40000], [50000, 65535]])
    torch.library.opcheck(torch.ops.relkd.pair_histogram_topk.default,
                          (x, None, y, None, None, None, prefixes, bits - 16, 9, collect, 100,
                           ops.as_int64(1 << (bits - 2))))


# --------------------------------------------------------------------- losses
shapes = dict(n=st.integers(1, 400), d=st.integers(1, 130), seed=st.integers(0, 2**16))


@cuda_settings
@given(**shapes, dtype=st.sampled_from([F32, F64]), kernel=st.sampled_from(["gaussian",
                                                                             "bilinear"]))
def test_cckd(n, d, seed, dtype, kernel):
    fs, ft = gpu(embeddings(n, d, seed, dtype), embeddings(n, d + 3, seed + 1, dtype))
    compare(Fn.cckd_loss, fs, ft, kernel=kernel)


@cuda_settings
@given(**shapes, dtype=st.sampled_from([F32, F64]))
def test_sp(n, d, seed, dtype):
    fs, ft = gpu(embeddings(n, d, seed, dtype), embeddings(n, d + 5, seed + 1, dtype))
    compare(Fn.sp_loss, fs, ft)


@cuda_settings
@given(**shapes, dtype=st.sampled_from([F32, F64]))
def test_rkd_distance(n, d, seed, dtype):
    fs = embeddings(n, d, seed, dtype)
    compare(Fn.rkd_loss, *gpu(fs, correlated(fs, seed + 1)), angle_weight=0.0)


@cuda_settings
@given(n=st.integers(1, 120), d=st.integers(1, 130), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([F32, F64]))
def test_rkd_with_angles(n, d, seed, dtype):
    """The angle term's vertices a few at a time (csrc/cpu/rkd_angle.cpp's
    ATen code, on CUDA tensors) against the reference (N^3 angles: small N)."""
    fs = embeddings(n, d, seed, dtype)
    compare(Fn.rkd_loss, *gpu(fs, correlated(fs, seed + 1)))


@cuda_settings
@given(**shapes, pattern=st.sampled_from(LABEL_PATTERNS), k=st.integers(1, 40),
       coupleface=st.booleans(), mine_by=st.sampled_from(["teacher", "student"]))
def test_rad_float64(n, d, seed, pattern, k, coupleface, mine_by):
    fs = embeddings(n, d, seed, F64)
    fn = Fn.coupleface_loss if coupleface else Fn.rad_loss
    compare(fn, *gpu(fs, correlated(fs, seed + 1), labels(pattern, n, seed)), k=k, metric="l2",
            mine_by=mine_by)


@cuda_settings
@given(n=st.integers(1, 40), m=st.integers(1, 20_000), d=st.integers(1, 64),
       k=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_rad_bank_float64(n, m, d, k, seed):
    fs = embeddings(n, d, seed, F64)
    bank = 2.0 * embeddings(m, d, seed + 2, F64)
    y, bank_labels = labels("random", n, seed), labels("random", m, seed + 3)
    compare(Fn.rad_loss, *gpu(fs, correlated(fs, seed + 1), y, bank, bank_labels), k=k,
            metric="l1", margin=0.0)


@cuda_settings
@given(n=st.integers(1, 400), seed=st.integers(0, 2**16), pattern=st.sampled_from(LABEL_PATTERNS),
       topk=st.integers(0, 3000), training=st.booleans())
def test_ekd_float64(n, seed, pattern, topk, training):
    fs = embeddings(n, 16, seed, F64)
    anchors = torch.tensor([0.6, 0.45, 0.3, 0.2, 0.1, 0.05], dtype=F64)
    compare(Fn.ekd_loss, *gpu(fs, correlated(fs, seed + 1, 0.8), labels(pattern, n, seed),
                              anchors, anchors + 0.03), topk=topk, training=training,
            temperature=0.1)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_ekd_five_training_steps_with_anchors(dtype):
    on_gpu = relkd.EKDLoss(topk=300 if dtype == F64 else 10**6, temperature=0.05, momentum=0.2,
                           backend="fused").cuda()
    ref = relkd.EKDLoss(topk=on_gpu.topk, temperature=0.05, momentum=0.2, backend="reference")
    y = labels("random", 200, 1)
    tol = dict(rtol=1e-9, atol=1e-13) if dtype == F64 else dict(rtol=2e-4, atol=1e-6)
    for step in range(5):
        fs = embeddings(200, 24, 10 + step, dtype)
        ft = correlated(fs, 20 + step, 0.6)
        fs_g = fs.cuda().requires_grad_()
        loss = on_gpu(fs_g, ft.cuda(), y.cuda())
        (grad,) = torch.autograd.grad(loss, fs_g)
        fs_c = fs.clone().requires_grad_()
        want = ref(fs_c, ft, y)
        (want_grad,) = torch.autograd.grad(want, fs_c)
        torch.testing.assert_close(loss.cpu(), want.detach(), **tol)
        torch.testing.assert_close(grad.cpu(), want_grad, **tol)
        torch.testing.assert_close(on_gpu.s_anchor.cpu(), ref.s_anchor, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(on_gpu.t_anchor.cpu(), ref.t_anchor, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_loss_gradcheck(name):
    base = embeddings(8, 3, seed=13, dtype=F64)
    fs = base.cuda().requires_grad_()
    ft = correlated(base, seed=14).cuda().requires_grad_(name in ("cckd", "sp_gram", "sp_direct"))
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4], device="cuda")
    with torch.device("cuda"):  # the cases build their constant tensors on the default device
        assert torch.autograd.gradcheck(lambda a, b: GRADCHECK_CASES[name](a, b, y), (fs, ft))


@pytest.mark.parametrize("name", list(DOUBLE_BACKWARD))
def test_double_backward_matches_the_reference(name):
    fs = embeddings(24, 5, seed=31, dtype=F64)
    ft, y = correlated(fs, seed=32), torch.arange(24) % 6
    args = gpu(fs, ft, y) + gpu(embeddings(24, 5, seed=33, dtype=F64))
    with torch.device("cuda"):
        want = hessian_vector(DOUBLE_BACKWARD[name], *args[:3], "reference", args[3])
        got = hessian_vector(DOUBLE_BACKWARD[name], *args[:3], "fused", args[3])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_double_backward_of_half_operands(half, monkeypatch):
    # 16-bit operands (float32 loss): the graphed gradient is the kernel's
    # (whose gradient products round the derivative tile to 16 bits).
    monkeypatch.setenv("RELKD_TENSOR_CORES", "auto")
    fs, ft = gpu(embeddings(300, 64, seed=34).to(half), embeddings(300, 64, seed=35).to(half))
    grads = []
    for create_graph in (False, True):
        x = fs.detach().clone().requires_grad_()
        with relkd.double_backward():
            loss = Fn.cckd_loss(x, ft)
        (g,) = torch.autograd.grad(loss, x, create_graph=create_graph)
        assert g.dtype == half and g.requires_grad == create_graph
        grads.append(g.detach().float())
    assert (grads[1] - grads[0]).norm() <= 0.02 * grads[0].norm()


LOSSES = {
    "rad": lambda fs, ft, y: Fn.rad_loss(fs, ft, y, k=20),
    "rad_bank": lambda fs, ft, y: Fn.rad_loss(fs, ft, y, ft[:300] * 2, y[:300], k=50),
    "coupleface": lambda fs, ft, y: Fn.coupleface_loss(fs, ft, y, k=20),
    "ekd": lambda fs, ft, y: Fn.ekd_loss(fs, ft, y, torch.zeros(6, device=fs.device),
                                         torch.zeros(6, device=fs.device))[0],
    "cckd": lambda fs, ft, y: Fn.cckd_loss(fs, ft),
    "sp": lambda fs, ft, y: Fn.sp_loss(fs, ft),
    "rkd": lambda fs, ft, y: Fn.rkd_loss(fs, ft, angle_weight=0.0),
}


def loss_and_grad(fn, fs, ft, y):
    fs = fs.detach().clone().requires_grad_()
    loss = fn(fs, ft, y)
    (grad,) = torch.autograd.grad(loss, fs)
    return loss.detach(), grad


@pytest.mark.parametrize("name", list(LOSSES))
def test_bitwise_deterministic(name):
    fs, ft, y = gpu(embeddings(5000, 64, seed=8), correlated(embeddings(5000, 64, seed=8), 9),
                    labels("random", 5000, 10))
    first = loss_and_grad(LOSSES[name], fs, ft, y)
    second = loss_and_grad(LOSSES[name], fs, ft, y)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("name", list(LOSSES))
def test_non_contiguous_inputs(name):
    wide = embeddings(700, 96, seed=11)
    fs, ft = wide.cuda()[:, ::2], correlated(wide, 12).cuda()[:, 1::2]  # strided views
    y = labels("random", 1400, 13).cuda()[::2]
    got = loss_and_grad(LOSSES[name], fs, ft, y)
    want = loss_and_grad(LOSSES[name], fs.contiguous(), ft.contiguous(), y.contiguous())
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_rows(name, n):
    fs = torch.randn(n, 8, device="cuda", requires_grad=True)
    ft, y = torch.randn(n, 8, device="cuda"), torch.zeros(n, dtype=torch.long, device="cuda")
    if name == "rad_bank":
        loss = Fn.rad_loss(fs, ft, y, torch.randn(30, 8, device="cuda"),
                           torch.arange(30, device="cuda"), k=5)
    else:
        loss = LOSSES[name](fs, ft, y)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(fs.grad, torch.zeros_like(fs))


@pytest.mark.parametrize("name", list(LOSSES))
def test_bad_input_raises_value_errors(name):
    fs = torch.randn(8, 4, device="cuda")
    with pytest.raises(ValueError, match=r"ft: expected 8 rows"):
        LOSSES[name](fs, torch.randn(7, 4, device="cuda"), torch.zeros(8, dtype=torch.long,
                                                                       device="cuda"))
    with pytest.raises(ValueError, match=r"one device"):
        LOSSES[name](fs, torch.randn(8, 4), torch.zeros(8, dtype=torch.long, device="cuda"))
    with pytest.raises(ValueError, match="idx values must lie in"):
        ops.pair_dot(fs, fs, torch.full((8, 2), 8, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_half_inputs_accumulate_in_float32(dtype):
    net = torch.nn.Linear(32, 16).cuda()
    x, ft, y = gpu(embeddings(256, 32, seed=1), embeddings(256, 16, seed=2),
                   labels("random", 256, 3))
    for name, fn in LOSSES.items():
        with torch.autocast("cuda", dtype=dtype):
            fs = net(x)
            loss = fn(fs, ft.to(dtype), y)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), name
        want = fn(fs.detach().float(), ft.to(dtype).float(), y)
        torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(LOSSES))
def test_half_inputs_run_half_operands_under_auto(name, half, monkeypatch):
    """RELKD_TENSOR_CORES=auto with bfloat16 / float16 inputs: the fused
    losses pass 16-bit embeddings to the kernels (tensor cores; bf16
    gradient products for bfloat16 and in the rows pass); the loss stays
    float32 and near that of float32 inputs holding the same values (the
    normalised rows are rounded to 16 bits: relative 2^-9 or 2^-11 each),
    the gradient within 2 % of its norm."""
    fs, ft, y = gpu(embeddings(700, 64, seed=1), embeddings(700, 48, seed=2),
                    labels("random", 700, 3))
    fs, ft = fs.to(half), ft.to(half)

    def loss_and_grad(a, b):
        a = a.detach().requires_grad_()
        loss = LOSSES[name](a, b, y)
        return loss, torch.autograd.grad(loss, a)[0].float()

    monkeypatch.setenv("RELKD_TENSOR_CORES", "0")
    want, want_grad = loss_and_grad(fs.float(), ft.float())
    monkeypatch.setenv("RELKD_TENSOR_CORES", "auto")
    got, got_grad = loss_and_grad(fs, ft)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-4, msg=name)
    assert float((got_grad - want_grad).norm()) <= 2e-2 * float(want_grad.norm()) + 1e-8, name


@pytest.mark.parametrize("mode", ["0", "auto"])
def test_float16_gradients_take_the_loss_scale_before_rounding(mode, monkeypatch):
    """A GradScaler multiplies the loss by 2^16 so that float16 gradients
    do not underflow: pairwise_loss returns float32 gradients for 16-bit
    embeddings and rounds grad_loss * gradient to float16, so the scaled
    gradient is the float32 one scaled, to float16's precision, even where
    the unscaled entries lie below float16's normal range (CCKD at N = 4096:
    all of them, median 1e-7, on the CPU)."""
    monkeypatch.setenv("RELKD_TENSOR_CORES", mode)
    x, z, _, params = (None if a is None else a.cuda()
                       for a in inputs("cckd", 4096, 64, seed=1, dtype=F32))
    xh = x.half().requires_grad_()
    scale, pairs = 2.0 ** 16, 4096.0 ** 2  # CCKDLoss divides by N^2
    (ops.pairwise_loss("cckd", xh, z.half(), params=params) * (scale / pairs)).backward()
    xf = xh.detach().float().requires_grad_()
    (ops.pairwise_loss("cckd", xf, z.half().float(), params=params) / pairs).backward()
    want = xf.grad * scale
    assert xh.grad.dtype == torch.float16
    assert float((xf.grad.abs() < 2.0 ** -14).float().mean()) > 0.5  # subnormal unscaled
    bound = (4e-3 if mode == "auto" else 2e-3) * float(want.norm())
    assert float((xh.grad.float() - want).norm()) <= bound


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_operands_opcheck(half):
    """The fake kernels' dtypes for 16-bit operands (a float32 loss, float32
    gradients and top-k values)."""
    xs, xt, _, params = (None if a is None else a.cuda()
                         for a in inputs("cckd", 90, 16, seed=3, dtype=F32))
    torch.library.opcheck(torch.ops.relkd.pairwise_loss.default,
                          ("cckd", xs.to(half), xt.to(half), None, None, None, None, None,
                           None, params, True, True))
    q = xs.to(half)
    torch.library.opcheck(torch.ops.relkd.topk_sim.default, (q, q, 5, None, None, None, True, 0))


@pytest.mark.parametrize("name", list(LOSSES))
def test_training_step_compiles_fullgraph(name):
    x, ft, y = gpu(embeddings(256, 32, seed=1), embeddings(256, 16, seed=2),
                   labels("random", 256, 3))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Linear(32, 16).cuda()

        def step(x_, ft_, y_):
            return LOSSES[name](net(x_), ft_, y_)

        run = torch.compile(step, fullgraph=True) if compiled else step
        loss = run(x, ft, y)
        loss.backward()
        results.append([loss.detach(), net.weight.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_no_relation_matrix_is_allocated():
    # The fused losses at N = 16,384 stay far below one N x N float32 matrix (1 GiB).
    n = 16_384
    fs, ft, y = gpu(embeddings(n, 128, seed=1), embeddings(n, 128, seed=2),
                    labels("random", n, 3))
    for name, fn in LOSSES.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss_and_grad(fn, fs, ft, y)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        assert extra < (n * n * 4) // 3, f"{name}: {extra / 2**20:.0f} MiB extra"


# ------------------------------------------------------------------- DDP
# Two gloo ranks sharing the GPU with CUDA tensors: relkd.distributed moves
# the collectives' tensors to the CPU for gloo (the code path NCCL takes
# with the GPU itself). Shares sum to the one-process loss, gradients match.
DDP_N, DDP_SHARDS = 300, (140, 160)


def ddp_batch():
    fs = embeddings(DDP_N, 16, seed=21, dtype=F64)
    return fs, correlated(fs, seed=22, noise=0.7), labels("random", DDP_N, 23)


DDP_LOSSES = {
    "rad": lambda fs, ft, y, **kw: Fn.rad_loss(fs, ft, y, k=5, metric="l2", **kw),
    "ekd": lambda fs, ft, y, **kw: Fn.ekd_loss(
        fs, ft, y, torch.zeros(6, dtype=F64, device=fs.device),
        torch.zeros(6, dtype=F64, device=fs.device), topk=50, **kw)[0],
    "cckd": lambda fs, ft, y, **kw: Fn.cckd_loss(fs, ft, **kw),
    "rkd": lambda fs, ft, y, **kw: Fn.rkd_loss(fs, ft, angle_weight=0.0, **kw),
}


def ddp_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    lo = sum(DDP_SHARDS[:rank])
    rows = slice(lo, lo + DDP_SHARDS[rank])
    fs, ft, y = ddp_batch()
    results = {}
    for name, fn in DDP_LOSSES.items():
        part = fs[rows].cuda().requires_grad_()
        loss = fn(part, ft[rows].cuda(), y[rows].cuda(), gather=True)
        loss.backward()
        results[name] = (loss.detach().cpu(), part.grad.cpu())
    finish_rank(results, out_dir, rank)


def test_ddp_shares_with_cuda_tensors():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(ddp_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    fs, ft, y = ddp_batch()
    for name, fn in DDP_LOSSES.items():
        whole = fs.cuda().requires_grad_()
        loss = fn(whole, ft.cuda(), y.cuda())
        loss.backward()
        torch.testing.assert_close(sum(r[name][0] for r in ranks), loss.detach().cpu(),
                                   rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(torch.cat([r[name][1] for r in ranks]), whole.grad.cpu(),
                                   rtol=1e-9, atol=1e-13)
