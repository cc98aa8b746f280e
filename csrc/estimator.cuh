// The MeanCache estimator (algorithm.md §2.2 steps 3-7 and §3), shared by skip_step.cu and estimate.cu so the two
// cannot drift: one element-wise op that reads the ring, estimates v̂, logs (x_i, v̂) into slot_write, and stores an
// output that each op chooses with a small functor (skip_step: the Euler step; estimate: the scaled velocity).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "utils.cuh"

namespace meancache {

// All operands are float32 (§3). inv_d = 1 / (σ_i - σ_j0), or 0 when the window has zero length, which makes jvp 0
// and v̂ = v_last: the reuse fallback of §3 instead of a NaN. No division here: the host did it once, in double.
__device__ __forceinline__ float estimate_velocity(float xi, float x0, float v0, float v_last, float inv_d,
                                                   float dt) {
  const float avg = (xi - x0) * inv_d;  // average velocity over the window j0 .. i-1
  const float jvp = (v0 - avg) * inv_d;  // finite-difference "JVP" (no autograd, no model call)
  return v_last - jvp * dt;
}

// Skipped step i, per element:
//   avg = (x_i - x_j0) · inv_d;  jvp = (v_j0 - avg) · inv_d;  v̂ = v_last - jvp · dt
//   xs[slot_write] = x_i;  vs[slot_write] = v̂;  out = output(x_i, v̂, dt)
// with inv_d = 1/(σ_i - σ_j0) (0 if that is 0) and dt = σ_{i+1} - σ_i. Out is a functor with a member type out_t
// (the dtype of `out`) and `__device__ out_t operator()(float xi, float v_hat, float dt) const`. An element-wise
// op for elementwise_kernel (utils.cuh).
template <typename x_t, typename Out>
struct EstimatorOp {
  using out_t = typename Out::out_t;
  static constexpr int kVec = vec_width<x_t, out_t, float>();

  const x_t* x;
  // Ring rows. No __restrict__: on a full ring slot_write may equal slot_start or slot_last, so the written rows
  // can alias the read ones.
  const float* xs_start;
  const float* vs_start;
  const float* vs_last;
  float* xs_write;
  float* vs_write;
  out_t* out;
  int64_t n;
  float inv_d;
  float dt;
  Out output;

  bool aligned() const { return all_aligned(x, xs_start, vs_start, vs_last, xs_write, vs_write, out); }

  // Elements e .. e+N-1. Every load completes before the first store, so an aliased write row only ever overwrites
  // values this thread has already read; other threads own other elements.
  template <int N>
  __device__ __forceinline__ void group(int64_t e) const {
    x_t x_in[N];
    float x0[N], v0[N], v_last[N];
    load_vec<N>(x + e, x_in);
    load_vec<N>(xs_start + e, x0);
    load_vec<N>(vs_start + e, v0);
    load_vec<N>(vs_last + e, v_last);

    float xi[N], v_hat[N];
    out_t o[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      xi[k] = static_cast<float>(x_in[k]);
      v_hat[k] = estimate_velocity(xi[k], x0[k], v0[k], v_last[k], inv_d, dt);
      o[k] = output(xi[k], v_hat[k], dt);
    }
    store_vec<N>(xs_write + e, xi);
    store_vec<N>(vs_write + e, v_hat);
    store_vec<N>(out + e, o);
  }
};

// Host side, shared by the two launchers. The argument checks they have in common: the ring (check_ring), its
// three slots, and x clear of the row being written.
inline void check_estimator_args(const char* op, const at::Tensor& x, const at::Tensor& xs, const at::Tensor& vs,
                                 int64_t slot_start, int64_t slot_last, int64_t slot_write) {
  const int64_t capacity = check_ring(op, x, xs, vs);
  MC_CHECK_SLOT(op, slot_start, "slot_start", capacity);
  MC_CHECK_SLOT(op, slot_last, "slot_last", capacity);
  MC_CHECK_SLOT(op, slot_write, "slot_write", capacity);
  check_not_written(op, x, "x", xs, vs, slot_write);
}

// Builds the op over x's n = x.numel() elements (> 0) and `out` (dtype Out::out_t, same numel); the ring rows are
// base + slot * n.
template <typename x_t, typename Out>
EstimatorOp<x_t, Out> estimator_op(const at::Tensor& x, at::Tensor& xs, at::Tensor& vs, int64_t slot_start,
                                   int64_t slot_last, int64_t slot_write, double inv_d, double dt, at::Tensor& out,
                                   Out output) {
  const int64_t n = x.numel();
  const float* xs_base = xs.const_data_ptr<float>();
  const float* vs_base = vs.const_data_ptr<float>();
  return {x.const_data_ptr<x_t>(),
          xs_base + slot_start * n,
          vs_base + slot_start * n,
          vs_base + slot_last * n,
          xs.mutable_data_ptr<float>() + slot_write * n,
          vs.mutable_data_ptr<float>() + slot_write * n,
          out.mutable_data_ptr<typename Out::out_t>(),
          n,
          static_cast<float>(inv_d),
          static_cast<float>(dt),
          output};
}

}  // namespace meancache
