// First-fit-decreasing bin packing of sample lengths under a token budget.
// Plain C++17 (no torch) so the algorithm is unit-tested on its own; packing_op.cpp wraps it as a torch op.
#pragma once

#include <cstdint>
#include <vector>

namespace llavamed_fast::packing {

// Writes into bins[i] the bin of item i (bins numbered 0, 1, ... in order of opening) and returns the
// number of bins. Items are visited longest first, ties by ascending index; each goes into the
// lowest-numbered open bin whose remaining room is >= its length, else into a new bin. This is exactly
// llavamed_fast.ops.reference.packing, in O(n log n).
//
// Throws std::invalid_argument if budget <= 0 or if an item's length is outside (0, budget]; the message
// names the first such item (index, length, budget), as the reference does.
//
// Length is int32_t or int64_t (explicitly instantiated in packing.cpp).
template <typename Length>
int64_t first_fit_decreasing(const Length* lengths, int64_t n, int64_t budget, int64_t* bins);

std::vector<int64_t> first_fit_decreasing(const std::vector<int64_t>& lengths, int64_t budget);

}  // namespace llavamed_fast::packing
