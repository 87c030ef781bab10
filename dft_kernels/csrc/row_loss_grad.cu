// CUDA row kernel of the "cuda" backend: loss, per-token stats and, in place, the scaled
// logits gradient of every objective, one block per row.  The per-row math (pass 1 online
// max/sum/entropy/argmax, objective epilogue, pass 2 gradient; formulas at the top of
// row_kernel.cuh) is shared with the host emulation in the tests; this file adds the
// block-wide merge (cub) and the launch.  Contract: dft_kernels/backends/__init__.py.
#include <cub/block/block_reduce.cuh>

#include "row_loss_grad.h"

namespace dftk {
namespace {

struct MergeOp {
  __device__ __forceinline__ RowStats operator()(const RowStats& a, const RowStats& b) const { return merge(a, b); }
};

template <typename T, int kBlock>
__global__ void __launch_bounds__(kBlock) row_loss_grad_kernel(T* __restrict__ logits, const RowParams p) {
  // Offsets past int32: the row offset row * row_stride passes 2^31 elements as soon as N * V
  // does, so it is computed in int64 (row and row_stride are int64), as is every per-row index
  // (target, weights, grad_scale, outputs).  Within a row the int column indices j, and j plus
  // the block size as a loop steps, stay below V + 2 * 512 <= INT_MAX: bindings.cpp rejects
  // larger V (kMaxVocab).  Host-emulated past 2^31 in tests/backends/test_csrc_emulation.py.
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  T* z0 = logits + row * p.row_stride;
  const int64_t y = p.target[row];

  if (!valid_target(y, p)) {  // block-uniform branch: zero outputs, zero gradient row
    if (tid == 0) write_invalid_row(p, row);
    if (p.grad_scale) transform_row(z0, p.vocab, tid, kBlock, ZeroOp{});
    return;
  }

  RowStats stats = empty_stats();
  PushOp push_op{stats, p.softcap};
  visit_row(z0, p.vocab, tid, kBlock, push_op);

  using BlockReduce = cub::BlockReduce<RowStats, kBlock>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  __shared__ RowEpilogue epilogue;
  stats = BlockReduce(reduce_storage).Reduce(stats, MergeOp{});  // valid in thread 0 only
  if (tid == 0) {
    const int yi = static_cast<int>(y);  // valid: 0 <= y < V <= INT_MAX
    epilogue = finish_row(stats, apply_softcap(to_float(z0[yi]), p.softcap), yi, p, row);
  }
  if (p.grad_scale == nullptr) return;  // block-uniform
  __syncthreads();
  transform_row(z0, p.vocab, tid, kBlock, GradOp{epilogue, p.softcap});
}

template <typename T>
void launch(T* logits, int64_t n, const RowParams& p, cudaStream_t stream) {
  // Wide rows get a wide block; narrow rows would leave most of one idle.
  const unsigned grid = static_cast<unsigned>(n);
  if (p.vocab >= 4096) {
    row_loss_grad_kernel<T, 512><<<grid, 512, 0, stream>>>(logits, p);
  } else {
    row_loss_grad_kernel<T, 128><<<grid, 128, 0, stream>>>(logits, p);
  }
}

}  // namespace

cudaError_t launch_row_loss_grad(void* logits, LogitsType type, int64_t n, const RowParams& p, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (type) {
    case LogitsType::kFloat32:
      launch(static_cast<float*>(logits), n, p, stream);
      break;
    case LogitsType::kBFloat16:
      launch(static_cast<__nv_bfloat16*>(logits), n, p, stream);
      break;
    case LogitsType::kFloat16:
      launch(static_cast<__half*>(logits), n, p, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace dftk
