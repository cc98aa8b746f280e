// meancache::_estimate_cuda: the MeanCache velocity estimate alone (no Euler step), logged and returned scaled.
// For callers that hand the velocity to their own sampler step instead of letting meancache take it.
#include <ATen/ops/empty.h>

#include "estimator.cuh"
#include "ops.h"
#include "utils.cuh"

namespace meancache {
namespace {

// Estimate for skipped step i, algorithm.md §2.2 (steps 3-7) and §3: the estimator (estimator.cuh), then
// out = cast_out(v̂ · scale). The scale lets the caller return v̂ (dx/dσ) in another convention, e.g. -1 for a
// model that predicts -dx/dσ like Z-Image (algorithm.md §1).
template <typename o_t>
struct ScaledVelocity {
  using out_t = o_t;
  float scale;
  __device__ __forceinline__ o_t operator()(float /*xi*/, float v_hat, float /*dt*/) const {
    return static_cast<o_t>(v_hat * scale);
  }
};

}  // namespace

at::Tensor estimate_cuda(const at::Tensor& x, at::Tensor& xs, at::Tensor& vs, int64_t slot_start,
                         int64_t slot_last, int64_t slot_write, double inv_d, double dt, double out_scale,
                         c10::ScalarType out_dtype) {
  static constexpr const char* kOp = "meancache::_estimate_cuda";
  check_estimator_args(kOp, x, xs, vs, slot_start, slot_last, slot_write);
  MC_CHECK_FLOAT_DTYPE(kOp, out_dtype, "out_dtype");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  if (x.numel() == 0) return out;

  MC_DISPATCH_FLOAT(x.scalar_type(), kOp, x_t, [&] {
    MC_DISPATCH_FLOAT(out_dtype, kOp, o_t, [&] {
      const ScaledVelocity<o_t> output{static_cast<float>(out_scale)};
      launch_elementwise(estimator_op<x_t>(x, xs, vs, slot_start, slot_last, slot_write, inv_d, dt, out, output),
                         x.device().index());
    });
  });
  return out;
}

}  // namespace meancache
