// torch ops llavamed_fast::projector_cuda_forward / projector_cuda_backward: the projector (Linear -> exact
// GELU -> Linear for mlp2x_gelu, one Linear for v0) on cuBLASLt, each image's tokens written by the last
// GEMM straight into its rows of the packed embeddings. The contract is llavamed_fast/ops/_library.py's
// (projector section); llavamed_fast/ops/reference.py is the definition. Registered only in CUDA builds.
//
// Why it is built this way:
// - cuBLASLt's GELU epilogues (GELU_AUX_BIAS, DGELU, ...) compute the tanh approximation of GELU (cuBLAS
//   docs, cublasLtEpilogue_t, footnote on GELU); the model uses the exact erf GELU. So GEMM1 uses only the
//   BIAS epilogue and writes the pre-activation h, a kernel computes gelu(h) (and gelu'(h) backward).
// - Layout: a row-major [r, c] tensor is a column-major c x r matrix, so y = x W^T + b, with x [M, K] and
//   W [O, K], is the column-major D (O x M) = op(A) (O x K, A = W read transposed) * B (K x M, B = x).
//   The bias (length O) is a per-row vector of D: cuBLASLt's BIAS epilogue.
// - Packed output: image i's P tokens are the contiguous rows offsets[i] .. of the [T, D] output, so the
//   last GEMM runs once per image with D pointing at out + offsets[i] * D (leading dimension D): no
//   intermediate buffer, no scatter. The pointers must be known on the host: image_offsets on the CPU is
//   free, on the GPU it costs one small device-to-host copy that waits for the queued work. (cuBLASLt's
//   pointer-array and grouped batches, which could take device pointers in one launch, allow only the
//   DEFAULT epilogue, and grouped ones only on sm_100+.) Only the text rows of embeds are copied into the
//   output (one kernel, driven by a row map built on the device from the offsets); the GEMMs write the
//   others.
// - Backward: one pass over dy (split_rows) writes dembeds (text rows copied, image rows zeroed) and
//   gathers the image rows into a contiguous [N * P, D] buffer; then each gradient is one GEMM over all
//   N * P rows. Per-image GEMMs would read dy in place but, for dW2 = sum_i dy_i^T a_i,
//   each would read and write the whole [D, D1] float32 accumulator for only K = P = 576 rows of work:
//   2 * D * D1 * P flops per 8 * D * D1 bytes = P / 4 = 144 flop/byte, below an H100's ~300 (bf16 tensor
//   cores over HBM3): memory-bound, N times over. The gather costs one read and one write of N * P * D
//   elements (57 MB each for 12 images at D = 4096 in bf16, ~40 us on an H100), and buys K = N * P for
//   dW2 and dW1, one large GEMM for da, and one rounding of dW2 instead of N.
// - Bias gradients (float32 sums) ride on passes that read the rows anyway: db2 on the split of dy, db1 on
//   the GELU backward, each writing per-chunk partial sums that a small kernel adds up in a fixed order.
//   Measured on an H100: cuBLASLt's BGRADB epilogue ran as a separate kernel of 40 us per bias, and torch's
//   column sum took about as long (a second read of the rows). Where nothing is split or no GELU runs
//   (no embeds, the linear projector), torch's column sum remains.
// - The forward keeps the GELU's output as well as its input for the backward (dW2 = dy^T gelu(h)):
//   recomputing it there cost a read and a write of N * P * D1 elements.
// - Precision: float32 accumulation everywhere (CUBLAS_COMPUTE_32F, no TF32 for float32 inputs, as torch's
//   default). da = dy W2 is written in the inputs' dtype, as torch's backward writes it: a float32 da
//   (dh rounded once) doubled the bytes written by that GEMM and read by the GELU backward.
#ifdef LLAVAMED_FAST_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "projector.h"

namespace llavamed_fast::projector {
namespace {

constexpr const char* kOp = "projector (cuda backend)";

// ------------------------------------------------------------------------------------------------------
// Argument checks

DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      TORCH_CHECK_TYPE(false, kOp,
                       ": float64 is not supported (bfloat16, float16 and float32 are); run float64 through "
                       "the torch backend: use_backend(projector=\"torch\")");
    default:
      TORCH_CHECK_TYPE(false, kOp, ": x must be bfloat16, float16 or float32, got ", x.scalar_type());
  }
}

void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.device() == x.device(), kOp, ": ", name, " is on ", t.device(), " but x is on ",
                    x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), kOp, ": ", name, " has dtype ", t.scalar_type(),
                   " but x has ", x.scalar_type(), " (all floating-point inputs must share one dtype)");
  TORCH_CHECK_VALUE(t.sizes() == shape, kOp, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

struct Shapes {
  int64_t images;    // N
  int64_t tokens;    // P, per image
  int64_t channels;  // C, vision width
  int64_t hidden;    // D1, first layer's output width
  int64_t width;     // D, output width (D1 for the linear projector)
  int64_t total;     // T, rows of embeds (0 without embeds)
  bool mlp;
};

Shapes check_inputs(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
                    const std::optional<at::Tensor>& embeds, const std::optional<at::Tensor>& image_offsets) {
  TORCH_CHECK_VALUE(x.is_cuda(), kOp, ": x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 3, kOp, ": x must be [images, tokens, channels], got shape ", x.sizes());
  dtype_of(x);
  TORCH_CHECK_VALUE(w1.dim() == 2, kOp, ": w1 must be [hidden, channels], got shape ", w1.sizes());
  Shapes s{x.size(0), x.size(1), x.size(2), w1.size(0), w1.size(0), 0, w2.has_value()};
  TORCH_CHECK_VALUE(s.channels > 0 && s.hidden > 0, kOp, ": x ", x.sizes(), " and w1 ", w1.sizes(),
                    " must have non-zero widths");
  check_like_x(w1, "w1", x, {s.hidden, s.channels});
  if (b1.has_value()) {
    check_like_x(*b1, "b1", x, {s.hidden});
  }
  TORCH_CHECK_VALUE(s.mlp || !b2.has_value(), kOp, ": b2 given without w2");
  if (s.mlp) {
    TORCH_CHECK_VALUE(w2->dim() == 2 && w2->size(0) > 0, kOp, ": w2 must be [width, hidden], got shape ",
                      w2->sizes());
    s.width = w2->size(0);
    check_like_x(*w2, "w2", x, {s.width, s.hidden});
    if (b2.has_value()) {
      check_like_x(*b2, "b2", x, {s.width});
    }
  }
  TORCH_CHECK_VALUE(embeds.has_value() == image_offsets.has_value(), kOp,
                    ": embeds and image_offsets go together");
  if (embeds.has_value()) {
    TORCH_CHECK_VALUE(embeds->dim() == 2, kOp, ": embeds must be [tokens, width], got shape ",
                      embeds->sizes());
    s.total = embeds->size(0);
    check_like_x(*embeds, "embeds", x, {s.total, s.width});
    TORCH_CHECK_TYPE(image_offsets->scalar_type() == at::kLong, kOp,
                     ": image_offsets must have dtype int64, got ", image_offsets->scalar_type());
    TORCH_CHECK_VALUE(image_offsets->dim() == 1 && image_offsets->size(0) == s.images, kOp,
                      ": image_offsets must be [", s.images, "], got shape ", image_offsets->sizes());
    TORCH_CHECK_VALUE(image_offsets->is_cpu() || image_offsets->device() == x.device(), kOp,
                      ": image_offsets must be on the CPU or on x's device ", x.device(), ", got ",
                      image_offsets->device());
  }
  return s;
}

// The first row of each image, read on the host (a device-to-host copy when they live on the GPU) and
// checked: every image's rows must lie inside embeds.
std::vector<int64_t> host_offsets(const at::Tensor& image_offsets, const Shapes& s) {
  const at::Tensor host = image_offsets.cpu().contiguous();
  const int64_t* data = host.const_data_ptr<int64_t>();
  std::vector<int64_t> offsets(data, data + s.images);
  for (int64_t i = 0; i < s.images; ++i) {
    TORCH_CHECK_VALUE(offsets[i] >= 0 && offsets[i] + s.tokens <= s.total, kOp, ": image ", i,
                      " starts at row ", offsets[i], ", so its ", s.tokens, " tokens do not fit in the ",
                      s.total, " rows of embeds");
  }
  return offsets;
}

const char* row_ptr(const at::Tensor& t, int64_t row, int64_t width) {
  return static_cast<const char*>(t.const_data_ptr()) + row * width * t.element_size();
}

char* row_ptr(at::Tensor& t, int64_t row, int64_t width) {
  return static_cast<char*>(t.mutable_data_ptr()) + row * width * t.element_size();
}

// ------------------------------------------------------------------------------------------------------
// cuBLASLt

void check_blas(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, kOp, ": ", what, " failed: ", cublasLtGetStatusString(status));
}

template <typename Handle, cublasStatus_t (*Destroy)(Handle)>
struct Owned {
  Handle value = nullptr;
  Owned() = default;
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() {
    if (value != nullptr) {
      Destroy(value);
    }
  }
};
using MatmulDesc = Owned<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>;
using Layout = Owned<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>;
using Preference = Owned<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy>;

template <typename V>
void set(const MatmulDesc& desc, cublasLtMatmulDescAttributes_t attribute, const V& value) {
  check_blas(cublasLtMatmulDescSetAttribute(desc.value, attribute, &value, sizeof(value)),
             "cublasLtMatmulDescSetAttribute");
}

template <typename V>
void set(const Preference& preference, cublasLtMatmulPreferenceAttributes_t attribute, const V& value) {
  check_blas(cublasLtMatmulPreferenceSetAttribute(preference.value, attribute, &value, sizeof(value)),
             "cublasLtMatmulPreferenceSetAttribute");
}

// torch's cuBLASLt handle and workspace for the current device and stream, as torch's own GEMMs use them.
struct Blas {
  cublasLtHandle_t handle;
  cudaStream_t stream;
  void* workspace;
  size_t workspace_size;
};

Blas current_blas() {
  Blas blas{};
  blas.handle = at::cuda::getCurrentCUDABlasLtHandle();
  blas.stream = c10::cuda::getCurrentCUDAStream().stream();
  // Size first, then the buffer: the order of torch's own CublasLtWorkspace (ATen/cuda/CUDABlas.cpp).
  blas.workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  blas.workspace = at::cuda::getCUDABlasLtWorkspace();
  return blas;
}

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return CUDA_R_32F;
    case DType::kFloat16:
      return CUDA_R_16F;
    case DType::kBFloat16:
      return CUDA_R_16BF;
  }
  TORCH_INTERNAL_ASSERT(false);
}

// The heuristics assume 256-byte aligned matrices unless told otherwise, and an algorithm picked for
// aligned pointers may refuse less aligned ones: tell them the worst alignment of the pointers used.
uint32_t alignment(const void* pointer) {
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  uint32_t bytes = 256;
  while (bytes > 1 && address % bytes != 0) {
    bytes /= 2;
  }
  return bytes;
}

enum class Epilogue {
  kNone,
  kBias,  // D += bias (length m) broadcast over the columns
};

struct Product {
  const void* a;
  const void* b;
  void* d;
};

// Column-major D (m x n, leading dimension ldd) = op(A) (m x k) op(B) (k x n), plus the epilogue, for each
// product: one descriptor and one algorithm serve them all (the per-image GEMMs differ only in pointers).
// A and B have the inputs' dtype; D too, or float32 when float_output. Where cuBLASLt has no algorithm
// for the epilogue (rare shapes and alignments), a plain GEMM plus a small kernel does the same work.
void gemm(const Blas& blas, DType dtype, bool float_output, bool trans_a, bool trans_b, int64_t m, int64_t n,
          int64_t k, int64_t lda, int64_t ldb, int64_t ldd, Epilogue epilogue, void* bias,
          const std::vector<Product>& products) {
  TORCH_INTERNAL_ASSERT(epilogue == Epilogue::kNone || (!float_output && bias != nullptr));
  const cudaDataType_t ab_type = cuda_type(dtype);
  const cudaDataType_t d_type = float_output ? CUDA_R_32F : ab_type;

  MatmulDesc desc;
  check_blas(cublasLtMatmulDescCreate(&desc.value, CUBLAS_COMPUTE_32F, CUDA_R_32F),
             "cublasLtMatmulDescCreate");
  set(desc, CUBLASLT_MATMUL_DESC_TRANSA, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N);
  set(desc, CUBLASLT_MATMUL_DESC_TRANSB, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N);
  Layout a_layout;
  Layout b_layout;
  Layout d_layout;
  check_blas(cublasLtMatrixLayoutCreate(&a_layout.value, ab_type, trans_a ? k : m, trans_a ? m : k, lda),
             "cublasLtMatrixLayoutCreate");
  check_blas(cublasLtMatrixLayoutCreate(&b_layout.value, ab_type, trans_b ? n : k, trans_b ? k : n, ldb),
             "cublasLtMatrixLayoutCreate");
  check_blas(cublasLtMatrixLayoutCreate(&d_layout.value, d_type, m, n, ldd), "cublasLtMatrixLayoutCreate");

  Preference preference;
  check_blas(cublasLtMatmulPreferenceCreate(&preference.value), "cublasLtMatmulPreferenceCreate");
  set(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(blas.workspace_size));
  uint32_t align_a = 256;
  uint32_t align_b = 256;
  uint32_t align_d = 256;
  for (const Product& p : products) {
    align_a = std::min(align_a, alignment(p.a));
    align_b = std::min(align_b, alignment(p.b));
    align_d = std::min(align_d, alignment(p.d));
  }
  set(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a);
  set(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b);
  set(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d);
  set(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d);

  cublasLtMatmulHeuristicResult_t result = {};
  auto find_algorithm = [&](cublasLtEpilogue_t mode) {
    set(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, mode);
    int found = 0;
    const cublasStatus_t status =
        cublasLtMatmulAlgoGetHeuristic(blas.handle, desc.value, a_layout.value, b_layout.value,
                                       d_layout.value, d_layout.value, preference.value, 1, &result, &found);
    return status == CUBLAS_STATUS_SUCCESS && found > 0;
  };
  bool fused = false;
  if (epilogue != Epilogue::kNone) {
    // The preferences above carry no bias alignment, and cuBLASLt's bias epilogues have been seen to fault
    // on a bias vector that is not 16-byte aligned (a view into a flat parameter buffer can be): such a
    // bias takes the separate kernel. Otherwise set the pointer before asking, so the heuristics see it.
    if (alignment(bias) >= 16) {
      set(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
      fused = find_algorithm(CUBLASLT_EPILOGUE_BIAS);
    }
    if (!fused) {
      TORCH_WARN_ONCE(kOp, ": cuBLASLt has no BIAS epilogue for a ", m, " x ", n, " x ", k,
                      " GEMM at these alignments; a separate kernel "
                      "does its work (slower, same result)");
    }
  }
  if (!fused) {
    TORCH_CHECK(find_algorithm(CUBLASLT_EPILOGUE_DEFAULT), kOp, ": cuBLASLt found no algorithm for a ", m,
                " x ", n, " x ", k, " GEMM (transa ", trans_a, ", transb ", trans_b, ", lda ", lda, ", ldb ",
                ldb, ", ldd ", ldd, ", alignments ", align_a, "/", align_b, "/", align_d, " bytes)");
  }

  const float alpha = 1.0f;
  const float beta = 0.0f;
  for (const Product& p : products) {
    check_blas(cublasLtMatmul(blas.handle, desc.value, &alpha, p.a, a_layout.value, p.b, b_layout.value,
                              &beta, p.d, d_layout.value, p.d, d_layout.value, &result.algo, blas.workspace,
                              blas.workspace_size, blas.stream),
               "cublasLtMatmul");
    if (!fused && epilogue == Epilogue::kBias) {
      // D is n rows (row-major view) of m elements, ldd apart.
      C10_CUDA_CHECK(add_bias(dtype, p.d, n, m, ldd, bias, blas.stream));
    }
  }
}

// out = in W^T + b for in [rows, K] and W [O, K]: into rows 0.. of out (offsets null), or image by image
// into rows offsets[i] .. of out ([T, O], tokens rows per image).
void linear(const Blas& blas, DType dtype, const at::Tensor& in, const at::Tensor& w, const at::Tensor& b,
            at::Tensor& out, const std::vector<int64_t>* offsets, int64_t images, int64_t tokens) {
  const int64_t outputs = w.size(0);
  const int64_t inputs = w.size(1);
  std::vector<Product> products;
  int64_t n = images * tokens;
  if (offsets == nullptr) {
    products.push_back({w.const_data_ptr(), in.const_data_ptr(), out.mutable_data_ptr()});
  } else {
    n = tokens;
    for (int64_t i = 0; i < images; ++i) {
      products.push_back(
          {w.const_data_ptr(), row_ptr(in, i * tokens, inputs), row_ptr(out, (*offsets)[i], outputs)});
    }
  }
  gemm(blas, dtype, /*float_output=*/false, /*trans_a=*/true, /*trans_b=*/false, outputs, n, inputs, inputs,
       inputs, outputs, b.defined() ? Epilogue::kBias : Epilogue::kNone,
       b.defined() ? b.mutable_data_ptr() : nullptr, products);
}

// dW = grad_out^T in ([O, K]) for grad_out [rows, O] and in [rows, K]: column-major dW^T (K x O) = A (K x
// rows, in as stored) * op(B) (rows x O, grad_out as stored, read transposed).
void weight_grad(const Blas& blas, DType dtype, const at::Tensor& grad_out, const at::Tensor& in,
                 at::Tensor& dw) {
  const int64_t rows = grad_out.size(0);
  const int64_t outputs = grad_out.size(1);
  const int64_t inputs = in.size(1);
  gemm(blas, dtype, /*float_output=*/false, /*trans_a=*/false, /*trans_b=*/true, inputs, outputs, rows,
       inputs, outputs, inputs, Epilogue::kNone, nullptr,
       {{in.const_data_ptr(), grad_out.const_data_ptr(), dw.mutable_data_ptr()}});
}

// The bias gradient: column sums of grad_out [rows, O], accumulated in float32, in grad_out's dtype.
at::Tensor bias_grad(const at::Tensor& grad_out) {
  return at::sum(grad_out, {0}, /*keepdim=*/false, at::kFloat).to(grad_out.scalar_type());
}

// The bias gradient from a pass's partial column sums [chunks, O], in x's dtype.
at::Tensor column_sums(const at::Tensor& partial, const at::Tensor& x) {
  at::Tensor out = at::empty({partial.size(1)}, x.options());
  C10_CUDA_CHECK(sum_partials(dtype_of(x), partial.const_data_ptr<float>(), partial.size(0), partial.size(1),
                              out.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

// For each row of a packed [T, ...] tensor: -1 for a text row, else its row in the image-major
// [N * P, ...] matrix (see mark_image_rows), on x's device. Offsets on the GPU are read there; offsets on
// the CPU are read on the host (no host-to-device copy, so the op can be captured in a CUDA graph).
at::Tensor image_row_map(const at::Tensor& image_offsets, const Shapes& s, const at::Tensor& x,
                         cudaStream_t stream) {
  TORCH_CHECK_VALUE(s.images * s.tokens <= INT32_MAX && s.total <= INT32_MAX, kOp, ": ", s.images,
                    " images of ", s.tokens, " tokens in ", s.total, " rows exceed the int32 row map");
  at::Tensor map = at::empty({s.total}, x.options().dtype(at::kInt));
  int32_t* data = map.mutable_data_ptr<int32_t>();
  C10_CUDA_CHECK(cudaMemsetAsync(data, 0xFF, s.total * sizeof(int32_t), stream));  // -1: text rows
  if (image_offsets.is_cpu()) {
    const std::vector<int64_t> offsets = host_offsets(image_offsets, s);
    for (int64_t i = 0; i < s.images; ++i) {
      C10_CUDA_CHECK(mark_rows(offsets[i], i * s.tokens, s.tokens, data, stream));
    }
  } else {
    const at::Tensor offsets = image_offsets.contiguous();
    C10_CUDA_CHECK(mark_image_rows(offsets.const_data_ptr<int64_t>(), s.images, s.tokens, s.total, data, stream));
  }
  return map;
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// ------------------------------------------------------------------------------------------------------
// The ops

std::tuple<at::Tensor, at::Tensor> projector_cuda_forward(const at::Tensor& x, const at::Tensor& w1,
                                                          const std::optional<at::Tensor>& b1,
                                                          const std::optional<at::Tensor>& w2,
                                                          const std::optional<at::Tensor>& b2,
                                                          const std::optional<at::Tensor>& embeds,
                                                          const std::optional<at::Tensor>& image_offsets) {
  const Shapes s = check_inputs(x, w1, b1, w2, b2, embeds, image_offsets);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const DType dtype = dtype_of(x);
  const int64_t rows = s.images * s.tokens;
  // Checked before any work is queued.
  const std::vector<int64_t> offsets =
      embeds.has_value() ? host_offsets(*image_offsets, s) : std::vector<int64_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor out;
  if (!embeds.has_value()) {
    out = at::empty({s.images, s.tokens, s.width}, x.options());
  } else if (rows == 0) {
    out = embeds->clone(at::MemoryFormat::Contiguous);
  } else {
    // The text rows only: the last GEMM writes the image rows.
    const at::Tensor embeds_c = embeds->contiguous();
    out = at::empty_like(embeds_c);
    const at::Tensor map = image_row_map(*image_offsets, s, x, stream);
    C10_CUDA_CHECK(split_rows(dtype, embeds_c.const_data_ptr(), s.total, s.width, map.const_data_ptr<int32_t>(),
                              out.mutable_data_ptr(), /*zero_images=*/false, nullptr, stream));
  }
  // The GELU's input and output for the backward: [2, N, P, D1].
  at::Tensor activations = s.mlp ? at::empty({2, s.images, s.tokens, s.hidden}, x.options())
                                 : at::empty({0}, x.options());
  if (rows == 0) {
    return {out, activations};
  }
  const at::Tensor xc = x.contiguous();
  const Blas blas = current_blas();
  const std::vector<int64_t>* into = embeds.has_value() ? &offsets : nullptr;
  if (!s.mlp) {
    linear(blas, dtype, xc, w1.contiguous(), contiguous_or_undefined(b1), out, into, s.images, s.tokens);
    return {out, activations};
  }
  at::Tensor pre_activation = activations[0];
  at::Tensor activation = activations[1];
  linear(blas, dtype, xc, w1.contiguous(), contiguous_or_undefined(b1), pre_activation, nullptr, s.images,
         s.tokens);
  C10_CUDA_CHECK(gelu_forward(dtype, pre_activation.const_data_ptr(), activation.mutable_data_ptr(),
                              pre_activation.numel(), blas.stream));
  linear(blas, dtype, activation, w2->contiguous(), contiguous_or_undefined(b2), out, into, s.images,
         s.tokens);
  return {out, activations};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> projector_cuda_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& embeds, const std::optional<at::Tensor>& image_offsets,
    const at::Tensor& activations, std::array<bool, 6> needs) {
  const Shapes s = check_inputs(x, w1, b1, w2, b2, embeds, image_offsets);
  const int64_t rows = s.images * s.tokens;
  if (embeds.has_value()) {
    check_like_x(dy, "dy", x, {s.total, s.width});
  } else {
    check_like_x(dy, "dy", x, {s.images, s.tokens, s.width});
  }
  if (s.mlp) {
    check_like_x(activations, "activations", x, {2, s.images, s.tokens, s.hidden});
  }
  const c10::cuda::CUDAGuard device_guard(x.device());
  const DType dtype = dtype_of(x);
  const bool want_x = needs[0];
  const bool want_w1 = needs[1];
  const bool want_b1 = needs[2] && b1.has_value();
  const bool want_w2 = needs[3] && s.mlp;
  const bool want_b2 = needs[4] && b2.has_value();
  const bool want_embeds = needs[5] && embeds.has_value();
  const bool want_params = want_x || want_w1 || want_b1 || want_w2 || want_b2;
  std::array<at::Tensor, 6> grads;  // dx, dw1, db1, dw2, db2, dembeds; undefined: not computed

  const at::Tensor dyc = dy.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // dy's image rows as one [rows, D] matrix: dy itself without embeds, else gathered.
  at::Tensor dy_images = embeds.has_value() ? at::Tensor() : dyc.view({rows, s.width});
  if (want_embeds && rows == 0) {
    grads[5] = dyc.clone();  // no image rows: dy passes through untouched
  } else if (embeds.has_value() && (want_params || want_embeds) && rows > 0) {
    // One pass over dy: text rows to dembeds, image rows zeroed there and gathered for the GEMMs. The
    // row map is built on the device, so the backward never waits for it.
    if (want_params) {
      dy_images = at::empty({rows, s.width}, dy.options());
    }
    if (want_embeds) {
      grads[5] = at::empty_like(dyc);
    }
    const at::Tensor map = image_row_map(*image_offsets, s, x, stream);
    // The last layer's bias gradient (db2, or db1 of the linear projector) is the column sum of these very
    // rows: summed in the same pass.
    const bool last_bias = s.mlp ? want_b2 : want_b1;
    if (last_bias) {
      at::Tensor partial =
          at::empty({column_sum_chunks(s.total), s.width}, x.options().dtype(at::kFloat));
      C10_CUDA_CHECK(split_rows_with_sums(dtype, dyc.const_data_ptr(), s.total, s.width,
                                          map.const_data_ptr<int32_t>(),
                                          want_embeds ? grads[5].mutable_data_ptr() : nullptr,
                                          dy_images.mutable_data_ptr(), partial.mutable_data_ptr<float>(), stream));
      grads[s.mlp ? 4 : 2] = column_sums(partial, x);
    } else {
      C10_CUDA_CHECK(split_rows(dtype, dyc.const_data_ptr(), s.total, s.width, map.const_data_ptr<int32_t>(),
                                want_embeds ? grads[5].mutable_data_ptr() : nullptr, /*zero_images=*/true,
                                want_params ? dy_images.mutable_data_ptr() : nullptr, stream));
    }
  }

  if (want_params && rows == 0) {
    // No image rows: the weights and biases got no gradient at all.
    if (want_x) grads[0] = at::empty(x.sizes(), x.options());
    if (want_w1) grads[1] = at::zeros({s.hidden, s.channels}, x.options());
    if (want_b1) grads[2] = at::zeros({s.hidden}, x.options());
    if (want_w2) grads[3] = at::zeros({s.width, s.hidden}, x.options());
    if (want_b2) grads[4] = at::zeros({s.width}, x.options());
  } else if (want_params) {
    const Blas blas = current_blas();
    at::Tensor dh;  // [rows, D1]: the gradient at the first layer's output
    if (s.mlp) {
      const at::Tensor saved = activations.contiguous();
      const at::Tensor h = saved[0].view({rows, s.hidden});
      if (want_w2) {
        grads[3] = at::empty({s.width, s.hidden}, x.options());
        weight_grad(blas, dtype, dy_images, saved[1].view({rows, s.hidden}), grads[3]);
      }
      if (want_b2 && !grads[4].defined()) {
        grads[4] = bias_grad(dy_images);  // no embeds: dy is the image rows, nothing was split
      }
      if (want_x || want_w1 || want_b1) {
        const at::Tensor w2c = w2->contiguous();
        // Row-major da [rows, D1] = dy [rows, D] W2 [D, D1], i.e. column-major da^T (D1 x rows) = W2^T
        // (w2 as stored, D1 x D) * dy^T (dy as stored, D x rows); in the inputs' dtype, as torch has it.
        at::Tensor da = at::empty({rows, s.hidden}, x.options());
        gemm(blas, dtype, /*float_output=*/false, /*trans_a=*/false, /*trans_b=*/false, s.hidden, rows,
             s.width, s.hidden, s.width, s.hidden, Epilogue::kNone, nullptr,
             {{w2c.const_data_ptr(), dy_images.const_data_ptr(), da.mutable_data_ptr()}});
        dh = at::empty({rows, s.hidden}, x.options());
        // db1 is the column sum of dh: summed in the same pass.
        at::Tensor partial;
        if (want_b1) {
          partial = at::empty({column_sum_chunks(rows), s.hidden}, x.options().dtype(at::kFloat));
        }
        C10_CUDA_CHECK(gelu_backward(dtype, da.const_data_ptr(), h.const_data_ptr(), dh.mutable_data_ptr(), rows,
                                     s.hidden, want_b1 ? partial.mutable_data_ptr<float>() : nullptr,
                                     blas.stream));
        if (want_b1) {
          grads[2] = column_sums(partial, x);
        }
      }
    } else {
      dh = dy_images;
    }
    const at::Tensor xc = x.contiguous().view({rows, s.channels});
    if (want_w1) {
      grads[1] = at::empty({s.hidden, s.channels}, x.options());
      weight_grad(blas, dtype, dh, xc, grads[1]);
    }
    if (want_b1 && !grads[2].defined()) {
      grads[2] = bias_grad(dh);  // the linear projector without embeds: no pass to fold the sums into
    }
    if (want_x) {
      // Row-major dx [rows, C] = dh [rows, D1] W1 [D1, C], i.e. column-major dx^T (C x rows) = W1^T (w1 as
      // stored, C x D1) * dh^T (dh as stored, D1 x rows).
      const at::Tensor w1c = w1.contiguous();
      grads[0] = at::empty({s.images, s.tokens, s.channels}, x.options());
      gemm(blas, dtype, /*float_output=*/false, /*trans_a=*/false, /*trans_b=*/false, s.channels, rows,
           s.hidden, s.channels, s.hidden, s.channels, Epilogue::kNone, nullptr,
           {{w1c.const_data_ptr(), dh.const_data_ptr(), grads[0].mutable_data_ptr()}});
    }
  }
  for (at::Tensor& g : grads) {
    if (!g.defined()) {
      g = at::empty({0}, dy.options());  // "no gradient": one fresh tensor each, never aliased
    }
  }
  return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]};
}

}  // namespace
}  // namespace llavamed_fast::projector

// FRAGMENT: other files and Python code define more ops in the namespace. Only CUDA kernels: the public
// op (llavamed_fast.ops.projector) routes CPU tensors elsewhere and owns the fake (meta) implementation.
TORCH_LIBRARY_FRAGMENT(llavamed_fast, m) {
  m.def(
      "projector_cuda_forward(Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, Tensor? embeds, "
      "Tensor? image_offsets) -> (Tensor, Tensor)");
  m.def(
      "projector_cuda_backward(Tensor dy, Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, "
      "Tensor? embeds, Tensor? image_offsets, Tensor activations, bool[6] needs) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llavamed_fast, CUDA, m) {
  m.impl("projector_cuda_forward", &llavamed_fast::projector::projector_cuda_forward);
  m.impl("projector_cuda_backward", &llavamed_fast::projector::projector_cuda_backward);
}

#endif  // LLAVAMED_FAST_WITH_CUDA
