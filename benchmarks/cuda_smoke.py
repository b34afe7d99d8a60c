"""A small case of every relkd CUDA kernel, for compute-sanitizer
(memcheck, racecheck) in benchmarks/gpu_check.sh: topk_sim (batch and bank
mode, labels, scale, k > M, a k that forces compactions; the opt-in tensor-core
search, bf16, TF32 and 3xTF32), pair_dot and its
backward, pairwise_loss of every kind (symmetric and rectangular, with
gradients; on the float32 tiles and on the opt-in tensor-core kernels: bf16,
TF32, 3xTF32, 16-bit operands),
pair_histogram, pair_histogram_topk's first-pass collections and pair_topk
(including many ties and more pairs above the threshold than it returns; on
tensor cores too). Each result is also checked against
the CPU kernels, so a sanitizer run that passes also computed right.

Usage: python3 benchmarks/cuda_smoke.py   (exits 1 on a mismatch)
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from relkd import ops  # noqa: E402
from helpers import (dyadic, first_pass_args_on, first_pass_cases, tensor_cores,  # noqa: E402
                     tf32_values)

FAILURES = []


def check(name, got, want, atol=1e-10, rel_norm=None):
    """got == want within atol per entry, or (rel_norm) within that fraction
    of want's norm per output."""
    got = [g.cpu() for g in (got if isinstance(got, (tuple, list)) else [got])]
    want = want if isinstance(want, (tuple, list)) else [want]
    for g, w in zip(got, want):
        if not w.is_floating_point() and atol == 0:  # ids, counts, 64-bit keys: exactly
            ok = torch.equal(g, w)
        elif rel_norm is not None and g.shape == w.shape:
            error = float((g.double() - w.double()).norm())
            ok = error <= rel_norm * float(w.double().norm()) + 1e-6
        else:
            ok = g.shape == w.shape and torch.allclose(g.double(), w.double(), atol=atol, rtol=0,
                                                       equal_nan=True)
        if not ok:
            FAILURES.append(name)
            print(f"MISMATCH {name}")
            return
    print(f"ok {name}")


def main() -> int:
    torch.manual_seed(0)
    f64 = torch.float64
    q, c = torch.randn(300, 24, dtype=f64), torch.randn(3000, 24, dtype=f64)
    ql, cl = torch.randint(0, 50, (300,)), torch.randint(0, 50, (3000,))
    scale = torch.rand(3000, dtype=f64) + 0.5
    g = lambda *ts: [None if t is None else t.cuda() for t in ts]  # noqa: E731
    check("topk_sim bank + labels + scale", ops.topk_sim(*g(q, c), 40, *g(ql, cl, scale)),
          ops.topk_sim(q, c, 40, ql, cl, scale))
    check("topk_sim batch + self", ops.topk_sim(*g(q, q), 5000, None, None, None, True),
          ops.topk_sim(q, q, 5000, None, None, None, True))
    check("topk_sim many compactions", ops.topk_sim(*g(q[:7], c), 3), ops.topk_sim(q[:7], c, 3))
    # The tensor-core search, on float32 rows bf16 represents (unit rows:
    # float32 sums differ from the CPU's in the last bits only).
    q16 = torch.nn.functional.normalize(q, dim=1).float().bfloat16().float()
    c16 = torch.nn.functional.normalize(c, dim=1).float().bfloat16().float()
    with tensor_cores("1"):
        got = ops.topk_sim(*g(q16, c16), 40, *g(ql, cl, scale.float()))
    check("topk_sim tensor cores (values)", got[0],
          ops.topk_sim(q16, c16, 40, ql, cl, scale.float())[0], atol=1e-5)
    # A long bank for a few rows: cut into column ranges (2 of >= 8192
    # columns here), each with its own selection, joined per row.
    long_bank = torch.cat([c16] * 6)
    with tensor_cores("1"):
        got = ops.topk_sim(*g(q16[:5], long_bank), 300)
    check("topk_sim tensor cores, column ranges (values)", got[0],
          ops.topk_sim(q16[:5], long_bank, 300)[0], atol=1e-5)
    # TF32 (auto at precision "high"), on rows TF32 represents.
    q32 = tf32_values(torch.nn.functional.normalize(q, dim=1).float())
    c32 = tf32_values(torch.nn.functional.normalize(c, dim=1).float())
    with tensor_cores("auto", "high"):
        got = ops.topk_sim(*g(q32, c32), 40, *g(ql, cl, scale.float()))
    check("topk_sim TF32 tensor cores (values)", got[0],
          ops.topk_sim(q32, c32, 40, ql, cl, scale.float())[0], atol=1e-5)
    # 3xTF32 (auto at "highest"), on any unit rows.
    q1, c1 = (torch.nn.functional.normalize(t, dim=1).float() for t in (q, c))
    with tensor_cores("auto"):
        got = ops.topk_sim(*g(q1, c1), 40, *g(ql, cl, scale.float()))
    check("topk_sim 3xTF32 tensor cores (values)", got[0],
          ops.topk_sim(q1, c1, 40, ql, cl, scale.float())[0], atol=1e-5)

    a, b = torch.randn(200, 16, dtype=f64), torch.randn(500, 16, dtype=f64)
    idx = torch.randint(-1, 500, (200, 9))
    grad = torch.randn(200, 9, dtype=f64)
    check("pair_dot", ops.pair_dot(*g(a, b, idx)), ops.pair_dot(a, b, idx))
    check("pair_dot_backward", torch.ops.relkd.pair_dot_backward(*g(grad, a, b, idx), True, True),
          torch.ops.relkd.pair_dot_backward(grad, a, b, idx, True, True))

    x = torch.nn.functional.normalize(torch.randn(700, 12, dtype=f64), dim=1)
    z = torch.nn.functional.normalize(torch.randn(700, 12, dtype=f64), dim=1)
    y = torch.randint(0, 90, (700,))
    cases = {"cckd": torch.tensor([0.4, 0.3, 0.2], dtype=f64),
             "ekd_pos": torch.tensor([0.1, 0.5, 0.2, 0.45, 0.25], dtype=f64),
             "rkd_dist_sum": torch.zeros(0, dtype=f64),
             "rkd_distance": torch.tensor([1.3, 0.9], dtype=f64)}
    for kind, params in cases.items():
        teacher = None if kind == "rkd_dist_sum" else z
        labels = y if kind == "ekd_pos" else None
        grad_t = kind == "cckd"
        sym = (kind, x, teacher, None, None, labels, None, None, None, params, True, grad_t)
        rect = (kind, x[100:400], None if teacher is None else teacher[100:400], x, teacher,
                None if labels is None else labels[100:400], labels, torch.arange(100, 400),
                None, params, True, grad_t)
        for name, args in (("symmetric", sym), ("rows x columns", rect)):
            on_gpu = [a_.cuda() if isinstance(a_, torch.Tensor) else a_ for a_ in args]
            check(f"pairwise_loss {kind} {name}", torch.ops.relkd.pairwise_loss(*on_gpu),
                  torch.ops.relkd.pairwise_loss(*args), atol=1e-8)
            # The tensor-core tiles (bf16 mma), on float32 inputs bf16 represents.
            bf16_valued = [a_.bfloat16().float() if isinstance(a_, torch.Tensor)
                           and a_.is_floating_point() and a_.dim() == 2 else
                           a_.float() if isinstance(a_, torch.Tensor) and a_.is_floating_point()
                           else a_ for a_ in args]
            with tensor_cores("1"):
                got = torch.ops.relkd.pairwise_loss(
                    *[a_.cuda() if isinstance(a_, torch.Tensor) else a_ for a_ in bf16_valued])
            # (symmetric without the teacher's gradient: the rows pass, whose bf16
            # derivatives multiply the embeddings: relative 2^-9 each.)
            check(f"pairwise_loss {kind} {name}, tensor cores", got,
                  torch.ops.relkd.pairwise_loss(*bf16_valued), rel_norm=4e-3)
            # TF32 tiles (auto at precision "high"), on float32 inputs TF32
            # represents; the gradient products are TF32: torch's GEMMs, or
            # the rows pass's mma (symmetric without the teacher's gradient).
            tf32_valued = [tf32_values(a_) if isinstance(a_, torch.Tensor) and a_.dim() == 2
                           and a_.dtype == torch.float32 else a_ for a_ in bf16_valued]
            with tensor_cores("auto", "high"):
                got = torch.ops.relkd.pairwise_loss(
                    *[a_.cuda() if isinstance(a_, torch.Tensor) else a_ for a_ in tf32_valued])
            check(f"pairwise_loss {kind} {name}, TF32 tensor cores", got,
                  torch.ops.relkd.pairwise_loss(*tf32_valued), rel_norm=2.0 ** -9)
            # 3xTF32 tiles (auto at "highest"), on any float32 inputs (and
            # the rows pass's 3xTF32 gradient products).
            as_float = [a_.float() if isinstance(a_, torch.Tensor) and a_.is_floating_point()
                        else a_ for a_ in args]
            with tensor_cores("auto"):
                got = torch.ops.relkd.pairwise_loss(
                    *[a_.cuda() if isinstance(a_, torch.Tensor) else a_ for a_ in as_float])
            check(f"pairwise_loss {kind} {name}, 3xTF32 tensor cores", got,
                  torch.ops.relkd.pairwise_loss(*as_float), rel_norm=1e-5)

    # 16-bit operands under auto: float32 copies, tensor cores in that
    # format (bf16 gradient products for bfloat16; the rectangular cckd
    # takes the tile path).
    rect = ("cckd", x[100:400], z[100:400], x, z, None, None, torch.arange(100, 400), None,
            cases["cckd"].float(), True, True)
    for half in (torch.bfloat16, torch.float16):
        name = str(half).replace("torch.", "")
        with tensor_cores("auto"):
            got = torch.ops.relkd.pairwise_loss(
                *[a_.cuda().to(half) if isinstance(a_, torch.Tensor) and a_.dim() == 2 else
                  a_.cuda() if isinstance(a_, torch.Tensor) else a_ for a_ in rect])
            got_topk = ops.topk_sim(*g(q16.to(half), c16.to(half)), 40)
        same_values = [a_.to(half).float() if isinstance(a_, torch.Tensor) and a_.dim() == 2
                       else a_.float() if isinstance(a_, torch.Tensor) and a_.is_floating_point()
                       else a_ for a_ in rect]
        want = torch.ops.relkd.pairwise_loss(*same_values)
        check(f"pairwise_loss cckd {name} operands (loss)", got[0], want[0], atol=1e-3)
        check(f"pairwise_loss cckd {name} operands (gradient)", got[1], want[1], rel_norm=4e-3)
        q_h, c_h = q16.to(half).float(), c16.to(half).float()
        check(f"topk_sim {name} operands (values)", got_topk[0], ops.topk_sim(q_h, c_h, 40)[0],
              atol=1e-5)

    prefixes = torch.zeros(1, dtype=torch.long)
    check("pair_histogram", torch.ops.relkd.pair_histogram(*g(x), None, *g(y), None, None, None,
                                                           *g(prefixes), 48),
          torch.ops.relkd.pair_histogram(x, None, y, None, None, None, prefixes, 48))
    check("negative_pair_select", ops.negative_pair_select(*g(x, y), [10, 100], 300, None, None,
                                                           0, ""),
          ops.negative_pair_select(x, y, [10, 100], 300, None, None, 0, ""))
    flat = torch.ones(600, 4, dtype=f64) / 2  # every similarity ties at 1
    check("pair_topk ties", ops.negative_pair_select(*g(flat, y[:600]), [10], 1000, None, None,
                                                     0, ""),
          ops.negative_pair_select(flat, y[:600], [10], 1000, None, None, 0, ""))
    check("pair_topk above overflow",
          torch.ops.relkd.pair_topk(*g(x), None, *g(y), None, None, None, 1, 0, 50),
          torch.ops.relkd.pair_topk(x, None, y, None, None, None, 1, 0, 50))
    # Several tiles: a bank wider than one top-k column tile (8192), float32
    # paths, pairs over more rows than one pair tile (4096 float32, 2048
    # float64 for the selection).
    q32, c32 = q[:20].float(), torch.randn(20_000, 24)
    check("topk_sim float32, 3 column tiles", ops.topk_sim(*g(q32, c32), 30),
          ops.topk_sim(q32, c32, 30), atol=1e-5)
    big = torch.nn.functional.normalize(torch.randn(4500, 8, dtype=f64), dim=1)
    big_y = torch.randint(0, 500, (4500,))
    check("negative_pair_select float64, several tiles",
          ops.negative_pair_select(*g(big, big_y), [10, 1000], 2000, None, None, 0, ""),
          ops.negative_pair_select(big, big_y, [10, 1000], 2000, None, None, 0, ""))
    coef = torch.tensor([0.4, 0.3, 0.2])
    big32 = big.float()
    check("pairwise_loss cckd float32, several tiles",
          torch.ops.relkd.pairwise_loss("cckd", *g(big32, big32), None, None, None, None, None,
                                        None, *g(coef), True, True),
          torch.ops.relkd.pairwise_loss("cckd", big32, big32, None, None, None, None, None,
                                        None, coef, True, True), atol=2e-3)
    # cuBLAS and the CPU round some float32 products differently, which can
    # move a pair to the next bin: the totals agree exactly, the bins nearly.
    hist_gpu = torch.ops.relkd.pair_histogram(*g(big32), None, *g(big_y), None, None, None,
                                              *g(prefixes), 16)
    hist_cpu = torch.ops.relkd.pair_histogram(big32, None, big_y, None, None, None, prefixes, 16)
    check("pair_histogram float32 (total)", hist_gpu.sum(), hist_cpu.sum(), atol=0)
    check("pair_histogram float32 (bins)", hist_gpu, hist_cpu, atol=100)
    # The selection on tensor cores (bf16, TF32, 3xTF32), on entries k / 8:
    # exact similarities in every format, so exactly the CPU's selection.
    eighths = dyadic(2500, 24, seed=1)
    eighths_y = torch.randint(0, 50, (2500,))
    want = ops.negative_pair_select(eighths, eighths_y, [10, 1000], 3000, None, None, 0, "")
    for mode, precision in (("1", "highest"), ("auto", "high"), ("auto", "highest")):
        with tensor_cores(mode, precision):
            got = ops.negative_pair_select(*g(eighths, eighths_y), [10, 1000], 3000, None, None, 0,
                                           "")
        check(f"negative_pair_select tensor cores ({mode}, {precision})", got, want, atol=0)
    # The first pass's collections (kept keys past a small cap too, the top
    # pairs' buffer), tile path and tensor cores, on exact similarities.
    for dtype, mode in ((f64, "0"), (torch.float32, "1")):
        small = dyadic(300, 24, seed=2).to(dtype)
        small_y = torch.randint(0, 30, (300,))
        with tensor_cores(mode):
            for rows in (None, slice(60, 240)):
                for n, args in enumerate(first_pass_cases(small, small_y, rows,
                                                          64 if dtype == f64 else 32, 40)):
                    check(f"pair_histogram_topk {dtype} tensor cores {mode} case {n}",
                          torch.ops.relkd.pair_histogram_topk(*first_pass_args_on("cuda", args)),
                          torch.ops.relkd.pair_histogram_topk(*args), atol=0)
    torch.cuda.synchronize()
    print(f"{len(FAILURES)} mismatches" if FAILURES else "all kernels match the CPU")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
