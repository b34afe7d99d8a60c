"""Global-batch relations under DDP (SPEC §8), with the gloo backend on CPU:
2 and 3 processes holding unequal shards of one batch, one of them empty.
For every loss and both backends: the per-rank shares sum to the loss of one
process holding the concatenated batch, each rank's gradient (and
Hessian-vector product: a double backward through the collectives) equals
that process's for its rows, and EKD's anchors (and a PrototypeBank) are
identical on every rank and equal the single-process ones; EKD's
selection resolves its thresholds from keys gathered from every rank in
one pass. A rank whose inputs fail validation stops every rank (no hang)
and leaves the group usable. Collectives time
out and the spawned ranks are bounded in time, so a hang fails the test
instead of blocking CI."""
import datetime
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist

import relkd
from relkd import functional as Fn
from relkd import ops
from relkd.distributed import COMPILED_COLLECTIVES

from helpers import (correlated, embeddings, finish_rank, labels, requires_extension,
                     spawn_with_deadline)

pytestmark = [requires_extension, pytest.mark.distributed]
N, D = 21, 8
SHARDS = {"world2": [10, 11], "world3": [6, 7, 8], "world3_empty_shard": [10, 0, 11]}
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
RUN_DEADLINE_S = 900
ANCHORS = torch.linspace(0.5, 0.05, 6, dtype=torch.float64)
BANK = embeddings(40, D, seed=7, dtype=torch.float64)
BANK_LABELS = torch.arange(40) % 9


def batch(d=D):
    fs = embeddings(N, d, seed=1, dtype=torch.float64)
    return fs, correlated(fs, seed=2, noise=0.7), labels("random", N, seed=3)


def ekd(fs, ft, y, backend, **dist_kw):
    return Fn.ekd_loss(fs, ft, y, ANCHORS, ANCHORS + 0.02, topk=37, temperature=0.1,
                       backend=backend, **dist_kw)


WEIGHT = embeddings(6, 10, seed=8, dtype=torch.float64)  # for EC-KD's exclusivity term

# name -> (feature dim, fn(fs, ft, y, **dist_kw) -> loss or (loss, anchors...))
CASES = {}
for backend in ("fused", "reference"):
    b = backend
    CASES.update({
        f"fcd_{b}": (D, lambda fs, ft, y, b=b, **kw: Fn.fcd_loss(fs, ft, backend=b, **kw)),
        f"eckd_{b}": (D, lambda fs, ft, y, b=b, **kw: relkd.ECKDLoss(
            lam=0.5, backend=b, **kw)(fs, ft, WEIGHT)),
        f"rad_{b}": (D, lambda fs, ft, y, b=b, **kw: Fn.rad_loss(
            fs, ft, y, k=5, metric="l2", backend=b, **kw)),
        f"rad_hinge_student_{b}": (D, lambda fs, ft, y, b=b, **kw: Fn.rad_loss(
            fs, ft, y, k=4, margin=-0.1, mine_by="student", backend=b, **kw)),
        f"rad_bank_{b}": (D, lambda fs, ft, y, b=b, **kw: Fn.rad_loss(
            fs, ft, y, BANK, BANK_LABELS, k=6, metric="l1", backend=b, **kw)),
        f"coupleface_{b}": (D, lambda fs, ft, y, b=b, **kw: Fn.coupleface_loss(
            fs, ft, y, k=5, metric="l2", backend=b, **kw)),
        f"ekd_{b}": (D, lambda fs, ft, y, b=b, **kw: ekd(fs, ft, y, b, **kw)),
        f"cckd_{b}": (D, lambda fs, ft, y, b=b, **kw: Fn.cckd_loss(fs, ft, backend=b, **kw)),
        f"sp_gram_{b}": (D, lambda fs, ft, y, b=b, **kw: Fn.sp_loss(fs, ft, backend=b, **kw)),
        f"sp_direct_{b}": (32, lambda fs, ft, y, b=b, **kw: Fn.sp_loss(fs, ft, backend=b,
                                                                          **kw)),
        f"rkd_{b}": (D, lambda fs, ft, y, b=b, **kw: Fn.rkd_loss(
            fs, ft, angle_weight=0.0, backend=b, **kw)),
        f"rkd_angle_{b}": (D, lambda fs, ft, y, b=b, **kw: Fn.rkd_loss(
            fs, ft, distance_weight=1.0, angle_weight=2.0, backend=b, **kw)),
    })


# EKD's selection (ops.negative_pair_select) on its own, with enough rows
# that its first pass keeps the keys near each predicted threshold.
SELECT_SHARDS = {"world2": [140, 160], "world3": [90, 100, 110],
                 "world3_empty_shard": [150, 0, 150]}
SELECT_DIVISORS = [10, 100, 1000]


def selection_inputs(dtype):
    n = sum(SELECT_SHARDS["world2"])
    x = torch.nn.functional.normalize(embeddings(n, 16, seed=5, dtype=dtype), dim=1)
    return x, labels("random", n, seed=6)


def selections(layout, rank, group_name):
    """This rank's negative_pair_select results and histogram passes, with the
    first-pass key collection off (radix passes), on, and on with CUDA's way
    to the top pairs (from predicted bins; "device"), per dtype."""
    shards = SELECT_SHARDS[layout]
    lo = sum(shards[:rank])
    out = {}
    radix_select, min_rows = ops.radix_select, ops.COLLECT_MIN_ROWS
    by_bar = ops.top_by_running_bar
    for dtype in (torch.float32, torch.float64):
        x, y = selection_inputs(dtype)
        for collect in (False, True, "device"):
            ops.COLLECT_MIN_ROWS = 0 if collect else 10**9
            ops.top_by_running_bar = (lambda device: False) if collect == "device" else by_bar
            shifts = []
            ops.radix_select = lambda h, *a, **k: radix_select(
                lambda p, sh: shifts.append(sh) or h(p, sh), *a, **k)
            result = ops.negative_pair_select(x[lo:lo + shards[rank]], y[lo:lo + shards[rank]],
                                              SELECT_DIVISORS, 50, x, y, lo, group_name)
            ops.radix_select = radix_select
            out[(dtype, collect)] = (result, shifts)
    ops.COLLECT_MIN_ROWS, ops.top_by_running_bar = min_rows, by_bar
    return out


def run_case(fn, fs, ft, y, direction, **dist_kw):
    """(loss, gradient, Hessian-vector product along direction, anchors...):
    the gradient by a double-backward graph, which the HVP differentiates
    (its collectives are differentiable too)."""
    fs = fs.detach().clone().requires_grad_()
    with relkd.double_backward():
        out = fn(fs, ft, y, **dist_kw)
    loss, extra = (out[0], list(out[1:])) if isinstance(out, tuple) else (out, [])
    (grad,) = torch.autograd.grad(loss, fs, create_graph=True)
    hvp = None
    if grad.requires_grad:  # not on an empty shard whose share is a constant 0
        (hvp,) = torch.autograd.grad((grad * direction).sum(), fs, allow_unused=True)
    hvp = torch.zeros_like(fs) if hvp is None else hvp
    return loss.detach(), grad.detach(), hvp, extra


def direction(d=D):
    return embeddings(N, d, seed=4, dtype=torch.float64)


def worker(rank, layout, init_file, out_dir):
    torch.set_num_threads(1)
    shards = SHARDS[layout]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=len(shards), timeout=COLLECTIVE_TIMEOUT)
    lo = sum(shards[:rank])
    rows = slice(lo, lo + shards[rank])
    results = {}
    for name, (d, fn) in CASES.items():
        fs, ft, y = batch(d)
        results[name] = run_case(fn, fs[rows], ft[rows], y[rows], direction(d)[rows],
                                 gather=True)
    bank = relkd.PrototypeBank(9, D, momentum=0.5, gather=True, dtype=torch.float64)
    fs, ft, y = batch()
    bank.update(ft[rows], y[rows] % 9)
    results["bank"] = bank.prototypes
    results["select"] = selections(layout, rank, dist.group.WORLD.group_name)
    finish_rank(results, out_dir, rank)


@pytest.fixture(scope="module", params=list(SHARDS))
def ranks(request):
    layout = request.param
    world = len(SHARDS[layout])
    with tempfile.TemporaryDirectory() as tmp:
        yield world, spawn_with_deadline(worker, world, tmp, RUN_DEADLINE_S, layout)


@pytest.mark.parametrize("name", list(CASES))
def test_shares_sum_to_the_global_loss(ranks, name):
    world, results = ranks
    d, fn = CASES[name]
    fs, ft, y = batch(d)
    loss, grad, hvp, extra = run_case(fn, fs, ft, y, direction(d))
    shares = [r[name] for r in results]
    torch.testing.assert_close(sum(s[0] for s in shares), loss, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(torch.cat([s[1] for s in shares]), grad, rtol=1e-9, atol=1e-13)
    assert hvp.abs().max() > 0 or name.startswith("eckd")  # EC-KD's term is not the rows'
    torch.testing.assert_close(torch.cat([s[2] for s in shares]), hvp, rtol=1e-9, atol=1e-13)
    for e, want in enumerate(extra):  # EKD's anchors: the same on every rank
        for s in shares:
            torch.testing.assert_close(s[3][e], want, rtol=1e-12, atol=1e-14)


def test_prototype_bank_is_global(ranks):
    world, results = ranks
    bank = relkd.PrototypeBank(9, D, momentum=0.5, dtype=torch.float64)
    fs, ft, y = batch()
    bank.update(ft, y % 9)
    for r in results:
        torch.testing.assert_close(r["bank"], bank.prototypes, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_collects_keys_across_ranks(ranks, dtype):
    """Under DDP the first pass's kept keys (gathered from every rank, bins
    predicted from the summed row samples) resolve every threshold in one
    pass, and its kept pairs give the top pairs, with bitwise the radix
    passes' result, the same on every rank and equal to one process's
    selection."""
    world, results = ranks
    bits = ops.key_bits(dtype)
    x, y = selection_inputs(dtype)
    single = ops.negative_pair_select(x, y, SELECT_DIVISORS, 50, None, None, 0, "")
    for r in results:
        (radix, radix_shifts), (collected, collected_shifts), (device, device_shifts) = (
            r["select"][(dtype, False)], r["select"][(dtype, True)],
            r["select"][(dtype, "device")])
        assert len(radix_shifts) == bits // 16 and collected_shifts == [bits - 16]
        assert all(torch.equal(a, b) for a, b in zip(collected, radix))
        # CUDA's way: every rank's pairs in the bins predicted from the summed
        # samples, checked against the summed histogram, in the same one pass.
        assert device_shifts == [bits - 16]
        assert all(torch.equal(a, b) for a, b in zip(device, radix))
        first_rank = results[0]["select"][(dtype, True)][0]
        assert all(torch.equal(a, b) for a, b in zip(collected, first_rank))
        # One process computes some similarities in another order: equal to the last bits.
        torch.testing.assert_close(collected[0], single[0], rtol=1e-6, atol=0)
        torch.testing.assert_close(collected[1], single[1], rtol=1e-6, atol=0)
        assert int(collected[4]) == int(single[4])


def test_gather_without_process_group_is_an_error():
    with pytest.raises(ValueError, match="gather=True: torch.distributed is not initialised"):
        Fn.cckd_loss(torch.randn(4, 3), torch.randn(4, 3), gather=True)


# ------------------------------------- a rank whose inputs fail validation
def teacher_of(ft, rows, rank):
    return ft[rows][:-1] if rank == 1 else ft[rows]


def _raise_simulated_error(*args, **kwargs):
    raise RuntimeError("simulated failure")


def rejecting_worker(rank, init_file, out_dir):
    """Rank 1 passes a teacher batch one row short (or, for the bank, labels
    out of range) and must raise its ValueError; rank 0 must raise too rather
    than wait for rank 1 in a collective, and then a good call must work on
    both (the ranks still run the same collectives)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=2, timeout=COLLECTIVE_TIMEOUT)
    rows = slice(10 * rank, 10 * rank + 10)

    def outcome(call):
        try:
            out = call()
        except Exception as error:  # noqa: BLE001 (the test checks which)
            return type(error).__name__, str(error)
        return "ok", (out[0] if isinstance(out, tuple) else out).detach()

    results = {}
    for name, (d, fn) in CASES.items():
        fs, ft, y = batch(d)
        teacher = teacher_of(ft, rows, rank)
        rejected = outcome(lambda: fn(fs[rows], teacher, y[rows], gather=True))
        results[name] = rejected, outcome(lambda: fn(fs[rows], ft[rows], y[rows], gather=True))
    fs, ft, y = batch()
    results["every_rank"] = outcome(lambda: Fn.cckd_loss(fs[rows], ft[rows][:-1], gather=True))
    wider = torch.cat([fs, fs[:, :1]], 1)  # valid alone; not beside rank 0's dim
    results["dim"] = outcome(lambda: Fn.cckd_loss((wider if rank else fs)[rows], ft[rows],
                                                  gather=True))
    results["dtype"] = outcome(lambda: Fn.cckd_loss(fs[rows], ft[rows].to(
        torch.float32 if rank else torch.float64), gather=True))
    results["labels"] = outcome(lambda: Fn.rad_loss(fs[rows], ft[rows], y[rows].to(
        torch.int32 if rank else torch.int64), k=3, gather=True))
    # Options that differ between ranks (each valid alone) run different
    # collectives: abort, hang or wrong shares before.
    options = {
        "k": lambda: Fn.rad_loss(fs[rows], ft[rows], y[rows], k=3 + rank, gather=True),
        "backend": lambda: Fn.rad_loss(fs[rows], ft[rows], y[rows], k=3, gather=True,
                                       backend="fused" if rank else "reference"),
        "training": lambda: ekd(fs[rows], ft[rows], y[rows], "fused", training=rank == 0,
                                gather=True),
        "normalize": lambda: Fn.fcd_loss(fs[rows], ft[rows], normalize=rank == 0, gather=True),
        "bank": lambda: relkd.PrototypeBank(9 + rank, D, gather=True, dtype=torch.float64
                                            ).update(ft[rows], y[rows] % 9)}
    for name, call in options.items():
        results[f"options_{name}"] = outcome(call)
    # The same options spelt differently, and a compiled rank beside an eager
    # one (whose options the compiled graph holds as constants): no error.
    results["same_options"] = [
        outcome(lambda: Fn.rad_loss(fs[rows], ft[rows], y[rows], k=np.int64(3) if rank else 3,
                                    margin=0 if rank else 0.0, gather=True)),
        outcome(lambda: Fn.cckd_loss(fs[rows], ft[rows], order=2, gamma=np.float64(0.5) if rank
                                     else 0.5, detach_teacher=np.bool_(True) if rank else True,
                                     gather=True))]
    torch.compiler.reset()
    for loss in (Fn.cckd_loss, Fn.fcd_loss):
        step = (lambda a, b, loss=loss: loss(a, b, gather=True))
        results["same_options"].append(outcome(lambda: (torch.compile(step) if rank == 0 else step)(
            fs[rows], ft[rows])))
    # Rejections found later than the first check, on another path into the exchange.
    results["non_tensor"] = outcome(lambda: Fn.cckd_loss(
        fs[rows].tolist() if rank else fs[rows], ft[rows], process_group=dist.group.WORLD))
    with torch.no_grad():
        torch.compiler.reset()  # plain compile: the failing trace falls back to eager
        results["compiled_fcd"] = outcome(lambda: torch.compile(
            lambda a, b: Fn.fcd_loss(a, b, gather=True))(fs[rows], teacher_of(ft, rows, rank)))
    if rank == 1:  # fails in CoupleFace's FCD, after the RAD part's exchange
        import relkd.fused as fused_module
        fused_module.fcd_loss = _raise_simulated_error
    results["coupleface_fcd"] = outcome(lambda: Fn.coupleface_loss(
        fs[rows], ft[rows], y[rows], k=3, gather=True))
    results["after"] = outcome(lambda: Fn.cckd_loss(fs[rows], ft[rows], gather=True))
    bank = relkd.PrototypeBank(9, D, gather=True, dtype=torch.float64)
    results["bank"] = outcome(lambda: bank.update(ft[rows], y[rows] % 9 + 9 * rank))
    finish_rank(results, out_dir, rank)


@pytest.fixture(scope="module")
def rejecting_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        yield spawn_with_deadline(rejecting_worker, 2, tmp, RUN_DEADLINE_S)


@pytest.mark.parametrize("name", list(CASES))
def test_a_rank_rejecting_its_inputs_stops_every_rank(rejecting_ranks, name):
    (kind0, message0), _ = rejecting_ranks[0][name]
    (kind1, message1), _ = rejecting_ranks[1][name]
    assert (kind1, message1.split(":")[0]) == ("ValueError", "ft")
    assert kind0 == "RuntimeError" and "rank(s) [1] of the process group rejected" in message0
    d, fn = CASES[name]
    fs, ft, y = batch(d)
    (kind0, share0), (kind1, share1) = (r[name][1] for r in rejecting_ranks)
    assert kind0 == kind1 == "ok"  # the next call: the ranks still agree
    want = fn(fs[:20], ft[:20], y[:20])
    torch.testing.assert_close(share0 + share1, want[0] if isinstance(want, tuple) else want,
                               rtol=1e-10, atol=1e-14)


def test_every_rank_rejecting_raises_its_own_error(rejecting_ranks):
    for results in rejecting_ranks:
        kind, message = results["every_rank"]
        assert kind == "ValueError" and message.startswith("ft:")


@pytest.mark.parametrize("case,argument,rank1", [
    ("dim", "fs", "(rows, 9) torch.float64"), ("dtype", "ft", "(rows, 8) torch.float32"),
    ("labels", "y", "(rows,) torch.int32")])
def test_ranks_whose_batches_differ_in_shape_or_dtype_raise(rejecting_ranks, case, argument,
                                                            rank1):
    # Each rank's batch is valid alone; gathered together they would hand
    # the collective mismatched buffers (gloo aborted the process). Every
    # rank raises the same error, and the group still works afterwards.
    for results in rejecting_ranks:
        kind, message = results[case]
        assert kind == "ValueError" and message.startswith(f"{argument}: the ranks")
        assert f"rank 1: {rank1}" in message
        assert results["after"][0] == "ok"
    torch.testing.assert_close(sum(r["after"][1] for r in rejecting_ranks),
                               Fn.cckd_loss(*(t[:20] for t in batch()[:2])), rtol=1e-10,
                               atol=1e-14)


@pytest.mark.parametrize("option,loss", [
    ("k", "RADLoss"), ("backend", "RADLoss"), ("training", "EKDLoss"),
    ("normalize", "FCDLoss"), ("bank", "PrototypeBank.update")])
def test_ranks_calling_with_different_options_raise(rejecting_ranks, option, loss):
    for rank, results in enumerate(rejecting_ranks):
        kind, message = results[f"options_{option}"]
        assert kind == "ValueError", message
        assert message.startswith(f"{loss}: rank(s) [{1 - rank}] of the process group called it "
                                  "with other options than this rank")
    assert rejecting_ranks[0]["after"][0] == rejecting_ranks[1]["after"][0] == "ok"


def test_ranks_calling_with_the_same_options_spelt_differently_agree(rejecting_ranks):
    fs, ft, y = (t[:20] for t in batch())
    want = [Fn.rad_loss(fs, ft, y, k=3, margin=0.0), Fn.cckd_loss(fs, ft, gamma=0.5),
            Fn.cckd_loss(fs, ft), Fn.fcd_loss(fs, ft)]
    (got0, got1) = (r["same_options"] for r in rejecting_ranks)
    for w, (kind0, share0), (kind1, share1) in zip(want, got0, got1):
        assert kind0 == kind1 == "ok", (share0, share1)
        torch.testing.assert_close(share0 + share1, w, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("case,message1", [
    ("non_tensor", "fs: expected a torch.Tensor"), ("compiled_fcd", "ft: expected 10 rows"),
    ("coupleface_fcd", "simulated failure")])
def test_later_rejections_stop_every_rank(rejecting_ranks, case, message1):
    # A non-tensor argument (the exchange's device from the next tensor), a
    # check failing while Dynamo traces (the others' compiled exchange sees
    # the rejection), an error in CoupleFace's FCD part (after its RAD part's
    # exchange, before FCD's own).
    kind0, message0 = rejecting_ranks[0][case]
    kind1, got1 = rejecting_ranks[1][case]
    assert message1 in got1
    assert kind0 == "RuntimeError" and "of the process group rejected their inputs" in message0
    assert case == "compiled_fcd" or "rank(s) [1]" in message0
    assert rejecting_ranks[0]["after"][0] == rejecting_ranks[1]["after"][0] == "ok"


def test_prototype_bank_update_rejected_on_one_rank_stops_every_rank(rejecting_ranks):
    kind0, message0 = rejecting_ranks[0]["bank"]
    kind1, message1 = rejecting_ranks[1]["bank"]
    assert kind1 == "ValueError" and message1.startswith("y: labels must lie in [0, 9)")
    assert kind0 == "RuntimeError" and "rank(s) [1]" in message0


# ------------------------------------------- where collectives run, per backend
@pytest.mark.parametrize("backend,tensor_device,expected", [
    ("gloo", "cpu", "cpu"),
    ("gloo", "meta", "cpu"),               # e.g. CUDA tensors on a gloo group
    ("cpu:gloo,cuda:nccl", "cpu", "cpu"),  # mixed groups: each device its own backend
    ("cpu:gloo,cuda:nccl", "meta", "meta"),
    ("mpi", "meta", "meta"),               # other backends take tensors where they are
])
def test_communication_device_follows_the_group_backend(monkeypatch, backend, tensor_device,
                                                        expected):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    if backend == "cpu:gloo,cuda:nccl" and tensor_device == "meta":
        # a meta tensor stands in for a device type the group serves: cuda
        monkeypatch.setattr(relkd.distributed, "_backend_device_types",
                            lambda group: {"cpu": "gloo", "meta": "nccl"})
    got = relkd.distributed._comm_device(object(), torch.device(tensor_device))
    assert got.type == expected


# torch.compile(fullgraph=True) under DDP: the ranks' row counts are data
# the graph cannot specialise on, so the compiled graph assumes equal shards
# (checked at run time). Before, every batch-relation loss with gather=True
# failed inside Dynamo (PendingUnbackedSymbolNotFound). Torch before 2.13
# compiles the collectives' backward wrongly (2.11: every loss's gradient
# off, with or without fullgraph), so there relkd keeps its collectives out
# of the graph: fullgraph fails, a plain compile runs them eagerly between
# graphs (exact). A loss behind torch.compiler.disable is exact either way.
COMPILED = ["fcd", "rad", "rad_bank", "coupleface", "ekd", "cckd", "sp_gram", "rkd",
            "rkd_angle"]


def compiled_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=2, timeout=COLLECTIVE_TIMEOUT)
    results = {}
    for name in COMPILED:
        d, fn = CASES[f"{name}_fused"]
        fs, ft, y = batch(d)
        rows = slice(10 * rank, 10 * rank + 10)  # equal shards of 10

        def step(f, fn=fn, ft=ft[rows], y=y[rows]):
            out = fn(f, ft, y, gather=True)
            return out[0] if isinstance(out, tuple) else out

        def outside(f, fn=fn, ft=ft[rows], y=y[rows]):  # the loss left out of the graph
            return torch.compiler.disable(step)(f) * 1.0

        got, want, disabled = [], [], []
        torch._dynamo.reset()  # one code object (step) per loss: not recompiles of one
        # fullgraph where torch compiles the collectives exactly, else a plain
        # compile (which must run them eagerly between graphs).
        compiled = torch.compile(step, fullgraph=COMPILED_COLLECTIVES)
        for call, out in ((compiled, got), (step, want),
                          (torch.compile(outside, fullgraph=False), disabled)):
            torch._dynamo.reset()
            x = fs[rows].detach().clone().requires_grad_()
            loss = call(x)
            out.extend([loss.detach(), torch.autograd.grad(loss, x)[0]])
        if not COMPILED_COLLECTIVES:
            torch._dynamo.reset()
            try:
                torch.compile(step, fullgraph=True)(fs[rows].detach().clone())
                got.append(None)
            except Exception as error:  # noqa: BLE001 (Dynamo wraps relkd's RuntimeError)
                got.append(f"{type(error).__name__}: {error}")
        results[name] = (got, want, disabled)
    x = fs[:10 + rank].detach().clone()  # unequal shards: 10 and 11 rows
    try:
        torch.compile(lambda f: Fn.cckd_loss(f, f, gather=True), fullgraph=True)(x)
        results["unequal"] = None
    except RuntimeError as error:
        results["unequal"] = str(error)
    finish_rank(results, out_dir, rank)


@pytest.fixture(scope="module")
def compiled_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        yield spawn_with_deadline(compiled_worker, 2, tmp, RUN_DEADLINE_S)


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_fullgraph_matches_eager_under_ddp(compiled_ranks, name):
    for results in compiled_ranks:
        got, want, disabled = results[name]
        torch.testing.assert_close(disabled[0], want[0], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(disabled[1], want[1], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-14)
        if not COMPILED_COLLECTIVES:  # fullgraph refused
            assert got[2] is not None, "fullgraph compiled the collectives on torch < 2.13"


def test_compiled_unequal_shards_raise(compiled_ranks):
    for results in compiled_ranks:
        if COMPILED_COLLECTIVES:
            assert "same batch size on every rank" in results["unequal"]
        else:  # refused before the shard check
            assert results["unequal"] is not None
