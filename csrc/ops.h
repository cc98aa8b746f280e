// Host entry points of the meancache CUDA kernels, registered in torch_bindings.cpp as the private ops
// meancache::_<op>_cuda. Python (meancache/ops.py) owns the public schemas and only routes CUDA tensors here.
//
// Common contract: x is the current latent (n elements, contiguous, float16/bfloat16/float32); xs and vs are the
// float32 history ring, contiguous, shape (C, *latent_shape), read and written in place; slots index its first
// dimension. Scalars arrive as double (the schema's `float`) and the kernels use them as float32.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>

namespace meancache {

// Skipped step (algorithm.md §2.2): estimate v̂ from the ring, log (x, v̂) into slot_write, return x + dt·v̂.
at::Tensor skip_step_cuda(const at::Tensor& x, at::Tensor& xs, at::Tensor& vs, int64_t slot_start,
                          int64_t slot_last, int64_t slot_write, double inv_d, double dt);

// Computed step: log (x, v) into slot_write, return x + dt·v. v may have a different float dtype than x.
at::Tensor compute_step_cuda(const at::Tensor& x, const at::Tensor& v, at::Tensor& xs, at::Tensor& vs,
                             int64_t slot_write, double dt);

// Estimate only: as skip_step_cuda, but return v̂·out_scale in out_dtype instead of taking the Euler step.
at::Tensor estimate_cuda(const at::Tensor& x, at::Tensor& xs, at::Tensor& vs, int64_t slot_start,
                         int64_t slot_last, int64_t slot_write, double inv_d, double dt, double out_scale,
                         c10::ScalarType out_dtype);

// Skipped step with any estimator as host weights (meancache/estimators.py): v̂ = Σ_t v_weights[t]·V[v_slots[t]]
// (1..4 terms, in that order) + x_weight·(x - xs[x_slot]) (left out, xs[x_slot] unread, when x_weight == 0), with
// V = vc (a (D, *latent_shape) float32 stack of computed velocities) or vs when vc is empty; log (x, v̂) into
// slot_write; return x + dt·v̂ in x's dtype (euler; out_dtype ignored) or v̂·out_scale in out_dtype.
at::Tensor weighted_step_cuda(const at::Tensor& x, at::Tensor& xs, at::Tensor& vs, const std::optional<at::Tensor>& vc,
                              at::IntArrayRef v_slots, at::ArrayRef<double> v_weights, int64_t x_slot,
                              double x_weight, int64_t slot_write, double dt, double out_scale,
                              c10::ScalarType out_dtype, bool euler);

}  // namespace meancache
