// Shared helpers for the meancache CUDA kernels: argument checks, 16-byte vector load/store, dtype dispatch, launch
// geometry, and the element-wise kernel template with its launcher. Includes only the ATen/c10 headers it uses (not
// ATen/ATen.h or torch/extension.h): nvcc parses each .cu once per target arch, so header weight multiplies into the
// build time.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>

namespace meancache {

// ---------------------------------------------------------------------------------------------------------------
// Host-side argument checks. Every message names the op and the argument so a failure reads like the Python fake's.
// ---------------------------------------------------------------------------------------------------------------

#define MC_CHECK_CUDA(OP, T, NAME) TORCH_CHECK((T).is_cuda(), OP, ": ", NAME, " must be a CUDA tensor, got ", (T).device())

#define MC_CHECK_CONTIGUOUS(OP, T, NAME) \
  TORCH_CHECK((T).is_contiguous(), OP, ": ", NAME, " must be contiguous (got strides ", (T).strides(), ")")

#define MC_CHECK_SAME_DEVICE(OP, T, NAME, REF, REF_NAME)                                                        \
  TORCH_CHECK((T).device() == (REF).device(), OP, ": ", NAME, " must be on the same device as ", REF_NAME, " (", \
              (T).device(), " vs ", (REF).device(), ")")

#define MC_CHECK_FLOAT_DTYPE(OP, DTYPE, NAME)                                                                  \
  TORCH_CHECK(::meancache::is_supported_dtype(DTYPE), OP, ": ", NAME, " must be float16, bfloat16 or float32, got ", \
              DTYPE)

#define MC_CHECK_SLOT(OP, SLOT, NAME, CAPACITY)                                                                 \
  TORCH_CHECK((SLOT) >= 0 && (SLOT) < (CAPACITY), OP, ": ", NAME, "=", (SLOT), " is out of range for a ring of ", \
              (CAPACITY), " slots (xs.size(0))")

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Whether byte ranges [a, a + a_bytes) and [b, b + b_bytes) intersect; empty ranges intersect nothing.
inline bool bytes_overlap(const void* a, int64_t a_bytes, const void* b, int64_t b_bytes) {
  const auto a0 = reinterpret_cast<uintptr_t>(a);
  const auto b0 = reinterpret_cast<uintptr_t>(b);
  return a_bytes > 0 && b_bytes > 0 && a0 < b0 + static_cast<uintptr_t>(b_bytes) &&
         b0 < a0 + static_cast<uintptr_t>(a_bytes);
}

// Checks shared by the three ops: x and the ring (xs, vs) live on one CUDA device, are dense, and the ring is a
// float32 (C, *x.shape) pair of two non-overlapping tensors. Returns the ring capacity C.
inline int64_t check_ring(const char* op, const at::Tensor& x, const at::Tensor& xs, const at::Tensor& vs) {
  MC_CHECK_CUDA(op, x, "x");
  MC_CHECK_CUDA(op, xs, "xs");
  MC_CHECK_CUDA(op, vs, "vs");
  MC_CHECK_SAME_DEVICE(op, xs, "xs", x, "x");
  MC_CHECK_SAME_DEVICE(op, vs, "vs", x, "x");
  MC_CHECK_CONTIGUOUS(op, x, "x");
  MC_CHECK_CONTIGUOUS(op, xs, "xs");
  MC_CHECK_CONTIGUOUS(op, vs, "vs");
  MC_CHECK_FLOAT_DTYPE(op, x.scalar_type(), "x");
  TORCH_CHECK(xs.scalar_type() == at::kFloat, op, ": xs must be float32, got ", xs.scalar_type());
  TORCH_CHECK(vs.scalar_type() == at::kFloat, op, ": vs must be float32, got ", vs.scalar_type());
  // The kernels address row `slot` of both halves as base + slot * x.numel(), so both must be exactly
  // (C, *x.shape): a shorter vs would be written past its end.
  TORCH_CHECK(xs.dim() == x.dim() + 1 && xs.sizes().slice(1) == x.sizes(), op, ": xs has shape ", xs.sizes(),
              " but x has shape ", x.sizes(), ": the ring must be (C, *x.shape)");
  TORCH_CHECK(xs.sizes() == vs.sizes(), op, ": xs has shape ", xs.sizes(), " but vs has shape ", vs.sizes(),
              ": xs and vs must have the same shape (C, *x.shape)");
  TORCH_CHECK(xs.size(0) >= 1, op, ": xs has shape ", xs.sizes(), ": the ring capacity C = xs.size(0) must be >= 1");
  TORCH_CHECK(!bytes_overlap(xs.const_data_ptr(), xs.nbytes(), vs.const_data_ptr(), vs.nbytes()), op,
              ": xs and vs share memory: the two halves of the ring must not overlap");
  return xs.size(0);
}

// The launch reads `input` (contiguous) while it writes rows xs[slot_write] and vs[slot_write]: an input sharing
// bytes with a written row would be overwritten mid-launch, in an order that depends on the thread schedule.
inline void check_not_written(const char* op, const at::Tensor& input, const char* name, const at::Tensor& xs,
                              const at::Tensor& vs, int64_t slot_write) {
  const int64_t row_elems = xs.numel() / xs.size(0);
  const int64_t row_bytes = row_elems * static_cast<int64_t>(sizeof(float));
  const void* rows[] = {xs.const_data_ptr<float>() + slot_write * row_elems,
                        vs.const_data_ptr<float>() + slot_write * row_elems};
  const char* ring_names[] = {"xs", "vs"};
  for (int r = 0; r < 2; ++r) {
    TORCH_CHECK(!bytes_overlap(input.const_data_ptr(), input.nbytes(), rows[r], row_bytes), op, ": ", name,
                " shares memory with ", ring_names[r], "[", slot_write, "], the ring row this call writes (slot_write=",
                slot_write, "): an input must not overlap the row being written");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// dtype dispatch. AT_DISPATCH names its type `scalar_t`, which clashes when two dispatches nest (x and v dtypes),
// so this one takes the alias name as an argument.
// ---------------------------------------------------------------------------------------------------------------

#define MC_DISPATCH_FLOAT(DTYPE, OP, TYPE_NAME, ...)                                                     \
  [&] {                                                                                                  \
    switch (DTYPE) {                                                                                     \
      case at::kFloat: {                                                                                 \
        using TYPE_NAME = float;                                                                         \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      case at::kHalf: {                                                                                  \
        using TYPE_NAME = c10::Half;                                                                     \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      case at::kBFloat16: {                                                                              \
        using TYPE_NAME = c10::BFloat16;                                                                 \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      default:                                                                                           \
        TORCH_CHECK(false, OP, ": unsupported dtype ", DTYPE, " (expected float16, bfloat16 or float32)"); \
    }                                                                                                    \
  }()

// ---------------------------------------------------------------------------------------------------------------
// Vector access. The kernels are bandwidth-bound, so each thread moves 16 bytes per access of its narrowest
// operand: 8 half/bf16 or 4 float elements. Wider operands in the same group use several 16-byte accesses.
// ---------------------------------------------------------------------------------------------------------------

constexpr int kVecBytes = 16;

// Elements per thread group: 16 bytes of the narrowest of the operand types.
template <typename... Ts>
constexpr int vec_width() {
  constexpr size_t sizes[] = {sizeof(Ts)...};
  size_t narrowest = sizes[0];
  for (size_t s : sizes) narrowest = s < narrowest ? s : narrowest;
  return static_cast<int>(kVecBytes / narrowest);
}

// Loads N consecutive elements. When N elements span whole 16-byte chunks, it issues 128-bit loads (the caller
// guarantees 16-byte alignment); N == 1 is the scalar path, for unaligned pointers.
template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, T (&r)[N]) {
  if constexpr ((N * sizeof(T)) % kVecBytes == 0) {
    constexpr int kChunks = N * sizeof(T) / kVecBytes;
    constexpr int kPerChunk = kVecBytes / sizeof(T);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[c];
      // memcpy between registers compiles to moves; it sidesteps aliasing rules for c10::Half / c10::BFloat16.
      memcpy(&r[c * kPerChunk], &raw, kVecBytes);
    }
  } else {
    static_assert(N == 1, "partial vectors are not used: a vector group is whole 16-byte chunks or one element");
    r[0] = p[0];
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const T (&r)[N]) {
  if constexpr ((N * sizeof(T)) % kVecBytes == 0) {
    constexpr int kChunks = N * sizeof(T) / kVecBytes;
    constexpr int kPerChunk = kVecBytes / sizeof(T);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      uint4 raw;
      memcpy(&raw, &r[c * kPerChunk], kVecBytes);
      reinterpret_cast<uint4*>(p)[c] = raw;
    }
  } else {
    static_assert(N == 1, "partial vectors are not used: a vector group is whole 16-byte chunks or one element");
    p[0] = r[0];
  }
}

inline bool is_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;
}

// The vector path needs every pointer it touches 16-byte aligned. Ring rows sit at base + slot * n, so they are
// checked individually: the allocator aligns the base but n * 4 bytes need not be a multiple of 16.
template <typename... Ptrs>
inline bool all_aligned(const Ptrs*... ptrs) {
  return (is_aligned(ptrs) && ...);
}

// ---------------------------------------------------------------------------------------------------------------
// Launch geometry: grid-stride loops over vector groups, the grid capped at a few waves of the device.
// ---------------------------------------------------------------------------------------------------------------

constexpr int kThreads = 256;
// 8 x 256 = 2048 threads per SM, at or above the resident limit of every target (1536 or 2048): the grid fills the
// GPU and the grid-stride loop covers larger tensors.
constexpr int kBlocksPerSm = 8;

// SM count per device, cached: after the first call per device (normally an eager warm-up, before any CUDA graph
// capture) the launch path makes no runtime API call besides the launch itself.
inline int sm_count(c10::DeviceIndex device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (cacheable) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

// Blocks for `work_items` grid-stride items (vector groups). `work_items` must be > 0.
inline unsigned int grid_size(int64_t work_items, c10::DeviceIndex device) {
  const int64_t needed = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * kBlocksPerSm;
  return static_cast<unsigned int>(needed < cap ? needed : cap);
}

// ---------------------------------------------------------------------------------------------------------------
// Element-wise kernels. Each op is a kernel-argument struct with
//   int64_t n;                                                the element count, > 0
//   static constexpr int kVec;                                elements per vector group: vec_width of its operands
//   bool aligned() const;                                     all_aligned of every pointer it reads or writes
//   template <int N> __device__ void group(int64_t e) const;  elements e .. e+N-1, N == kVec or 1; all loads of
//                                                             a group precede its stores (ring rows may alias)
// and one kernel template runs it. launch_elementwise is its host side.
// ---------------------------------------------------------------------------------------------------------------

// VEC elements per grid-stride item (16-byte accesses); VEC == 1 is the scalar path for unaligned pointers. With
// VEC > 1 the last n % VEC elements are done one each by the first threads of the grid.
template <int VEC, typename Op>
__global__ void elementwise_kernel(const Op op) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n_groups = op.n / VEC;
  for (int64_t g = tid; g < n_groups; g += stride) {
    op.template group<VEC>(g * VEC);
  }
  if constexpr (VEC > 1) {
    const int64_t tail = n_groups * VEC + tid;
    if (tail < op.n) op.template group<1>(tail);
  }
}

// Host C++ builds of this header (tools/emulate_kernels.cpp, g++) cannot parse <<<>>>; that emulation mirrors
// launch_elementwise instead.
#if defined(__CUDACC__)

// Launches `op` on the current stream; the caller holds a CUDAGuard for `device`. Vector path iff op.aligned().
template <typename Op>
void launch_elementwise(const Op& op, c10::DeviceIndex device) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (op.aligned()) {
    // At least one block even when n < kVec: the tail still needs threads.
    const int64_t items = op.n / Op::kVec > 0 ? op.n / Op::kVec : 1;
    elementwise_kernel<Op::kVec, Op><<<grid_size(items, device), kThreads, 0, stream>>>(op);
  } else {
    elementwise_kernel<1, Op><<<grid_size(op.n, device), kThreads, 0, stream>>>(op);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif  // defined(__CUDACC__)

}  // namespace meancache
