"""Build of relkd._C, the C++ extension holding every fused relkd kernel.

Build against the torch that is already installed:
    pip install --no-build-isolation .
CPU sources are always compiled (OpenMP). There are no CUDA sources yet;
see README, "Status".
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_extension():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=HERE))
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
    return CppExtension(
        "relkd._C",
        sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


setup(
    packages=["relkd"],
    ext_modules=[cpu_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
