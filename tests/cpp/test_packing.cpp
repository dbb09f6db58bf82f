// Unit test of the first-fit-decreasing packer, without torch. Exit code 0 on success; each failure
// prints what was expected and exits 1.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "packing/packing.h"

namespace {

using llavamed_fast::packing::first_fit_decreasing;
using Lengths = std::vector<int64_t>;

[[noreturn]] void fail(const std::string& what) {
  std::cerr << "FAIL: " << what << "\n";
  std::exit(1);
}

std::string show(const Lengths& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(values[i]);
  }
  return out + "]";
}

// Replays the placements in first-fit-decreasing order and checks that each one is what first fit
// demands at that moment: the chosen bin had room, no earlier open bin had room, and a new bin is the
// next one to open. This also proves every item is placed once and no bin goes over budget.
void check_first_fit(const Lengths& lengths, int64_t budget, const Lengths& bins) {
  const std::string where = " (budget " + std::to_string(budget) + ", lengths " + show(lengths) + ")";
  if (bins.size() != lengths.size()) {
    fail("one bin per item expected" + where);
  }
  std::vector<int64_t> order(lengths.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  std::vector<int64_t> room;
  for (const int64_t item : order) {
    const int64_t bin = bins[item];
    const int64_t open = static_cast<int64_t>(room.size());
    if (bin < 0 || bin > open) {
      fail("item " + std::to_string(item) + " in bin " + std::to_string(bin) + " but only " +
           std::to_string(open) + " bins were open" + where);
    }
    for (int64_t earlier = 0; earlier < bin; ++earlier) {
      if (room[earlier] >= lengths[item]) {
        fail("item " + std::to_string(item) + " went to bin " + std::to_string(bin) + " although bin " +
             std::to_string(earlier) + " had room" + where);
      }
    }
    if (bin == open) {
      room.push_back(budget);
    }
    if (room[bin] < lengths[item]) {
      fail("bin " + std::to_string(bin) + " over budget" + where);
    }
    room[bin] -= lengths[item];
  }
}

void expect_bins(const Lengths& lengths, int64_t budget, const Lengths& expected) {
  const Lengths bins = first_fit_decreasing(lengths, budget);
  if (bins != expected) {
    fail("lengths " + show(lengths) + " budget " + std::to_string(budget) + ": expected " + show(expected) +
         ", got " + show(bins));
  }
}

void expect_error(const Lengths& lengths, int64_t budget, const std::string& message) {
  try {
    first_fit_decreasing(lengths, budget);
  } catch (const std::invalid_argument& error) {
    if (error.what() != message) {
      fail("expected error \"" + message + "\", got \"" + error.what() + "\"");
    }
    return;
  }
  fail("expected error \"" + message + "\", got none");
}

void hand_worked_cases() {
  expect_bins({}, 10, {});
  expect_bins({10}, 10, {0});
  // Visit order 7(#1), 5(#3), 4(#0), 3(#2), 2(#4): 7→b0 (room 3), 5→b1 (5), 4→b1 (1), 3→b0 (0), 2→b2.
  expect_bins({4, 7, 3, 5, 2}, 10, {1, 0, 0, 1, 2});
  // Equal lengths keep index order: 6, 6, 6 open three bins; the 4s fill them in order.
  expect_bins({4, 6, 6, 4, 6, 4}, 10, {0, 0, 1, 1, 2, 2});
  // Ones fill the first bin before the second opens.
  expect_bins({1, 1, 1, 1, 1}, 2, {0, 0, 1, 1, 2});
  // A later, smaller item goes back to the earliest bin with room (first fit, not next fit).
  expect_bins({8, 8, 1, 1, 1}, 9, {0, 1, 0, 1, 2});
  // int32 lengths follow the same path.
  const std::vector<int32_t> narrow = {4, 7, 3, 5, 2};
  Lengths bins(narrow.size());
  if (first_fit_decreasing(narrow.data(), 5, 10, bins.data()) != 3 || bins != Lengths{1, 0, 0, 1, 2}) {
    fail("int32 lengths: got " + show(bins));
  }
}

void error_cases() {
  expect_error({1, 2}, 0, "packing budget must be positive, got 0");
  expect_error({1, 2}, -3, "packing budget must be positive, got -3");
  expect_error({1, 0, 2}, 10, "item 1 has length 0, outside (0, 10]");
  expect_error({1, 2, -5}, 10, "item 2 has length -5, outside (0, 10]");
  expect_error({11, 2}, 10, "item 0 has length 11, outside (0, 10]");
  // The first bad item by index is reported, as in the Python reference.
  expect_error({3, 20, 0}, 10, "item 1 has length 20, outside (0, 10]");
}

void random_cases() {
  std::mt19937_64 rng(20240611);
  for (int trial = 0; trial < 2000; ++trial) {
    const int64_t budget = std::uniform_int_distribution<int64_t>(1, trial % 2 ? 64 : 4096)(rng);
    const size_t n = std::uniform_int_distribution<size_t>(0, 300)(rng);
    // Few distinct values in some trials, so ties in the visit order are common.
    const int64_t top = trial % 3 == 0 ? std::min<int64_t>(budget, 4) : budget;
    std::uniform_int_distribution<int64_t> length(1, top);
    Lengths lengths(n);
    for (auto& value : lengths) {
      value = trial % 5 == 0 ? budget - length(rng) % std::min<int64_t>(budget, 3) : length(rng);
    }
    const Lengths bins = first_fit_decreasing(lengths, budget);
    check_first_fit(lengths, budget, bins);
  }
}

void many_items() {
  // 200k items: an O(n * bins) packer would take minutes here; O(n log n) takes milliseconds.
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<int64_t> length(1, 2048);
  Lengths lengths(200000);
  for (auto& value : lengths) {
    value = length(rng);
  }
  const Lengths bins = first_fit_decreasing(lengths, 4096);
  std::vector<int64_t> used(*std::max_element(bins.begin(), bins.end()) + 1, 0);
  for (size_t i = 0; i < bins.size(); ++i) {
    used[bins[i]] += lengths[i];
  }
  if (*std::max_element(used.begin(), used.end()) > 4096 ||
      *std::min_element(used.begin(), used.end()) == 0) {
    fail("200k items: a bin is over budget or empty");
  }
}

}  // namespace

int main() {
  hand_worked_cases();
  error_cases();
  random_cases();
  many_items();
  std::cout << "test_packing: all passed\n";
  return 0;
}
