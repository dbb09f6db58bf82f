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

// Column sums without atomics: a pass over [rows, cols] splits the rows into column_sum_chunks(rows) chunks
// and writes one float32 partial row per chunk, partial [chunks, cols]; sum_partials adds them up in a
// fixed order (deterministic, unlike atomics) into out [cols], in the inputs' dtype.
int64_t column_sum_chunks(int64_t rows);
cudaError_t sum_partials(DType dtype, const float* partial, int64_t chunks, int64_t cols, void* out,
                         cudaStream_t stream);

// dh = da * gelu'(h) with gelu'(h) = Phi(h) + h * phi(h), for row-major [rows, cols] da, h and dh of one
// dtype (da in the inputs' dtype, as torch's own backward has it). When partial is not null it also
// writes the bias gradient's partial column sums of dh (of the rounded values written), so the bias
// gradient needs no second read of dh.
cudaError_t gelu_backward(DType dtype, const void* da, const void* h, void* dh, int64_t rows, int64_t cols,
                          float* partial, cudaStream_t stream);

// map[offsets[i] + t] = i * tokens + t for every image i and token t < tokens: the row of the image-major
// [images * tokens, width] matrix that a packed row holds. The caller fills map [total_rows] with -1 first
// (text rows); offsets is a device array, and an image whose rows fall outside [0, total_rows) is skipped
// (the host checked them when the forward ran).
cudaError_t mark_image_rows(const int64_t* offsets, int64_t images, int64_t tokens, int64_t total_rows,
                            int32_t* map, cudaStream_t stream);

// The same for one image whose offset is known on the host: map[offset + t] = first + t for t < tokens.
cudaError_t mark_rows(int64_t offset, int64_t first, int64_t tokens, int32_t* map, cudaStream_t stream);

// For each row r of src [total_rows, width], with map from mark_image_rows: a text row (map[r] < 0) is
// copied to text_out; an image row is zeroed in text_out when zero_images, and copied to row map[r] of
// gathered. text_out and gathered may be null (not written); src is read only where something is written.
cudaError_t split_rows(DType dtype, const void* src, int64_t total_rows, int64_t width, const int32_t* map,
                       void* text_out, bool zero_images, void* gathered, cudaStream_t stream);

// The same split for the backward (text_out and gathered both written, image rows zeroed in text_out),
// also writing the partial column sums of the image rows (column_sum_chunks(total_rows) of them): the
// second layer's bias gradient, from the same single read of src.
cudaError_t split_rows_with_sums(DType dtype, const void* src, int64_t total_rows, int64_t width,
                                 const int32_t* map, void* text_out, void* gathered, float* partial,
                                 cudaStream_t stream);

// out[r * ld + c] += bias[c] for r < rows, c < cols (the bias epilogue, where cuBLASLt has none).
cudaError_t add_bias(DType dtype, void* out, int64_t rows, int64_t cols, int64_t ld, const void* bias,
                     cudaStream_t stream);

}  // namespace llavamed_fast::projector
