// The relkd operator library: its schemas (csrc/schemas.h, one place) and
// what every device shares. Kernels register their implementations per
// device in csrc/cpu/*.cpp and csrc/cuda/ops.cpp; fake (meta) kernels and
// autograd formulas live in relkd/ops.py.
#include <torch/library.h>

#include <string>

#include "schemas.h"
#ifdef RELKD_CUDA_ARCHS
#include "cuda/launchers.h"
#endif

#ifdef RELKD_PYTHON_MODULE
#include <Python.h>

// `import relkd._C` loads this library, which runs the registrations below.
// The module itself is empty: every entry point is torch.ops.relkd.*.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

// What this build holds, for `python -m relkd` and relkd.ops' load check:
// the torch (major.minor) it was compiled against, the CUDA architectures
// its kernels were compiled for (none in a CPU build), the CUDA runtime
// they use (setup.py defines those) and the tensor-core kernels' staging
// (depth x stages, as the kernels were compiled).
#define RELKD_STRINGIFY(x) #x
#define RELKD_TO_STRING(x) RELKD_STRINGIFY(x)
#ifndef RELKD_TORCH_VERSION
#define RELKD_TORCH_VERSION unknown
#endif
#ifdef RELKD_CUDA_ARCHS
static std::string build_info() {
  const relkd::cuda::MmaTiling tiling = relkd::cuda::mma_tiling();
  return "torch=" RELKD_TO_STRING(RELKD_TORCH_VERSION) " cuda_archs=" RELKD_TO_STRING(
             RELKD_CUDA_ARCHS) " cudart=" RELKD_TO_STRING(RELKD_CUDART) " mma_staging=" +
         std::to_string(tiling.depth) + "x" + std::to_string(tiling.stages) +
         " mma_wide=64x" + std::to_string(tiling.wide_cols) + "/" +
         std::to_string(tiling.warp_rows) + "x" + std::to_string(tiling.warp_cols) +
         " mma_select=" + std::to_string(tiling.select_rows) + "x" +
         std::to_string(tiling.select_cols) + "/" + std::to_string(tiling.select_warp_rows) +
         "x" + std::to_string(tiling.select_warp_cols);
}
#else
static std::string build_info() {
  return "torch=" RELKD_TO_STRING(RELKD_TORCH_VERSION)
      " cuda_archs= cudart= mma_staging= mma_wide= mma_select=";
}
#endif

TORCH_LIBRARY(relkd, m) {
  m.def("build_info() -> str", &build_info);
  relkd::define_operators(m);
}

// Mining and selection are discrete, so they have no gradient: a fallthrough
// autograd kernel makes their outputs plain tensors that never require grad,
// on every device (torch's advice for non-differentiable operators).
TORCH_LIBRARY_IMPL(relkd, Autograd, m) {
  m.impl("topk_sim", torch::CppFunction::makeFallthrough());
  m.impl("topk_sim_symmetric", torch::CppFunction::makeFallthrough());
  m.impl("pair_histogram", torch::CppFunction::makeFallthrough());
  m.impl("pair_topk", torch::CppFunction::makeFallthrough());
  m.impl("pair_histogram_topk", torch::CppFunction::makeFallthrough());
}
