"""The CUDA backend's own code, run on the CPU: the glue (csrc/cuda/ops.cpp)
and every kernel (csrc/cuda/*.cu) compiled as C++ with -DRELKD_EMULATE,
each CUDA thread a host thread (tests/cuda_emulation/cuda_emulation.h), and
registered as relkd_emulated::* operators on CPU tensors. Every op is
compared with the CPU kernels (themselves tested against the reference):
multi-tile top-k with labels, self exclusion, scale, NaN and padding;
pair_dot and its backward; every pairwise_loss kind, symmetric and
rectangular, with gradients, on the float32 tiles and on the tensor-core
tiles (bf16, fp16, TF32 and 3xTF32 mma), 16-bit operands and the staging's
rounding; histograms and top-k pairs, on tiles and on tensor cores, with
ties beyond capacity and thresholds below more pairs than returned. This
is what CI can check of the GPU code without a GPU (tests/test_cuda.py
runs on one)."""
import os
import pathlib

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils.cpp_extension import load

from relkd import ops, reference

from helpers import (LABEL_PATTERNS, assert_same_mining, embeddings, first_pass_cases, labels,
                     dyadic, requires_extension, spread_ties, temporarily, tf32_values)

pytestmark = requires_extension
ROOT = pathlib.Path(__file__).resolve().parent.parent
F32, F64 = torch.float32, torch.float64


@pytest.fixture(scope="module")
def emulated():
    """Builds (once per source change; torch caches it) and loads the
    emulated CUDA backend; its ops are torch.ops.relkd_emulated.*."""
    build = ROOT / "build" / "cuda_emulated"
    build.mkdir(parents=True, exist_ok=True)
    units = []
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        unit = build / f"{cu.stem}_emulated.cpp"  # the .cu file itself, compiled as C++
        text = f'#include "{cu}"\n'
        if not unit.exists() or unit.read_text() != text:
            unit.write_text(text)
        units.append(str(unit))
    glue = [str(ROOT / "csrc" / "cuda" / "ops.cpp"),
            str(ROOT / "tests" / "cuda_emulation" / "staging_op.cpp")]
    # The staging's tuning constants as setup.py takes them (a variant's
    # emulated suite: RELKD_MMA_DEPTH=32 RELKD_MMA_STAGES=3 pytest ...).
    staging = [f"-D{name}={int(os.environ[name])}" for name in ("RELKD_MMA_DEPTH",
                                                               "RELKD_MMA_STAGES",
                                                               "RELKD_MMA_WIDE",
                                                               "RELKD_SELECT_ROWS")
               if os.environ.get(name)]
    # C++20 for std::barrier and std::atomic_ref: torch 2.11's cpp_extension
    # passes -std=c++17 (2.13's c++20); the later flag wins.
    load(name="relkd_cuda_emulated", sources=glue + units,
         extra_cflags=["-std=c++20", "-O2", "-DRELKD_EMULATE", "-pthread",
                       f"-I{ROOT / 'tests' / 'cuda_emulation'}", f"-I{ROOT / 'csrc'}"] + staging,
         extra_ldflags=["-pthread"], build_directory=str(build), is_python_module=False,
         verbose=os.environ.get("RELKD_VERBOSE_BUILD") == "1")
    return torch.ops.relkd_emulated


def close(got, want, atol):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if g.is_floating_point():
            torch.testing.assert_close(g, w, atol=atol, rtol=0, equal_nan=True)
        else:
            assert torch.equal(g, w)


# ------------------------------------------------------------------ topk_sim
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("n,m,k,with_labels,scaled", [
    (5, 20_000, 7, True, True),      # three column tiles: the per-row state persists
    (40, 3000, 1, False, False),     # k = 1: a selection after every chunk
    (17, 900, 300, True, False),     # k near M, compactions with many kept
    (9, 50, 80, False, True),        # k > M: padding
])
def test_topk_sim_bank_mode(emulated, dtype, n, m, k, with_labels, scaled):
    q, c = embeddings(n, 12, seed=n, dtype=dtype), embeddings(m, 12, seed=m, dtype=dtype)
    ql = labels("random", n, 1) if with_labels else None
    cl = labels("random", m, 2) if with_labels else None
    scale = (torch.rand(m, dtype=dtype, generator=torch.Generator().manual_seed(3)) + 0.5
             if scaled else None)
    got = emulated.topk_sim(q, c, k, ql, cl, scale, False, 0)
    want = ops.topk_sim(q, c, k, ql, cl, scale, False, 0)
    # Tile products round alike in float64 here: indices agree exactly.
    close(got, want, atol=1e-12 if dtype == F64 else 2e-6)


def test_topk_sim_batch_mode_self_exclusion_ties_and_nan(emulated):
    x = embeddings(300, 6, seed=4, dtype=F64)
    y = labels("random", 300, 5)
    close(emulated.topk_sim(x, x, 25, y, y, None, True, 0),
          ops.topk_sim(x, x, 25, y, y, None, True, 0), atol=1e-12)
    ties = torch.eye(4, 6, dtype=F64).repeat(5, 1)  # exact ties: the smaller column first
    close(emulated.topk_sim(ties, ties, 9, None, None, None, True, 3),
          ops.topk_sim(ties, ties, 9, None, None, None, True, 3), atol=0)
    x[7, 2] = float("nan")  # NaN ranks below every number
    close(emulated.topk_sim(x, x, 310, None, None, None, False, 0),
          ops.topk_sim(x, x, 310, None, None, None, False, 0), atol=1e-12)


@pytest.mark.parametrize("k", [2100, 2700])
def test_topk_sim_large_k_sorted_by_the_caller(emulated, k):
    # Above kFinishRankMost (2048) pairs per row the finish kernel leaves
    # them unsorted and the glue sorts them: NaN below every number, exact
    # ties to the smaller column, padding last (k = 2700 > M).
    q, c = embeddings(4, 8, seed=50, dtype=F64), embeddings(2600, 8, seed=51, dtype=F64)
    c[100:140] = c[60]           # ties
    c[7, 3] = float("nan")       # one NaN similarity per row
    q[2, 0] = float("nan")       # a row of NaN similarities
    ql, cl = labels("random", 4, 52), labels("random", 2600, 53)
    close(emulated.topk_sim(q, c, k, ql, cl, None, False, 0),
          ops.topk_sim(q, c, k, ql, cl, None, False, 0), atol=1e-12)


@pytest.mark.parametrize("n,m,k,with_labels,scaled", [
    (5, 3000, 7, True, True),      # many compactions of a partial row block
    (70, 900, 1, False, False),    # two row blocks (the second partial), k = 1
    (17, 400, 300, True, False),   # k near M: every value kept, no compaction
    (9, 50, 80, False, True),      # k > M: padding
])
@pytest.mark.parametrize("fmt", ["bf16", "tf32", "tf32x3"])
def test_topk_sim_tensor_cores(emulated, monkeypatch, n, m, k, with_labels, scaled, fmt):
    """The bank search with the similarities computed on (emulated) tensor
    cores and filtered in registers, against the CPU kernel on embeddings
    the operand format represents: bf16 (RELKD_TENSOR_CORES=1), TF32 (auto
    at matmul precision "high"; 32 entries per staging step, D = 12 one
    partial step); 3xTF32 (auto at "highest") on any unit rows."""
    prepared = {"bf16": lambda x: x.bfloat16().float(), "tf32": tf32_values,
                "tf32x3": lambda x: reference.normalize(x, F32)}[fmt]
    q = prepared(embeddings(n, 12, seed=n, dtype=F32))
    c = prepared(embeddings(m, 12, seed=m, dtype=F32))
    ql = labels("random", n, 1) if with_labels else None
    cl = labels("random", m, 2) if with_labels else None
    scale = (torch.rand(m, generator=torch.Generator().manual_seed(3)) + 0.5
             if scaled else None)
    monkeypatch.setenv("RELKD_TENSOR_CORES", "1" if fmt == "bf16" else "auto")
    with matmul_precision("high" if fmt == "tf32" else "highest"):
        got = emulated.topk_sim(q, c, k, ql, cl, scale, False, 0)
    if fmt == "tf32x3":  # the CPU kernel's values up to summation order, not its bits
        monkeypatch.setenv("RELKD_TENSOR_CORES", "0")
        assert not torch.equal(got[0], emulated.topk_sim(q, c, k, ql, cl, scale, False, 0)[0])
    assert_same_mining(got, ops.topk_sim(q, c, k, ql, cl, scale, False, 0), q, c, scale)


@pytest.mark.parametrize("fmt", ["bf16", "tf32"])
@pytest.mark.parametrize("d", [70, 400])
def test_topk_sim_tensor_cores_hold_the_query_rows(emulated, monkeypatch, fmt, d):
    """A block stages its 64 query rows once, every entry (D = 70: two
    bf16 steps or three TF32 ones, the last partial), and streams only the
    bank's columns through the steps. Rows beyond its shared memory (the
    emulation allows the columns' ring and 32 KiB of rows: D = 400 needs
    57 KiB) take the tile path instead, whose
    float32 products show which ran: the operand format's rounding where
    the rows fit, none where they do not."""
    q = reference.normalize(embeddings(70, d, seed=1, dtype=F32), F32)  # two row blocks
    c = reference.normalize(embeddings(900, d, seed=2, dtype=F32), F32)
    monkeypatch.setenv("RELKD_TENSOR_CORES", "1" if fmt == "bf16" else "auto")
    with matmul_precision("high"):
        got = emulated.topk_sim(q, c, 20, None, None, None, False, 0)
    if d == 70:
        rounded = (lambda x: x.bfloat16().float()) if fmt == "bf16" else tf32_values
        q, c = rounded(q), rounded(c)
    assert_same_mining(got, ops.topk_sim(q, c, 20), q, c, None)


def test_topk_sim_tensor_cores_self_exclusion_ties_and_nan(emulated, monkeypatch):
    monkeypatch.setenv("RELKD_TENSOR_CORES", "1")
    x = embeddings(130, 6, seed=4, dtype=F32).bfloat16().float()
    y = labels("random", 130, 5)
    assert_same_mining(emulated.topk_sim(x, x, 25, y, y, None, True, 0),
                       ops.topk_sim(x, x, 25, y, y, None, True, 0), x, x, None)
    ties = torch.eye(4, 6).repeat(5, 1)  # exact ties: the smaller column first
    close(emulated.topk_sim(ties, ties, 9, None, None, None, True, 3),
          ops.topk_sim(ties, ties, 9, None, None, None, True, 3), atol=0)
    x[7, 2] = float("nan")  # NaN ranks below every number
    close(emulated.topk_sim(x, x, 140, None, None, None, False, 0)[0].isnan(),
          ops.topk_sim(x, x, 140, None, None, None, False, 0)[0].isnan(), atol=0)


def test_topk_sim_tensor_cores_column_splits(emulated, monkeypatch):
    """A few query rows against a long bank: the bank is cut into column
    ranges (4 here: the emulation counts 2 multiprocessors and cuts ranges
    of at least 256 columns), each with its own selection, joined per row.
    Exact ties span the ranges: the smaller column must still win."""
    monkeypatch.setenv("RELKD_TENSOR_CORES", "1")
    q, c = spread_ties(1200, every=20)  # 16 ties in each range of 320 columns
    close(emulated.topk_sim(q, c, 40, None, None, None, False, 0),
          ops.topk_sim(q, c, 40, None, None, None, False, 0), atol=0)
    q = embeddings(9, 12, seed=1, dtype=F32).bfloat16().float()
    c = embeddings(5000, 12, seed=2, dtype=F32).bfloat16().float()
    for k in (1, 40, 1200):  # one pair per row; a compaction per range; more than a range holds
        assert_same_mining(emulated.topk_sim(q, c, k, None, None, None, False, 0),
                           ops.topk_sim(q, c, k, None, None, None, False, 0), q, c, None)


# ------------------------------------------------------------------ pair_dot
@pytest.mark.parametrize("dtype", [F64, F32])
def test_pair_dot_and_backward(emulated, dtype):
    a, b = embeddings(70, 40, seed=1, dtype=dtype), embeddings(90, 40, seed=2, dtype=dtype)
    idx = torch.randint(-1, 90, (70, 6), generator=torch.Generator().manual_seed(3))
    idx[5] = 4  # a column gathered many times
    grad = embeddings(70, 6, seed=4, dtype=dtype)
    atol = 1e-12 if dtype == F64 else 2e-5
    close([emulated.pair_dot(a, b, idx)], [ops.pair_dot(a, b, idx)], atol)
    for need_a, need_b in ((True, True), (True, False), (False, True)):
        close(emulated.pair_dot_backward(grad, a, b, idx, need_a, need_b),
              torch.ops.relkd.pair_dot_backward(grad, a, b, idx, need_a, need_b), atol)


# ------------------------------------------------------------- pairwise_loss
PARAMS = {"cckd": [0.4, 0.3, 0.2], "ekd_pos": [0.1, 0.5, 0.2, 0.45, 0.25],
          "rkd_dist_sum": [], "rkd_distance": [1.3, 0.9]}


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("kind", list(PARAMS))
@pytest.mark.parametrize("rect", [False, True])
def test_pairwise_loss(emulated, kind, dtype, rect):
    raw = embeddings(600, 10, seed=5, dtype=dtype)
    x = raw if kind.startswith("rkd") else reference.normalize(raw, dtype)
    z = reference.normalize(embeddings(600, 8, seed=6, dtype=dtype), dtype)
    teacher = None if kind == "rkd_dist_sum" else z
    y = labels("random", 600, 7) if kind == "ekd_pos" else None
    params = torch.tensor(PARAMS[kind], dtype=dtype)
    grad_t = kind == "cckd"
    if rect:
        r = slice(150, 420)
        args = (kind, x[r], None if teacher is None else teacher[r], x, teacher,
                None if y is None else y[r], y, torch.arange(150, 420), None, params, True,
                grad_t)
    else:
        args = (kind, x, teacher, None, None, y, None, None, None, params, True, grad_t)
    got = emulated.pairwise_loss(*args)
    want = torch.ops.relkd.pairwise_loss(*args)
    scale = max(float(want[0].abs()), 1.0)
    close(got, want, atol=(1e-11 if dtype == F64 else 2e-4) * scale)


def tensor_core_case(kind, rect, representable, half=torch.bfloat16):
    """pairwise_loss arguments over 150 rows (three 64-row sub-tiles, the
    last partial), student D=72 (a partial second staging step of 16-bit
    entries, a partial third of TF32 ones), teacher D=24; representable: every entry a value of `half` (bfloat16 or
    float16), so that rounding to it changes nothing."""
    def prepared(x):
        return x.to(half).float() if representable else x
    raw = embeddings(150, 72, seed=11, dtype=F32)
    x = prepared(raw if kind.startswith("rkd") else reference.normalize(raw, F32))
    z = prepared(reference.normalize(embeddings(150, 24, seed=12, dtype=F32), F32))
    teacher = None if kind == "rkd_dist_sum" else z
    y = labels("random", 150, 7) if kind == "ekd_pos" else None
    params = torch.tensor(PARAMS[kind], dtype=F32)
    grad_t = kind == "cckd"
    if not rect:
        return (kind, x, teacher, None, None, y, None, None, None, params, True, grad_t)
    r = slice(30, 130)
    return (kind, x[r], None if teacher is None else teacher[r], x, teacher,
            None if y is None else y[r], y, torch.arange(30, 130), None, params, True, grad_t)


def uses_rows_pass(args):
    """Whether the tensor-core path takes the symmetric pass with the
    gradient products inside (csrc/cuda/pair_rows_mma.cuh; every kind and
    format, student gradient only): its derivative tile is rounded
    (DERIVATIVE_ROUNDING) before it multiplies the embeddings."""
    xs_c, grad_t = args[3], args[11]
    return xs_c is None and not grad_t


# The relative rounding of the rows pass's derivatives before G x X per
# operand format: to bf16 for 16-bit formats, TF32 for TF32, and 3xTF32's
# big + small (about 2^-21 with the dropped small x small term).
DERIVATIVE_ROUNDING = {"bf16": 2.0 ** -9, "fp16": 2.0 ** -9, "tf32": 2.0 ** -11,
                       "tf32x3": 2.0 ** -20}


def student_pair_derivatives(args):
    """G = dL/dS (float64) of a symmetric case's loss with respect to the
    student's similarity matrix S = xs xs^T, S a leaf (RKD's squared norms
    held fixed): the derivatives the rows pass rounds (DERIVATIVE_ROUNDING)."""
    kind, xs, xt, y, params = args[0], args[1].double(), args[2], args[5], args[9].double()
    s = (xs @ xs.T).requires_grad_()
    t = None if xt is None else xt.double() @ xt.double().T
    n = len(s)
    if kind == "cckd":
        coef = params.tolist()
        loss = (reference.polynomial(coef, s) - reference.polynomial(coef, t)).pow(2).sum()
    elif kind == "ekd_pos":
        a = (params.numel() - 1) // 2
        iu = torch.triu_indices(n, n, 1)
        pos = y[iu[0]] == y[iu[1]]
        rank_s = reference.ekd_rank(s[iu[0], iu[1]][pos], params[1:1 + a], params[0].item())
        rank_t = reference.ekd_rank(t[iu[0], iu[1]][pos], params[1 + a:], params[0].item())
        loss = (rank_s - rank_t).pow(2).sum()
    else:
        def distances(gram, square):
            sq = torch.diagonal(square).detach()
            return (sq[:, None] + sq[None, :] - 2 * gram).clamp(min=reference.RKD_EPS).sqrt()
        off = ~torch.eye(n, dtype=torch.bool)
        d_s = distances(s, s)
        if kind == "rkd_dist_sum":
            loss = d_s[off].sum()
        else:
            d_t = distances(t, t)
            loss = torch.nn.functional.smooth_l1_loss(d_s[off] / params[0], d_t[off] / params[1],
                                                      reduction="sum")
    return torch.autograd.grad(loss, s)[0]


def close_to_tensor_core_result(got, want, args, fmt="bf16"):
    """Every output within what its path's rounding explains. float32-level
    paths (the tiles, any format; TF32 inputs are exact): the largest error
    against float64 within 8 times the float32 CPU kernel's own (3xTF32
    drops a 2^-22 term per product; RKD's near-duplicate points amplify
    both), plus 2e-5 of the loss. The rows pass rounds each pair derivative
    G_pq + G_qp (relative u = DERIVATIVE_ROUNDING[fmt]: 2^-9 for bf16): its
    gradient within twice u (|G| + |G|^T) |X| of the float32 kernel's, the
    loss as above."""
    scale = max(float(want[0].abs()), 1.0)
    exact = torch.ops.relkd.pairwise_loss(
        *[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
          for a in args])
    rows_pass = uses_rows_pass(args)
    for i, (g, w, e) in enumerate(zip(got, want, exact)):
        assert g.shape == w.shape and g.dtype == w.dtype
        if rows_pass and i > 0 and g.numel() > 0 and i < 5:
            derivatives = student_pair_derivatives(args).abs()
            rounding = DERIVATIVE_ROUNDING[fmt]
            bound = rounding * (derivatives + derivatives.T) @ args[1].double().abs()
            excess = (g.double() - w.double()).abs() - 2 * bound - 2e-5 * w.double().abs()
            assert float(excess.max()) <= 1e-6, (i, float(excess.max()))
            continue
        if g.numel() == 0:
            continue
        got_error = float((g.double() - e).abs().max())
        assert got_error <= 8 * float((w.double() - e).abs().max()) + 2e-5 * scale, (i, got_error)


@pytest.mark.parametrize("kind", list(PARAMS) + ["cckd_student_only"])
@pytest.mark.parametrize("rect", [False, True])
def test_pairwise_loss_tensor_cores(emulated, monkeypatch, kind, rect):
    """RELKD_TENSOR_CORES=1: the mma tile kernel (csrc/cuda/pair_tile_mma.cuh)
    with the emulation's m16n8k16, on embeddings that bfloat16 represents
    exactly, equals the float32 CPU kernels up to summation order; the
    symmetric pass with the gradient products inside (every kind without
    the teacher's gradient; RKD with its squared norms' share) up to its
    bf16 derivatives."""
    monkeypatch.setenv("RELKD_TENSOR_CORES", "1")
    args = tensor_core_case(kind.replace("_student_only", ""), rect, representable=True)
    if kind == "cckd_student_only":
        args = args[:11] + (False,)
    got = emulated.pairwise_loss(*args)
    want = torch.ops.relkd.pairwise_loss(*args)
    close_to_tensor_core_result(got, want, args)


# Cases the old tolerances failed: RKD on near-duplicate points in one
# dimension, whose distance gradients amplify any error in |x_i|^2 + |x_j|^2
# - 2 x_i.x_j (d^2 ~ 1e-7 |x|^2 there), so that the dropped 2^-22 term of
# 3xTF32 costs far more than float32's rounding; and a gradient of four
# rows whose bf16 derivative errors do not shrink with its norm. RKD under
# 3xTF32 therefore runs on TF32-exact values (big + 0: the split's products
# exact), the other kinds on any values.
@example(kind="rkd_dist_sum", n=57, d=1, dt=1, pattern="same", rect=False, fmt="tf32x3",
         seed=2)
@example(kind="rkd_distance", n=59, d=1, dt=2, pattern="same", rect=False, fmt="tf32x3",
         seed=6)
@example(kind="rkd_dist_sum", n=59, d=1, dt=1, pattern="same", rect=False, fmt="tf32x3",
         seed=1391)
@example(kind="ekd_pos", n=4, d=2, dt=10, pattern="same", rect=False, fmt="bf16", seed=1)
@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(list(PARAMS)), n=st.integers(1, 140), d=st.integers(1, 140),
       dt=st.integers(1, 40), pattern=st.sampled_from(LABEL_PATTERNS), rect=st.booleans(),
       fmt=st.sampled_from(["bf16", "tf32", "tf32x3"]), seed=st.integers(0, 2**16))
def test_pairwise_loss_tensor_cores_property(emulated, kind, n, d, dt, pattern, rect, fmt,
                                             seed):
    """The tensor-core tiles over random shapes (partial sub-tiles and
    staging steps, n = 1, teacher dims other than the student's), label
    patterns, symmetric and rectangular with global ids, bf16 operands
    (RELKD_TENSOR_CORES=1), TF32 ones (auto at precision "high", on values
    TF32 represents) and 3xTF32 (auto at "highest", on any values)."""
    args = pairwise_case(kind, n, d, dt, pattern, rect, fmt, seed)
    got = pairwise_on_tensor_cores(emulated, args, fmt)
    close_to_tensor_core_result(got, torch.ops.relkd.pairwise_loss(*args), args, fmt)


def pairwise_case(kind, n, d, dt, pattern, rect, fmt, seed):
    """pairwise_loss arguments of the property test: values the operand
    format represents (3xTF32: any, but RKD's; see its examples)."""
    def valued(x):
        if fmt == "tf32x3" and kind.startswith("rkd"):
            return tf32_values(x)
        return {"bf16": x.bfloat16().float(), "tf32": tf32_values(x), "tf32x3": x}[fmt]
    raw = embeddings(n, d, seed, F32)
    x = valued(raw if kind.startswith("rkd") else reference.normalize(raw, F32))
    z = valued(reference.normalize(embeddings(n, dt, seed + 1, F32), F32))
    teacher = None if kind == "rkd_dist_sum" else z
    y = labels(pattern, n, seed) if kind == "ekd_pos" else None
    params = torch.tensor(PARAMS[kind], dtype=F32)
    grad_t = kind == "cckd"
    if rect and n > 1:
        r = slice(n // 3, n)
        return (kind, x[r], None if teacher is None else teacher[r], x, teacher,
                None if y is None else y[r], y, torch.arange(n // 3, n), None, params, True,
                grad_t)
    return (kind, x, teacher, None, None, y, None, None, None, params, True, grad_t)


def pairwise_on_tensor_cores(emulated, args, fmt):
    """The emulated pairwise_loss with the tensor cores in format fmt."""
    with pytest.MonkeyPatch.context() as patch, matmul_precision("high" if fmt == "tf32" else
                                                                 "highest"):
        patch.setenv("RELKD_TENSOR_CORES", "1" if fmt == "bf16" else "auto")
        return emulated.pairwise_loss(*args)


@pytest.fixture(params=["at the wait", "at once"])
def copy_landing(request, emulated):
    """When the emulated cp.async copies land: at the wait that covers
    them (the default, the latest the GPU allows) or as they are issued
    (the earliest)."""
    previous = emulated.set_copies_land_early(request.param == "at once")
    yield request.param
    emulated.set_copies_land_early(previous)


@pytest.mark.parametrize("kind,rect,fmt", [("rkd_distance", False, "bf16"),
                                           ("rkd_dist_sum", False, "tf32"),
                                           ("ekd_pos", True, "tf32"), ("cckd", False, "tf32x3")])
def test_staging_ring_over_many_steps(emulated, copy_landing, kind, rect, fmt):
    """The staging ring (pair_tile_mma.cuh: sub_tile_products) over many
    steps (D = 200: four bf16 steps, seven TF32 ones) of rows the copies
    take 16 bytes at a time, whenever the copies land. The emulation's race
    check aborts where a copy could overwrite a buffer some warp still
    reads, or a warp could read a copy not yet landed (or not yet ordered
    by a barrier after its wait). The rows pass (RKD; bf16, and TF32, whose
    G x X chunks split the column rows in two: eight chunks of float32), the
    tile path (EKD, rectangular; CCKD with the teacher's gradient) and the
    top-k's resident query rows."""
    args = pairwise_case(kind, 150, 200, 136, "random", rect, fmt, seed=7)
    assert uses_rows_pass(args) == kind.startswith("rkd")
    got = pairwise_on_tensor_cores(emulated, args, fmt)
    close_to_tensor_core_result(got, torch.ops.relkd.pairwise_loss(*args), args, fmt)
    q = reference.normalize(embeddings(70, 136, seed=1, dtype=F32), F32).bfloat16().float()
    c = reference.normalize(embeddings(300, 136, seed=2, dtype=F32), F32).bfloat16().float()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RELKD_TENSOR_CORES", "1")
        got = emulated.topk_sim(q, c, 20, None, None, None, False, 0)
    assert_same_mining(got, ops.topk_sim(q, c, 20), q, c, None)


@pytest.mark.parametrize("kind", ["cckd", "ekd_pos"])
def test_rows_pass_multiplies_tf32_derivatives(emulated, kind):
    """At precision "high" the rows pass multiplies its derivative tile by
    the column rows in TF32: G = dL/dS + (dL/dS)^T rounded to TF32 (as
    torch's TF32 GEMM rounds its operands; X is TF32-valued here), not
    kept in float32 (the float32 tile path's product) nor rounded to bf16
    (the 16-bit formats' product). The student's gradient is tf32(G) X up
    to float32 sums: ten times closer to it than either other product."""
    args = pairwise_case(kind, 150, 72, 24, "random", False, "tf32", seed=5)[:11] + (False,)
    assert uses_rows_pass(args)  # a detached teacher
    got = pairwise_on_tensor_cores(emulated, args, "tf32")[1].double()
    g = student_pair_derivatives(args)
    g = (g + g.T).float()
    x = args[1].double()
    tf32 = tf32_values(g).double() @ x
    for other in (g.double() @ x, g.bfloat16().double() @ x):
        assert float((got - tf32).norm()) <= 0.1 * float((other - tf32).norm())


@pytest.mark.parametrize("kind", ["cckd", "ekd_pos"])
def test_pairwise_loss_tensor_cores_round_to_bfloat16(emulated, monkeypatch, kind):
    """On general float32 embeddings the tensor-core path's loss is that of
    the bfloat16-rounded embeddings (the similarities are computed from them),
    not that of the float32 ones: the path really runs when asked, and only
    then."""
    args = tensor_core_case(kind, False, representable=False)
    rounded = tuple(a.bfloat16().float() if isinstance(a, torch.Tensor) and a.dtype == F32
                    and a.dim() == 2 else a for a in args)
    exact = torch.ops.relkd.pairwise_loss(*args)[0]
    of_rounded = torch.ops.relkd.pairwise_loss(*rounded)[0]
    gap = float((exact - of_rounded).abs())
    assert gap > 1e-5 * max(float(exact.abs()), 1.0)  # rounding shows at this size
    monkeypatch.setenv("RELKD_TENSOR_CORES", "1")
    assert float((emulated.pairwise_loss(*args)[0] - of_rounded).abs()) < gap / 20
    monkeypatch.setenv("RELKD_TENSOR_CORES", "0")
    assert float((emulated.pairwise_loss(*args)[0] - exact).abs()) < gap / 20
    monkeypatch.setenv("RELKD_TENSOR_CORES", "auto")  # follows the float32 matmul precision
    for precision, want in [("highest", exact), ("medium", of_rounded)]:
        with matmul_precision(precision):
            assert float((emulated.pairwise_loss(*args)[0] - want).abs()) < gap / 20, precision


@pytest.mark.parametrize("kind", ["cckd", "ekd_pos", "rkd_distance"])
def test_tensor_cores_run_3xtf32_at_highest_precision(emulated, monkeypatch, kind):
    """RELKD_TENSOR_CORES=auto at matmul precision "highest" (torch's
    default): 3xTF32 tiles, each entry a TF32 value plus a TF32 remainder.
    On general float32 embeddings the loss and gradients are the float32
    CPU kernels' within 1/100 of what TF32 alone would move the loss (and
    1e-5 of the gradients' norm), computed by the tensor-core path (not
    bitwise the tile path's results)."""
    monkeypatch.setenv("RELKD_TENSOR_CORES", "auto")
    args = tensor_core_case(kind, False, representable=False)
    rounded = tuple(tf32_values(a) if isinstance(a, torch.Tensor) and a.dtype == F32
                    and a.dim() == 2 else a for a in args)
    exact = torch.ops.relkd.pairwise_loss(*args)
    tf32_gap = float((exact[0] - torch.ops.relkd.pairwise_loss(*rounded)[0]).abs())
    assert torch.get_float32_matmul_precision() == "highest"
    got = emulated.pairwise_loss(*args)
    assert float((got[0] - exact[0]).abs()) < tf32_gap / 100
    for g, w in zip(got[1:5], exact[1:5]):
        assert g.shape == w.shape
        if w.numel():
            assert float((g - w).norm()) <= 1e-5 * float(w.norm())
    monkeypatch.setenv("RELKD_TENSOR_CORES", "0")
    tile_path = emulated.pairwise_loss(*args)
    assert not all(torch.equal(g, t) for g, t in zip(got, tile_path))


@pytest.mark.parametrize("kind", ["cckd", "ekd_pos", "rkd_distance"])
def test_tensor_cores_run_tf32_at_high_precision(emulated, monkeypatch, kind):
    """RELKD_TENSOR_CORES=auto at matmul precision "high": the loss is that
    of the TF32-rounded embeddings (RKD's squared norms too), not that of
    the float32 ones; the symmetric cases take the tile path (the rows
    pass's bf16 derivatives would undercut TF32), whose gradient products
    multiply the derivative tiles by the float32 embeddings (addmm_, TF32
    itself at "high" on a GPU): the gradients are those of the TF32-rounded
    embeddings up to that rounding (relative 2^-11 per entry)."""
    monkeypatch.setenv("RELKD_TENSOR_CORES", "auto")
    args = tensor_core_case(kind, False, representable=False)
    rounded = tuple(tf32_values(a) if isinstance(a, torch.Tensor) and a.dtype == F32
                    and a.dim() == 2 else a for a in args)
    exact = torch.ops.relkd.pairwise_loss(*args)
    of_rounded = torch.ops.relkd.pairwise_loss(*rounded)
    gap = float((exact[0] - of_rounded[0]).abs())
    assert gap > 1e-6 * max(float(exact[0].abs()), 1.0)  # rounding shows at this size
    with matmul_precision("high"):
        got = emulated.pairwise_loss(*args)
    assert float((got[0] - of_rounded[0]).abs()) < gap / 20
    for g, w in zip(got[1:5], of_rounded[1:5]):
        assert g.shape == w.shape
        if w.numel():
            assert float((g - w).norm()) <= 2.0 ** -10 * float(w.norm())


def test_tensor_core_switch_names_bad_values(emulated, monkeypatch):
    monkeypatch.setenv("RELKD_TENSOR_CORES", "yes")
    x = embeddings(8, 4, seed=1, dtype=F32)
    with pytest.raises(ValueError, match="RELKD_TENSOR_CORES must be 0, 1 or auto"):
        emulated.topk_sim(x, x, 2, None, None, None, False, 0)


def matmul_precision(precision):
    return temporarily(torch.get_float32_matmul_precision, torch.set_float32_matmul_precision,
                       precision)


HALVES = [torch.bfloat16, torch.float16]


def as_half_operands(args, half):
    """The same pairwise_loss arguments with the embeddings as `half`."""
    return tuple(a.to(half) if isinstance(a, torch.Tensor) and a.dim() == 2 else a
                 for a in args)


def special_floats():
    """float32 values at TF32's edges: signed zeros and infinities, ties
    (1 + 2^-11 and 1 + 3 * 2^-11 round away from zero), float32 subnormals
    and the largest finite values (which round to infinity)."""
    base = [0.0, -0.0, float("inf"), -float("inf"), 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11,
            1.0 + 2.0 ** -12, 1e30, 1e-40, 2.0 ** -126, 2.0 ** -149, 3.4e38, 3.4028235e38]
    return torch.tensor(base + [-v for v in base], dtype=F32)


def words_of(bits16):
    """16-bit patterns (int64, n x d) packed two per 32-bit word, the lower
    index in the lower half, rows zero-padded to whole 8-entry pieces."""
    bits16 = torch.nn.functional.pad(bits16, (0, -bits16.shape[1] % 8))
    return bits16[:, 0::2] | bits16[:, 1::2] << 16


def bits16_of(x):
    return x.view(torch.int16).long() & 0xFFFF


FORMATS = {torch.bfloat16: 0, torch.float16: 1}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("d", [24, 13])
@pytest.mark.parametrize("vector", [True, False])
def padded_like(words, staged):
    """words (rows x w) with zero rows and columns up to staged's shape:
    staging fills whole 64-row blocks and whole steps, zero past the rows'
    ends and past the last row."""
    assert staged.shape[0] >= words.shape[0] and staged.shape[1] >= words.shape[1]
    return torch.nn.functional.pad(words, (0, staged.shape[1] - words.shape[1],
                                           0, staged.shape[0] - words.shape[0]))


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("d", [24, 13])
@pytest.mark.parametrize("vector", [True, False])
def test_staging_reads_16_bit_operands_as_they_are(emulated, fmt, d, vector):
    """The kernels read 16-bit operands as stored (the glue rounds float32
    ones with torch's conversion): each staged row holds its entries bit for
    bit, two per word in the mma fragments' order, whether copied 16 bytes
    at a time (cp.async) or one entry at a time, the rest of the step and
    the rows past the last zero (over a buffer filled with other bytes). All
    65,536 patterns, NaN and infinities included."""
    x = torch.arange(2 ** 16, dtype=torch.int32).to(torch.int16).view(fmt)
    x = x[: x.numel() // d * d].view(-1, d)
    got = emulated.stage_pieces(x, FORMATS[fmt], vector)
    want = words_of(bits16_of(x))
    assert torch.equal(got, padded_like(want, got))
    assert torch.equal(emulated.stage_pieces(x, FORMATS[fmt], vector, fragments=True), got)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("d", [16, 80])
@pytest.mark.parametrize("vector", [True, False])
def test_rows_pass_stages_its_products_operand_as_bf16(emulated, fmt, d, vector):
    """The rows pass multiplies G by the column rows in bf16 whatever the
    16-bit format: bfloat16 entries pass as they are (by cp.async where
    rows are 16-byte aligned), float16 ones are rounded to the nearest
    bfloat16 (ties to even) as torch rounds the same value, over all 65,536
    float16 patterns (subnormals, infinities; NaN stays NaN). D = 80: two
    64-entry chunks, the second partial, and a partial last row block."""
    x = torch.arange(2 ** 16, dtype=torch.int32).to(torch.int16).view(fmt)
    x = x[: x.numel() // d * d].view(-1, d)
    got = emulated.stage_pieces(x, FORMATS[fmt], vector, True).view(x.shape[0], -1)
    want = words_of(bits16_of(x.float().bfloat16()))
    nan = torch.isnan(x)
    for shift, mask in ((0, nan[:, 0::2]), (16, nan[:, 1::2])):  # the two halves of a word
        got_half, want_half = got >> shift & 0xFFFF, want >> shift & 0xFFFF
        assert torch.equal(got_half[~mask], want_half[~mask])
        assert torch.isnan(got_half[mask].to(torch.int16).view(torch.bfloat16)).all()


@pytest.mark.parametrize("d", [24, 13])
@pytest.mark.parametrize("vector", [True, False])
def test_staging_rounds_float32_to_tf32(emulated, d, vector):
    """TF32 operands are staged as float32, bit for bit (cp.async or entry by
    entry, zero past the rows), and rounded in the fragments after ldmatrix,
    as cvt.rna does (ties away from zero; checked against a float64
    computation), over every float32 magnitude and random bit patterns;
    NaN stays NaN."""
    torch.manual_seed(0)
    randoms = torch.randn(6000) * torch.exp2(torch.randint(-40, 20, (6000,)).float())
    patterns = (torch.randint(0, 2**31, (6000,)) - 2**30).to(torch.int32).view(F32)
    x = torch.cat([special_floats(), randoms, patterns])
    x = x[: x.numel() // d * d].view(-1, d)
    staged = emulated.stage_pieces(x, 2, vector)
    assert torch.equal(staged, padded_like(x.view(torch.int32).long() & 0xFFFFFFFF, staged))
    got = emulated.stage_pieces(x, 2, vector, fragments=True)
    want = padded_like(tf32_values(x).view(torch.int32).long() & 0xFFFFFFFF, got)
    nan = padded_like(torch.isnan(x).long(), got).bool()
    assert torch.equal(got[~nan], want[~nan])
    assert torch.isnan(got[nan].to(torch.int32).view(F32)).all()


@pytest.mark.parametrize("half", HALVES)
@pytest.mark.parametrize("kind", list(PARAMS) + ["cckd_student_only"])
@pytest.mark.parametrize("rect", [False, True])
@pytest.mark.parametrize("mode", ["0", "auto"])
def test_pairwise_loss_half_operands(emulated, monkeypatch, half, kind, rect, mode):
    """16-bit embeddings (what the fused losses pass on CUDA for bfloat16 /
    float16 inputs): a float32 loss and float32 gradients (the autograd
    formula rounds them to the embeddings' dtype). RELKD_TENSOR_CORES=auto
    runs the tensor cores for them whatever the matmul precision (their
    products are exact there: float16 ones in float16, not rounded to
    bfloat16), with bf16 gradient products for bfloat16 and in the rows
    pass; 0 the float32 tile path on the same values."""
    args = tensor_core_case(kind.replace("_student_only", ""), rect, True, half)
    if kind == "cckd_student_only":
        args = args[:11] + (False,)
    monkeypatch.setenv("RELKD_TENSOR_CORES", mode)
    got = emulated.pairwise_loss(*as_half_operands(args, half))
    want = torch.ops.relkd.pairwise_loss(*args)  # the CPU kernel on the same values
    for g, w in zip(got, want):
        assert g.dtype == F32 and g.shape == w.shape
    scale = max(float(want[0].abs()), 1.0)
    torch.testing.assert_close(got[0], want[0], atol=2e-5 * scale, rtol=0)
    torch.testing.assert_close(got[5], want[5], atol=2e-5 * scale, rtol=0)
    bf16_products = mode == "auto" and (half == torch.bfloat16 or uses_rows_pass(args))
    for g, w in zip(got[1:5], want[1:5]):
        bound = (4e-3 if bf16_products else 2e-5) * float(w.norm()) + 1e-6
        assert float((g - w).norm()) <= bound


@pytest.mark.parametrize("half", HALVES)
@pytest.mark.parametrize("rect", [False, True])
def test_half_operands_run_the_tensor_cores_under_auto(emulated, monkeypatch, half, rect):
    """Which path ran shows in the student's gradient: the float32 path's is
    the CPU kernel's up to summation order; the tensor-core paths round
    derivatives to bf16 before multiplying them back (rows pass, symmetric)
    or multiply in bf16 (bfloat16 tile path, rectangular), which moves it
    by about 2^-9 of its norm. Under auto they run for 16-bit operands at
    precision "highest". (float16's rectangular tile path multiplies back in
    float32: no trace to tell it by here; the loss test above covers it.)"""
    if half == torch.float16 and rect:
        pytest.skip("float16 tile path: float32 gradient products, as the float32 path's")
    args = tensor_core_case("cckd", rect, True, half)[:11] + (False,)
    exact = torch.ops.relkd.pairwise_loss(*args)[1]

    def distance(mode):
        monkeypatch.setenv("RELKD_TENSOR_CORES", mode)
        grad = emulated.pairwise_loss(*as_half_operands(args, half))[1]
        return float((grad - exact).norm() / exact.norm())

    assert torch.get_float32_matmul_precision() == "highest"
    assert distance("0") < 1e-5
    assert distance("auto") > 1e-4


def test_half_operands_must_share_one_dtype(emulated):
    args = list(tensor_core_case("cckd", True, representable=True))
    args[1] = args[1].bfloat16()  # xs_r bf16, the rest float32
    with pytest.raises(ValueError, match="xt_r must be bfloat16 like the other embeddings"):
        emulated.pairwise_loss(*args)
    args[2] = args[2].half()  # xt_r float16
    with pytest.raises(ValueError, match="xt_r must be bfloat16 like the other embeddings"):
        emulated.pairwise_loss(*args)
    q = embeddings(9, 8, seed=1, dtype=F32)
    with pytest.raises(ValueError, match="c must be float16 like the other embeddings"):
        emulated.topk_sim(q.half(), q, 3, None, None, None, False, 0)


@pytest.mark.parametrize("half", HALVES)
@pytest.mark.parametrize("mode", ["0", "auto"])
def test_topk_sim_half_operands(emulated, monkeypatch, half, mode):
    """16-bit q and c: float32 values equal to the float32 products of the
    same values (exact products on the tensor cores: float16 operands are
    not rounded to bfloat16, which would move them by about 1e-3)."""
    q = reference.normalize(embeddings(70, 16, seed=3, dtype=F32), F32).to(half)
    c = reference.normalize(embeddings(2000, 16, seed=4, dtype=F32), F32).to(half)
    monkeypatch.setenv("RELKD_TENSOR_CORES", mode)
    got = emulated.topk_sim(q, c, 30, None, None, None, False, 0)
    want = ops.topk_sim(q.float(), c.float(), 30)
    assert got[0].dtype == F32
    assert_same_mining(got, want, q.float(), c.float(), None)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- pair_select
@pytest.mark.parametrize("dtype", [F64, F32])
def test_histograms(emulated, dtype):
    x = reference.normalize(embeddings(500, 6, seed=8, dtype=dtype), dtype)
    y = labels("random", 500, 9)
    bits = 64 if dtype == F64 else 32
    top = torch.ops.relkd.pair_histogram(x, None, y, None, None, None,
                                         torch.zeros(1, dtype=torch.long), bits - 16)
    prefixes = torch.nonzero(top[0]).flatten()[-3:]  # digits that occur: real prefixes
    for args in ((x, None, y, None, None, None, torch.zeros(1, dtype=torch.long), bits - 16),
                 (x, None, y, None, None, None, prefixes, bits - 32),
                 (x[100:300], x, y[100:300], y, torch.arange(100, 300), None, prefixes,
                  bits - 32)):
        close([emulated.pair_histogram(*args)], [torch.ops.relkd.pair_histogram(*args)], 0)


@pytest.mark.parametrize("path", ["tile-f64", "tile-f32", "bf16", "tf32"])
def test_first_pass_counts_hot_bins_per_block(emulated, monkeypatch, path):
    """The first histogram pass counts the bins where similarities pile up
    (|value| in [2^-16, 2)) per block in shared memory and adds each count
    once; other bins (0, |value| >= 2, NaN) go straight to the global
    histogram. N = 1100 spans several blocks of 65,536 tile elements and,
    on tensor cores, two strips of 16 column sub-tiles (the diagonal's
    lower sub-tiles skipped inside a strip); dyadic rows of 8 entries give
    exact similarities from -8 to 8 in steps of 1/64, zeros among them, and
    one NaN row: the CPU kernel's counts exactly, before and after a prefix."""
    dtype = F64 if path == "tile-f64" else F32
    monkeypatch.setenv("RELKD_TENSOR_CORES", "0" if path.startswith("tile") else
                       "1" if path == "bf16" else "auto")
    x, y = dyadic(1100, 8, seed=3).to(dtype), labels("random", 1100, 4)
    x[517, 3] = float("nan")
    bits = 64 if dtype == F64 else 32
    start = torch.zeros(1, dtype=torch.long)
    top = torch.ops.relkd.pair_histogram(x, None, y, None, None, None, start, bits - 16)
    assert top[0, 0] > 0 and top[0, 0x8000] > 0  # NaN and zero: bins outside the hot ones
    prefixes = torch.nonzero(top[0]).flatten()[-2:]
    with matmul_precision("high" if path == "tf32" else "highest"):
        for args in ((x, None, y, None, None, None, start, bits - 16),
                     (x, None, y, None, None, None, prefixes, bits - 32),
                     (x[100:400], x, y[100:400], y, torch.arange(100, 400), None, start,
                      bits - 16)):
            close([emulated.pair_histogram(*args)], [torch.ops.relkd.pair_histogram(*args)], 0)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_top_pairs_at_the_selected_threshold(emulated, dtype):
    x = reference.normalize(embeddings(700, 6, seed=10, dtype=dtype), dtype)
    y = labels("random", 700, 11)
    bits = ops.key_bits(dtype)

    def histogram(prefixes, shift):
        return torch.ops.relkd.pair_histogram(x, None, y, None, None, None, prefixes, shift)

    for topk in (1, 500):
        keys, n_above = ops.radix_select(histogram, [topk - 1], bits)
        args = (x, None, y, None, None, None, ops.as_int64(keys[0]), topk - n_above[0], topk)
        # The same pairs; their values from tiles of other sizes, so a few
        # differ in the last bit.
        close(emulated.pair_topk(*args), torch.ops.relkd.pair_topk(*args),
              atol=1e-15 if dtype == F64 else 1e-7)


def test_top_pairs_with_ties_beyond_any_buffer(emulated):
    # Every similarity is exactly 1: the top-k are the first pairs (i, j).
    x = torch.ones(300, 4, dtype=F64) / 2
    y = torch.arange(300) % 7
    tau = ops.as_int64(ops.radix_select(
        lambda p, s: torch.ops.relkd.pair_histogram(x, None, y, None, None, None, p, s),
        [0], 64)[0][0])
    for n_equal, topk in ((5000, 5000), (17, 40), (0, 10)):
        args = (x, None, y, None, None, None, tau, n_equal, topk)
        close(emulated.pair_topk(*args), torch.ops.relkd.pair_topk(*args), atol=0)


def test_top_pairs_below_a_low_threshold_are_the_best(emulated):
    # A threshold below many more pairs than topk (the op called directly).
    x = reference.normalize(embeddings(300, 6, seed=12, dtype=F64), F64)
    y = labels("random", 300, 13)
    for threshold_key in (1, 0):
        args = (x, None, y, None, None, None, threshold_key, 3, 50)
        close(emulated.pair_topk(*args), torch.ops.relkd.pair_topk(*args), atol=1e-15)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_first_pass_collections(emulated, dtype):
    """pair_histogram_topk on CUDA (pair_select.cuh, collect_first_pass):
    the CPU kernel's histogram, kept keys and top pairs exactly (dyadic
    embeddings: exact products, many ties): top pairs from the buffer of
    the pairs at and above top_min_key (first and later passes), or by the
    radix passes and pair_topk when the buffer cannot hold them (keys 1 or 0
    of 87,990 pairs, or fewer pairs than topk); keys given up past their
    cap; NaN similarities last."""
    x, y = dyadic(420, 6, seed=29).to(dtype), labels("random", 420, 30)
    bits = ops.key_bits(dtype)
    for args in first_pass_cases(x, y, None, bits, 40):
        close(emulated.pair_histogram_topk(*args), torch.ops.relkd.pair_histogram_topk(*args), 0)
    # Fewer negative pairs (1,254) than topk, too many pairs for the buffer.
    few = torch.zeros(420, dtype=torch.long)
    few[:3] = torch.tensor([1, 2, 3])
    args = (x, None, few, None, None, None, torch.zeros(1, dtype=torch.long), bits - 16, 2000)
    close(emulated.pair_histogram_topk(*args), torch.ops.relkd.pair_histogram_topk(*args), 0)
    # NaN similarities (a NaN row) rank last, by (i, j), as on the CPU.
    nan_row = x[:40].clone()
    nan_row[3] = float("nan")
    args = (nan_row, None, y[:40], None, None, None, torch.zeros(1, dtype=torch.long), bits - 16,
            800)
    close(emulated.pair_histogram_topk(*args), torch.ops.relkd.pair_histogram_topk(*args), 0)


# Tensor-core selection: the three float32 formats by switch and precision.
SELECT_FORMATS = {"bf16": ("1", "highest"), "tf32": ("auto", "high"),
                  "tf32x3": ("auto", "highest")}


@pytest.mark.parametrize("fmt", list(SELECT_FORMATS))
def test_histograms_on_tensor_cores(emulated, monkeypatch, fmt):
    """pair_histogram with its similarities computed on tensor cores
    (csrc/cuda/pair_select_mma.cu): the CPU kernel's counts exactly, over
    the top digit, a second digit under prefixes, and rows x columns with
    global ids (N = 150: partial 64-row sub-tiles, some below the
    diagonal; D = 24, a partial staging step)."""
    mode, precision = SELECT_FORMATS[fmt]
    monkeypatch.setenv("RELKD_TENSOR_CORES", mode)
    x, y = dyadic(150, 24, seed=1), labels("random", 150, 2)
    top = torch.ops.relkd.pair_histogram(x, None, y, None, None, None,
                                         torch.zeros(1, dtype=torch.long), 16)
    prefixes = torch.nonzero(top[0]).flatten()[-3:]
    with matmul_precision(precision):
        for args in ((x, None, y, None, None, None, torch.zeros(1, dtype=torch.long), 16),
                     (x, None, y, None, None, None, prefixes, 0),
                     (x[40:130], x, y[40:130], y, torch.arange(40, 130), None, prefixes, 0)):
            close([emulated.pair_histogram(*args)], [torch.ops.relkd.pair_histogram(*args)], 0)


@pytest.mark.parametrize("fmt", list(SELECT_FORMATS))
@pytest.mark.parametrize("rect", [False, True])
def test_top_pairs_on_tensor_cores(emulated, monkeypatch, fmt, rect):
    """pair_topk's collection on tensor cores: at a threshold found by the
    radix select, the CPU kernel's pairs and values exactly, ties at the
    threshold ranked by (i, j) (dyadic embeddings: many ties), and the
    second collection below a low threshold."""
    mode, precision = SELECT_FORMATS[fmt]
    monkeypatch.setenv("RELKD_TENSOR_CORES", mode)
    x, y = dyadic(150, 24, seed=3), labels("random", 150, 4)
    cols = (x, y, torch.arange(40, 130), None) if rect else (None, None, None, None)
    rows = (x[40:130], y[40:130]) if rect else (x, y)
    x_c, y_c, ids_r, ids_c = cols

    def histogram(prefixes, shift):
        return torch.ops.relkd.pair_histogram(rows[0], x_c, rows[1], y_c, ids_r, ids_c,
                                              prefixes, shift)

    with matmul_precision(precision):
        for topk in (1, 300):
            keys, n_above = ops.radix_select(histogram, [topk - 1], 32)
            args = (rows[0], x_c, rows[1], y_c, ids_r, ids_c, ops.as_int64(keys[0]),
                    topk - n_above[0], topk)
            close(emulated.pair_topk(*args), torch.ops.relkd.pair_topk(*args), atol=0)
        args = (rows[0], x_c, rows[1], y_c, ids_r, ids_c, 1, 3, 50)  # far below: 2nd pass
        close(emulated.pair_topk(*args), torch.ops.relkd.pair_topk(*args), atol=0)


@pytest.mark.parametrize("rect", [False, True])
def test_first_pass_collections_on_tensor_cores(emulated, monkeypatch, rect):
    """The first pass's collections with similarities computed on tensor
    cores (bf16 operands; dyadic embeddings, exact): the CPU kernel's
    outputs exactly, symmetric and rows x columns with global ids."""
    monkeypatch.setenv("RELKD_TENSOR_CORES", "1")
    x, y = dyadic(150, 24, seed=31), labels("random", 150, 32)
    for args in first_pass_cases(x, y, slice(40, 130) if rect else None, 32, 25):
        close(emulated.pair_histogram_topk(*args), torch.ops.relkd.pair_histogram_topk(*args), 0)


def test_selection_runs_on_tensor_cores_when_switched_on(emulated, monkeypatch):
    """On general float32 embeddings the bf16 path's top-digit histogram is
    that of bf16-rounded similarities, not the float32 tile path's: the
    tensor-core passes run when asked, and only then."""
    x = reference.normalize(embeddings(150, 24, seed=5, dtype=F32), F32)
    y = labels("random", 150, 6)
    args = (x, None, y, None, None, None, torch.zeros(1, dtype=torch.long), 16)
    monkeypatch.setenv("RELKD_TENSOR_CORES", "0")
    tiles = emulated.pair_histogram(*args)
    assert torch.equal(tiles, torch.ops.relkd.pair_histogram(*args))
    monkeypatch.setenv("RELKD_TENSOR_CORES", "1")
    assert not torch.equal(emulated.pair_histogram(*args), tiles)
