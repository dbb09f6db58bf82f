// Element-wise and copy kernels of the fused projector (declared in projector.h). The GEMMs are cuBLASLt
// calls in projector_op.cpp; these kernels do what cuBLASLt's epilogues cannot do exactly (the erf GELU
// and its derivative: cuBLASLt's GELU epilogues use the tanh approximation) and the backward's row moves.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "projector.h"

namespace llavamed_fast::projector {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops: 4096 blocks of 256 threads keep every SM of an H100 (132 SMs x 2048 resident
// threads = 1056 such blocks) busy several times over without a launch per 256 elements.
constexpr int64_t kMaxBlocks = 4096;

int64_t blocks_for(int64_t work) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (work + kThreads - 1) / kThreads));
}

bool aligned(const void* pointer, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % static_cast<uintptr_t>(bytes) == 0;
}

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

constexpr float kSqrtHalf = 0.70710678118654752440f;    // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1 / sqrt(2 pi)

// The same float32 formulas as torch's GELU kernels (approximate="none"), so a matches F.gelu(h).
__device__ __forceinline__ float gelu(float x) { return x * 0.5f * (1.0f + erff(x * kSqrtHalf)); }

__device__ __forceinline__ float gelu_grad(float x) {
  const float cdf = 0.5f * (1.0f + erff(x * kSqrtHalf));
  const float pdf = expf(-0.5f * x * x) * kInvSqrt2Pi;
  return cdf + x * pdf;
}

// kVec elements moved as one aligned load/store (16 bytes of T when the pointers allow it).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__global__ void gelu_forward_kernel(const T* __restrict__ h, T* __restrict__ a, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x * kVec;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; i < n; i += step) {
    if (i + kVec <= n) {
      const Pack<T, kVec> in = *reinterpret_cast<const Pack<T, kVec>*>(h + i);
      Pack<T, kVec> out;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        out.v[j] = from_float<T>(gelu(to_float(in.v[j])));
      }
      *reinterpret_cast<Pack<T, kVec>*>(a + i) = out;
    } else {
      for (int64_t j = i; j < n; ++j) {
        a[j] = from_float<T>(gelu(to_float(h[j])));
      }
    }
  }
}

// A 2-D grid: x walks groups of kVec columns, y chunks of rows. Each thread runs down its kVec columns
// through the chunk's rows, so it can sum them in registers: the bias gradient comes for free while dh
// is written, one partial row per chunk.
template <typename T, int kVec>
__global__ void gelu_backward_kernel(const T* __restrict__ da, const T* __restrict__ h, T* __restrict__ dh,
                                     int64_t rows, int64_t cols, int64_t rows_per_chunk,
                                     float* __restrict__ partial) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t c = group * kVec;
  if (c >= cols) {
    return;
  }
  const int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t last = std::min<int64_t>(rows, first + rows_per_chunk);
  float sums[kVec] = {};
#pragma unroll 4
  for (int64_t r = first; r < last; ++r) {
    const int64_t i = r * cols + c;
    const Pack<T, kVec> grad = *reinterpret_cast<const Pack<T, kVec>*>(da + i);
    const Pack<T, kVec> in = *reinterpret_cast<const Pack<T, kVec>*>(h + i);
    Pack<T, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      out.v[j] = from_float<T>(to_float(grad.v[j]) * gelu_grad(to_float(in.v[j])));
      sums[j] += to_float(out.v[j]);
    }
    *reinterpret_cast<Pack<T, kVec>*>(dh + i) = out;
  }
  if (partial != nullptr) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      partial[blockIdx.y * cols + c + j] = sums[j];
    }
  }
}

__global__ void mark_image_rows_kernel(const int64_t* __restrict__ offsets, int64_t images, int64_t tokens,
                                       int64_t total_rows, int32_t* __restrict__ map) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < images * tokens;
       i += step) {
    const int64_t image = i / tokens;
    const int64_t offset = offsets[image];
    if (offset >= 0 && offset <= total_rows - tokens) {
      map[offset + (i - image * tokens)] = static_cast<int32_t>(i);
    }
  }
}

__global__ void mark_rows_kernel(int64_t offset, int64_t first, int64_t tokens, int32_t* __restrict__ map) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < tokens; t += step) {
    map[offset + t] = static_cast<int32_t>(first + t);
  }
}

// Rows are moved as opaque units U (16, 8, 4 or 2 bytes); one block walks a row at a time, so the row's
// kind (map) is read once per block and no thread divides by the row length.
template <typename U>
__global__ void split_rows_kernel(const U* __restrict__ src, int64_t total_rows, int64_t row_units,
                                  const int32_t* __restrict__ map, U* __restrict__ text_out, bool zero_images,
                                  U* __restrict__ gathered) {
  for (int64_t r = blockIdx.x; r < total_rows; r += gridDim.x) {
    const int64_t slot = map[r];
    const int64_t at = r * row_units;
    if (slot < 0) {
      if (text_out != nullptr) {
        for (int64_t c = threadIdx.x; c < row_units; c += blockDim.x) {
          text_out[at + c] = src[at + c];
        }
      }
      continue;
    }
    for (int64_t c = threadIdx.x; c < row_units; c += blockDim.x) {
      if (gathered != nullptr) {
        gathered[slot * row_units + c] = src[at + c];
      }
      if (text_out != nullptr && zero_images) {
        text_out[at + c] = U{};
      }
    }
  }
}

// split_rows for the backward with the image rows' column sums: the layout of gelu_backward_kernel (x
// walks groups of kVec columns, y chunks of rows), so each thread sums its columns down the chunk in
// registers. Every thread of a block reads the same map entry per row (one broadcast load).
template <typename T, int kVec>
__global__ void split_rows_sum_kernel(const T* __restrict__ src, int64_t total_rows, int64_t width,
                                      int64_t rows_per_chunk, const int32_t* __restrict__ map,
                                      T* __restrict__ text_out, T* __restrict__ gathered,
                                      float* __restrict__ partial) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (c >= width) {
    return;
  }
  const int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t last = std::min<int64_t>(total_rows, first + rows_per_chunk);
  float sums[kVec] = {};
  for (int64_t r = first; r < last; ++r) {
    const int64_t slot = map[r];
    const Pack<T, kVec> value = *reinterpret_cast<const Pack<T, kVec>*>(src + r * width + c);
    if (slot < 0) {
      if (text_out != nullptr) {
        *reinterpret_cast<Pack<T, kVec>*>(text_out + r * width + c) = value;
      }
      continue;
    }
    *reinterpret_cast<Pack<T, kVec>*>(gathered + slot * width + c) = value;
    if (text_out != nullptr) {
      *reinterpret_cast<Pack<T, kVec>*>(text_out + r * width + c) = Pack<T, kVec>{};
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      sums[j] += to_float(value.v[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    partial[blockIdx.y * width + c + j] = sums[j];
  }
}

// out[c] = sum over chunks of partial[k, c]: 32 columns per block (128-byte reads across a warp), its 8
// warps taking every 8th chunk, then the 8 sums added in shared memory in a fixed order.
constexpr int kSumColumns = 32;
constexpr int kSumLanes = 8;

template <typename T>
__global__ void sum_partials_kernel(const float* __restrict__ partial, int64_t chunks, int64_t cols,
                                    T* __restrict__ out) {
  __shared__ float lanes[kSumLanes][kSumColumns];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kSumColumns + threadIdx.x;
  float sum = 0.0f;
  if (c < cols) {
#pragma unroll 8
    for (int64_t k = threadIdx.y; k < chunks; k += kSumLanes) {
      sum += partial[k * cols + c];
    }
  }
  lanes[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.0f;
#pragma unroll
    for (int y = 0; y < kSumLanes; ++y) {
      total += lanes[y][threadIdx.x];
    }
    out[c] = from_float<T>(total);
  }
}

template <typename T>
__global__ void add_bias_kernel(T* __restrict__ out, int64_t rows, int64_t cols, int64_t ld,
                                const T* __restrict__ bias) {
  const int64_t total = rows * cols;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t r = i / cols;
    const int64_t c = i - r * cols;
    T& value = out[r * ld + c];
    value = from_float<T>(to_float(value) + to_float(bias[c]));
  }
}

template <typename F>
cudaError_t dispatch(DType dtype, F&& launch) {
  switch (dtype) {
    case DType::kFloat32:
      return launch(float{});
    case DType::kFloat16:
      return launch(__half{});
    case DType::kBFloat16:
      return launch(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

int64_t element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

}  // namespace

cudaError_t gelu_forward(DType dtype, const void* h, void* a, int64_t n, cudaStream_t stream) {
  if (n == 0) {
    return cudaSuccess;
  }
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const T* in = static_cast<const T*>(h);
    T* out = static_cast<T*>(a);
    if (aligned(in, 16) && aligned(out, 16)) {
      gelu_forward_kernel<T, kVec><<<blocks_for((n + kVec - 1) / kVec), kThreads, 0, stream>>>(in, out, n);
    } else {
      gelu_forward_kernel<T, 1><<<blocks_for(n), kThreads, 0, stream>>>(in, out, n);
    }
    return cudaGetLastError();
  });
}

// 512 chunks: at the projector's widths (4096 columns, two 256-thread blocks across in bf16) about 1024
// blocks, enough to fill an H100 several times over, while the partial sums stay at 8 MB.
int64_t column_sum_chunks(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(rows, 512)); }

cudaError_t sum_partials(DType dtype, const float* partial, int64_t chunks, int64_t cols, void* out,
                         cudaStream_t stream) {
  if (cols == 0) {
    return cudaSuccess;
  }
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 block(kSumColumns, kSumLanes);
    const auto grid = static_cast<unsigned>((cols + kSumColumns - 1) / kSumColumns);
    sum_partials_kernel<T><<<grid, block, 0, stream>>>(partial, chunks, cols, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

namespace {

// Launches a kernel of the column-chunk layout (x: groups of kVec columns, y: chunks of rows) for [rows, cols]
// tensors of T: launch(kVec, grid, rows_per_chunk), with kVec = 16 bytes of T when every row of every
// pointer starts on a 16-byte boundary (null pointers are not written), else 1.
template <typename T, typename Launch>
cudaError_t launch_column_chunks(int64_t rows, int64_t cols, std::initializer_list<const void*> pointers,
                                 Launch&& launch) {
  constexpr int kVec = 16 / sizeof(T);
  bool vector = cols % kVec == 0;
  for (const void* pointer : pointers) {
    vector = vector && (pointer == nullptr || aligned(pointer, 16));
  }
  const int64_t chunks = column_sum_chunks(rows);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  const auto grid = [&](int64_t groups) {
    return dim3(static_cast<unsigned>((groups + kThreads - 1) / kThreads), static_cast<unsigned>(chunks));
  };
  if (vector) {
    launch(std::integral_constant<int, kVec>{}, grid(cols / kVec), rows_per_chunk);
  } else {
    launch(std::integral_constant<int, 1>{}, grid(cols), rows_per_chunk);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t gelu_backward(DType dtype, const void* da, const void* h, void* dh, int64_t rows, int64_t cols,
                          float* partial, cudaStream_t stream) {
  if (rows == 0 || cols == 0) {
    return cudaSuccess;
  }
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* grad = static_cast<const T*>(da);
    const T* in = static_cast<const T*>(h);
    T* out = static_cast<T*>(dh);
    return launch_column_chunks<T>(rows, cols, {grad, in, out}, [&](auto vec, dim3 grid, int64_t rows_per_chunk) {
      gelu_backward_kernel<T, decltype(vec)::value>
          <<<grid, kThreads, 0, stream>>>(grad, in, out, rows, cols, rows_per_chunk, partial);
    });
  });
}

cudaError_t mark_image_rows(const int64_t* offsets, int64_t images, int64_t tokens, int64_t total_rows,
                            int32_t* map, cudaStream_t stream) {
  if (images == 0 || tokens == 0) {
    return cudaSuccess;
  }
  mark_image_rows_kernel<<<blocks_for(images * tokens), kThreads, 0, stream>>>(offsets, images, tokens,
                                                                              total_rows, map);
  return cudaGetLastError();
}

cudaError_t mark_rows(int64_t offset, int64_t first, int64_t tokens, int32_t* map, cudaStream_t stream) {
  if (tokens == 0) {
    return cudaSuccess;
  }
  mark_rows_kernel<<<blocks_for(tokens), kThreads, 0, stream>>>(offset, first, tokens, map);
  return cudaGetLastError();
}

cudaError_t split_rows(DType dtype, const void* src, int64_t total_rows, int64_t width, const int32_t* map,
                       void* text_out, bool zero_images, void* gathered, cudaStream_t stream) {
  if (total_rows == 0 || width == 0 || (text_out == nullptr && gathered == nullptr)) {
    return cudaSuccess;
  }
  const int64_t row_bytes = width * element_size(dtype);
  // The widest unit that divides a row and every base pointer (a row offset is a multiple of a row).
  int64_t unit = 16;
  while (unit > 2 && (row_bytes % unit != 0 || !aligned(src, unit) ||
                      (text_out != nullptr && !aligned(text_out, unit)) ||
                      (gathered != nullptr && !aligned(gathered, unit)))) {
    unit /= 2;
  }
  const int64_t row_units = row_bytes / unit;
  // A row of 4096 bf16 is 512 units of 16 bytes: two per thread of a 256-thread block.
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(total_rows, 16 * kMaxBlocks));
  auto launch = [&](auto tag) {
    using U = decltype(tag);
    split_rows_kernel<U><<<grid, kThreads, 0, stream>>>(static_cast<const U*>(src), total_rows, row_units, map,
                                                        static_cast<U*>(text_out), zero_images,
                                                        static_cast<U*>(gathered));
    return cudaGetLastError();
  };
  switch (unit) {
    case 16:
      return launch(uint4{});
    case 8:
      return launch(uint2{});
    case 4:
      return launch(uint32_t{});
    default:
      return launch(uint16_t{});
  }
}

cudaError_t split_rows_with_sums(DType dtype, const void* src, int64_t total_rows, int64_t width,
                                 const int32_t* map, void* text_out, void* gathered, float* partial,
                                 cudaStream_t stream) {
  if (total_rows == 0 || width == 0) {
    return cudaSuccess;
  }
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(src);
    T* text = static_cast<T*>(text_out);
    T* images = static_cast<T*>(gathered);
    return launch_column_chunks<T>(
        total_rows, width, {in, text, images}, [&](auto vec, dim3 grid, int64_t rows_per_chunk) {
          split_rows_sum_kernel<T, decltype(vec)::value>
              <<<grid, kThreads, 0, stream>>>(in, total_rows, width, rows_per_chunk, map, text, images, partial);
        });
  });
}

cudaError_t add_bias(DType dtype, void* out, int64_t rows, int64_t cols, int64_t ld, const void* bias,
                     cudaStream_t stream) {
  if (rows == 0 || cols == 0) {
    return cudaSuccess;
  }
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    add_bias_kernel<T><<<blocks_for(rows * cols), kThreads, 0, stream>>>(static_cast<T*>(out), rows, cols, ld,
                                                                         static_cast<const T*>(bias));
    return cudaGetLastError();
  });
}

}  // namespace llavamed_fast::projector
