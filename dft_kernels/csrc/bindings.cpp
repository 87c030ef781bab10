// The torch op dft_kernels_cuda::row_loss_grad: input checks, output allocation and the
// launch of the CUDA row kernel on the current stream; registered with TORCH_LIBRARY.
// The library also has a Python module init, so that `import dft_kernels._C` loads it.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "row_loss_grad.h"

namespace dftk {
namespace {

void check_vector(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& logits, bool allow_scalar) {
  TORCH_CHECK(t.device() == logits.device(), "row_loss_grad: ", name, " must be on ", logits.device(),
              " like logits, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "row_loss_grad: ", name, " must be float32, got ", t.scalar_type());
  const bool scalar = allow_scalar && t.dim() == 0;
  TORCH_CHECK(scalar || (t.dim() == 1 && t.size(0) == n), "row_loss_grad: ", name, " must have shape [", n, "]",
              allow_scalar ? " or []" : "", ", got ", t.sizes());
  TORCH_CHECK(scalar || n <= 1 || t.stride(0) == 1, "row_loss_grad: ", name, " must be contiguous");
}

// Returns (loss, nll, prob, entropy, correct), float32 [n]; entropy is [0] unless with_entropy,
// correct is [0] unless with_stats.  With grad_scale, logits is overwritten in place by the
// scaled gradient (docs/design.md, Backend contract).  softcap 0 disables the cap.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_loss_grad(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& token_weights,
    const std::optional<at::Tensor>& grad_scale, int64_t kernel_id, double param0, double param1,
    int64_t ignore_index, double softcap, double label_smoothing, double z_loss, bool with_entropy,
    bool with_stats) {
  TORCH_CHECK(logits.is_cuda(), "row_loss_grad: logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "row_loss_grad: logits must have shape [n, V], got ", logits.sizes());
  const auto dtype = logits.scalar_type();
  LogitsType type;
  switch (dtype) {
    case at::kFloat: type = LogitsType::kFloat32; break;
    case at::kBFloat16: type = LogitsType::kBFloat16; break;
    case at::kHalf: type = LogitsType::kFloat16; break;
    default: TORCH_CHECK(false, "row_loss_grad: logits must be float32, bfloat16 or float16, got ", dtype);
  }
  const int64_t n = logits.size(0);
  const int64_t vocab = logits.size(1);
  TORCH_CHECK(vocab >= 1, "row_loss_grad: logits must have at least one column (V >= 1), got ", logits.sizes());
  // The kernel's int column indices step past V by up to two block sizes (512 threads) before they stop.
  constexpr int64_t kMaxVocab = std::numeric_limits<int>::max() - 4096;
  TORCH_CHECK(vocab <= kMaxVocab, "row_loss_grad: V = ", vocab, " is too large (at most ", kMaxVocab, ")");
  TORCH_CHECK(n <= std::numeric_limits<int>::max(), "row_loss_grad: n = ", n, " rows is too many for one launch");
  const bool rows_contiguous = (vocab == 1 || logits.stride(1) == 1) && (n <= 1 || logits.stride(0) >= vocab);
  TORCH_CHECK(rows_contiguous, "row_loss_grad: logits rows must be contiguous, got strides ", logits.strides());
  TORCH_CHECK(target.device() == logits.device(), "row_loss_grad: target must be on ", logits.device(),
              " like logits, got ", target.device());
  TORCH_CHECK(target.scalar_type() == at::kLong, "row_loss_grad: target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n, "row_loss_grad: target must have shape [", n, "], got ",
              target.sizes());
  TORCH_CHECK(n <= 1 || target.stride(0) == 1, "row_loss_grad: target must be contiguous");
  if (token_weights) check_vector(*token_weights, "token_weights", n, logits, /*allow_scalar=*/false);
  if (grad_scale) check_vector(*grad_scale, "grad_scale", n, logits, /*allow_scalar=*/true);
  TORCH_CHECK(kernel_id >= 0 && kernel_id < kNumObjectives, "row_loss_grad: kernel_id must be in [0, ",
              kNumObjectives, "), got ", kernel_id);
  TORCH_CHECK(softcap >= 0.0, "row_loss_grad: softcap must be >= 0 (0 disables it), got ", softcap);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "row_loss_grad: label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(z_loss >= 0.0, "row_loss_grad: z_loss must be >= 0, got ", z_loss);

  const c10::DeviceGuard guard(logits.device());
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, f32), nll = at::empty({n}, f32), prob = at::empty({n}, f32);
  at::Tensor entropy = at::empty({with_entropy ? n : 0}, f32);
  at::Tensor correct = at::empty({with_stats ? n : 0}, f32);
  if (n == 0) return {loss, nll, prob, entropy, correct};

  RowParams p;
  p.vocab = static_cast<int>(vocab);
  p.row_stride = n > 1 ? logits.stride(0) : vocab;
  p.ignore_index = ignore_index;
  p.kernel_id = static_cast<int>(kernel_id);
  p.param0 = static_cast<float>(param0);
  p.param1 = static_cast<float>(param1);
  p.softcap = static_cast<float>(softcap);
  p.label_smoothing = static_cast<float>(label_smoothing);
  p.z_loss = static_cast<float>(z_loss);
  p.target = target.data_ptr<int64_t>();
  p.token_weights = token_weights ? token_weights->data_ptr<float>() : nullptr;
  p.grad_scale = grad_scale ? grad_scale->data_ptr<float>() : nullptr;
  p.grad_scale_stride = grad_scale && grad_scale->dim() == 1 ? 1 : 0;
  p.loss = loss.data_ptr<float>();
  p.nll = nll.data_ptr<float>();
  p.prob = prob.data_ptr<float>();
  p.entropy = with_entropy ? entropy.data_ptr<float>() : nullptr;
  p.correct = with_stats ? correct.data_ptr<float>() : nullptr;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  C10_CUDA_CHECK(launch_row_loss_grad(logits.data_ptr(), type, n, p, stream));
  return {loss, nll, prob, entropy, correct};
}

}  // namespace
}  // namespace dftk

TORCH_LIBRARY(dft_kernels_cuda, m) {
  m.def(
      "row_loss_grad(Tensor(a!) logits, Tensor target, Tensor? token_weights, Tensor? grad_scale, "
      "int kernel_id, float param0, float param1, int ignore_index, float softcap, float label_smoothing, "
      "float z_loss, bool with_entropy, bool with_stats) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dft_kernels_cuda, CUDA, m) { m.impl("row_loss_grad", &dftk::row_loss_grad); }

// An empty module: loading the library runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr,
                                      nullptr};
  return PyModule_Create(&module);
}
