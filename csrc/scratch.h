// Scratch buffers reused from call to call on the same thread.
//
// A training step allocates the same large scratch (the encoder's pre-activation chunk, the
// nested loss's suffix sums) every time; fresh large allocations are fresh pages from the
// OS, and the kernel spends about 0.5 ms per MiB faulting and zeroing them. Keeping one
// buffer per slot per thread makes that a one-off. Buffers above kMaxCachedBytes are not
// kept, so an unusually large call does not pin its memory.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <array>

namespace sparsecode {

enum class ScratchSlot { kPreActivations = 0, kSuffixSums = 1 };

constexpr int64_t kMaxCachedBytes = int64_t(128) << 20;

// An uninitialised tensor of `sizes` and `options` (CPU, contiguous); contents are garbage.
inline at::Tensor scratch(ScratchSlot slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  thread_local std::array<at::Tensor, 2> cache;
  const int64_t numel = c10::multiply_integers(sizes);
  const int64_t bytes = numel * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes > kMaxCachedBytes) {
    return at::empty(sizes, options);
  }
  at::Tensor& held = cache[static_cast<int>(slot)];
  if (!held.defined() || held.numel() < numel || held.dtype() != options.dtype()) {
    // A normal tensor even when the first call runs under torch.inference_mode(): an
    // inference tensor could not be written by a later call outside inference mode.
    c10::InferenceMode normal_tensors(false);
    held = at::empty({numel}, options);
  }
  return held.narrow(0, 0, numel).view(sizes);
}

}  // namespace sparsecode
