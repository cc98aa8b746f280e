// meancache::_compute_step_cuda: log a computed step into the ring and take its Euler step, in one launch.
#include <ATen/ops/empty.h>

#include "ops.h"
#include "utils.cuh"

namespace meancache {
namespace {

// Computed step i, algorithm.md §2.2 (last paragraph) and §3. Per element:
//   xs[slot_write] = x_i;  vs[slot_write] = v_i;  out = cast_x(x_i + dt · v_i),  dt = σ_{i+1} - σ_i
// v_i is the post-CFG model velocity, possibly in another float dtype than x (upcast to fp32 here, so the ring
// keeps it unrounded). An element-wise op for elementwise_kernel (utils.cuh).
template <typename x_t, typename v_t>
struct ComputeStepOp {
  static constexpr int kVec = vec_width<x_t, v_t, float>();

  const x_t* x;
  const v_t* v;
  float* xs_write;
  float* vs_write;
  x_t* out;
  int64_t n;
  float dt;

  bool aligned() const { return all_aligned(x, v, xs_write, vs_write, out); }

  template <int N>
  __device__ __forceinline__ void group(int64_t e) const {
    x_t x_in[N];
    v_t v_in[N];
    load_vec<N>(x + e, x_in);
    load_vec<N>(v + e, v_in);

    float xi[N], vi[N];
    x_t x_next[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      xi[k] = static_cast<float>(x_in[k]);
      vi[k] = static_cast<float>(v_in[k]);
      x_next[k] = static_cast<x_t>(xi[k] + dt * vi[k]);
    }
    store_vec<N>(xs_write + e, xi);
    store_vec<N>(vs_write + e, vi);
    store_vec<N>(out + e, x_next);
  }
};

}  // namespace

at::Tensor compute_step_cuda(const at::Tensor& x, const at::Tensor& v, at::Tensor& xs, at::Tensor& vs,
                             int64_t slot_write, double dt) {
  static constexpr const char* kOp = "meancache::_compute_step_cuda";
  const int64_t capacity = check_ring(kOp, x, xs, vs);
  MC_CHECK_CUDA(kOp, v, "v");
  MC_CHECK_SAME_DEVICE(kOp, v, "v", x, "x");
  MC_CHECK_CONTIGUOUS(kOp, v, "v");
  MC_CHECK_FLOAT_DTYPE(kOp, v.scalar_type(), "v");
  TORCH_CHECK(v.sizes() == x.sizes(), kOp, ": v has shape ", v.sizes(), " but x has shape ", x.sizes(),
              ": they must match");
  MC_CHECK_SLOT(kOp, slot_write, "slot_write", capacity);
  check_not_written(kOp, x, "x", xs, vs, slot_write);
  check_not_written(kOp, v, "v", xs, vs, slot_write);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return out;

  MC_DISPATCH_FLOAT(x.scalar_type(), kOp, x_t, [&] {
    MC_DISPATCH_FLOAT(v.scalar_type(), kOp, v_t, [&] {
      const ComputeStepOp<x_t, v_t> op{x.const_data_ptr<x_t>(),
                                       v.const_data_ptr<v_t>(),
                                       xs.mutable_data_ptr<float>() + slot_write * n,
                                       vs.mutable_data_ptr<float>() + slot_write * n,
                                       out.mutable_data_ptr<x_t>(),
                                       n,
                                       static_cast<float>(dt)};
      launch_elementwise(op, x.device().index());
    });
  });
  return out;
}

}  // namespace meancache
