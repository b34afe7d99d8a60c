"""What benchmarks/bench.py measures: the benchmark cases, their inputs, the
callables that run one pass of each case, and the peak-memory probe that a
child process runs for one case.

A case (`Case`) is one operation (a loss, similarity_topk or ida_scores) at one shape,
run by one backend in one pass ("fwd", "fwd+bwd", or "hvp": the gradient
with create_graph=True and a Hessian-vector product by differentiating it
again; losses only, fused and reference). `prepare(case, inputs)`
returns a zero-argument callable doing exactly one pass; bench.py times it,
and `probe_peak_memory(case)` measures its peak extra memory. The losses run
through relkd.functional (the same entry points the tests exercise) with
backend="fused" or "reference"; "compiled" is relkd.reference's function of
the loss under torch.compile.

Backends:
  fused       relkd.functional.<loss>(..., backend="fused")
  reference   relkd.functional.<loss>(..., backend="reference")  (eager)
  compiled    torch.compile(relkd.reference.<loss>, dynamic=False)
  chunked     similarity_topk only: chunked torch.mm + topk with a running
              top-k merge (the usual PyTorch way), `chunk` rows of b at a time
  gemm        similarity_topk only: the bare (N, D) x (D, M) product in
              chunks of `chunk` columns, the physical floor of any exact k-NN
ida_scores (N pairs against an M-row support gallery) has two backends:
  fused       relkd.IDAScorer(..., backend="fused"), `chunk` pairs per search
  reference   relkd.IDAScorer(..., backend="reference"): the reference on
              `chunk` pairs at a time (bounded memory); with `subset` set,
              only the first `subset` pairs run and bench.py extrapolates

Inputs: N/4 identities x 4 images each (shuffled labels), student and teacher
embeddings = identity centre + noise; EKD anchors are the batch's FPR
thresholds (ekd_anchors); similarity_topk: Gaussian queries and bank;
ida_scores: Gaussian faces (b = a + noise) and support gallery.
"""
from __future__ import annotations

import ctypes
import gc
import re
import resource
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as torch_f
from torch import Tensor

import relkd
from relkd import functional as rf
from relkd import reference as rr

LOSS_NAMES = ("fcd", "rad", "coupleface", "ekd", "cckd", "sp", "rkd")
# Losses run only when named (--losses): RKD with its angle term (the
# default weights) is O(N^3 D), out of reach at the default sizes.
EXTRA_LOSS_NAMES = ("rkd_angle",)
TOPK = "similarity_topk"
IDA = "ida_scores"
BACKENDS = ("fused", "reference", "compiled", "chunked", "gemm", "faiss")
PASSES = ("fwd+bwd", "fwd")  # the default sweep
EXTRA_PASSES = ("hvp",)      # run only when named (--passes)

IMAGES_PER_IDENTITY = 4  # labels: N/4 identities x 4 images each, shuffled
RAD_K = 16               # mined neighbours per row for RAD / CoupleFace
ANCHOR_SAMPLE_ROWS = 2048
TINY_N = 64              # rows of the warm-up inputs that initialise everything


@dataclass(frozen=True)
class Case:
    """One measurement: `op` at one shape, one backend, one pass."""
    op: str                 # a LOSS_NAMES entry, TOPK or IDA
    backend: str
    mode: str               # "fwd", "fwd+bwd" or "hvp" (the record's "pass")
    n: int                  # rows of fs / queries; pairs (ida_scores)
    d: int
    m: Optional[int] = None     # bank rows (similarity_topk), support rows (ida_scores)
    k: Optional[int] = None     # neighbours (similarity_topk, RAD, CoupleFace, ida_scores)
    chunk: Optional[int] = None  # chunked / gemm backends; pairs per chunk (ida_scores)
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    subset: Optional[int] = None  # ida_scores: only the first `subset` pairs run

    @property
    def kind(self) -> str:
        return {TOPK: "topk", IDA: "ida"}.get(self.op, "loss")

    @property
    def name(self) -> str:
        if self.kind == "topk":
            return f"{TOPK} N={self.n} M={self.m} D={self.d} k={self.k}"
        if self.kind == "ida":
            return f"{IDA} pairs={self.n} M={self.m} D={self.d} k={self.k}"
        return f"{self.op} N={self.n} D={self.d}"

    def to_json(self) -> dict:
        return asdict(self)

    def tiny(self) -> "Case":
        """The same case on tiny inputs, for warming up."""
        return replace(self, n=min(self.n, TINY_N), m=None if self.m is None else min(self.m, 256),
                       chunk=None if self.chunk is None else min(self.chunk, 128),
                       subset=None if self.subset is None else min(self.subset, TINY_N))


def make_case(op: str, backend: str, mode: str, n: int, d: int, **extra) -> Case:
    """A Case with the op's fixed parameters filled in (k for RAD/CoupleFace)."""
    if op in ("rad", "coupleface"):
        extra.setdefault("k", RAD_K)
    return Case(op=op, backend=backend, mode=mode, n=n, d=d, **extra)


# ----------------------------------------------------------------- inputs
@dataclass
class LossInputs:
    fs: Tensor          # (N, D) student embeddings (requires_grad is set per pass)
    ft: Tensor          # (N, D) teacher embeddings
    y: Tensor           # (N,) identity labels
    s_anchor: Tensor    # (6,) EKD anchors
    t_anchor: Tensor


@dataclass
class TopkInputs:
    a: Tensor           # (N, D) queries
    b: Tensor           # (M, D) bank


@dataclass
class IdaInputs:
    a: Tensor           # (N, D) first faces of the pairs
    b: Tensor           # (N, D) second faces
    support: Tensor     # (M, D) support gallery


def identity_labels(n: int, generator: torch.Generator) -> Tensor:
    """N / 4 identities with 4 images each (the last one smaller), shuffled."""
    y = torch.arange(n) // IMAGES_PER_IDENTITY
    return y[torch.randperm(n, generator=generator)]


def ekd_anchors(fs: Tensor, ft: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """Realistic EKD anchors: the FPR thresholds of the negative-pair
    similarities (what the anchors' EMA converges to), taken on the first
    ANCHOR_SAMPLE_ROWS rows so that it is cheap; the cost of the loss does not
    depend on the anchor values."""
    rows = min(len(fs), ANCHOR_SAMPLE_ROWS)
    zeros = torch.zeros(len(rf.DEFAULT_FPR_LEVELS), dtype=torch.float32, device=fs.device)
    with torch.no_grad():
        _, s_anchor, t_anchor = rf.ekd_loss(fs[:rows], ft[:rows], y[:rows], zeros, zeros,
                                            training=True, momentum=1.0, backend="auto")
    return s_anchor, t_anchor


def build_loss_inputs(n: int, d: int, dtype: str = "float32", device: str = "cpu",
                      seed: int = 0) -> LossInputs:
    """Clustered embeddings (identity centre + noise) and a teacher that sees
    the same identities through different noise, so relations look like face
    embeddings' rather than pure noise."""
    g = torch.Generator().manual_seed(seed)
    y = identity_labels(n, g)
    centres = torch.randn(int(y.max()) + 1, d, generator=g)
    fs = centres[y] + 0.7 * torch.randn(n, d, generator=g)
    ft = centres[y] + 0.5 * torch.randn(n, d, generator=g)
    to = dict(dtype=getattr(torch, dtype), device=device)
    fs, ft, y = fs.to(**to), ft.to(**to), y.to(device)
    s_anchor, t_anchor = ekd_anchors(fs, ft, y)
    return LossInputs(fs, ft, y, s_anchor, t_anchor)


def build_topk_inputs(n: int, m: int, d: int, dtype: str = "float32", device: str = "cpu",
                      seed: int = 0) -> TopkInputs:
    g = torch.Generator().manual_seed(seed)
    to = dict(dtype=getattr(torch, dtype), device=device)
    a = torch.randn(n, d, generator=g).to(**to)
    b = torch.randn(m, d, generator=g).to(**to)
    return TopkInputs(a, b)


def build_ida_inputs(n: int, m: int, d: int, dtype: str = "float32", device: str = "cpu",
                     seed: int = 0) -> IdaInputs:
    g = torch.Generator().manual_seed(seed)
    to = dict(dtype=getattr(torch, dtype), device=device)
    a = torch.randn(n, d, generator=g)
    b = a + torch.randn(n, d, generator=g)
    support = torch.randn(m, d, generator=g).to(**to)
    return IdaInputs(a.to(**to), b.to(**to), support)


def inputs_key(case: Case) -> tuple:
    """Cases with equal keys share inputs."""
    return (case.kind, case.n, case.m, case.d, case.dtype, case.device, case.seed)


def build_inputs(case: Case):
    if case.kind == "topk":
        return build_topk_inputs(case.n, case.m, case.d, case.dtype, case.device, case.seed)
    if case.kind == "ida":
        return build_ida_inputs(case.n, case.m, case.d, case.dtype, case.device, case.seed)
    return build_loss_inputs(case.n, case.d, case.dtype, case.device, case.seed)


# ----------------------------------------------------------------- losses
@dataclass(frozen=True)
class LossDefinition:
    """How to call one loss: its functional and reference forms and the
    arguments after fs."""
    functional: Callable
    reference: Callable
    args: Callable[[LossInputs], tuple]
    kwargs: Dict
    returns_tuple: bool = False  # EKD returns (loss, s_anchor, t_anchor)


LOSSES: Dict[str, LossDefinition] = {
    "fcd": LossDefinition(rf.fcd_loss, rr.fcd_loss, lambda i: (i.ft,), {}),
    "rad": LossDefinition(rf.rad_loss, rr.rad_loss, lambda i: (i.ft, i.y), {"k": RAD_K}),
    "coupleface": LossDefinition(rf.coupleface_loss, rr.coupleface_loss,
                                 lambda i: (i.ft, i.y), {"k": RAD_K}),
    "ekd": LossDefinition(rf.ekd_loss, rr.ekd_loss,
                          lambda i: (i.ft, i.y, i.s_anchor, i.t_anchor), {}, returns_tuple=True),
    "cckd": LossDefinition(rf.cckd_loss, rr.cckd_loss, lambda i: (i.ft,), {}),
    "sp": LossDefinition(rf.sp_loss, rr.sp_loss, lambda i: (i.ft,), {}),
    "rkd": LossDefinition(rf.rkd_loss, rr.rkd_loss, lambda i: (i.ft,), {"angle_weight": 0.0}),
    "rkd_angle": LossDefinition(rf.rkd_loss, rr.rkd_loss, lambda i: (i.ft,), {}),
}


# The GEMM floor of each loss: the bare products an unfused implementation
# must do, as (left rows, inner dim) of N x inner x N products, in order:
# forward, one N x N x D similarity product per relation matrix (RAD: the
# mining product only, its pairs are O(N k D)); forward+backward of the
# pairwise losses adds the two gradient products G X and G^T X (N x N x D).
# FCD and EC-KD have no relation matrix; SP's fused path (the Gram identity)
# may run below its floor. RKD's angle term adds, per vertex (n of them),
# the Gram matrices of the student's and the teacher's unit differences and,
# backward, the product of the derivatives by the student's.
def gemm_floor_products(op: str, mode: str, d: int, d_teacher: int, n: int = 0) -> List[int]:
    """Inner dimensions of the N x . x N products of `op`'s floor (none
    for a Hessian-vector product: no floor is defined)."""
    if mode == "hvp":
        return []
    forward = {"fcd": [], "rad": [d_teacher], "coupleface": [d_teacher],
               "ekd": [d, d_teacher], "cckd": [d, d_teacher], "sp": [d, d_teacher],
               "rkd": [d, d_teacher], "rkd_angle": [d, d_teacher] * (n + 1)}[op]
    backward = []
    if mode == "fwd+bwd" and op in ("cckd", "sp", "rkd", "rkd_angle"):
        backward = [d, d] + ([d] * n if op == "rkd_angle" else [])
    return forward + backward


def floor_flops(case: Case) -> Optional[int]:
    """Floating-point operations of the GEMM work `case` cannot avoid: the
    floor's N x N products (losses; the teacher has the student's D) or the
    N x M similarity product (similarity_topk); None for ida_scores."""
    if case.kind == "topk":
        return 2 * case.n * case.m * case.d
    if case.kind == "ida":
        return None
    return 2 * case.n * case.n * sum(gemm_floor_products(case.op, case.mode, case.d, case.d,
                                                         case.n))


def gemm_floor_callable(case: Case, inputs: LossInputs, chunk: int = 4096) -> Callable[[], None]:
    """The floor's products, each computed in row chunks into one reused
    output buffer (the same arithmetic as one N x N product, without its
    memory)."""
    n = inputs.fs.shape[0]
    inners = gemm_floor_products(case.op, case.mode, inputs.fs.shape[1], inputs.ft.shape[1], n)
    operands = {inner: torch.randn(n, inner, dtype=inputs.fs.dtype, device=inputs.fs.device)
                for inner in set(inners)}
    buffer = inputs.fs.new_empty(min(chunk, n), n)

    def run() -> None:
        for inner in inners:
            x = operands[inner]
            for start in range(0, n, chunk):
                rows = x[start:start + chunk]
                torch.mm(rows, x.T, out=buffer[:rows.shape[0]])

    return run


def compiled(fn: Callable) -> Callable:
    """fn under torch.compile, specialised to the shapes it first sees; a
    fresh Dynamo cache, so every case compiles (and is timed) on its own."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def loss_callable(op: str, backend: str) -> Callable[[Tensor, LossInputs], Tensor]:
    """(fs, inputs) -> the loss as a 0-dim tensor."""
    definition = LOSSES[op]
    if backend in ("fused", "reference"):
        fn, kwargs = definition.functional, dict(definition.kwargs, backend=backend)
    elif backend == "compiled":
        fn, kwargs = compiled(definition.reference), definition.kwargs
    else:
        raise ValueError(f"backend {backend!r} does not apply to losses")

    def call(fs: Tensor, inputs: LossInputs) -> Tensor:
        out = fn(fs, *definition.args(inputs), **kwargs)
        return out[0] if definition.returns_tuple else out

    return call


# ------------------------------------------------------------ similarity_topk
def chunked_torch_topk(a: Tensor, b: Tensor, k: int, chunk: int) -> Tuple[Tensor, Tensor]:
    """Exact cosine k-NN the PyTorch way: per chunk of b, torch.mm of the
    normalised rows and topk, merged into a running top-k."""
    x = torch_f.normalize(a, dim=1)
    best_values = best_indices = None
    for start in range(0, b.shape[0], chunk):
        c = torch_f.normalize(b[start:start + chunk], dim=1)
        values, indices = torch.mm(x, c.T).topk(min(k, c.shape[0]), dim=1)
        indices += start
        if best_values is not None:
            values = torch.cat([best_values, values], dim=1)
            indices = torch.cat([best_indices, indices], dim=1)
            values, order = values.topk(min(k, values.shape[1]), dim=1)
            indices = indices.gather(1, order)
        best_values, best_indices = values, indices
    return best_values, best_indices


def chunked_matmul_floor(a: Tensor, b: Tensor, chunk: int) -> Callable[[], None]:
    """The bare a @ b.T in chunks of `chunk` rows of b, written into one
    reused output buffer (allocated on the first call, so it counts in peak
    memory but not in the timed repeats)."""
    buffer = []

    def run() -> None:
        if not buffer:
            buffer.append(a.new_empty(a.shape[0], min(chunk, b.shape[0])))
        out = buffer[0]
        for start in range(0, b.shape[0], chunk):
            c = b[start:start + chunk]
            if c.shape[0] == out.shape[1]:
                torch.mm(a, c.T, out=out)
            else:
                torch.mm(a, c.T)

    return run


def faiss_search(a: Tensor, b: Tensor, k: int) -> Callable[[], None]:
    """FAISS's exact inner-product search (IndexFlatIP) of the normalised
    rows, the bank added beforehand (not timed): the search alone. faiss-cpu
    is an optional benchmark baseline, never a relkd dependency."""
    import faiss  # noqa: PLC0415  (optional)

    x = torch_f.normalize(a.float(), dim=1).numpy()
    c = torch_f.normalize(b.float(), dim=1).numpy()
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    faiss.omp_set_num_threads(torch.get_num_threads())
    return lambda: index.search(x, k)


def topk_callable(case: Case, inputs: TopkInputs) -> Callable[[], None]:
    a, b, k = inputs.a, inputs.b, case.k
    if case.backend == "faiss":
        return faiss_search(a, b, k)
    if case.backend in ("fused", "reference"):
        return lambda: relkd.similarity_topk(a, b, k=k, backend=case.backend)
    if case.backend == "compiled":
        fn = compiled(rr.similarity_topk)
        return lambda: fn(a, b, k)
    if case.backend == "chunked":
        return lambda: chunked_torch_topk(a, b, k, case.chunk)
    if case.backend == "gemm":
        return chunked_matmul_floor(a, b, case.chunk)
    raise ValueError(f"unknown similarity_topk backend {case.backend!r}")


# ---------------------------------------------------------------- ida_scores
def ida_callable(case: Case, inputs: IdaInputs) -> Callable[[], None]:
    """Scores of the first `subset` (default all) pairs, `chunk` pairs per
    support-set search: fused, or the reference on each chunk. The scorer is
    built inside the pass, as ida_scores does (the support's norms count)."""
    if case.backend not in ("fused", "reference"):
        raise ValueError(f"unknown ida_scores backend {case.backend!r}")
    pairs = case.subset or case.n
    a, b = inputs.a[:pairs], inputs.b[:pairs]

    def run() -> None:
        relkd.IDAScorer(inputs.support, k=case.k, chunk_size=2 * case.chunk,
                        backend=case.backend).scores(a, b)

    return run


# ------------------------------------------------------------------ one pass
def prepare(case: Case, inputs) -> Callable[[], None]:
    """A zero-argument callable that runs one pass of `case` on `inputs` and
    leaves no state behind (gradients are dropped after backward)."""
    if case.kind in ("topk", "ida"):
        if case.mode != "fwd":
            raise ValueError(f"{case.op} has no backward pass")
        return topk_callable(case, inputs) if case.kind == "topk" else ida_callable(case, inputs)
    if case.backend == "gemm":
        return gemm_floor_callable(case, inputs)
    loss = loss_callable(case.op, case.backend)
    if case.mode == "fwd":
        fs = inputs.fs.detach()
        return lambda: loss(fs, inputs)
    fs = inputs.fs.detach().requires_grad_(True)

    def forward_backward() -> None:
        loss(fs, inputs).backward()
        fs.grad = None

    if case.mode == "fwd+bwd":
        return forward_backward
    direction = torch.randn_like(inputs.fs)

    def hessian_vector() -> None:
        with relkd.double_backward():  # EKD, CCKD, RKD keep their ops' inputs
            value = loss(fs, inputs)
        (grad,) = torch.autograd.grad(value, fs, create_graph=True)
        (grad * direction).sum().backward()
        fs.grad = None

    return hessian_vector


def warm_up_tiny(case: Case) -> None:
    """Run the case once on tiny inputs: imports, thread pools, lazy
    initialisation. Not for "compiled" (it would compile another shape)."""
    if case.backend != "compiled":
        tiny = case.tiny()
        prepare(tiny, build_inputs(tiny))()


# --------------------------------------------------------- peak memory probe
def rss_status_bytes(field: str) -> Optional[int]:
    """VmRSS / VmHWM of this process from /proc/self/status, in bytes."""
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def peak_rss_bytes() -> int:
    """The resident-set high-water mark (ru_maxrss is in KiB on Linux)."""
    hwm = rss_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0,
    /proc/self/clear_refs "5"); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def fix_mmap_threshold() -> bool:
    """Serve every allocation >= 128 KiB by mmap and unmap it on free, by
    fixing glibc's mmap threshold (glibc raises it dynamically otherwise, and
    then keeps freed tensors in the heap). The RSS then follows the live
    tensors, so the peak is reproducible (within ~0.1 MiB instead of ~20 MiB
    run to run) and comparable with CUDA's max_memory_allocated."""
    libc = _libc()
    try:
        return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except AttributeError:  # not glibc
        return False


def release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back to the kernel, so
    memory freed earlier does not hide the next allocations from the RSS."""
    gc.collect()
    libc = _libc()
    try:
        if libc:
            libc.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


def probe_peak_memory(case: Case) -> dict:
    """Peak extra memory of one pass of `case`, in bytes, measured in this
    process (on CPU it must be a fresh child: bench.py runs one per case).

    CPU: fix glibc's mmap threshold, tiny warm-up, build inputs, baseline =
    RSS high-water mark after that (reset to the current RSS where the kernel
    allows), run once, peak extra = high-water mark - baseline. CUDA: max_memory_allocated after
    reset_peak_memory_stats, minus memory_allocated before the run.
    """
    if case.device.startswith("cuda"):
        inputs = build_inputs(case)
        run = prepare(case, inputs)
        run()  # warm-up (and compilation) at full size
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - baseline,
                "memory_method": "cuda max_memory_allocated"}
    fixed_threshold = fix_mmap_threshold()
    warm_up_tiny(case)
    inputs = build_inputs(case)
    run = prepare(case, inputs)
    if case.backend == "compiled":
        run()  # compile at full size; its peak is cleared by the reset below
    release_free_memory()
    resettable = reset_peak_rss()
    baseline = peak_rss_bytes()
    run()
    method = "RSS high-water mark (VmHWM) reset by clear_refs" if resettable else "ru_maxrss"
    if fixed_threshold:
        method += f", glibc mmap threshold fixed at {MMAP_THRESHOLD_BYTES // 1024} KiB"
    result = {"peak_extra_bytes": max(0, peak_rss_bytes() - baseline), "memory_method": method}
    if not resettable and case.backend == "compiled":
        result["memory_error"] = ("RSS high-water mark not resettable: the full-size "
                                  "compilation run hides the measured run's peak")
    return result


def child_probe(case_json: dict, connection) -> None:
    """Entry point of a memory child process: send back probe_peak_memory's
    result or ("error", message)."""
    try:
        connection.send(("ok", probe_peak_memory(Case(**case_json))))
    except BaseException as exc:  # noqa: BLE001 - reported, not raised
        connection.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        connection.close()
