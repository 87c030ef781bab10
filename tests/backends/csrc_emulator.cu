// Host emulation of the CUDA row kernel, for the CPU test suite (tests/backends/test_csrc_emulation.py).
// Runs the kernel's own per-row code (csrc/row_kernel.cuh: visit_row/push, merge,
// finish_row, transform_row/GradOp) on the CPU, one "thread" after another: each thread's
// pass-1 state, a pairwise tree merge like a block reduction, the epilogue, then each
// thread's pass 2.  Only the cub reduction and the launch are not exercised here.
#include <vector>

#include "row_kernel.cuh"

namespace {

template <typename T>
void emulate_rows(T* logits, int64_t n, const dftk::RowParams& p, int nthreads) {
  using namespace dftk;
  std::vector<RowStats> partial(nthreads);
  for (int64_t row = 0; row < n; ++row) {
    T* z0 = logits + row * p.row_stride;
    const int64_t y = p.target[row];
    if (!valid_target(y, p)) {
      write_invalid_row(p, row);
      if (p.grad_scale)
        for (int tid = 0; tid < nthreads; ++tid) transform_row(z0, p.vocab, tid, nthreads, ZeroOp{});
      continue;
    }
    for (int tid = 0; tid < nthreads; ++tid) {
      partial[tid] = empty_stats();
      PushOp op{partial[tid], p.softcap};
      visit_row(z0, p.vocab, tid, nthreads, op);
    }
    for (int width = 1; width < nthreads; width *= 2)
      for (int tid = 0; tid + width < nthreads; tid += 2 * width) partial[tid] = merge(partial[tid], partial[tid + width]);
    const int yi = static_cast<int>(y);
    const RowEpilogue e = finish_row(partial[0], apply_softcap(to_float(z0[yi]), p.softcap), yi, p, row);
    if (p.grad_scale)
      for (int tid = 0; tid < nthreads; ++tid) transform_row(z0, p.vocab, tid, nthreads, GradOp{e, p.softcap});
  }
}

}  // namespace

// Same arguments as the torch op, as raw pointers; type: 0 float32, 1 bfloat16, 2 float16.
extern "C" int dftk_emulate_row_loss_grad(void* logits, int type, int64_t n, int vocab, int64_t row_stride,
                                          const int64_t* target, int64_t ignore_index, int kernel_id, float param0,
                                          float param1, float softcap, float label_smoothing, float z_loss,
                                          const float* token_weights, const float* grad_scale,
                                          int64_t grad_scale_stride, float* loss, float* nll, float* prob,
                                          float* entropy, float* correct, int nthreads) {
  dftk::RowParams p{vocab,     row_stride,      ignore_index,   kernel_id,     param0,    param1,
                    softcap,   label_smoothing, z_loss,         target,        token_weights,
                    grad_scale, grad_scale_stride, loss, nll, prob, entropy, correct};
  switch (type) {
    case 0: emulate_rows(static_cast<float*>(logits), n, p, nthreads); return 0;
    case 1: emulate_rows(static_cast<__nv_bfloat16*>(logits), n, p, nthreads); return 0;
    case 2: emulate_rows(static_cast<__half*>(logits), n, p, nthreads); return 0;
    default: return 1;
  }
}
