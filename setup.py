"""Build of relkd._C, the C++ extension holding every fused relkd kernel.

    pip install .                           (against the torch already installed;
                                             build_backend/relkd_build.py says how)
    pip install --no-build-isolation .      (the same, with this environment's setuptools)

The wheel requires torch==X.Y.* of the torch it was built against: the
extension's C++ ABI is that torch's.

CPU kernels (csrc/cpu) are always compiled. CUDA kernels (csrc/cuda) are
compiled too when a CUDA toolkit is found (CUDA_HOME / CUDA_PATH, nvcc on the
PATH, or /usr/local/cuda), also on a machine without a GPU and against a
CPU-only torch: the .cu units are torch-free, nvcc compiles them here, and a
glue (csrc/cuda/ops.cpp) built against torch's headers registers them.
Environment:
  RELKD_CUDA=0            no CUDA kernels
  RELKD_FORCE_CUDA=1      fail if no CUDA toolkit is found
  TORCH_CUDA_ARCH_LIST    GPU architectures, default "8.0;9.0+PTX" (A100, H100/H200,
                          and PTX that newer GPUs compile at load)
  RELKD_CUDART            static | shared: the CUDA runtime the kernels use. Default:
                          shared (torch's own) with a CUDA torch, static with a CPU torch
                          (so that the module imports where no CUDA runtime is installed)
  MAX_JOBS                parallel compile jobs (nvcc units and, with ninja, C++ units)
  RELKD_NATIVE=1          -march=native;  RELKD_SANITIZE=1  ASan + UBSan (make sanitize)
  RELKD_PTXAS_VERBOSE=1   print ptxas' register / spill report of every kernel
  RELKD_MMA_DEPTH, RELKD_MMA_STAGES
                          the tensor-core staging (units per step: 32, 64, 96, 128;
                          steps staged at once: 2-4; default 64 and 2), for tuning
"""
import glob
import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit("relkd: building the extension needs PyTorch, which this Python cannot import; "
             "install it first (pip install torch), then run pip install . again")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def sources(pattern):
    return sorted(glob.glob(pattern, root_dir=HERE))


# ------------------------------------------------------------------- CUDA
def cuda_home():
    """A CUDA toolkit directory (with bin/nvcc and the runtime), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and cuda_lib_dir(home):
            return home
    return None


def cuda_lib_dir(home):
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        path = os.path.join(home, sub)
        if os.path.exists(os.path.join(path, "libcudart_static.a")):
            return path
    return None


def cuda_enabled():
    if os.environ.get("RELKD_CUDA", "1") == "0":
        return None
    home = cuda_home()
    if home is None and os.environ.get("RELKD_FORCE_CUDA", "0") == "1":
        sys.exit("relkd: RELKD_FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME to "
                 "the toolkit directory (the one holding bin/nvcc)")
    return home


def gencode_flags(archs):
    """nvcc -gencode flags of a TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", spaces also separate)."""
    flags = []
    for arch in archs.replace(" ", ";").split(";"):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        number = arch.replace("+PTX", "").replace(".", "")
        flags += ["-gencode", f"arch=compute_{number},code=sm_{number}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{number},code=compute_{number}"]
    return flags


def nvcc_flags():
    flags = ["-std=c++17", "-O3", "-lineinfo", "-Xcompiler", "-fPIC",
             "-I", os.path.join(HERE, "csrc")]
    flags += gencode_flags(arch_list())
    flags += mma_staging_flags()
    if os.environ.get("RELKD_PTXAS_VERBOSE", "0") == "1":
        flags += ["-Xptxas", "-v"]
    return flags


def mma_staging_flags():
    """-D flags of the tensor-core kernels' tuning constants
    (csrc/cuda/pair_tile_mma.cuh), from RELKD_MMA_DEPTH (16-bit units per
    step: 32, 64, 96 or 128), RELKD_MMA_STAGES (steps staged at once, 2 to
    4), RELKD_MMA_WIDE (1: 64 x 128 sub-tiles with 32 x 32 warps for the
    top-k, the selection and the rows pass; 0: 64 x 64 with 16 x 32) and
    RELKD_SELECT_ROWS (128: the selection's sub-tiles 128 x 128 with 32 x 64
    warps; 64: as RELKD_MMA_WIDE says); unset: the header's defaults."""
    flags = []
    for name, allowed in (("RELKD_MMA_DEPTH", (32, 64, 96, 128)), ("RELKD_MMA_STAGES", (2, 3, 4)),
                          ("RELKD_MMA_WIDE", (0, 1)), ("RELKD_SELECT_ROWS", (64, 128))):
        value = os.environ.get(name)
        if not value:
            continue
        if not value.isdigit() or int(value) not in allowed:
            sys.exit(f"setup.py: {name} must be one of {allowed}, got {value!r}")
        flags.append(f"-D{name}={int(value)}")
    return flags


def arch_list():
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS


def arch_tag():
    """The arch list as one shell- and macro-safe word (python -m relkd shows it): 8.0/9.0+PTX."""
    return "/".join(a for a in arch_list().replace(" ", ";").split(";") if a)


def cudart_kind():
    kind = os.environ.get("RELKD_CUDART", "shared" if torch.version.cuda else "static")
    if kind not in ("static", "shared"):
        sys.exit(f"relkd: RELKD_CUDART must be static or shared, got {kind!r}")
    return kind


def cudart_link_flags(home):
    lib = cuda_lib_dir(home)
    if cudart_kind() == "shared":
        return [f"-L{lib}", "-lcudart"]
    return [f"-L{lib}", "-lcudart_static", "-lrt", "-ldl", "-lpthread"]


class BuildExt(BuildExtension):
    """BuildExtension that first compiles an extension's .cu units with nvcc
    (in parallel; a unit is recompiled only when it, a header or the flags
    changed) and links their objects in."""

    def build_extensions(self):
        for ext in self.extensions:
            units = getattr(ext, "relkd_cuda_units", None)
            if units:
                ext.extra_objects = list(ext.extra_objects) + self.compile_cuda(units, ext)
        super().build_extensions()

    def compile_cuda(self, units, ext):
        nvcc = os.path.join(ext.relkd_cuda_home, "bin", "nvcc")
        flags = nvcc_flags()
        # A directory that outlives pip's temporary build trees, so that an
        # unchanged unit is not recompiled by the next build.
        out_dir = os.path.join(HERE, "build", "relkd_cuda")
        os.makedirs(out_dir, exist_ok=True)
        headers = sources("csrc/*.h") + sources("csrc/cuda/*.h") + sources("csrc/cuda/*.cuh")
        newest_header = max(os.path.getmtime(os.path.join(HERE, h)) for h in headers)
        stamp = hashlib.sha1(" ".join([nvcc] + flags).encode()).hexdigest()[:12]

        def compile_unit(unit):
            src = os.path.join(HERE, unit)
            obj = os.path.join(out_dir, f"{os.path.basename(unit)}.{stamp}.o")
            if (os.path.exists(obj)
                    and os.path.getmtime(obj) > max(os.path.getmtime(src), newest_header)):
                return obj
            print(f"nvcc {unit}", flush=True)
            done = subprocess.run([nvcc, "-c", src, "-o", obj] + flags, capture_output=True,
                                  text=True)
            if done.stdout or done.stderr:
                print(done.stdout + done.stderr, flush=True)
            if done.returncode != 0:
                raise RuntimeError(f"nvcc failed on {unit} (exit code {done.returncode})")
            return obj

        jobs = max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
        with ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(compile_unit, units))


# -------------------------------------------------------------- extension
def extension():
    # -fopenmp compiles ATen's at::parallel_for (an inline template) into
    # OpenMP regions; they run on the libgomp torch ships and loads first.
    cxx_flags = ["-O3", "-fopenmp", "-DRELKD_PYTHON_MODULE"]
    link_flags = ["-fopenmp"]
    if os.environ.get("RELKD_NATIVE", "0") == "1":
        cxx_flags.append("-march=native")
    if os.environ.get("RELKD_SANITIZE", "0") == "1":  # `make sanitize`
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    "-fno-omit-frame-pointer", "-g"]
        cxx_flags = [f for f in cxx_flags if f != "-O3"] + ["-O1"] + sanitize
        link_flags += sanitize
    cxx_flags.append(f"-DRELKD_TORCH_VERSION={torch_major_minor()}")
    cpp = ["csrc/ops.cpp"] + sources("csrc/cpu/*.cpp")
    home = cuda_enabled()
    if home:
        cpp += sources("csrc/cuda/*.cpp")
        link_flags += cudart_link_flags(home)
        cxx_flags += [f"-DRELKD_CUDA_ARCHS={arch_tag()}", f"-DRELKD_CUDART={cudart_kind()}"]
    ext = CppExtension("relkd._C", cpp, extra_compile_args={"cxx": cxx_flags},
                       extra_link_args=link_flags)
    ext.relkd_cuda_home = home
    ext.relkd_cuda_units = sources("csrc/cuda/*.cu") if home else []
    return ext


def torch_major_minor():
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


setup(
    packages=["relkd", "relkd.demo"],
    install_requires=[f"torch=={torch_major_minor()}.*"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt.with_options(no_python_abi_suffix=False)},
)
