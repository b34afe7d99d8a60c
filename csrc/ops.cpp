// Schemas of every relkd operator, in one place. Kernels register their
// implementations per device in csrc/cpu/*.cpp; fake (meta) kernels and
// autograd formulas live in relkd/ops.py.
#include <torch/library.h>

#include <string>

#ifdef RELKD_PYTHON_MODULE
#include <Python.h>

// `import relkd._C` loads this library, which runs the registrations below.
// The module itself is empty: every entry point is torch.ops.relkd.*.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

// What this build holds, for `python -m relkd`: the CUDA architectures its
// kernels were compiled for (setup.py defines them; none in a CPU build) and
// the CUDA runtime they use.
#define RELKD_STRINGIFY(x) #x
#define RELKD_TO_STRING(x) RELKD_STRINGIFY(x)
#ifdef RELKD_CUDA_ARCHS
static std::string build_info() {
  return "cuda_archs=" RELKD_TO_STRING(RELKD_CUDA_ARCHS) " cudart=" RELKD_TO_STRING(RELKD_CUDART);
}
#else
static std::string build_info() { return "cuda_archs= cudart="; }
#endif

TORCH_LIBRARY(relkd, m) {
  m.def("build_info() -> str", &build_info);

  // Per row i of q: the k largest c_scale[j] * q_i.c_j over valid columns j
  // (c_labels[j] != q_labels[i]; j != i + self_offset when exclude_self),
  // sorted descending, ties to the smaller j, padding (-inf, -1).
  m.def(
      "topk_sim(Tensor q, Tensor c, int k, Tensor? q_labels=None, Tensor? c_labels=None, "
      "Tensor? c_scale=None, bool exclude_self=False, int self_offset=0) -> (Tensor, Tensor)");

  // out[i, s] = a_i . b_{idx[i, s]}, 0 where idx is -1.
  m.def("pair_dot(Tensor a, Tensor b, Tensor idx) -> Tensor");
  m.def(
      "pair_dot_backward(Tensor grad, Tensor a, Tensor b, Tensor idx, bool need_a, bool need_b) "
      "-> (Tensor, Tensor)");

  // Sum over the (row, column) pairs selected by the kind's mask of the
  // kind's pair loss, and its gradients (see csrc/cpu/pair_kinds.h). xs_c /
  // xt_c None = columns are the rows (symmetric case). Returns
  // (loss, grad_xs_r, grad_xs_c, grad_xt_r, grad_xt_c, grad_params); a
  // gradient that was not asked for is an empty tensor.
  m.def(
      "pairwise_loss(str kind, Tensor xs_r, Tensor? xt_r, Tensor? xs_c, Tensor? xt_c, "
      "Tensor? labels_r, Tensor? labels_c, Tensor? ids_r, Tensor? ids_c, Tensor params, "
      "bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Negative pairs (id_i < id_j, labels differ): histogram of the 16-bit
  // digit at `shift` of the order keys of x_i.x_j, one histogram per key
  // prefix (the key bits above shift + 16). Returns int64 (P, 65536).
  m.def(
      "pair_histogram(Tensor x_r, Tensor? x_c, Tensor labels_r, Tensor? labels_c, Tensor? ids_r, "
      "Tensor? ids_c, Tensor prefixes, int shift) -> Tensor");

  // Negative pairs with order key > threshold_key, plus the first n_equal
  // (by (id_i, id_j)) with key == threshold_key; at most topk, sorted by value
  // descending then (id_i, id_j). Returns (values, id_i, id_j) of length
  // topk, padded with (-inf, -1, -1). threshold_key is the key's bit pattern.
  m.def(
      "pair_topk(Tensor x_r, Tensor? x_c, Tensor labels_r, Tensor? labels_c, Tensor? ids_r, "
      "Tensor? ids_c, int threshold_key, int n_equal, int topk) -> (Tensor, Tensor, Tensor)");
}

// Mining and selection are discrete, so they have no gradient: a fallthrough
// autograd kernel makes their outputs plain tensors that never require grad,
// on every device (torch's advice for non-differentiable operators).
TORCH_LIBRARY_IMPL(relkd, Autograd, m) {
  m.impl("topk_sim", torch::CppFunction::makeFallthrough());
  m.impl("pair_histogram", torch::CppFunction::makeFallthrough());
  m.impl("pair_topk", torch::CppFunction::makeFallthrough());
}
