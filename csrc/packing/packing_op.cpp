// torch op llavamed_fast::packing: lengths -> bin ids, first-fit-decreasing (see packing.h).
// Only the headers the op needs: torch/extension.h would quadruple the compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <stdexcept>

#include "packing.h"

namespace llavamed_fast {
namespace {

void check_lengths(const at::Tensor& lengths) {
  TORCH_CHECK_TYPE(lengths.scalar_type() == at::kLong || lengths.scalar_type() == at::kInt,
                   "packing: lengths must have dtype int64 or int32, got ", lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.dim() == 1, "packing: lengths must be 1-D, got a ", lengths.dim(),
                    "-D tensor of shape ", lengths.sizes());
}

at::Tensor packing_kernel(const at::Tensor& lengths, int64_t budget) {
  check_lengths(lengths);
  // The packer is host code that runs once per batch in the collator; device tensors would need a sync.
  TORCH_CHECK_VALUE(lengths.device().is_cpu(), "packing: lengths must be a CPU tensor, got one on ",
                    lengths.device());
  const at::Tensor dense = lengths.contiguous();
  at::Tensor bins = at::empty({dense.numel()}, dense.options().dtype(at::kLong));
  try {
    if (dense.scalar_type() == at::kInt) {
      packing::first_fit_decreasing(dense.const_data_ptr<int32_t>(), dense.numel(), budget,
                                    bins.mutable_data_ptr<int64_t>());
    } else {
      packing::first_fit_decreasing(dense.const_data_ptr<int64_t>(), dense.numel(), budget,
                                    bins.mutable_data_ptr<int64_t>());
    }
  } catch (const std::invalid_argument& error) {
    // Same message and exception type (ValueError) as the Python reference.
    TORCH_CHECK_VALUE(false, error.what());
  }
  return bins;
}

// Shapes only, for torch.compile's fake tensors: one bin id per item.
at::Tensor packing_meta(const at::Tensor& lengths, int64_t /*budget*/) {
  check_lengths(lengths);
  return at::empty(lengths.sizes(), lengths.options().dtype(at::kLong));
}

}  // namespace
}  // namespace llavamed_fast

// FRAGMENT, not TORCH_LIBRARY: Python code defines more ops in the same namespace (torch.library.custom_op).
TORCH_LIBRARY_FRAGMENT(llavamed_fast, m) {
  m.def("packing(Tensor lengths, int budget) -> Tensor");
}

// CompositeExplicitAutograd rather than CPU so that a CUDA tensor reaches the device check above and gets
// its message instead of the dispatcher's "could not run on the CUDA backend".
TORCH_LIBRARY_IMPL(llavamed_fast, CompositeExplicitAutograd, m) {
  m.impl("packing", &llavamed_fast::packing_kernel);
}

TORCH_LIBRARY_IMPL(llavamed_fast, Meta, m) {
  m.impl("packing", &llavamed_fast::packing_meta);
}
