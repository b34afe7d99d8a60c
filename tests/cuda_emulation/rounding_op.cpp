// A test-only operator of the emulated build (tests/test_cuda_emulated.py):
// csrc/cuda/mma.cuh's rounding of float32 pairs to the tensor cores' 16-bit
// operand formats, as the emulated kernels stage them, for comparison with
// torch's own float16 / bfloat16 conversions. (On the GPU one cvt
// instruction rounds instead; tests/test_cuda.py checks its results.)
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/mma.cuh"

namespace {

// x: float32 with an even number of entries; returns the packed register of
// each pair (x[2i] in the lower half), as int64.
at::Tensor pack_operand_pairs(const at::Tensor& x, bool fp16) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.numel() % 2 == 0,
                    "x must be float32 with an even number of entries");
  const at::Tensor flat = x.contiguous().view(-1);
  at::Tensor out = at::empty({flat.numel() / 2}, flat.options().dtype(at::kLong));
  const float* v = flat.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  using relkd::cuda::MmaOperands;
  for (int64_t i = 0; i < out.numel(); ++i)
    o[i] = fp16 ? relkd::cuda::pack_pair<MmaOperands::Fp16>(v[2 * i], v[2 * i + 1])
                : relkd::cuda::pack_pair<MmaOperands::Bf16>(v[2 * i], v[2 * i + 1]);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(relkd_emulated, m) {
  m.def("pack_operand_pairs(Tensor x, bool fp16) -> Tensor");
  m.impl("pack_operand_pairs", c10::DispatchKey::CPU, TORCH_FN(pack_operand_pairs));
}
