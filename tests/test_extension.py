"""relkd never degrades silently: an extension that is not built or fails to
load is reported (import, `python -m relkd`, the first loss call), and
backend="auto" warns once per loss and reason when it falls back to the
N x N reference."""
import importlib.machinery
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import relkd
from relkd import functional as Fn
from relkd import ops

from helpers import embeddings, requires_extension

PACKAGE = os.path.dirname(relkd.__file__)


def copy_of_package(tmp_path, extension_bytes=None):
    """The relkd sources in tmp_path/relkd, with no compiled extension or
    with a file of the given bytes in its place."""
    target = tmp_path / "relkd"
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    if extension_bytes is not None:
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        (target / f"_C{suffix}").write_bytes(extension_bytes)
    return tmp_path


# An editable install (`pip install -e .`) adds an import hook that maps
# relkd's submodules to the source tree, built extension included: drop it so
# that the copy under test is all there is.
ONLY_THE_COPY = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
"""


def run_python(root, code):
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONWARNINGS="always")
    # -P: do not put the current directory ahead of PYTHONPATH.
    return subprocess.run([sys.executable, "-P", "-c", ONLY_THE_COPY + code],
                          capture_output=True, text=True, env=env, cwd=root, timeout=300)


PROBE = """
import warnings, torch
import relkd
from relkd import ops
print("STATE", ops.EXTENSION_STATE, relkd.__file__)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        relkd.CCKDLoss()(torch.randn(6, 3), torch.randn(6, 3))
print("FALLBACKS", sum(issubclass(w.category, ops.FallbackWarning) for w in caught))
try:
    relkd.CCKDLoss(backend="fused")(torch.randn(6, 3), torch.randn(6, 3))
except RuntimeError as exc:
    print("FUSED", exc)
"""


def test_an_unbuilt_extension_is_reported_plainly(tmp_path):
    root = copy_of_package(tmp_path)
    done = run_python(root, PROBE)
    assert done.returncode == 0, done.stderr
    assert f"STATE not built {root}" in done.stdout
    assert "circular import" not in done.stdout + done.stderr
    assert "FALLBACKS 1" in done.stdout  # once per loss and reason
    assert "is not built; build it with `pip install .`" in done.stdout
    main = run_python(root, "import runpy; runpy.run_module('relkd', run_name='__main__')")
    assert "extension relkd._C: NOT BUILT" in main.stdout, main.stdout + main.stderr


def test_an_extension_that_fails_to_load_is_not_a_silent_fallback(tmp_path):
    root = copy_of_package(tmp_path, extension_bytes=b"not a shared library")
    done = run_python(root, PROBE)
    assert done.returncode == 0, done.stderr
    assert "STATE failed to load" in done.stdout
    assert "ExtensionWarning" in done.stderr and "exists but failed to load" in done.stderr
    assert "FALLBACKS 1" in done.stdout
    assert "FUSED" in done.stdout and "failed to load" in done.stdout
    main = run_python(root, "import runpy; runpy.run_module('relkd', run_name='__main__')")
    assert "extension relkd._C: FAILED TO LOAD" in main.stdout, main.stdout + main.stderr


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(ops, "_WARNED", set())


@requires_extension
def test_fallback_warns_once_naming_the_cost(fresh_warnings, monkeypatch):
    fs, ft = embeddings(10, 4, seed=1), embeddings(10, 4, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relkd.RKDLoss()(fs, ft)  # fused, the angle term too: no warning
    monkeypatch.setattr(ops, "FUSED_DEVICES", ())  # a build without CPU kernels
    with pytest.warns(ops.FallbackWarning,
                      match=r"RKDLoss: .*no fused kernels for cpu.*N x N x N angles"):
        relkd.RKDLoss()(fs, ft)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relkd.RKDLoss()(fs, ft)  # the same loss and reason: no second warning
        relkd.RKDLoss(backend="reference")(fs, ft)  # asked for: no warning


@requires_extension
def test_tensors_on_a_device_without_kernels_warn(fresh_warnings, monkeypatch):
    # A CUDA tensor where only CPU kernels are compiled is decided before any
    # tensor is touched; the meta device stands in for it here.
    monkeypatch.setattr(ops, "FUSED_DEVICES", ("cpu",))
    with pytest.warns(ops.FallbackWarning, match=r"SPLoss: .*no fused kernels for cuda tensors"
                                                  r".*N x N relation matrices"):
        assert not Fn._use_fused("SPLoss", "auto", torch.device("cuda"))
    with pytest.raises(NotImplementedError, match=r"no fused kernels for cuda tensors"):
        Fn._use_fused("SPLoss", "fused", torch.device("cuda"))


@requires_extension
def test_fallback_under_torch_compile_still_warns(fresh_warnings, monkeypatch):
    monkeypatch.setattr(ops, "FUSED_DEVICES", ())  # a build without CPU kernels
    loss_fn = relkd.RKDLoss()
    step = torch.compile(lambda a, b: loss_fn(a, b), fullgraph=True)
    with pytest.warns(ops.FallbackWarning, match="RKDLoss"):
        step(embeddings(10, 4, seed=3), embeddings(10, 4, seed=4))


@requires_extension
def test_an_extension_built_for_another_torch_is_not_used(monkeypatch):
    # Its C++ ABI is that torch's: a major.minor mismatch is a load failure
    # that names both versions and says to rebuild.
    monkeypatch.setattr(torch, "__version__", "9.9.0")
    state, why = ops._load_extension()
    built = ops.build_info()["torch"]
    assert state == "failed to load"
    assert f"built against torch {built}" in why and "9.9.0" in why and "rebuild" in why


@requires_extension
def test_build_info_names_the_tensor_core_staging():
    """A build with CUDA kernels reports their staging as compiled (units
    per step x steps staged: RELKD_MMA_DEPTH x RELKD_MMA_STAGES, setup.py's
    allowed values), the wide kernels' sub-tile / warp tile
    (RELKD_MMA_WIDE: 1, the default, or 0) and the selection's (the wide
    one, or 128 x 128 with RELKD_SELECT_ROWS=128); a CPU-only build
    reports none."""
    info = ops.build_info()
    if "cuda" not in ops.fused_devices():
        assert info["mma_staging"] == info["mma_wide"] == info["mma_select"] == ""
        return
    depth, stages = (int(v) for v in info["mma_staging"].split("x"))
    assert depth in (32, 64, 96, 128) and stages in (2, 3, 4)
    assert info["mma_wide"] in ("64x128/32x32", "64x64/16x32")
    assert info["mma_select"] in (info["mma_wide"], "128x128/32x64")


# Inputs made by numpy, so that relkd's kernel is the process's first
# OpenMP region: the threads it adds are its worker pool.
THREADS_PROBE = """
import os, numpy, torch
torch.set_num_threads({n})
import relkd
x = torch.from_numpy(numpy.random.default_rng(0).standard_normal((3000, 64), numpy.float32))
before = len(os.listdir("/proc/self/task"))
relkd.ops.topk_sim(x, x, 5)
print(len(os.listdir("/proc/self/task")) - before)
print(sorted({{line.split()[-1] for line in open("/proc/self/maps")
              if "libgomp" in line or "libiomp" in line}}))
"""


@requires_extension
def test_kernels_run_on_torchs_openmp_runtime_and_thread_count(tmp_path):
    # One OpenMP runtime per process (torch's), so torch.set_num_threads
    # governs relkd's kernels too: their worker pool grows with it.
    def probe(n):
        done = subprocess.run([sys.executable, "-c", THREADS_PROBE.format(n=n)],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
        new_threads, runtimes = done.stdout.strip().splitlines()
        return int(new_threads), eval(runtimes)

    few, runtimes = probe(2)
    many, _ = probe(5)
    assert len(runtimes) == 1 and os.path.dirname(torch.__file__) in runtimes[0], runtimes
    assert many - few == 3, (few, many)
