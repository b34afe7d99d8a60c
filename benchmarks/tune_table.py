"""The tensor-core kernels' variants side by side: gpu_check.sh's stage `tune`
builds relkd with each RELKD_MMA_DEPTH x RELKD_MMA_STAGES pair (a "-square"
suffix: RELKD_MMA_WIDE=0; "-tall": RELKD_SELECT_ROWS=128), benchmarks it into tune-<variant>.json (losses)
and tune-topk-<variant>.json, and this prints one Markdown table of the
fused cases' median times per variant (fastest marked *) and their ratio to
the GEMM floor.

    python3 benchmarks/tune_table.py OUTDIR/tune-*.json > OUTDIR/tune.md
"""
import argparse
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple


def variant_of(path: Path) -> str:
    found = re.search(r"(\d+x\d+(?:-square|-tall)?)\.json$", path.name)
    if not found:
        raise SystemExit(f"tune_table: {path} is not named "
                         "tune[-topk]-<depth>x<stages>[-square|-tall].json")
    return found.group(1)


def fused_times(paths: List[Path]) -> Tuple[List[str], Dict[str, Dict[str, dict]]]:
    """Variants in order, and {case label: {variant: record}} of fused records."""
    variants, table = [], {}
    for path in paths:
        variant = variant_of(path)
        if variant not in variants:
            variants.append(variant)
        for r in json.loads(path.read_text())["records"]:
            if r["backend"] != "fused":
                continue
            label = (f"{r['op']} N={r['N']}" + (f" M={r['M']} k={r['k']}" if r["M"] else "")
                     + f" {r['dtype']} {r['pass']}")
            table.setdefault(label, {})[variant] = r
    return variants, table


def cell(record: dict, fastest: bool) -> str:
    if record is None or record["median_s"] is None:
        return "error" if record else "-"
    text = f"{record['median_s'] * 1e3:.2f} ms"
    if record.get("time_over_gemm_floor"):
        text += f" ({record['time_over_gemm_floor']:.2f}x floor)"
    return text + (" *" if fastest else "")


def table(paths: List[Path]) -> str:
    variants, by_case = fused_times(paths)
    lines = ["| case | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for label, by_variant in by_case.items():
        times = [r["median_s"] for r in by_variant.values() if r["median_s"] is not None]
        best = min(times) if times else None
        cells = [cell(by_variant.get(v), by_variant.get(v) is not None
                      and by_variant[v]["median_s"] == best) for v in variants]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Units per staging step x steps staged (RELKD_MMA_DEPTH x RELKD_MMA_STAGES; "
              "-square: RELKD_MMA_WIDE=0, 64 x 64 sub-tiles with 16 x 32 warps; "
              "-tall: RELKD_SELECT_ROWS=128, EKD's selection in 128 x 128 sub-tiles "
              "with 32 x 64 warps); "
              "* the fastest; floor: the same shapes' torch.mm time in that run."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    print(table(parser.parse_args(argv).runs))


if __name__ == "__main__":
    main()
