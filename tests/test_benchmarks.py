"""The benchmark tooling's own arithmetic and outputs (benchmarks/): the GEMM
floor's FLOP counts behind the TFLOP/s columns, the plot of a run and the
table of the staging variants (gpu_check.sh's stage `tune`)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import cases  # noqa: E402
import plot  # noqa: E402
import tune_table  # noqa: E402


@pytest.mark.parametrize("op,mode,products", [
    ("cckd", "fwd", 2),        # student and teacher similarities
    ("cckd", "fwd+bwd", 4),    # + the two gradient products
    ("rad", "fwd+bwd", 1),     # the teacher's similarities for the mining
    ("fcd", "fwd", 0),         # no relation matrix
    ("rkd_angle", "fwd", 2 * 1001),          # distances, and per vertex two Gram matrices
    ("rkd_angle", "fwd+bwd", 2 * 1001 + 2 + 1000),  # + the gradient products
    ("cckd", "hvp", 0),        # no floor defined for a double backward
])
def test_floor_flops_count_the_floor_products(op, mode, products):
    case = cases.make_case(op, "fused", mode, n=1000, d=64)
    assert cases.floor_flops(case) == 2 * 1000 * 1000 * 64 * products


def test_floor_flops_of_a_bank_search():
    case = cases.Case(cases.TOPK, "fused", "fwd", 100, 32, m=5000, k=10)
    assert cases.floor_flops(case) == 2 * 100 * 5000 * 32


def record(op, backend, n, median, dtype="float32", error=None):
    return {"kind": "loss", "op": op, "backend": backend, "N": n, "D": 512, "dtype": dtype,
            "pass": "fwd+bwd", "median_s": median, "error": error}


def test_plot_writes_a_png_with_failed_cases(tmp_path):
    pytest.importorskip("matplotlib")
    records = [record("cckd", "fused", n, n * 1e-6) for n in (1024, 8192, 32768)]
    records += [record("cckd", "reference", 1024, 1e-2),
                record("cckd", "reference", 32768, None, error="CUDA out of memory"),
                record("ekd", "gemm", 1024, 1e-3, dtype="bfloat16")]
    run = tmp_path / "bench.json"
    run.write_text(json.dumps({"machine": {"gpu": "test GPU"}, "records": records}))
    out = tmp_path / "plot.png"
    assert plot.main([str(run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = plot.series(plot.load_records([run], "fwd+bwd"))
    assert points[("cckd", "reference", "float32, D=512")] == {1024: 1e-2, 32768: None}
    assert plot.main([str(run), "--out", str(out), "--pass", "fwd"]) == 1  # nothing to draw


def test_tune_table_puts_the_variants_side_by_side(tmp_path):
    def run(variant, fused_s, topk_s, error=None):
        floor = dict(record("cckd", "gemm", 8192, 1e-3, dtype="bfloat16"))
        loss = dict(record("cckd", "fused", 8192, fused_s, dtype="bfloat16", error=error),
                    M=None, k=None, time_over_gemm_floor=fused_s and fused_s / 1e-3)
        topk = dict(record("topk_sim", "fused", 8192, topk_s, dtype="bfloat16"), kind="topk",
                    M=1_000_000, k=100, time_over_gemm_floor=None)
        (tmp_path / f"tune-{variant}.json").write_text(json.dumps({"records": [floor, loss]}))
        (tmp_path / f"tune-topk-{variant}.json").write_text(json.dumps({"records": [topk]}))
    run("64x2", 2e-3, 0.5)
    run("32x4", 1.5e-3, None, error=None)
    run("64x2-square", 2.5e-3, 0.7)  # RELKD_MMA_WIDE=0
    run("64x2-tall", 1.8e-3, 0.5)  # RELKD_SELECT_ROWS=128
    paths = sorted(tmp_path.glob("tune-*.json"))
    lines = tune_table.table(paths).splitlines()
    assert lines[0] == "| case | 32x4 | 64x2-square | 64x2-tall | 64x2 |"
    cckd = next(line for line in lines if line.startswith("| cckd N=8192 bfloat16"))
    assert cckd.endswith("| 1.50 ms (1.50x floor) * | 2.50 ms (2.50x floor) "
                         "| 1.80 ms (1.80x floor) | 2.00 ms (2.00x floor) |")
    topk = next(line for line in lines if line.startswith("| topk_sim N=8192 M=1000000 k=100"))
    assert topk.endswith("| error | 700.00 ms | 500.00 ms * | 500.00 ms * |")
    assert not any("gemm" in line for line in lines[2:])  # the floor only as ratios
