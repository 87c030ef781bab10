// Launcher of the CUDA row kernel (row_loss_grad.cu), called by the torch op in
// bindings.cpp.  Plain CUDA types only, so the .cu file compiles without torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "row_kernel.cuh"

namespace dftk {

enum class LogitsType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Runs the row kernel on n rows of logits (element type `type`, rows p.row_stride apart)
// on `stream`; one block per row.  Returns the launch status (cudaGetLastError).
cudaError_t launch_row_loss_grad(void* logits, LogitsType type, int64_t n, const RowParams& p, cudaStream_t stream);

}  // namespace dftk
