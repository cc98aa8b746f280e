// meancache::_compute_step_cuda: log a computed step into the ring and take its Euler step, in one launch.
#include <ATen/ops/empty.h>

#include "ops.h"
#include "utils.cuh"

namespace meancache {
namespace {

template <typename x_t, typename v_t>
struct ComputeStepArgs {
  const x_t* x;
  const v_t* v;
  float* xs_write;
  float* vs_write;
  x_t* out;
  int64_t n;
  float dt;
};

template <int N, typename x_t, typename v_t>
__device__ __forceinline__ void compute_step_group(const ComputeStepArgs<x_t, v_t>& a, int64_t e) {
  x_t x_in[N];
  v_t v_in[N];
  load_vec<N>(a.x + e, x_in);
  load_vec<N>(a.v + e, v_in);

  float xi[N], vi[N];
  x_t x_next[N];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    xi[k] = static_cast<float>(x_in[k]);
    vi[k] = static_cast<float>(v_in[k]);
    x_next[k] = static_cast<x_t>(xi[k] + a.dt * vi[k]);
  }
  store_vec<N>(a.xs_write + e, xi);
  store_vec<N>(a.vs_write + e, vi);
  store_vec<N>(a.out + e, x_next);
}

// Computed step i, algorithm.md §2.2 (last paragraph) and §3. Per element:
//   xs[slot_write] = x_i;  vs[slot_write] = v_i;  out = cast_x(x_i + dt · v_i),  dt = σ_{i+1} - σ_i
// v_i is the post-CFG model velocity, possibly in another float dtype than x (upcast to fp32 here, so the ring
// keeps it unrounded). Same VEC / tail scheme as skip_step_kernel.
template <int VEC, typename x_t, typename v_t>
__global__ void compute_step_kernel(const ComputeStepArgs<x_t, v_t> a) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n_groups = a.n / VEC;
  for (int64_t g = tid; g < n_groups; g += stride) {
    compute_step_group<VEC>(a, g * VEC);
  }
  if constexpr (VEC > 1) {
    const int64_t tail = n_groups * VEC + tid;
    if (tail < a.n) compute_step_group<1>(a, tail);
  }
}

}  // namespace

at::Tensor compute_step_cuda(const at::Tensor& x, const at::Tensor& v, at::Tensor& xs, at::Tensor& vs,
                             int64_t slot_write, double dt) {
  static constexpr const char* kOp = "meancache::_compute_step_cuda";
  const int64_t capacity = check_ring(kOp, x, xs, vs);
  MC_CHECK_CUDA(kOp, v, "v");
  MC_CHECK_SAME_DEVICE(kOp, v, "v", x, "x");
  MC_CHECK_CONTIGUOUS(kOp, v, "v");
  MC_CHECK_FLOAT_DTYPE(kOp, v.scalar_type(), "v");
  TORCH_CHECK(v.numel() == x.numel(), kOp, ": v must have as many elements as x (", x.numel(), "), got ", v.numel(),
              " (v shape ", v.sizes(), ", x shape ", x.sizes(), ")");
  MC_CHECK_SLOT(kOp, slot_write, "slot_write", capacity);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return out;

  MC_DISPATCH_FLOAT(x.scalar_type(), kOp, x_t, [&] {
    MC_DISPATCH_FLOAT(v.scalar_type(), kOp, v_t, [&] {
      ComputeStepArgs<x_t, v_t> args{x.const_data_ptr<x_t>(),
                                     v.const_data_ptr<v_t>(),
                                     xs.mutable_data_ptr<float>() + slot_write * n,
                                     vs.mutable_data_ptr<float>() + slot_write * n,
                                     out.mutable_data_ptr<x_t>(),
                                     n,
                                     static_cast<float>(dt)};
      const auto stream = c10::cuda::getCurrentCUDAStream();
      const auto device = x.device().index();
      constexpr int kVec = vec_width<x_t, v_t, float>();
      if (all_aligned(args.x, args.v, args.xs_write, args.vs_write, args.out)) {
        const int64_t items = n / kVec > 0 ? n / kVec : 1;
        compute_step_kernel<kVec, x_t, v_t><<<grid_size(items, device), kThreads, 0, stream>>>(args);
      } else {
        compute_step_kernel<1, x_t, v_t><<<grid_size(n, device), kThreads, 0, stream>>>(args);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace meancache
