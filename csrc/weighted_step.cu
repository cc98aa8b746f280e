// meancache::_weighted_step_cuda: a skipped step with any estimator of meancache/estimators.py (the published
// MeanCache estimator restated as weights, or the `extrapolate` polynomials), fused into one element-wise launch.
// The estimator arrives as host weights on stored rows, so one kernel serves them all and nothing here depends on
// sigmas.
#include <ATen/ops/empty.h>

#include <optional>
#include <type_traits>

#include "ops.h"
#include "utils.cuh"

namespace meancache {
namespace {

// Most velocity terms one step combines: meancache.estimators.MAX_TERMS (the 4 nodes of a cubic).
constexpr int kMaxTerms = 4;

// The operands every instantiation of WeightedStepOp (below) shares, computed once on the host.
struct WeightedRows {
  // Rows V[s_t] of the first n_terms terms; the rest are nullptr and never read. No __restrict__ on any row: with
  // V = vs a read row may be the written row vs[slot_write] (a full ring), and xs[x_slot] may be xs[slot_write].
  const float* v_rows[kMaxTerms];
  float w[kMaxTerms];
  int n_terms;
  // xs[x_slot], or nullptr when the latent term is left out: that row may then hold anything (an unwritten slot,
  // NaN) and is not read, since 0 · NaN would still be NaN.
  const float* xs_x;
  float x_weight;
  float* xs_write;
  float* vs_write;
  float dt;
  float out_scale;
};

// Weighted skipped step i, per element (float32 throughout, algorithm.md §3):
//   v̂ = w_0 · V[s_0] (+ w_1 · V[s_1] + w_2 · V[s_2] + w_3 · V[s_3])      summed in this order, n_terms of them
//   v̂ = v̂ + (x_i - xs[x_slot]) · x_weight                               only when xs_x is set (x_weight != 0)
//   xs[slot_write] = x_i;  vs[slot_write] = v̂
//   out = cast_x(x_i + dt · v̂)  (kEuler)   or   cast_out(v̂ · out_scale)
// V is the stack of computed velocities vc, or the ring's vs when the caller passed none. The order of the sum is
// the reference's (meancache/reference.py weighted_step_ref), so the two differ by FMA contraction only. An
// element-wise op for elementwise_kernel (utils.cuh).
template <typename x_t, typename o_t, bool kEuler>
struct WeightedStepOp {
  static_assert(!kEuler || std::is_same_v<x_t, o_t>, "the Euler step is stored in the latent's dtype");
  static constexpr int kVec = vec_width<x_t, o_t, float>();

  const x_t* x;
  o_t* out;
  int64_t n;
  WeightedRows r;

  // nullptr rows count as aligned (address 0), so only the rows the kernel reads decide the path.
  bool aligned() const {
    return all_aligned(x, r.v_rows[0], r.v_rows[1], r.v_rows[2], r.v_rows[3], r.xs_x, r.xs_write, r.vs_write, out);
  }

  // Elements e .. e+N-1. Every load completes before the first store, so a written row that aliases a read one
  // only overwrites values this thread has already read; other threads own other elements.
  template <int N>
  __device__ __forceinline__ void group(int64_t e) const {
    x_t x_in[N];
    load_vec<N>(x + e, x_in);
    float v_hat[N];
    {
      float v[N];
      load_vec<N>(r.v_rows[0] + e, v);
#pragma unroll
      for (int k = 0; k < N; ++k) v_hat[k] = v[k] * r.w[0];
    }
    // n_terms is the same for every thread (a kernel argument), so the branch never diverges; unrolled, each term
    // indexes v_rows and w with a constant, which keeps them in the kernel's parameter space.
#pragma unroll
    for (int t = 1; t < kMaxTerms; ++t) {
      if (t < r.n_terms) {
        float v[N];
        load_vec<N>(r.v_rows[t] + e, v);
#pragma unroll
        for (int k = 0; k < N; ++k) v_hat[k] = v_hat[k] + v[k] * r.w[t];
      }
    }
    float xi[N];
#pragma unroll
    for (int k = 0; k < N; ++k) xi[k] = static_cast<float>(x_in[k]);
    if (r.xs_x != nullptr) {
      float x0[N];
      load_vec<N>(r.xs_x + e, x0);
#pragma unroll
      for (int k = 0; k < N; ++k) v_hat[k] = v_hat[k] + (xi[k] - x0[k]) * r.x_weight;
    }

    o_t o[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if constexpr (kEuler) {
        o[k] = static_cast<o_t>(xi[k] + r.dt * v_hat[k]);
      } else {
        o[k] = static_cast<o_t>(v_hat[k] * r.out_scale);
      }
    }
    store_vec<N>(r.xs_write + e, xi);
    store_vec<N>(r.vs_write + e, v_hat);
    store_vec<N>(out + e, o);
  }
};

}  // namespace

// Host side of one instantiation: x's n = x.numel() elements (> 0), out of dtype o_t with the same numel.
template <typename x_t, typename o_t, bool kEuler>
void launch_weighted_step(const at::Tensor& x, at::Tensor& out, const WeightedRows& rows) {
  const WeightedStepOp<x_t, o_t, kEuler> op{x.const_data_ptr<x_t>(), out.mutable_data_ptr<o_t>(), x.numel(), rows};
  launch_elementwise(op, x.device().index());
}

at::Tensor weighted_step_cuda(const at::Tensor& x, at::Tensor& xs, at::Tensor& vs, const std::optional<at::Tensor>& vc,
                              at::IntArrayRef v_slots, at::ArrayRef<double> v_weights, int64_t x_slot,
                              double x_weight, int64_t slot_write, double dt, double out_scale,
                              c10::ScalarType out_dtype, bool euler) {
  static constexpr const char* kOp = "meancache::_weighted_step_cuda";
  const int64_t capacity = check_ring(kOp, x, xs, vs);
  // V: the computed velocities, a (D, *x.shape) float32 stack, or the ring's vs. Its rows are addressed like the
  // ring's, base + slot * n, so its shape is held to that as strictly as the ring's.
  const at::Tensor& source = vc.has_value() ? *vc : vs;
  if (vc.has_value()) {
    MC_CHECK_CUDA(kOp, *vc, "vc");
    MC_CHECK_SAME_DEVICE(kOp, *vc, "vc", x, "x");
    MC_CHECK_CONTIGUOUS(kOp, *vc, "vc");
    TORCH_CHECK(vc->scalar_type() == at::kFloat, kOp, ": vc must be float32, got ", vc->scalar_type());
    TORCH_CHECK(vc->dim() == x.dim() + 1 && vc->sizes().slice(1) == x.sizes() && vc->size(0) >= 1, kOp,
                ": vc has shape ", vc->sizes(), " but x has shape ", x.sizes(), ": it must be (D, *x.shape), D >= 1");
  }
  const auto n_terms = static_cast<int64_t>(v_slots.size());
  TORCH_CHECK(n_terms >= 1 && n_terms <= kMaxTerms && static_cast<int64_t>(v_weights.size()) == n_terms, kOp,
              ": v_slots has ", n_terms, " entries and v_weights ", v_weights.size(), ": need 1..", kMaxTerms,
              " slots and one weight per slot");
  const int64_t rows = source.size(0);
  for (const int64_t slot : v_slots) {
    TORCH_CHECK(slot >= 0 && slot < rows, kOp, ": v_slots entry ", slot, " is out of range for ",
                vc.has_value() ? "vc" : "vs", ", which holds ", rows, " rows");
  }
  MC_CHECK_SLOT(kOp, x_slot, "x_slot", capacity);
  MC_CHECK_SLOT(kOp, slot_write, "slot_write", capacity);
  check_not_written(kOp, x, "x", xs, vs, slot_write);
  if (vc.has_value()) check_not_written(kOp, *vc, "vc", xs, vs, slot_write);
  // With euler the output is the next latent, in x's dtype, and out_dtype is ignored (as in the reference).
  if (!euler) MC_CHECK_FLOAT_DTYPE(kOp, out_dtype, "out_dtype");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(euler ? x.scalar_type() : out_dtype));
  const int64_t n = x.numel();
  if (n == 0) return out;

  WeightedRows r{};
  const float* v_base = source.const_data_ptr<float>();
  for (int64_t t = 0; t < n_terms; ++t) {
    r.v_rows[t] = v_base + v_slots[t] * n;
    r.w[t] = static_cast<float>(v_weights[t]);
  }
  r.n_terms = static_cast<int>(n_terms);
  // The zero test is on the double the caller gave (not on its float32 rounding), as the reference's
  // `x_weight != 0.0` is: a tiny weight that rounds to 0 still reads its row, like the reference.
  r.xs_x = x_weight != 0.0 ? xs.const_data_ptr<float>() + x_slot * n : nullptr;
  r.x_weight = static_cast<float>(x_weight);
  r.xs_write = xs.mutable_data_ptr<float>() + slot_write * n;
  r.vs_write = vs.mutable_data_ptr<float>() + slot_write * n;
  r.dt = static_cast<float>(dt);
  r.out_scale = static_cast<float>(out_scale);

  MC_DISPATCH_FLOAT(x.scalar_type(), kOp, x_t, [&] {
    if (euler) {
      launch_weighted_step<x_t, x_t, true>(x, out, r);
    } else {
      MC_DISPATCH_FLOAT(out_dtype, kOp, o_t, [&] { launch_weighted_step<x_t, o_t, false>(x, out, r); });
    }
  });
  return out;
}

}  // namespace meancache
