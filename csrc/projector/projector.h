// Device kernels of the fused projector (projector.cu), called by the op (projector_op.cpp).
// Plain CUDA: no torch headers here, so projector.cu compiles in seconds for every architecture; the
// torch-facing glue and the cuBLASLt GEMMs live in projector_op.cpp, compiled once by the host compiler.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace llavamed_fast::projector {

enum class DType : int { kFloat32, kFloat16, kBFloat16 };

// a = gelu(h), the exact (erf) GELU, element-wise over n elements, computed in float32.
cudaError_t gelu_forward(DType dtype, const void* h, void* a, int64_t n, cudaStream_t stream);

// dh = da * gelu'(h) with gelu'(h) = Phi(h) + h * phi(h); da is float32 (the GEMM that makes it writes
// float32, so the product is rounded once).
cudaError_t gelu_backward(DType dtype, const float* da, const void* h, void* dh, int64_t n,
                          cudaStream_t stream);

// For each image i: copies rows offsets[i] .. offsets[i] + tokens - 1 of src [total_rows, width] to rows
// i * tokens .. of gathered [images * tokens, width] (when not null) and zeroes those rows of zeroed
// [total_rows, width] (when not null). offsets is a device array; an image whose rows fall outside
// [0, total_rows) is skipped (the host checked them when the forward ran).
cudaError_t gather_image_rows(DType dtype, const void* src, int64_t total_rows, const int64_t* offsets,
                              int64_t images, int64_t tokens, int64_t width, void* gathered, void* zeroed,
                              cudaStream_t stream);

// out[r * ld + c] += bias[c] for r < rows, c < cols (the bias epilogue, where cuBLASLt has none).
cudaError_t add_bias(DType dtype, void* out, int64_t rows, int64_t cols, int64_t ld, const void* bias,
                     cudaStream_t stream);

// out[c] = sum over r < rows of in[r * ld + c], accumulated in float32 (the bias-gradient epilogue, where
// cuBLASLt has none). Deterministic: no atomics.
cudaError_t column_sum(DType dtype, const void* in, int64_t rows, int64_t cols, int64_t ld, void* out,
                       cudaStream_t stream);

}  // namespace llavamed_fast::projector
