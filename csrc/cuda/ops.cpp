// CUDA implementations of relkd's operators: the glue between torch and the
// torch-free kernels of csrc/cuda/*.cu.
//
// Built against torch's headers, which may be a CPU-only torch (CI): it uses
// only device-generic c10 APIs to set the device (c10::DeviceGuard) and get
// the current stream (the CUDA DeviceGuardImpl's getStream().native_handle()),
// and ATen calls that dispatch at run time (at::mm for the tile GEMMs, which
// reaches cuBLAS and follows torch.get_float32_matmul_precision; at::empty,
// which takes memory from torch's caching allocator). The kernels receive raw
// device pointers, sizes and the stream.
//
// Every op works tile by tile, so extra memory is O(N (D + k)) plus a tile
// budget (kTileBytes) whatever N is; tiles run in a fixed order on one
// stream, and no kernel adds floats with atomics, so results are bitwise
// reproducible.
#include <ATen/Context.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../op_checks.h"
#include "../schemas.h"
#include "../tile_plan.h"
#include "launchers.h"

namespace relkd {
namespace {

constexpr int64_t kTileBytes = int64_t(256) << 20;  // budget of every op's tile buffers
constexpr int64_t kTopkColumns = 8192;              // bank columns per top-k tile

cuda::Stream current_stream(const at::Tensor& t) {
#ifdef RELKD_EMULATE
  (void)t;
  return nullptr;  // the emulated kernels run synchronously on the host
#else
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return impl->getStream(t.device()).native_handle();
#endif
}

void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "relkd CUDA kernel ", what, " failed: ", cuda::error_string(code));
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Which tensor-core kernels float32 topk_sim and pairwise_loss run, if any
// (sm_80+): their operand format (launchers.h), or none for the tile path.
// RELKD_TENSOR_CORES: unset or 0 = never (the default until a GPU run has
// validated them, README GPU); 1 = always, bf16 for float32 embeddings;
// auto = for 16-bit embeddings (`half`: their own format, in which the
// products are exact) and for float32 ones as
// torch.get_float32_matmul_precision() allows: "medium" bf16, "high" TF32,
// "highest" 3xTF32 (float32's accuracy).
c10::optional<cuda::MmaOperands> tensor_core_operands(const at::Tensor& x,
                                                      c10::optional<at::ScalarType> half) {
  const char* flag = std::getenv("RELKD_TENSOR_CORES");
  const std::string mode = flag ? flag : "0";
  TORCH_CHECK_VALUE(mode == "0" || mode == "1" || mode == "auto",
                    "the environment variable RELKD_TENSOR_CORES must be 0, 1 or auto, got '",
                    mode, "'");
  if (mode == "0" || !cuda::has_tensor_cores(x.device().index())) return c10::nullopt;
  if (half) return *half == at::kHalf ? cuda::MmaOperands::Fp16 : cuda::MmaOperands::Bf16;
  if (mode == "1") return cuda::MmaOperands::Bf16;
  switch (at::globalContext().float32MatmulPrecision()) {
    case at::Float32MatmulPrecision::MEDIUM: return cuda::MmaOperands::Bf16;
    case at::Float32MatmulPrecision::HIGH: return cuda::MmaOperands::Tf32;
    default: return cuda::MmaOperands::Tf32x3;
  }
}

bool is_half(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// 16-bit operands (the fused losses pass them on CUDA when their inputs
// were bfloat16 / float16) run as float32 copies, which hold the same
// values: the tensor-core kernels round them back exactly and their
// products are exact, the float32 tile path's too. Returns t itself when
// it is not 16-bit.
at::Tensor float_copy(const at::Tensor& t) {
  return is_half(t.scalar_type()) ? t.to(at::kFloat) : t;
}

c10::optional<at::Tensor> float_copy(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return t;
  return float_copy(*t);
}

// The embeddings' 16-bit format (bfloat16 or float16) when they have one:
// all of them the same, or (a ValueError) none 16-bit.
c10::optional<at::ScalarType> half_operands(
    std::initializer_list<std::pair<const char*, const at::Tensor*>> operands) {
  auto given = [](const at::Tensor* t) { return t && t->defined(); };
  c10::optional<at::ScalarType> half;
  for (const auto& [name, t] : operands)
    if (!half && given(t) && is_half(t->scalar_type())) half = t->scalar_type();
  if (!half) return half;
  for (const auto& [name, t] : operands)
    TORCH_CHECK_VALUE(!given(t) || t->scalar_type() == *half, name, " must be ",
                      *half == at::kHalf ? "float16" : "bfloat16",
                      " like the other embeddings, got ", t->scalar_type());
  return half;
}

// x's rows as the tensor cores see them with `operands`: rounded to
// bfloat16, float16 or TF32 (as cvt.rna.tf32.f32: the float32 bits plus half
// a TF32 ulp, the 13 low fraction bits cleared; never carries into the
// sign, infinities and NaN kept), or as they are (3xTF32).
at::Tensor operand_values(const at::Tensor& x, cuda::MmaOperands operands) {
  switch (operands) {
    case cuda::MmaOperands::Bf16: return x.to(at::kBFloat16);
    case cuda::MmaOperands::Fp16: return x.to(at::kHalf);
    case cuda::MmaOperands::Tf32x3: return x;
    case cuda::MmaOperands::Tf32: break;
  }
  const at::Tensor rounded = at::bitwise_and(x.view(at::kInt) + 0x1000, -0x2000).view(at::kFloat);
  return at::where(x.isfinite(), rounded, x);
}

// x as the tensor-core kernels read it (launchers.h, MmaOperands), contiguous:
// a bfloat16 / float16 tensor for the 16-bit formats (x itself when it is
// one; a float32 x rounded once, to nearest even, as cvt.rn would round it
// in the kernel), float32 for TF32 and 3xTF32 (rounded in the kernel).
at::Tensor operand_storage(const at::Tensor& x, cuda::MmaOperands operands) {
  if (!x.defined()) return x;
  switch (operands) {
    case cuda::MmaOperands::Bf16: return x.to(at::kBFloat16).contiguous();
    case cuda::MmaOperands::Fp16: return x.to(at::kHalf).contiguous();
    case cuda::MmaOperands::Tf32:
    case cuda::MmaOperands::Tf32x3: break;
  }
  return x.to(at::kFloat).contiguous();
}

// Rows and columns as the kernels read them: columns that alias the rows
// stay aliased (one conversion, not two).
std::pair<at::Tensor, at::Tensor> operand_storage(const at::Tensor& rows, const at::Tensor& cols,
                                                  cuda::MmaOperands operands) {
  at::Tensor stored_rows = operand_storage(rows, operands);
  return {stored_rows, cols.is_same(rows) ? stored_rows : operand_storage(cols, operands)};
}

// A stand-in for the argument checks of a 16-bit t, whose values are float32
// (SPEC: half inputs): t's shape and device, float32, no copy (one element,
// expanded).
at::Tensor checked_as_float(const at::Tensor& t) {
  if (!is_half(t.scalar_type())) return t;
  return at::empty({}, t.options().dtype(at::kFloat)).expand(t.sizes());
}

const at::Tensor* present(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

// The largest power-of-two block of rows = columns such that `buffers`
// square tiles of it fit the tile budget.
int64_t square_block(int64_t buffers, int64_t elem_bytes) {
  int64_t b = 8192;
  while (b > 256 && buffers * b * b * elem_bytes > kTileBytes) b /= 2;
  return b;
}

// Block ranges (csrc/tile_plan.h) of device ids / labels, read back to plan
// which tiles to compute.
std::vector<BlockRange> device_block_ranges(int64_t n, int64_t block, const at::Tensor& ids,
                                            const at::Tensor& labels,
                                            const at::TensorOptions& opts) {
  if (n == 0) return {};
  const int64_t blocks = ceil_div(n, block), pad = blocks * block - n;
  const at::Tensor id = ids.defined() ? ids : at::arange(n, opts.dtype(at::kLong));
  auto reduce = [&](const at::Tensor& v, int64_t fill, bool max) {
    auto padded = at::constant_pad_nd(v, {0, pad}, at::Scalar(fill)).view({blocks, block});
    return (max ? padded.amax(1) : padded.amin(1)).cpu();
  };
  const auto id_min = reduce(id, INT64_MAX, false), id_max = reduce(id, INT64_MIN, true);
  at::Tensor lab_min, lab_max;
  if (labels.defined()) {
    lab_min = reduce(labels, INT64_MAX, false);
    lab_max = reduce(labels, INT64_MIN, true);
  }
  std::vector<BlockRange> out(blocks);
  for (int64_t b = 0; b < blocks; ++b)
    out[b] = {id_min[b].item<int64_t>(), id_max[b].item<int64_t>(),
              labels.defined() ? lab_min[b].item<int64_t>() : INT64_MAX,
              labels.defined() ? lab_max[b].item<int64_t>() : INT64_MIN};
  return out;
}

// The tile of rows r0.. x columns c0.. of a b^T into a contiguous buffer.
at::Tensor tile_product(at::Tensor& buffer, const at::Tensor& a, const at::Tensor& b,
                        const Tile& t) {
  auto out = buffer.narrow(0, 0, t.rows * t.cols).view({t.rows, t.cols});
  at::mm_out(out, a.narrow(0, t.r0, t.rows), b.narrow(0, t.c0, t.cols).t());
  return out;
}

// ------------------------------------------------------------- topk_sim
// Rows of a selection (values, indices; rows x k) into its order: value
// descending with NaN below every number, ties to the smaller index, the
// padding (-1) last. Stable sorts, the least significant key first.
void sort_selection_rows(at::Tensor& values, at::Tensor& indices) {
  at::Tensor order = at::argsort(indices, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  auto then_by = [&](const at::Tensor& key, bool descending) {
    const at::Tensor inner = at::argsort(key.gather(1, order), /*stable=*/true, 1, descending);
    order = order.gather(1, inner);
  };
  const at::Tensor nan = values.isnan();
  then_by(values.masked_fill(nan, -std::numeric_limits<double>::infinity()), true);
  then_by(nan.to(at::kInt), false);
  then_by(indices.lt(0).to(at::kInt), false);
  values.copy_(values.gather(1, order));
  indices.copy_(indices.gather(1, order));
}

template <typename T>
void topk_sim_impl(const at::Tensor& q, const at::Tensor& c, int64_t k, const at::Tensor& q_labels,
                   const at::Tensor& c_labels, const at::Tensor& c_scale, bool exclude_self,
                   int64_t self_offset, c10::optional<cuda::MmaOperands> operands,
                   at::Tensor& values, at::Tensor& indices) {
  const int64_t n = q.size(0), m = c.size(0), k_buf = std::min(k, m);
  const auto stream = current_stream(q);
  const int64_t cols = std::min(m, kTopkColumns);
  const int64_t cap = k_buf + std::max(k_buf, cuda::kTopkChunk);
  const int64_t slot_bytes = cap * int64_t(sizeof(T) + 4) + 32;  // one row's selection
  const bool tensor_cores = operands.has_value();
  // The tensor-core kernel computes its own tiles and keeps one selection
  // per (row, column range); the tile path keeps one per row beside a tile.
  // Row blocks as large as the budget allows with one range, of equal size
  // (the last one not a sliver), then as many ranges as those rows want
  // (topk_mma_splits) and the budget holds.
  const int64_t row_bytes = tensor_cores ? slot_bytes : cols * int64_t(sizeof(T)) + slot_bytes;
  int64_t block_rows = std::max<int64_t>(1, std::min(n, kTileBytes / row_bytes));
  block_rows = ceil_div(n, ceil_div(n, block_rows));
  const int splits =
      !tensor_cores ? 1
                    : cuda::topk_mma_splits(q.device().index(), block_rows, m, q.size(1),
                                            *operands, kTileBytes / (block_rows * slot_bytes));
  const cuda::TopkValidity valid{ptr<int64_t>(q_labels), ptr<int64_t>(c_labels), exclude_self,
                                 self_offset};
  auto opts = values.options();
  at::Tensor tile = tensor_cores ? at::Tensor() : at::empty({block_rows * cols}, opts);
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - r0), slots = rows * splits;
    auto buf_v = at::empty({slots, cap}, opts);
    auto buf_c = at::empty({slots, cap}, opts.dtype(at::kInt));
    auto size = at::zeros({slots}, opts.dtype(at::kInt)), has_bar = at::zeros_like(size);
    auto bar_lo = at::zeros_like(size);
    auto bar_hi = at::zeros({slots}, opts.dtype(at::kLong));
    cuda::TopkState<T> st{ptr<T>(buf_v), ptr<int32_t>(buf_c), ptr<int32_t>(size),
                          reinterpret_cast<uint64_t*>(ptr<int64_t>(bar_hi)),
                          reinterpret_cast<uint32_t*>(ptr<int32_t>(bar_lo)),
                          ptr<int32_t>(has_bar), cap, k_buf};
    const auto merged = splits > 1 ? at::empty({rows}, opts.dtype(at::kInt)) : at::Tensor();
    if constexpr (std::is_same_v<T, float>) {
      if (tensor_cores) {  // every column of the row block in one launch
        check_launch(cuda::topk_offer_mma(q.data_ptr(), c.data_ptr(), q.size(1),
                                          {r0, rows, 0, m, 0}, r0, splits, ptr<float>(c_scale),
                                          valid, st, ptr<int32_t>(merged), *operands, stream),
                     "topk_sim (tensor cores)");
        if (splits > 1) {  // finish the joined selections, one per row
          st.size = ptr<int32_t>(merged);
          st.cap = splits * cap;
        }
      }
    }
    for (int64_t c0 = 0; c0 < m && !tensor_cores; c0 += cols) {
      const Tile t{r0, rows, c0, std::min(cols, m - c0), 0, 0};
      const auto sims = tile_product(tile, q, c, t);
      check_launch(cuda::topk_offer_tile(ptr<T>(sims), {t.r0, t.rows, t.c0, t.cols, t.cols}, r0,
                                         ptr<T>(c_scale), valid, st, stream),
                   "topk_sim (offer)");
    }
    check_launch(cuda::topk_finish(st, rows, k, ptr<T>(values) + r0 * k,
                                   ptr<int64_t>(indices) + r0 * k, stream),
                 "topk_sim (finish)");
    if (k > cuda::kFinishRankMost) {  // this block's rows: temporaries bounded as the rest
      at::Tensor v = values.narrow(0, r0, rows), i = indices.narrow(0, r0, rows);
      sort_selection_rows(v, i);
    }
  }
}

// q and c as they came in: float32, float64, or both bfloat16 / float16
// (`half`), whose values are float32 as for every half input. The
// tensor-core kernel reads 16-bit ones as they are (a bank of millions of
// rows is never copied); the tile path multiplies float32 copies.
std::tuple<at::Tensor, at::Tensor> topk_sim_run(const at::Tensor& q, const at::Tensor& c, int64_t k,
                                                const c10::optional<at::Tensor>& q_labels,
                                                const c10::optional<at::Tensor>& c_labels,
                                                const c10::optional<at::Tensor>& c_scale,
                                                bool exclude_self, int64_t self_offset,
                                                c10::optional<at::ScalarType> half) {
  check_topk_sim_args(checked_as_float(q), checked_as_float(c), k, q_labels, c_labels, c_scale);
  TORCH_CHECK_VALUE(c.size(0) < std::numeric_limits<int32_t>::max(),
                    "c must have fewer than 2^31 rows on CUDA, got ", c.size(0));
  c10::DeviceGuard guard(q.device());
  const int64_t n = q.size(0), m = c.size(0);
  const auto value_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto values = at::empty({n, k}, q.options().dtype(value_type));
  auto indices = at::empty({n, k}, q.options().dtype(at::kLong));
  if (n == 0) return {values, indices};
  if (m == 0) {
    values.fill_(-std::numeric_limits<double>::infinity());
    indices.fill_(-1);
    return {values, indices};
  }
  const auto ql = contiguous_or_empty(q_labels), cl = contiguous_or_empty(c_labels);
  const auto sc = contiguous_or_empty(c_scale);
  if (value_type == at::kFloat) {
    const auto operands = tensor_core_operands(q, half);
    if (operands && cuda::topk_mma_fits(q.device().index(), q.size(1), *operands)) {
      topk_sim_impl<float>(operand_storage(q, *operands), operand_storage(c, *operands), k, ql,
                           cl, sc, exclude_self, self_offset, operands, values, indices);
      return {values, indices};
    }
  }
  const auto qc = float_copy(q).contiguous(), cc = float_copy(c).contiguous();
  AT_DISPATCH_FLOATING_TYPES(value_type, "topk_sim_cuda", [&] {
    topk_sim_impl<scalar_t>(qc, cc, k, ql, cl, sc, exclude_self, self_offset, c10::nullopt,
                            values, indices);
  });
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> topk_sim_cuda(const at::Tensor& q, const at::Tensor& c, int64_t k,
                                                 const c10::optional<at::Tensor>& q_labels,
                                                 const c10::optional<at::Tensor>& c_labels,
                                                 const c10::optional<at::Tensor>& c_scale,
                                                 bool exclude_self, int64_t self_offset) {
  BelowAutograd below_autograd;
  const auto half = half_operands({{"q", &q}, {"c", &c}});
  return topk_sim_run(q, c, k, q_labels, c_labels, c_scale, exclude_self, self_offset, half);
}

// ------------------------------------------------------------- pair_dot
at::Tensor pair_dot_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& idx_in) {
  BelowAutograd below_autograd;
  check_pair_dot_args(a_in, b_in, idx_in);
  c10::DeviceGuard guard(a_in.device());
  const auto a = a_in.contiguous(), b = b_in.contiguous(), idx = idx_in.contiguous();
  auto out = at::empty(idx.sizes(), a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "pair_dot_cuda", [&] {
    check_launch(cuda::pair_dot_forward(ptr<scalar_t>(a), ptr<scalar_t>(b), ptr<int64_t>(idx),
                                        a.size(0), idx.size(1), a.size(1), ptr<scalar_t>(out),
                                        current_stream(a)),
                 "pair_dot");
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pair_dot_backward_cuda(const at::Tensor& grad_in,
                                                          const at::Tensor& a_in,
                                                          const at::Tensor& b_in,
                                                          const at::Tensor& idx_in, bool need_a,
                                                          bool need_b) {
  BelowAutograd below_autograd;
  check_pair_dot_args(a_in, b_in, idx_in);
  check_pair_dot_grad(grad_in, a_in, idx_in);
  c10::DeviceGuard guard(a_in.device());
  const auto grad = grad_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  const auto idx = idx_in.contiguous();
  const int64_t n = a.size(0), m = b.size(0), k = idx.size(1), d = a.size(1);
  const auto stream = current_stream(a);
  at::Tensor grad_a = need_a ? at::empty_like(a) : at::empty({0}, a.options());
  at::Tensor grad_b = need_b ? at::empty_like(b) : at::empty({0}, b.options());
  at::Tensor entries, start;
  if (need_b) {
    // Inverse index: the flat entries e = i * k + s of each column j, in
    // increasing e (a stable sort by column), and where each column starts.
    const auto flat = idx.reshape({-1});
    const auto sorted = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    entries = std::get<1>(sorted);
    start = at::searchsorted(std::get<0>(sorted), at::arange(m + 1, idx.options()));
  }
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "pair_dot_backward_cuda", [&] {
    if (need_a)
      check_launch(cuda::pair_dot_grad_rows(ptr<scalar_t>(grad), ptr<scalar_t>(b),
                                            ptr<int64_t>(idx), n, k, d, ptr<scalar_t>(grad_a),
                                            stream),
                   "pair_dot_backward (a)");
    if (need_b)
      check_launch(cuda::pair_dot_grad_columns(ptr<scalar_t>(grad), ptr<scalar_t>(a),
                                               ptr<int64_t>(entries), ptr<int64_t>(start), m, k,
                                               d, ptr<scalar_t>(grad_b), stream),
                   "pair_dot_backward (b)");
  });
  return {grad_a, grad_b};
}

// --------------------------------------------------------- pairwise_loss
cuda::PairKind pair_kind(c10::string_view name) {
  if (name == "cckd") return cuda::PairKind::Cckd;
  if (name == "ekd_pos") return cuda::PairKind::EkdPos;
  if (name == "rkd_dist_sum") return cuda::PairKind::RkdDistSum;
  return cuda::PairKind::RkdDistance;
}

// Tiles of an all-pairs op on CUDA, in row-major order (the stream runs
// them one after the other, so no waves are needed for determinism).
std::vector<Tile> device_tiles(pm::Mask mask, bool symmetric, int64_t block, int64_t n_r,
                               int64_t n_c, const at::Tensor& ids_r, const at::Tensor& ids_c,
                               const at::Tensor& lab_r, const at::Tensor& lab_c,
                               const at::TensorOptions& opts) {
  const auto rr = device_block_ranges(n_r, block, ids_r, lab_r, opts);
  const auto cr = symmetric ? rr : device_block_ranges(n_c, block, ids_c, lab_c, opts);
  return plan_tiles(mask, symmetric, block, n_r, n_c, rr, cr);
}

cuda::TileMask tile_mask(pm::Mask mask, bool symmetric, const at::Tensor& ids_r,
                         const at::Tensor& ids_c, const at::Tensor& lab_r,
                         const at::Tensor& lab_c) {
  return {static_cast<int>(mask), symmetric, ptr<int64_t>(ids_r), ptr<int64_t>(ids_c),
          ptr<int64_t>(lab_r), ptr<int64_t>(lab_c)};
}

// Squared row norms; of the rows as the tensor cores see them where the
// similarities come from those (`operands`), so that
// |x_i|^2 + |x_j|^2 - 2 x_i.x_j stays the squared distance of one set of points.
at::Tensor squared_norms(const at::Tensor& x, c10::optional<cuda::MmaOperands> operands) {
  if (!x.defined()) return at::Tensor();
  const at::Tensor rows = operands ? operand_values(x, *operands) : x;
  return rows.to(at::kDouble).pow(2).sum(1).to(x.scalar_type());
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The outputs from the summed partials (loss, dl/dparams) and the gradients
// (empty placeholders where not computed); the params' gradient only when
// `params_grad`. Copies: outputs must not alias each other (nor the sums).
Outputs pairwise_outputs(const at::Tensor& sums, const PairwiseArgs& in, bool params_grad,
                         at::Tensor g_sr, at::Tensor g_sc, at::Tensor g_tr, at::Tensor g_tc) {
  const auto opts = in.xs_r.options();
  auto or_empty = [&](at::Tensor t) { return t.defined() ? t : at::empty({0}, opts); };
  at::Tensor grad_params;
  if (params_grad) grad_params = sums.narrow(0, 1, in.params.numel()).to(opts.dtype(), false, true);
  return {sums[0].to(opts.dtype(), false, true), or_empty(g_sr), or_empty(g_sc), or_empty(g_tr),
          or_empty(g_tc), or_empty(grad_params)};
}

// A pairwise_loss's four embedding operands (columns alias the rows in the
// symmetric case, as in PairwiseArgs).
struct Embeddings {
  at::Tensor xs_r, xs_c, xt_r, xt_c;
};

// The four as the tensor-core kernels read them (operand_storage), aliases
// kept.
Embeddings operand_storage(const Embeddings& x, cuda::MmaOperands operands) {
  Embeddings out;
  std::tie(out.xs_r, out.xs_c) = operand_storage(x.xs_r, x.xs_c, operands);
  std::tie(out.xt_r, out.xt_c) = operand_storage(x.xt_r, x.xt_c, operands);
  return out;
}

// The symmetric tensor-core pass with the gradient products inside
// (cuda::pair_rows_mma): only the student's gradient (and the params'). Its
// G x X products are bf16 for 16-bit operands, TF32 or 3xTF32 for those
// formats: the precision the tile path's GEMMs would have.
bool rows_pass_applies(const PairwiseArgs& in, bool grad_s, bool grad_t,
                       cuda::MmaOperands operands) {
  return in.symmetric && grad_s && !grad_t &&
         cuda::rows_mma_fits(in.xs_r.device().index(), in.xs_r.size(1), operands);
}

Outputs rows_pass(cuda::PairKind kind, const PairwiseArgs& in, const Embeddings& stored,
                  cuda::MmaOperands operands) {
  const auto opts = in.xs_r.options();
  const int64_t n = in.n_r, blocks = cuda::pair_rows_mma_blocks(n);
  at::Tensor grad = at::empty_like(in.xs_r);  // every row written by its block
  auto partials = at::zeros({blocks * 3}, opts.dtype(at::kDouble));
  at::Tensor ns, nt;  // of the rows as the kernel rounds them
  if (in.kind.uses_norms) {
    ns = squared_norms(in.xs_r, operands);
    if (in.kind.has_teacher) nt = squared_norms(in.xt_r, operands);
  }
  const cuda::RowsMmaArgs args{kind,
                               ptr<float>(in.params),
                               in.params.numel(),
                               stored.xs_r.data_ptr(),
                               in.kind.has_teacher ? stored.xt_r.data_ptr() : nullptr,
                               ptr<float>(ns),
                               ptr<float>(nt),
                               n,
                               in.xs_r.size(1),
                               in.kind.has_teacher ? in.xt_r.size(1) : 0,
                               ptr<float>(grad),
                               ptr<double>(partials),
                               operands};
  const auto mask = tile_mask(in.kind.mask, true, in.ids_r, in.ids_c, in.labels_r, in.labels_c);
  const auto stream = current_stream(in.xs_r);
  check_launch(cuda::pair_rows_mma(args, mask, stream), "pairwise_loss (rows)");
  auto sums = at::zeros({3}, opts.dtype(at::kDouble));
  check_launch(cuda::sum_partials(ptr<double>(partials), blocks, ptr<double>(sums), stream),
               "pairwise_loss (sum)");
  return pairwise_outputs(sums, in, in.kind.params_grad, grad, {}, {}, {});
}

// half: the embeddings as they came in when 16-bit (`in` holds float32
// copies), else nullptr. The tensor-core kernels read them as they are; with
// bfloat16 ones the tensor-core path's gradient products are bfloat16 GEMMs
// of them (fp32 accumulation, each derivative tile rounded to bf16 once), as
// an eager bf16 backward's; with float16 ones they stay float32 GEMMs (a
// pair's derivative, about 1/N^2 of the loss, falls below float16's range).
template <typename T>
Outputs pairwise_impl(c10::string_view kind_name, const PairwiseArgs& in, bool grad_s,
                      bool grad_t, const Embeddings* half) {
  const KindInfo& kind = in.kind;
  const bool sym = in.symmetric;
  const auto opts = in.xs_r.options();
  const auto stream = current_stream(in.xs_r);
  const bool dn_tiles = kind.uses_norms && grad_s;
  const int64_t block = square_block(1 + kind.has_teacher + dn_tiles, sizeof(T));
  const c10::optional<at::ScalarType> half_type =
      half ? c10::make_optional(half->xs_r.scalar_type()) : c10::nullopt;
  c10::optional<cuda::MmaOperands> operands;
  if constexpr (std::is_same_v<T, float>) {
    operands = tensor_core_operands(in.xs_r, half_type);
  }
  const bool tensor_cores = operands.has_value();
  const Embeddings given = half ? *half : Embeddings{in.xs_r, in.xs_c, in.xt_r, in.xt_c};
  const Embeddings stored = tensor_cores ? operand_storage(given, *operands) : Embeddings{};
  if (tensor_cores && rows_pass_applies(in, grad_s, grad_t, *operands))
    return rows_pass(pair_kind(kind_name), in, stored, *operands);
  const auto tiles = device_tiles(kind.mask, sym, block, in.n_r, in.n_c, in.ids_r, in.ids_c,
                                  in.labels_r, in.labels_c, opts);
  at::Tensor ns_r, ns_c, nt_r, nt_c;
  if (kind.uses_norms) {
    ns_r = squared_norms(in.xs_r, operands);
    ns_c = sym ? ns_r : squared_norms(in.xs_c, operands);
    if (kind.has_teacher) {
      nt_r = squared_norms(in.xt_r, operands);
      nt_c = sym ? nt_r : squared_norms(in.xt_c, operands);
    }
  }
  at::Tensor g_sr, g_sc, g_tr, g_tc, dn_r, dn_c;
  if (grad_s) {
    g_sr = at::zeros_like(in.xs_r);
    g_sc = sym ? g_sr : at::zeros_like(in.xs_c);
    if (kind.uses_norms) {
      dn_r = at::zeros({in.n_r}, opts);
      dn_c = sym ? dn_r : at::zeros({in.n_c}, opts);
    }
  }
  if (grad_t) {
    g_tr = at::zeros_like(in.xt_r);
    g_tc = sym ? g_tr : at::zeros_like(in.xt_c);
  }
  auto blocks_of = [&](const cuda::TileView& v) {
    return tensor_cores ? cuda::pair_tile_mma_blocks(v) : cuda::pair_tile_blocks(v);
  };
  // Per-block partial sums of every tile, reduced in one fixed order at the end.
  int64_t parts = 0;
  for (const Tile& t : tiles) parts += blocks_of({t.r0, t.rows, t.c0, t.cols, t.cols});
  auto partials = at::zeros({std::max<int64_t>(parts, 1) * 3}, opts.dtype(at::kDouble));
  const int64_t tile_elems = std::min(block, in.n_r) * std::min(block, in.n_c);
  at::Tensor s_buf = at::empty({tile_elems}, opts);
  at::Tensor t_buf = kind.has_teacher ? at::empty({tile_elems}, opts) : at::Tensor();
  at::Tensor dn_buf = dn_tiles ? at::empty({tile_elems}, opts) : at::Tensor();
  const auto mask = tile_mask(kind.mask, sym, in.ids_r, in.ids_c, in.labels_r, in.labels_c);
  // The right-hand operands of the gradient products: bfloat16 embeddings
  // on the tensor-core path (bf16 GEMMs), else the float ones (addmm_).
  const bool bf16_products = tensor_cores && half_type == at::kBFloat16;
  const Embeddings ps = bf16_products ? *half
                                      : Embeddings{in.xs_r, in.xs_c, in.xt_r, in.xt_c};
  auto add_product = [](at::Tensor out, const at::Tensor& tile, const at::Tensor& x) {
    if (x.scalar_type() == at::kBFloat16)
      out.add_(at::mm(tile.to(at::kBFloat16), x));
    else
      out.addmm_(tile, x);
  };

  int64_t offset = 0;
  for (const Tile& t : tiles) {
    const cuda::TileView view{t.r0, t.rows, t.c0, t.cols, t.cols};
    auto tile_of = [&](at::Tensor& buf) {
      return buf.narrow(0, 0, t.rows * t.cols).view({t.rows, t.cols});
    };
    // The similarity tiles (which the kernel overwrites with their
    // derivatives); the tensor-core kernel computes them itself.
    at::Tensor s = tensor_cores ? tile_of(s_buf) : tile_product(s_buf, in.xs_r, in.xs_c, t);
    at::Tensor tt;
    if (kind.has_teacher)
      tt = tensor_cores ? tile_of(t_buf) : tile_product(t_buf, in.xt_r, in.xt_c, t);
    at::Tensor dn = dn_tiles ? tile_of(dn_buf) : at::Tensor();
    const cuda::PairTileArgs<T> args{pair_kind(kind_name), ptr<T>(s), ptr<T>(tt), ptr<T>(dn),
                                     ptr<T>(ns_r), ptr<T>(ns_c), ptr<T>(nt_r), ptr<T>(nt_c),
                                     ptr<T>(in.params), in.params.numel(), grad_s, grad_t,
                                     ptr<double>(partials) + offset * 3};
    if constexpr (std::is_same_v<T, float>) {
      if (tensor_cores) {
        const cuda::MmaTileInputs mma{stored.xs_r.data_ptr(), stored.xs_c.data_ptr(),
                                      kind.has_teacher ? stored.xt_r.data_ptr() : nullptr,
                                      kind.has_teacher ? stored.xt_c.data_ptr() : nullptr,
                                      in.xs_r.size(1), kind.has_teacher ? in.xt_r.size(1) : 0,
                                      *operands};
        check_launch(cuda::pair_tile_mma(args, mma, view, mask, stream), "pairwise_loss");
      }
    }
    if (!tensor_cores) check_launch(cuda::pair_tile(args, view, mask, stream), "pairwise_loss");
    offset += blocks_of(view);
    // The derivative tiles times the opposite embeddings (s and tt now hold them).
    if (grad_s) {
      add_product(g_sr.narrow(0, t.r0, t.rows), s, ps.xs_c.narrow(0, t.c0, t.cols));
      add_product(g_sc.narrow(0, t.c0, t.cols), s.t(), ps.xs_r.narrow(0, t.r0, t.rows));
    }
    if (grad_t) {
      add_product(g_tr.narrow(0, t.r0, t.rows), tt, ps.xt_c.narrow(0, t.c0, t.cols));
      add_product(g_tc.narrow(0, t.c0, t.cols), tt.t(), ps.xt_r.narrow(0, t.r0, t.rows));
    }
    if (dn_tiles) {
      dn_r.narrow(0, t.r0, t.rows).add_(dn.sum(1));
      dn_c.narrow(0, t.c0, t.cols).add_(dn.sum(0));
    }
  }
  auto sums = at::zeros({3}, opts.dtype(at::kDouble));
  if (parts > 0) check_launch(cuda::sum_partials(ptr<double>(partials), parts, ptr<double>(sums),
                                                 stream),
                              "pairwise_loss (sum)");
  if (dn_tiles) {  // the squared norm n_i = |x_i|^2 has gradient 2 x_i
    g_sr.add_(2 * dn_r.unsqueeze(1) * in.xs_r);
    if (!sym) g_sc.add_(2 * dn_c.unsqueeze(1) * in.xs_c);
  }
  // Symmetric: the columns' gradients are the rows' (not returned twice).
  return pairwise_outputs(sums, in, grad_s && kind.params_grad, g_sr, sym ? at::Tensor() : g_sc,
                          g_tr, sym ? at::Tensor() : g_tc);
}

Outputs pairwise_loss_cuda(c10::string_view kind_name, const at::Tensor& xs_r,
                           const c10::optional<at::Tensor>& xt_r,
                           const c10::optional<at::Tensor>& xs_c,
                           const c10::optional<at::Tensor>& xt_c,
                           const c10::optional<at::Tensor>& labels_r,
                           const c10::optional<at::Tensor>& labels_c,
                           const c10::optional<at::Tensor>& ids_r,
                           const c10::optional<at::Tensor>& ids_c, const at::Tensor& params,
                           bool grad_student, bool grad_teacher) {
  BelowAutograd below_autograd;
  const auto half = half_operands({{"xs_r", &xs_r}, {"xt_r", present(xt_r)},
                                   {"xs_c", present(xs_c)}, {"xt_c", present(xt_c)}});
  const PairwiseArgs args = check_pairwise_args(
      kind_name, float_copy(xs_r), float_copy(xt_r), float_copy(xs_c), float_copy(xt_c),
      labels_r, labels_c, ids_r, ids_c, params, grad_teacher);
  c10::DeviceGuard guard(xs_r.device());
  Outputs out;
  const Embeddings originals{xs_r, xs_c.value_or(xs_r), xt_r.value_or(at::Tensor()),
                             xt_c.value_or(xt_r.value_or(at::Tensor()))};
  AT_DISPATCH_FLOATING_TYPES(args.xs_r.scalar_type(), "pairwise_loss_cuda", [&] {
    out = pairwise_impl<scalar_t>(kind_name, args, grad_student, grad_teacher,
                                  half ? &originals : nullptr);
  });
  // 16-bit embeddings: the loss and the gradients stay float32 (SPEC: half
  // inputs); the autograd formula rounds grad_loss * gradient to the
  // embeddings' dtype, so that a GradScaler's scale applies before float16
  // rounding, as in an eager float16 backward.
  return out;
}

// ------------------------------------------------------------ pair_select
constexpr pm::Mask kNegative = pm::Mask::UpperDiffLabel;
constexpr int64_t kDigits = int64_t(1) << 16;
// pair_histogram_topk's outputs: histogram, top values, ids i and j, kept keys.
using Selected = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct SelectPlan {
  int64_t tile_elems;  // elements of the largest tile
  std::vector<Tile> tiles;
  cuda::TileMask mask;
};

// The tiles of pair_histogram and pair_topk. Both ops must see every pair's
// similarity rounded alike (a threshold found by one is applied by the
// other), so they use the same tiles: one block size for both, fitting
// pair_topk's buffers (the tile and its int64 tie keys) in the budget.
SelectPlan select_plan(const SelectArgs& in) {
  const int64_t elem_bytes = in.x_r.element_size() + int64_t(sizeof(int64_t));
  const int64_t block = square_block(1, elem_bytes);
  const int64_t n_r = in.x_r.size(0), n_c = in.x_c.size(0);
  return {std::min(block, n_r) * std::min(block, n_c),
          device_tiles(kNegative, in.symmetric, block, n_r, n_c, in.ids_r, in.ids_c, in.lab_r,
                       in.lab_c, in.x_r.options()),
          tile_mask(kNegative, in.symmetric, in.ids_r, in.ids_c, in.lab_r, in.lab_c)};
}

// The tensor-core inputs of the selection's passes (float32 only), or none:
// the tile path. Every pass of one selection must choose alike (a key found
// by the histograms is looked up by the collection): the choice depends only
// on the switch and the matmul precision, which callers keep between them.
// `rows` and `cols` hold the embeddings the pointers of `in` read.
struct SelectMma {
  at::Tensor rows, cols;
  cuda::MmaTileInputs in;
};

template <typename T>
c10::optional<SelectMma> select_mma_inputs(const SelectArgs& in) {
  if constexpr (std::is_same_v<T, float>) {
    if (const auto operands = tensor_core_operands(in.x_r, c10::nullopt)) {
      SelectMma out;
      std::tie(out.rows, out.cols) = operand_storage(in.x_r, in.x_c, *operands);
      out.in = cuda::MmaTileInputs{out.rows.data_ptr(), out.cols.data_ptr(), nullptr, nullptr,
                                   in.x_r.size(1), 0, *operands};
      return out;
    }
  }
  return c10::nullopt;
}

template <typename T>
at::Tensor histogram_impl(const SelectArgs& in, const at::Tensor& prefixes, int64_t shift,
                          const cuda::FirstPassCollect<T>& collect = {}) {
  const auto plan = select_plan(in);
  const auto stream = current_stream(in.x_r);
  auto hist = at::zeros({prefixes.numel(), kDigits}, prefixes.options());
  if (plan.tiles.empty() || prefixes.numel() == 0) return hist;
  const auto mma = select_mma_inputs<T>(in);
  at::Tensor buf = mma ? at::Tensor() : at::empty({plan.tile_elems}, in.x_r.options());
  auto* counts = reinterpret_cast<unsigned long long*>(ptr<int64_t>(hist));
  for (const Tile& t : plan.tiles) {
    const cuda::TileView view{t.r0, t.rows, t.c0, t.cols, t.cols};
    if (mma) {
      if constexpr (std::is_same_v<T, float>)
        check_launch(cuda::pair_histogram_mma(mma->in, view, plan.mask, ptr<int64_t>(prefixes),
                                              prefixes.numel(), static_cast<int>(shift), counts,
                                              collect, stream),
                     "pair_histogram (tensor cores)");
      continue;
    }
    const auto s = tile_product(buf, in.x_r, in.x_c, t);
    check_launch(cuda::pair_histogram_tile(ptr<T>(s), view, plan.mask, ptr<int64_t>(prefixes),
                                           prefixes.numel(), static_cast<int>(shift), counts,
                                           collect, stream),
                 "pair_histogram");
  }
  return hist;
}

at::Tensor pair_histogram_cuda(const at::Tensor& x_r, const c10::optional<at::Tensor>& x_c,
                               const at::Tensor& labels_r,
                               const c10::optional<at::Tensor>& labels_c,
                               const c10::optional<at::Tensor>& ids_r,
                               const c10::optional<at::Tensor>& ids_c, const at::Tensor& prefixes,
                               int64_t shift) {
  BelowAutograd below_autograd;
  const auto in = check_select_args(x_r, x_c, labels_r, labels_c, ids_r, ids_c);
  check_histogram_args(x_r.scalar_type() == at::kDouble ? 64 : 32, prefixes, shift, x_r);
  c10::DeviceGuard guard(x_r.device());
  const auto pre = prefixes.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(x_r.scalar_type(), "pair_histogram_cuda",
                                    [&] { return histogram_impl<scalar_t>(in, pre, shift); });
}

// The key at 0-based descending position `target` among the negative pairs,
// and how many pairs have a larger key: a radix select, 16 bits per pass
// (what relkd.ops.radix_select drives from Python, here for pair_topk's
// rare case of more candidates above its threshold than it may return).
template <typename T>
uint64_t select_key(const SelectArgs& in, int64_t target, int64_t* n_above) {
  using K = typename pm::KeyOf<T>::type;
  constexpr int bits = 8 * sizeof(K);
  uint64_t prefix = 0;
  int64_t remaining = target;
  for (int shift = bits - 16; shift >= 0; shift -= 16) {
    auto pre = at::full({1}, static_cast<int64_t>(prefix), in.x_r.options().dtype(at::kLong));
    const at::Tensor hist = histogram_impl<T>(in, pre, shift).cpu();
    const int64_t* h = hist.data_ptr<int64_t>();
    int64_t digit = 0;
    for (int64_t d = kDigits - 1; d >= 0; --d) {
      if (remaining < h[d]) {
        digit = d;
        break;
      }
      remaining -= h[d];
    }
    prefix = (prefix << 16) | static_cast<uint64_t>(digit);
  }
  *n_above = target - remaining;
  return prefix;
}

template <typename T>
T value_of_key(uint64_t key) {  // inverse of pm::order_key
  using K = typename pm::KeyOf<T>::type;
  constexpr K sign = K(1) << (8 * sizeof(K) - 1);
  if (key == 0) return std::numeric_limits<T>::quiet_NaN();
  const K k = static_cast<K>(key);
  const K bits = (k & sign) ? K(k & ~sign) : K(~k);
  T v;
  std::memcpy(&v, &bits, sizeof(K));
  return v;
}

// Ties are ranked by (i << 32 | j): ids must fit 31 bits.
void check_tie_ids(const SelectArgs& in, const char* op) {
  for (const at::Tensor& ids : {in.ids_r, in.ids_c})
    if (ids.defined() && ids.numel() > 0)
      TORCH_CHECK_VALUE(ids.min().item<int64_t>() >= 0 &&
                            ids.max().item<int64_t>() < std::numeric_limits<int32_t>::max(),
                        "ids must lie in [0, 2^31) on CUDA");
  TORCH_CHECK_VALUE(
      std::max(in.x_r.size(0), in.x_c.size(0)) < std::numeric_limits<int32_t>::max(), op,
      " on CUDA takes fewer than 2^31 rows");
}

// The candidates of pair_topk: the pairs above tau (at most topk of them,
// `n_above` counts them all) and the eq_cap smallest tie keys at tau.
struct Candidates {
  at::Tensor above_v, above_i, above_j, ties;
  int64_t n_above;
};

template <typename T>
Candidates collect_candidates(const SelectArgs& in, uint64_t tau, int64_t eq_cap, int64_t topk) {
  const auto opts = in.x_r.options();
  const auto long_opts = opts.dtype(at::kLong);
  const auto plan = select_plan(in);
  const auto stream = current_stream(in.x_r);
  Candidates c{at::empty({topk}, opts), at::empty({topk}, long_opts),
               at::empty({topk}, long_opts), at::empty({0}, long_opts), 0};
  auto counters = at::zeros({2}, long_opts);  // pairs above tau, ties in the current tile
  auto* above_count = reinterpret_cast<unsigned long long*>(ptr<int64_t>(counters));
  auto* tie_count = above_count + 1;
  const auto mma = select_mma_inputs<T>(in);
  at::Tensor buf = mma ? at::Tensor() : at::empty({plan.tile_elems}, opts);
  at::Tensor tie_keys = eq_cap > 0 ? at::empty({plan.tile_elems}, long_opts) : at::Tensor();
  at::Tensor& ties = c.ties;  // the eq_cap smallest (i << 32 | j) so far
  at::Tensor &above_v = c.above_v, &above_i = c.above_i, &above_j = c.above_j;
  for (const Tile& t : plan.tiles) {
    const cuda::TileView view{t.r0, t.rows, t.c0, t.cols, t.cols};
    counters[1].zero_();
    if constexpr (std::is_same_v<T, float>) {
      if (mma)
        check_launch(cuda::pair_collect_mma(mma->in, view, plan.mask, tau, ptr<T>(above_v),
                                            ptr<int64_t>(above_i), ptr<int64_t>(above_j), topk,
                                            above_count, ptr<int64_t>(tie_keys), tie_count,
                                            stream),
                     "pair_topk (collect, tensor cores)");
    }
    if (!mma) {
      const auto s = tile_product(buf, in.x_r, in.x_c, t);
      check_launch(cuda::pair_collect_tile(ptr<T>(s), view, plan.mask, tau, ptr<T>(above_v),
                                           ptr<int64_t>(above_i), ptr<int64_t>(above_j), topk,
                                           above_count, ptr<int64_t>(tie_keys), tie_count,
                                           stream),
                   "pair_topk (collect)");
    }
    if (eq_cap == 0) continue;
    const int64_t n_ties = counters[1].item<int64_t>();
    if (n_ties == 0) continue;
    const auto keys = tie_keys.narrow(0, 0, t.rows * t.cols);
    const auto smallest = std::get<0>(at::topk(keys, std::min(eq_cap, n_ties), 0, false, true));
    ties = std::get<0>(at::sort(at::cat({ties, smallest}))).narrow(
        0, 0, std::min<int64_t>(eq_cap, ties.numel() + smallest.numel()));
  }
  c.n_above = counters[0].item<int64_t>();
  return c;
}

// The first `keep` of the n pairs (v, i, j) in order, value descending and
// then (i, j) (stable sorts, least key first), into values, rows, cols.
void write_best_first(const at::Tensor& v, const at::Tensor& i, const at::Tensor& j, int64_t n,
                      int64_t keep, at::Tensor& values, at::Tensor& rows, at::Tensor& cols) {
  if (keep == 0) return;
  const auto v_n = v.narrow(0, 0, n), i_n = i.narrow(0, 0, n), j_n = j.narrow(0, 0, n);
  auto order = std::get<1>(at::sort(j_n, true, 0, false));
  order = order.index_select(0, std::get<1>(at::sort(i_n.index_select(0, order), true, 0, false)));
  // NaN last, as the CPU ranks it (a descending sort puts it first).
  const auto lowest = at::full({}, -std::numeric_limits<double>::infinity(), v_n.options());
  const auto v_key = at::where(v_n.isnan(), lowest, v_n);
  order = order.index_select(0, std::get<1>(at::sort(v_key.index_select(0, order), true, 0, true)));
  order = order.narrow(0, 0, keep);
  values.narrow(0, 0, keep).copy_(v_n.index_select(0, order));
  rows.narrow(0, 0, keep).copy_(i_n.index_select(0, order));
  cols.narrow(0, 0, keep).copy_(j_n.index_select(0, order));
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_impl(const SelectArgs& in, uint64_t tau,
                                                         int64_t n_equal, int64_t topk) {
  const auto opts = in.x_r.options();
  const auto long_opts = opts.dtype(at::kLong);
  at::Tensor values = at::full({topk}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor rows = at::full({topk}, -1, long_opts), cols = at::full({topk}, -1, long_opts);
  if (topk == 0 || in.x_r.size(0) == 0 || in.x_c.size(0) == 0) return {values, rows, cols};
  Candidates c = collect_candidates<T>(in, tau, std::min(n_equal, topk), topk);
  if (c.n_above > topk) {
    // More pairs above tau than may be returned (only when the op is called
    // with a low threshold): the best topk of them are the pairs above the
    // topk-th key plus that key's first ties. Histogram and collection use
    // the same tiles, so this second collection finds at most topk - 1
    // pairs above the new key.
    int64_t above_new = 0;
    const uint64_t tau_new = select_key<T>(in, topk - 1, &above_new);
    c = Candidates{};  // free the first collection's buffers
    c = collect_candidates<T>(in, tau_new, topk - above_new, topk);
    tau = tau_new;
    TORCH_CHECK(c.n_above < topk, "relkd pair_topk: inconsistent candidate counts (",
                c.n_above, " pairs above the ", topk, "-th key)");
  }
  const int64_t n_above = c.n_above;
  const at::Tensor& ties = c.ties;
  // Above tau: value descending, then (i, j).
  write_best_first(c.above_v, c.above_i, c.above_j, n_above, n_above, values, rows, cols);
  // Then the first ties at tau, by (i, j).
  const int64_t n_ties = std::min<int64_t>(ties.numel(), topk - n_above);
  if (n_ties > 0) {
    const auto kept = ties.narrow(0, 0, n_ties);
    values.narrow(0, n_above, n_ties).fill_(static_cast<double>(value_of_key<T>(tau)));
    rows.narrow(0, n_above, n_ties).copy_(kept.div(int64_t(1) << 32, "floor"));
    cols.narrow(0, n_above, n_ties).copy_(kept.remainder(int64_t(1) << 32));
  }
  return {values, rows, cols};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_topk_cuda(
    const at::Tensor& x_r, const c10::optional<at::Tensor>& x_c, const at::Tensor& labels_r,
    const c10::optional<at::Tensor>& labels_c, const c10::optional<at::Tensor>& ids_r,
    const c10::optional<at::Tensor>& ids_c, int64_t threshold_key, int64_t n_equal, int64_t topk) {
  BelowAutograd below_autograd;
  const auto in = check_select_args(x_r, x_c, labels_r, labels_c, ids_r, ids_c);
  check_pair_topk_args(x_r, threshold_key, n_equal, topk);
  c10::DeviceGuard guard(x_r.device());
  check_tie_ids(in, "pair_topk");
  return AT_DISPATCH_FLOATING_TYPES(x_r.scalar_type(), "pair_topk_cuda", [&] {
    return topk_impl<scalar_t>(in, static_cast<uint64_t>(threshold_key), n_equal, topk);
  });
}

// The whole keys a first pass collected, descending as unsigned numbers
// (int64 bit patterns: 64-bit keys with the top bit set sort with it flipped).
at::Tensor keys_descending(const at::Tensor& keys, int bits) {
  const auto order_of = bits == 64 ? keys.bitwise_xor(std::numeric_limits<int64_t>::min()) : keys;
  return keys.index_select(0, std::get<1>(at::sort(order_of, true, 0, true)));
}

// The top pairs when the pass's buffer could not hold them: the overall
// top-k by the radix passes and pair_topk's collection. The buffer is
// skipped only for top_min_key 0 (every pair) and overflows only past
// 4 topk pairs at or above the key, so these are the best topk of those
// too; with fewer than topk pairs select_key returns key 0, below them all.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> top_pairs_by_passes(const SelectArgs& in,
                                                                   int64_t topk) {
  int64_t n_above = 0;
  const uint64_t tau = select_key<T>(in, topk - 1, &n_above);
  return topk_impl<T>(in, tau, topk - n_above, topk);
}

template <typename T>
Selected histogram_topk_impl(const SelectArgs& in, const at::Tensor& prefixes, int64_t shift,
                             int64_t topk, const std::vector<uint8_t>& in_bin,
                             int64_t collect_cap, int64_t top_min_key) {
  constexpr int bits = 8 * sizeof(typename pm::KeyOf<T>::type);
  const auto opts = in.x_r.options();
  const auto long_opts = opts.dtype(at::kLong);
  auto counts = at::zeros({2}, long_opts);  // keys, top pairs met
  auto* count = reinterpret_cast<unsigned long long*>(ptr<int64_t>(counts));
  cuda::FirstPassCollect<T> collect;
  at::Tensor flags, keys, top_v, top_i, top_j;
  if (!in_bin.empty()) {
    flags = at::from_blob(const_cast<uint8_t*>(in_bin.data()), {kDigits}, at::kByte)
                .to(in.x_r.device());
    keys = at::empty({collect_cap}, long_opts);
    collect.in_bin = flags.data_ptr<uint8_t>();
    collect.keys = ptr<int64_t>(keys);
    collect.key_cap = collect_cap;
    collect.key_count = count;
  }
  // The top pairs come from one buffer when they fit it: those at and above
  // top_min_key (or all pairs, when few). A key predicted just below the
  // k-th pair's leaves about k + a margin of them.
  const int64_t top_cap = std::max<int64_t>(4 * topk, int64_t(1) << 16);
  const int64_t most_pairs = in.x_r.size(0) * in.x_c.size(0);
  const bool top_buffer = topk > 0 && (top_min_key != 0 || most_pairs <= top_cap);
  if (top_buffer) {
    top_v = at::empty({top_cap}, opts);
    top_i = at::empty({top_cap}, long_opts);
    top_j = at::empty({top_cap}, long_opts);
    collect.top_min_key = static_cast<uint64_t>(top_min_key);
    collect.top_v = ptr<T>(top_v);
    collect.top_i = ptr<int64_t>(top_i);
    collect.top_j = ptr<int64_t>(top_j);
    collect.top_cap = top_cap;
    collect.top_count = count + 1;
  }
  at::Tensor hist = histogram_impl<T>(in, prefixes, shift, collect);
  const auto met = counts.cpu();
  const int64_t n_keys = met.data_ptr<int64_t>()[0], n_top = met.data_ptr<int64_t>()[1];

  at::Tensor kept = at::empty({0}, long_opts);
  if (!in_bin.empty() && n_keys <= collect_cap)
    kept = keys_descending(keys.narrow(0, 0, n_keys), bits);
  at::Tensor values = at::full({topk}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor rows = at::full({topk}, -1, long_opts), cols = at::full({topk}, -1, long_opts);
  if (top_buffer && n_top <= top_cap) {
    write_best_first(top_v, top_i, top_j, n_top, std::min(n_top, topk), values, rows, cols);
  } else if (topk > 0) {
    std::tie(values, rows, cols) = top_pairs_by_passes<T>(in, topk);
  }
  return {hist, values, rows, cols, kept};
}

Selected pair_histogram_topk_cuda(const at::Tensor& x_r, const c10::optional<at::Tensor>& x_c,
                                  const at::Tensor& labels_r,
                                  const c10::optional<at::Tensor>& labels_c,
                                  const c10::optional<at::Tensor>& ids_r,
                                  const c10::optional<at::Tensor>& ids_c,
                                  const at::Tensor& prefixes, int64_t shift, int64_t topk,
                                  const c10::optional<at::Tensor>& collect_ranges,
                                  int64_t collect_cap, int64_t top_min_key) {
  BelowAutograd below_autograd;
  const auto in = check_select_args(x_r, x_c, labels_r, labels_c, ids_r, ids_c);
  const int64_t bits = x_r.scalar_type() == at::kDouble ? 64 : 32;
  check_histogram_args(bits, prefixes, shift, x_r);
  TORCH_CHECK_VALUE(topk >= 0, "topk must be >= 0, got ", topk);
  const auto in_bin = collect_bin_flags(collect_ranges, collect_cap, shift, bits, top_min_key);
  c10::DeviceGuard guard(x_r.device());
  if (topk > 0) check_tie_ids(in, "pair_histogram_topk");
  const auto pre = prefixes.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(x_r.scalar_type(), "pair_histogram_topk_cuda", [&] {
    return histogram_topk_impl<scalar_t>(in, pre, shift, topk, in_bin, collect_cap, top_min_key);
  });
}

}  // namespace

#ifdef RELKD_EMULATE
// The CPU-emulated build (tests/cuda_emulation): the same glue and kernels as
// operators relkd_emulated::* on CPU tensors.
TORCH_LIBRARY(relkd_emulated, m) { define_operators(m); }
#define RELKD_GLUE_IMPL TORCH_LIBRARY_IMPL(relkd_emulated, CPU, m)
#else
#define RELKD_GLUE_IMPL TORCH_LIBRARY_IMPL(relkd, CUDA, m)
#endif

RELKD_GLUE_IMPL {
  m.impl("topk_sim", &topk_sim_cuda);
  m.impl("pair_dot", &pair_dot_cuda);
  m.impl("pair_dot_backward", &pair_dot_backward_cuda);
  m.impl("pairwise_loss", &pairwise_loss_cuda);
  m.impl("pair_histogram", &pair_histogram_cuda);
  m.impl("pair_topk", &pair_topk_cuda);
  m.impl("pair_histogram_topk", &pair_histogram_topk_cuda);
}

}  // namespace relkd
