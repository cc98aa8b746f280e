// meancache::_estimate_cuda: the MeanCache velocity estimate alone (no Euler step), logged and returned scaled.
// For callers that hand the velocity to their own sampler step instead of letting meancache take it.
#include <ATen/ops/empty.h>

#include "ops.h"
#include "utils.cuh"

namespace meancache {
namespace {

template <typename x_t, typename o_t>
struct EstimateArgs {
  const x_t* x;
  // No __restrict__ on the ring rows: slot_write may equal slot_start or slot_last (see skip_step.cu).
  const float* xs_start;
  const float* vs_start;
  const float* vs_last;
  float* xs_write;
  float* vs_write;
  o_t* out;
  int64_t n;
  float inv_d;
  float dt;
  float out_scale;
};

// All loads of a group precede its stores, so aliased ring rows are read before they are overwritten.
template <int N, typename x_t, typename o_t>
__device__ __forceinline__ void estimate_group(const EstimateArgs<x_t, o_t>& a, int64_t e) {
  x_t x_in[N];
  float x0[N], v0[N], v_last[N];
  load_vec<N>(a.x + e, x_in);
  load_vec<N>(a.xs_start + e, x0);
  load_vec<N>(a.vs_start + e, v0);
  load_vec<N>(a.vs_last + e, v_last);

  float xi[N], v_hat[N];
  o_t o[N];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    xi[k] = static_cast<float>(x_in[k]);
    v_hat[k] = estimate_velocity(xi[k], x0[k], v0[k], v_last[k], a.inv_d, a.dt);
    // out_scale lets the caller return v̂ (dx/dσ) in another convention, e.g. -1 for a model that predicts
    // -dx/dσ like Z-Image (algorithm.md §1).
    o[k] = static_cast<o_t>(v_hat[k] * a.out_scale);
  }
  store_vec<N>(a.xs_write + e, xi);
  store_vec<N>(a.vs_write + e, v_hat);
  store_vec<N>(a.out + e, o);
}

// Estimate for skipped step i, algorithm.md §2.2 (steps 3-7) and §3. Per element:
//   avg = (x_i - x_j0) · inv_d;  jvp = (v_j0 - avg) · inv_d;  v̂ = v_last - jvp · dt
//   xs[slot_write] = x_i;  vs[slot_write] = v̂;  out = cast_out(v̂ · out_scale)
// Same VEC / tail scheme as skip_step_kernel.
template <int VEC, typename x_t, typename o_t>
__global__ void estimate_kernel(const EstimateArgs<x_t, o_t> a) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n_groups = a.n / VEC;
  for (int64_t g = tid; g < n_groups; g += stride) {
    estimate_group<VEC>(a, g * VEC);
  }
  if constexpr (VEC > 1) {
    const int64_t tail = n_groups * VEC + tid;
    if (tail < a.n) estimate_group<1>(a, tail);
  }
}

}  // namespace

at::Tensor estimate_cuda(const at::Tensor& x, at::Tensor& xs, at::Tensor& vs, int64_t slot_start,
                         int64_t slot_last, int64_t slot_write, double inv_d, double dt, double out_scale,
                         c10::ScalarType out_dtype) {
  static constexpr const char* kOp = "meancache::_estimate_cuda";
  const int64_t capacity = check_ring(kOp, x, xs, vs);
  MC_CHECK_SLOT(kOp, slot_start, "slot_start", capacity);
  MC_CHECK_SLOT(kOp, slot_last, "slot_last", capacity);
  MC_CHECK_SLOT(kOp, slot_write, "slot_write", capacity);
  MC_CHECK_FLOAT_DTYPE(kOp, out_dtype, "out_dtype");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  const int64_t n = x.numel();
  if (n == 0) return out;

  MC_DISPATCH_FLOAT(x.scalar_type(), kOp, x_t, [&] {
    MC_DISPATCH_FLOAT(out_dtype, kOp, o_t, [&] {
      const float* xs_base = xs.const_data_ptr<float>();
      const float* vs_base = vs.const_data_ptr<float>();
      EstimateArgs<x_t, o_t> args{x.const_data_ptr<x_t>(),
                                  xs_base + slot_start * n,
                                  vs_base + slot_start * n,
                                  vs_base + slot_last * n,
                                  xs.mutable_data_ptr<float>() + slot_write * n,
                                  vs.mutable_data_ptr<float>() + slot_write * n,
                                  out.mutable_data_ptr<o_t>(),
                                  n,
                                  static_cast<float>(inv_d),
                                  static_cast<float>(dt),
                                  static_cast<float>(out_scale)};
      const auto stream = c10::cuda::getCurrentCUDAStream();
      const auto device = x.device().index();
      constexpr int kVec = vec_width<x_t, o_t, float>();
      if (all_aligned(args.x, args.xs_start, args.vs_start, args.vs_last, args.xs_write, args.vs_write,
                      args.out)) {
        const int64_t items = n / kVec > 0 ? n / kVec : 1;
        estimate_kernel<kVec, x_t, o_t><<<grid_size(items, device), kThreads, 0, stream>>>(args);
      } else {
        estimate_kernel<1, x_t, o_t><<<grid_size(n, device), kThreads, 0, stream>>>(args);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace meancache
