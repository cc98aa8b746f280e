// meancache::_skip_step_cuda: one skipped MeanCache step, fused into a single element-wise launch.
#include <ATen/ops/empty.h>

#include "ops.h"
#include "utils.cuh"

namespace meancache {
namespace {

template <typename x_t>
struct SkipStepArgs {
  const x_t* x;
  // Ring rows. No __restrict__: on a full ring slot_write may equal slot_start or slot_last, so the written rows
  // can alias the read ones.
  const float* xs_start;
  const float* vs_start;
  const float* vs_last;
  float* xs_write;
  float* vs_write;
  x_t* out;
  int64_t n;
  float inv_d;
  float dt;
};

// Elements e .. e+N-1. Every load completes before the first store, so an aliased write row only ever overwrites
// values this thread has already read; other threads own other elements.
template <int N, typename x_t>
__device__ __forceinline__ void skip_step_group(const SkipStepArgs<x_t>& a, int64_t e) {
  x_t x_in[N];
  float x0[N], v0[N], v_last[N];
  load_vec<N>(a.x + e, x_in);
  load_vec<N>(a.xs_start + e, x0);
  load_vec<N>(a.vs_start + e, v0);
  load_vec<N>(a.vs_last + e, v_last);

  float xi[N], v_hat[N];
  x_t x_next[N];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    xi[k] = static_cast<float>(x_in[k]);
    v_hat[k] = estimate_velocity(xi[k], x0[k], v0[k], v_last[k], a.inv_d, a.dt);
    // Euler step in fp32, one rounding to the latent dtype at the end (algorithm.md §3).
    x_next[k] = static_cast<x_t>(xi[k] + a.dt * v_hat[k]);
  }
  store_vec<N>(a.xs_write + e, xi);
  store_vec<N>(a.vs_write + e, v_hat);
  store_vec<N>(a.out + e, x_next);
}

// Skipped step i, algorithm.md §2.2 (steps 3-8) with the fp32 rule of §3. Per element:
//   avg = (x_i - x_j0) · inv_d;  jvp = (v_j0 - avg) · inv_d;  v̂ = v_last - jvp · dt
//   xs[slot_write] = x_i;  vs[slot_write] = v̂;  out = cast(x_i + dt · v̂)
// with inv_d = 1/(σ_i - σ_j0) (0 if that is 0) and dt = σ_{i+1} - σ_i.
// VEC elements per grid-stride item (16-byte accesses); VEC == 1 is the scalar path for unaligned pointers. With
// VEC > 1 the last n % VEC elements are done one each by the first threads of the grid.
template <int VEC, typename x_t>
__global__ void skip_step_kernel(const SkipStepArgs<x_t> a) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n_groups = a.n / VEC;
  for (int64_t g = tid; g < n_groups; g += stride) {
    skip_step_group<VEC>(a, g * VEC);
  }
  if constexpr (VEC > 1) {
    const int64_t tail = n_groups * VEC + tid;
    if (tail < a.n) skip_step_group<1>(a, tail);
  }
}

}  // namespace

at::Tensor skip_step_cuda(const at::Tensor& x, at::Tensor& xs, at::Tensor& vs, int64_t slot_start,
                          int64_t slot_last, int64_t slot_write, double inv_d, double dt) {
  static constexpr const char* kOp = "meancache::_skip_step_cuda";
  const int64_t capacity = check_ring(kOp, x, xs, vs);
  MC_CHECK_SLOT(kOp, slot_start, "slot_start", capacity);
  MC_CHECK_SLOT(kOp, slot_last, "slot_last", capacity);
  MC_CHECK_SLOT(kOp, slot_write, "slot_write", capacity);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return out;

  MC_DISPATCH_FLOAT(x.scalar_type(), kOp, x_t, [&] {
    const float* xs_base = xs.const_data_ptr<float>();
    const float* vs_base = vs.const_data_ptr<float>();
    SkipStepArgs<x_t> args{x.const_data_ptr<x_t>(),
                           xs_base + slot_start * n,
                           vs_base + slot_start * n,
                           vs_base + slot_last * n,
                           xs.mutable_data_ptr<float>() + slot_write * n,
                           vs.mutable_data_ptr<float>() + slot_write * n,
                           out.mutable_data_ptr<x_t>(),
                           n,
                           static_cast<float>(inv_d),
                           static_cast<float>(dt)};
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const auto device = x.device().index();
    constexpr int kVec = vec_width<x_t, float>();
    if (all_aligned(args.x, args.xs_start, args.vs_start, args.vs_last, args.xs_write, args.vs_write, args.out)) {
      // At least one block even when n < kVec: the tail still needs threads.
      const int64_t items = n / kVec > 0 ? n / kVec : 1;
      skip_step_kernel<kVec, x_t><<<grid_size(items, device), kThreads, 0, stream>>>(args);
    } else {
      skip_step_kernel<1, x_t><<<grid_size(n, device), kThreads, 0, stream>>>(args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace meancache
