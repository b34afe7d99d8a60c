"""Shared test utilities: inputs, label patterns, the FlashAttention-style
tolerance pattern, and running a loss for its value and gradient."""
from __future__ import annotations

import contextlib
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from relkd import ops

requires_extension = pytest.mark.skipif(not ops.HAS_EXTENSION,
                                        reason=f"relkd._C not built: {ops.EXTENSION_ERROR}")

LABEL_PATTERNS = ("same", "distinct", "random")


def embeddings(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)


def correlated(base: torch.Tensor, seed: int, noise: float = 0.5) -> torch.Tensor:
    """A 'teacher' related to `base`, so relations are neither equal nor unrelated."""
    return base + noise * embeddings(*base.shape, seed, base.dtype)


def labels(pattern: str, n: int, seed: int) -> torch.Tensor:
    if pattern == "same":
        return torch.zeros(n, dtype=torch.long)
    if pattern == "distinct":
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(1, n // 3), (n,), generator=g)  # duplicates guaranteed


def value_and_grad(fn, fs: torch.Tensor, *args, **kwargs):
    """(loss, d loss / d fs) of fn(fs, *args, **kwargs); a tuple result's [0] is the loss."""
    fs = fs.detach().clone().requires_grad_(True)
    out = fn(fs, *args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(loss, fs, allow_unused=True)
    return loss.detach(), (torch.zeros_like(fs) if grad is None else grad)


def assert_bounded_error(fused, same_precision, exact, what: str, factor: float = 2.0,
                         floor: float = 2e-6, absolute: float = 1e-7):
    """The fused result's error against the float64 reference is at most
    `factor` times the same-precision reference's error, plus a tiny floor:
    `floor` relative to the result's magnitude and `absolute` (about float32's
    epsilon) for results that are zero in exact arithmetic
    (FlashAttention's test pattern)."""
    exact = exact.double()
    assert not torch.isnan(fused).any(), f"{what}: fused result has NaN"
    err_fused = (fused.double() - exact).abs().max().item() if fused.numel() else 0.0
    err_ref = (same_precision.double() - exact).abs().max().item() if fused.numel() else 0.0
    scale = exact.abs().max().item() if exact.numel() else 0.0
    bound = factor * err_ref + floor * scale + absolute
    assert err_fused <= bound, (f"{what}: fused error {err_fused:.3e} > bound {bound:.3e} "
                                f"(same-precision reference error {err_ref:.3e}, scale {scale:.3e})")


@contextlib.contextmanager
def temporarily(get, set_, value):
    """set_(value) inside the block; afterwards set_(what get() returned)."""
    before = get()
    set_(value)
    try:
        yield
    finally:
        set_(before)


def num_threads(n: int):
    return temporarily(torch.get_num_threads, torch.set_num_threads, n)


@contextlib.contextmanager
def tensor_cores(mode: str = "1", precision: str | None = None):
    """RELKD_TENSOR_CORES=mode (and the float32 matmul precision, when given)
    for the calls inside; both as before afterwards. 1: float32 ops on the
    bf16 mma kernels (csrc/cuda/pair_tile_mma.cuh); auto: the format the
    precision picks."""
    before = os.environ.get("RELKD_TENSOR_CORES")
    os.environ["RELKD_TENSOR_CORES"] = mode
    try:
        with temporarily(torch.get_float32_matmul_precision, torch.set_float32_matmul_precision,
                         precision or torch.get_float32_matmul_precision()):
            yield
    finally:
        if before is None:
            del os.environ["RELKD_TENSOR_CORES"]
        else:
            os.environ["RELKD_TENSOR_CORES"] = before


def assert_same_mining(got, want, q, c, scale):
    """Values equal up to float32 summation order; each returned index is
    the column its value belongs to (near-ties may swap which of two
    columns comes first)."""
    (gv, gi), (wv, wi) = got, want
    torch.testing.assert_close(gv, wv, atol=2e-6, rtol=0, equal_nan=True)
    valid = gi >= 0
    assert torch.equal(valid, wi >= 0)
    rows = torch.arange(len(q))[:, None].expand_as(gi)[valid]
    sims = (q.double()[rows] * c.double()[gi[valid]]).sum(1)
    if scale is not None:
        sims = sims * scale.double()[gi[valid]]
    torch.testing.assert_close(sims, gv[valid].double(), atol=2e-6, rtol=0, equal_nan=True)
    exact = valid & ((wv - wv.roll(1, 1)).abs() > 1e-5) & ((wv - wv.roll(-1, 1)).abs() > 1e-5)
    assert torch.equal(gi[exact], wi[exact])


def spread_ties(m, every):
    """Queries e0..e3 and a bank of m rows, e0 at every `every`-th row and
    e5 elsewhere: query 0 ties (value 1) with m / every columns spread over
    the whole bank, the others tie (value 0) with every column. A top-k
    whose bank is cut into ranges must still rank ties by column."""
    q, c = torch.eye(4, 6), torch.zeros(m, 6)
    c[:, 5] = 1.0
    c[::every] = q[0]
    return q, c


def tf32_values(x):
    """x rounded to TF32 as cvt.rna.tf32.f32 rounds: to 11 significant bits
    (a quantum of 2^-136 below float32's normal range), ties away from zero,
    computed on the values in float64 rather than on the bits."""
    x64 = x.double()
    exponent = torch.frexp(x64)[1].double()
    quantum = torch.where(x64.abs() < 2.0 ** -126, torch.full_like(x64, 2.0 ** -136),
                          torch.exp2(exponent - 11))
    rounded = torch.copysign(torch.floor(x64.abs() / quantum + 0.5) * quantum, x64)
    return torch.where(torch.isfinite(x64), rounded, x64).float()


def dyadic(n, d, seed):
    """Embeddings with entries k / 8, |k| <= 8: every format holds them and
    every similarity is exact in any summation order (multiples of 1/64), so
    the tensor-core passes must match the CPU kernels key for key, ties
    included (there are many)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (n, d), generator=g).to(torch.float32) / 8


def first_pass_cases(x, y, rows, bits, topk):
    """pair_histogram_topk arguments over x's negative pairs (rows: those
    rows, or all): key ranges around a middle and the top bins; top pairs
    from a key inside a high bin up, from a pair's own key up, from key 1 up (every pair: more than
    the buffer holds when there are over 65,536) and from key 0 (every pair;
    the buffer only when few); a key cap too small; a later pass; keys
    alone."""
    whole = torch.zeros(1, dtype=torch.long)
    hist = torch.ops.relkd.pair_histogram(x, None, y, None, None, None, whole, bits - 16)[0]
    bins = torch.nonzero(hist).flatten().tolist()
    ranges = torch.tensor([[bins[len(bins) // 2] - 1, bins[len(bins) // 2] + 1],
                           [bins[-4], 65535]])
    high = (bins[-6] << (bits - 16)) | (1 << (bits - 17))  # the middle of a high bin
    high -= (1 << 64) if high >= 1 << 63 else 0  # the key's bit pattern as an int64
    top_keys = torch.ops.relkd.pair_histogram_topk(x, None, y, None, None, None, whole,
                                                   bits - 16, 0, ranges[1:], 10**6)[4]
    exact = int(top_keys[min(20, len(top_keys) - 1)])  # a pair's key: its ties are kept
    common = ((x[rows], x, y[rows], y, torch.arange(rows.start, rows.stop), None) if rows
              else (x, None, y, None, None, None))
    prefixes = torch.tensor(bins[-3:])
    return [common + (whole, bits - 16, topk, ranges, 10**6, high),
            common + (whole, bits - 16, topk, None, 0, exact),
            common + (whole, bits - 16, topk, ranges, 5, high),
            common + (whole, bits - 16, topk, None, 0, 1),
            common + (whole, bits - 16, topk, None, 0, 0),
            common + (prefixes, bits - 32, topk, None, 0, high),
            common + (whole, bits - 16, 0, ranges, 10**6)]


def first_pass_args_on(device, args):
    """A first_pass_cases argument tuple with its tensors on `device`, but
    collect_ranges (argument 9), which stays on the host."""
    return [a.to(device) if isinstance(a, torch.Tensor) and at != 9 else a
            for at, a in enumerate(args)]


def finish_rank(results, out_dir: str, rank: int) -> None:
    """The end of a spawn_with_deadline worker: saves its results, waits for
    every rank (none tears down gloo while a peer still drains a collective)
    and leaves without finalising the interpreter: a gloo worker thread may
    release a finished collective's tensors after Python has begun
    finalising, and taking the GIL then aborts the process (a torch race,
    pytorch/pytorch PR #179291)."""
    import torch.distributed as dist

    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def spawn_with_deadline(target, world: int, tmp: str, deadline_s: float, *args) -> list:
    """Runs target(rank, *args, init_file, out_dir) on `world` ranks and
    returns what each saved (torch.save to out_dir/rank{r}.pt); a rank that
    crashes fails the run (mp raises), and so does a run still going after
    deadline_s (a hang), its ranks killed."""
    context = mp.spawn(target, args=(*args, os.path.join(tmp, "init"), tmp), nprocs=world,
                       join=False)
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP ranks ({target.__name__}{args}) still running after "
                        f"{deadline_s} s: a hang")
    return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
