#include "packing.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

namespace llavamed_fast::packing {
namespace {

// Max segment tree over the remaining room of n bin slots. Slots that no item has opened yet hold the
// full budget, so "leftmost slot with room >= length" is either the first open bin that fits or, when
// none does, the next bin to open: both cases of first-fit in one O(log n) descent. n slots suffice
// because every item fits an empty bin, so there are never more bins than items.
class RoomTree {
 public:
  RoomTree(int64_t slots, int64_t budget) : leaves_(1) {
    while (leaves_ < slots) {
      leaves_ *= 2;
    }
    room_.assign(2 * static_cast<size_t>(leaves_), budget);
  }

  // Always finds a slot when length <= budget: the k-th item placed has opened at most k bins, so an
  // unopened slot with the full budget remains.
  int64_t leftmost_fitting(int64_t length) const {
    size_t node = 1;
    while (node < static_cast<size_t>(leaves_)) {
      node = room_[2 * node] >= length ? 2 * node : 2 * node + 1;
    }
    return static_cast<int64_t>(node) - leaves_;
  }

  void take(int64_t slot, int64_t length) {
    size_t node = static_cast<size_t>(slot + leaves_);
    room_[node] -= length;
    for (node /= 2; node >= 1; node /= 2) {
      room_[node] = std::max(room_[2 * node], room_[2 * node + 1]);
    }
  }

 private:
  int64_t leaves_;
  std::vector<int64_t> room_;
};

template <typename Length>
void check_arguments(const Length* lengths, int64_t n, int64_t budget) {
  if (budget <= 0) {
    throw std::invalid_argument("packing budget must be positive, got " + std::to_string(budget));
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t length = lengths[i];
    if (length <= 0 || length > budget) {
      throw std::invalid_argument("item " + std::to_string(i) + " has length " + std::to_string(length) +
                                  ", outside (0, " + std::to_string(budget) + "]");
    }
  }
}

}  // namespace

template <typename Length>
int64_t first_fit_decreasing(const Length* lengths, int64_t n, int64_t budget, int64_t* bins) {
  check_arguments(lengths, n, budget);
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::sort(order.begin(), order.end(), [lengths](int64_t a, int64_t b) {
    return lengths[a] != lengths[b] ? lengths[a] > lengths[b] : a < b;
  });
  RoomTree tree(std::max<int64_t>(n, 1), budget);
  int64_t opened = 0;
  for (const int64_t item : order) {
    const int64_t slot = tree.leftmost_fitting(lengths[item]);
    tree.take(slot, lengths[item]);
    bins[item] = slot;
    opened = std::max(opened, slot + 1);
  }
  return opened;
}

template int64_t first_fit_decreasing<int32_t>(const int32_t*, int64_t, int64_t, int64_t*);
template int64_t first_fit_decreasing<int64_t>(const int64_t*, int64_t, int64_t, int64_t*);

std::vector<int64_t> first_fit_decreasing(const std::vector<int64_t>& lengths, int64_t budget) {
  std::vector<int64_t> bins(lengths.size());
  first_fit_decreasing(lengths.data(), static_cast<int64_t>(lengths.size()), budget, bins.data());
  return bins;
}

}  // namespace llavamed_fast::packing
