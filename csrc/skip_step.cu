// meancache::_skip_step_cuda: one skipped MeanCache step, fused into a single element-wise launch.
#include <ATen/ops/empty.h>

#include "estimator.cuh"
#include "ops.h"
#include "utils.cuh"

namespace meancache {
namespace {

// Skipped step i, algorithm.md §2.2 (steps 3-8): the estimator (estimator.cuh), then out = cast_x(x_i + dt · v̂):
// the Euler step in fp32, one rounding to the latent dtype at the end (algorithm.md §3).
template <typename x_t>
struct EulerStep {
  using out_t = x_t;
  __device__ __forceinline__ x_t operator()(float xi, float v_hat, float dt) const {
    return static_cast<x_t>(xi + dt * v_hat);
  }
};

}  // namespace

at::Tensor skip_step_cuda(const at::Tensor& x, at::Tensor& xs, at::Tensor& vs, int64_t slot_start,
                          int64_t slot_last, int64_t slot_write, double inv_d, double dt) {
  static constexpr const char* kOp = "meancache::_skip_step_cuda";
  check_estimator_args(kOp, x, xs, vs, slot_start, slot_last, slot_write);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;

  MC_DISPATCH_FLOAT(x.scalar_type(), kOp, x_t, [&] {
    launch_elementwise(
        estimator_op<x_t>(x, xs, vs, slot_start, slot_last, slot_write, inv_d, dt, out, EulerStep<x_t>{}),
        x.device().index());
  });
  return out;
}

}  // namespace meancache
