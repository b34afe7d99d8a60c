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
    cxx_flags = ["-O3", "-fopenmp", "-DRELKD_PYTHON_MODULE"]
    if os.environ.get("RELKD_NATIVE", "0") == "1":
        cxx_flags.append("-march=native")
    return CppExtension(
        "relkd._C",
        sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=["relkd", "relkd.demo"],
    ext_modules=[cpu_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
