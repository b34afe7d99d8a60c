// A test-only operator of the emulated build (tests/test_cuda_emulated.py):
// the tensor-core kernels' staging loads (csrc/cuda/pair_tile_mma.cuh's
// load_piece_at), which read float32 rows 16 bytes or one entry at a time
// and round them to the operand format, run on the host as the emulated
// kernels run them, for comparison with torch's own conversions. (On the
// GPU cvt instructions round instead; tests/test_cuda.py checks results.)
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/pair_tile_mma.cuh"

namespace {

using relkd::cuda::MmaOperands;

template <MmaOperands H>
at::Tensor pieces_of(const at::Tensor& x, bool vector) {
  const int64_t n = x.size(0), d = x.size(1), per_piece = relkd::cuda::kPieceEntries<H>;
  const int64_t pieces = (d + per_piece - 1) / per_piece;
  at::Tensor out = at::empty({n, pieces, 4}, x.options().dtype(at::kLong));
  const float* v = x.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  vector = vector && relkd::cuda::vector_rows(v, d);
  for (int64_t p = 0; p < n; ++p)
    for (int64_t i = 0; i < pieces; ++i) {
      const auto piece = relkd::cuda::load_piece_at<H>(v, n, d, p, i * per_piece, vector);
      for (int w = 0; w < 4; ++w) o[(p * pieces + i) * 4 + w] = piece.bits[w];
    }
  return out;
}

// x: 2-D float32; format: 0 bf16, 1 fp16, 2 TF32 (MmaOperands); vector:
// take the 16-byte loads where the rows allow them. Returns the 4 words of
// each 16-byte piece of each row (pieces x 4 per row, as int64), entries
// past the row's end 0.
at::Tensor stage_pieces(const at::Tensor& x_in, int64_t format, bool vector) {
  TORCH_CHECK_VALUE(x_in.scalar_type() == at::kFloat && x_in.dim() == 2,
                    "x must be a 2-D float32 tensor");
  const at::Tensor x = x_in.contiguous();
  switch (static_cast<MmaOperands>(format)) {
    case MmaOperands::Bf16: return pieces_of<MmaOperands::Bf16>(x, vector);
    case MmaOperands::Fp16: return pieces_of<MmaOperands::Fp16>(x, vector);
    case MmaOperands::Tf32: return pieces_of<MmaOperands::Tf32>(x, vector);
  }
  TORCH_CHECK_VALUE(false, "format must be 0, 1 or 2, got ", format);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(relkd_emulated, m) {
  m.def("stage_pieces(Tensor x, int format, bool vector) -> Tensor");
  m.impl("stage_pieces", c10::DispatchKey::CPU, TORCH_FN(stage_pieces));
}
