// The C++ call path of the ops: what `lmfast.ops.*` and the `lmfast.nn` modules call for
// CPU tensors, in one torch.ops.lmfast_C.* call each.
//
// 1. Public ops (lmfast_C::layer_norm, rms_norm, softmax, attention), CompositeImplicitAutograd:
//    they check the user's arguments (checks.h: the Python layer's messages), shape them into
//    the kernels' contracts (contiguous inputs, a 4-D view for softmax, an expanded mask;
//    views where possible) and call the kernel ops through the dispatcher. Being composite, torch.compile traces them into
//    those kernel ops, whose fake impls are registered in Python (lmfast/ops/*.py); they
//    therefore read shapes as SymInts.
// 2. Autograd of the kernel ops (lmfast_C::*_fwd): torch::autograd::Function subclasses whose
//    backward calls the *_bwd kernel ops. Without grad the kernel runs directly, skipping the
//    autograd node (decoding one token at a time calls these a few dozen times a token).
//
// Nothing here touches data: the kernels (csrc/cpu/) do, for the devices they are registered for.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace lmfast::api {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

// ---- the kernel ops, called through the dispatcher (autograd, fake tensors, devices) -------

template <typename Sig>
c10::TypedOperatorHandle<Sig> kernel_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// fn(): the typed handle of lmfast_C::fn, looked up once (the signature is __VA_ARGS__).
#define LMFAST_KERNEL_OP(fn, ...)                                          \
  const c10::TypedOperatorHandle<__VA_ARGS__>& fn() {                      \
    static const auto handle = kernel_op<__VA_ARGS__>("lmfast_C::" #fn);   \
    return handle;                                                         \
  }

using NormOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;
LMFAST_KERNEL_OP(layer_norm_fwd, NormOut(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double))
LMFAST_KERNEL_OP(layer_norm_bwd, std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                                    const Tensor&, const Tensor&, const OptTensor&,
                                                                    bool, bool, double))
LMFAST_KERNEL_OP(rms_norm_fwd, std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                                  double, double))
LMFAST_KERNEL_OP(rms_norm_bwd, std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                          const Tensor&, const OptTensor&, bool, double, double))
LMFAST_KERNEL_OP(softmax_fwd, Tensor(const Tensor&, const OptTensor&, double, bool))
LMFAST_KERNEL_OP(softmax_bwd, Tensor(const Tensor&, const Tensor&, double))
LMFAST_KERNEL_OP(attention_fwd, std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                   const OptTensor&, double, bool,
                                                                   std::optional<int64_t>, double, const OptTensor&,
                                                                   double, const OptTensor&, const OptTensor&))
LMFAST_KERNEL_OP(attention_bwd, std::tuple<Tensor, Tensor, Tensor, Tensor>(
                                    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                    const Tensor&, const OptTensor&, const OptTensor&, double, bool,
                                    std::optional<int64_t>, bool, double, const OptTensor&, double,
                                    const OptTensor&, const OptTensor&))
#undef LMFAST_KERNEL_OP

// ---- shaping helpers ----------------------------------------------------------------------

OptTensor contiguous(const OptTensor& t) { return t.has_value() ? OptTensor(t->contiguous()) : t; }
OptTensor defined_or_none(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// An output's incoming gradient as a contiguous tensor shaped like `like` (undefined: unused).
Tensor upstream_grad(const Tensor& g, const Tensor& like) {
  return g.defined() ? g.contiguous() : at::zeros_like(like, at::MemoryFormat::Contiguous);
}

bool grad_wanted(std::initializer_list<const OptTensor*> opts, std::initializer_list<const Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : tensors)
    if (t->requires_grad()) return true;
  for (const OptTensor* t : opts)
    if (t->has_value() && (*t)->requires_grad()) return true;
  return false;
}

// Which tensor arguments of a forward were given, as bits (bit i: argument i). needs_input_grad
// takes the index of an input among the *given* tensor inputs (a None optional has no autograd
// edge), which these bits translate to. One int in the context: its map costs per entry.
struct Given {
  int64_t bits = 0;
  explicit Given(std::initializer_list<bool> given) {
    int64_t i = 0;
    for (bool g : given) bits |= int64_t(g) << i++;
  }
  explicit Given(AutogradContext* ctx) : bits(ctx->saved_data["given"].toInt()) {}
  void save(AutogradContext* ctx) const { ctx->saved_data["given"] = bits; }
  bool has(int arg) const { return (bits >> arg) & 1; }
  // whether the backward must compute argument `arg`'s gradient
  bool needed(AutogradContext* ctx, int arg) const {
    return has(arg) && ctx->needs_input_grad(__builtin_popcountll(bits & ((int64_t(1) << arg) - 1)));
  }
};

// ---- autograd of the kernel ops ----------------------------------------------------------

struct LayerNormFwd : torch::autograd::Function<LayerNormFwd> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, double eps) {
    ctx->set_materialize_grads(false);
    Given({true, weight.has_value(), bias.has_value(), residual.has_value()}).save(ctx);
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->saved_data["eps"] = eps;
    auto [y, s, mean, rstd] = layer_norm_fwd().call(x, weight, bias, residual, eps);
    const bool has_residual = residual.has_value();
    ctx->save_for_backward({has_residual ? s : x, weight.value_or(Tensor()), mean, rstd});
    ctx->mark_non_differentiable(has_residual ? variable_list{mean, rstd} : variable_list{s, mean, rstd});
    return {y, s, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &normed = saved[0], &weight = saved[1], &mean = saved[2], &rstd = saved[3];
    const Given given(ctx);
    const bool need_x = given.needed(ctx, 0), need_w = given.needed(ctx, 1), need_b = given.needed(ctx, 2),
               need_r = given.needed(ctx, 3);
    const OptTensor ds = given.has(3) ? OptTensor(upstream_grad(grads[1], normed)) : std::nullopt;
    auto [dx, dw, db] = layer_norm_bwd().call(upstream_grad(grads[0], normed), normed, defined_or_none(weight),
                                              mean, rstd, ds, need_w, need_b, ctx->saved_data["eps"].toDouble());
    return {need_x ? dx : Tensor(), need_w ? dw : Tensor(), need_b ? db : Tensor(), need_r ? dx : Tensor(),
            Tensor()};
  }
};

struct RmsNormFwd : torch::autograd::Function<RmsNormFwd> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight,
                               const OptTensor& residual, double eps, double weight_offset) {
    ctx->set_materialize_grads(false);
    Given({true, weight.has_value(), residual.has_value()}).save(ctx);
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["weight_offset"] = weight_offset;
    auto [y, s, rstd] = rms_norm_fwd().call(x, weight, residual, eps, weight_offset);
    const bool has_residual = residual.has_value();
    ctx->save_for_backward({has_residual ? s : x, weight.value_or(Tensor()), rstd});
    ctx->mark_non_differentiable(has_residual ? variable_list{rstd} : variable_list{s, rstd});
    return {y, s, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &normed = saved[0], &weight = saved[1], &rstd = saved[2];
    const Given given(ctx);
    const bool need_x = given.needed(ctx, 0), need_w = given.needed(ctx, 1), need_r = given.needed(ctx, 2);
    const OptTensor ds = given.has(2) ? OptTensor(upstream_grad(grads[1], normed)) : std::nullopt;
    auto [dx, dw] = rms_norm_bwd().call(upstream_grad(grads[0], normed), normed, defined_or_none(weight), rstd, ds,
                                        need_w, ctx->saved_data["eps"].toDouble(),
                                        ctx->saved_data["weight_offset"].toDouble());
    return {need_x ? dx : Tensor(), need_w ? dw : Tensor(), need_r ? dx : Tensor(), Tensor(), Tensor()};
  }
};

// An additive mask's gradient (softmax's or attention's) from dz = d(loss)/d(logits),
// unrounded (float32 for 16-bit masks, else the mask's dtype): summed in dz's dtype over the
// dims along which the (expanded) mask broadcasts (stride 0), at index 0 of those dims and
// zeros elsewhere, in `dtype`. Autograd's expand backward then adds exact zeros. Summing after
// rounding each element to 16 bits would lose the cancellation of a softmax row's gradient (it
// sums to 0; found by tests/test_fuzz.py: a mask broadcast along the softmax dim got 3e-4 where
// eager gets 1e-7) and, in float16, could overflow to inf - inf = NaN (attention's: ops.h).
// With `softmax_invariant` (softmax's mask), a mask constant along the softmax (last) dim has
// gradient exactly 0 (softmax ignores a constant added to a row): the float sum would leave
// only its rounding noise (1e-7 in bfloat16 where the float64 reference's is 1e-28: found by
// the long fuzz profile), so such a mask gets exact zeros, NaN where the sum is not finite, as
// the reference's is. (Not attention's: its lse moves with such a mask, and lse has a gradient.)

Tensor broadcast_mask_grad(const Tensor& dz, const Tensor& mask, at::ScalarType dtype, bool softmax_invariant) {
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < dz.dim(); ++d)
    if (mask.stride(d) == 0 && mask.size(d) > 1) dims.push_back(d);
  if (dims.empty()) return dz.to(dtype);
  Tensor g = at::zeros(dz.sizes(), dz.options().dtype(dtype));
  Tensor first = g;
  for (int64_t d : dims) first = first.narrow(d, 0, 1);
  Tensor sum = dz.sum(dims, /*keepdim=*/true);
  if (softmax_invariant && dims.back() == dz.dim() - 1) sum = at::where(sum.isfinite(), 0.0, NAN);
  first.copy_(sum);
  return g;
}

struct SoftmaxFwd : torch::autograd::Function<SoftmaxFwd> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptTensor& mask, double scale, bool causal) {
    ctx->set_materialize_grads(false);
    Given({true, mask.has_value()}).save(ctx);
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor y = softmax_fwd().call(x, mask, scale, causal);
    ctx->saved_data["scale"] = scale;
    ctx->save_for_backward({y, mask.value_or(Tensor())});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &y = saved[0], &mask = saved[1];
    const Given given(ctx);
    const bool need_x = given.needed(ctx, 0), need_mask = given.needed(ctx, 1);
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
    const double scale = ctx->saved_data["scale"].toDouble();
    const Tensor dy = grads[0].contiguous();  // (B, H, M, N), as y
    if (!need_mask) return {softmax_bwd().call(dy, y, scale), Tensor(), Tensor(), Tensor()};
    // d(loss)/d(logits) is also the additive mask's gradient (summed over its broadcast dims
    // by autograd's expand backward); x's gradient is that times scale.
    if (y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble) {
      const Tensor dz = softmax_bwd().call(dy, y, 1.0);
      return {need_x ? dz * scale : Tensor(), broadcast_mask_grad(dz, mask, y.scalar_type(), true), Tensor(),
              Tensor()};
    }
    // 16-bit: float32 d(logits) from y renormalized in float32 (y rounded to 16 bits sums to
    // 1 +- 1e-3, and sum(dz) = sum(y dy) (1 - sum(y)) would not cancel), and the mask's
    // gradient reduced before rounding (above)
    const Tensor y32 = y.to(at::kFloat);
    const Tensor row_sum = y32.sum(-1, /*keepdim=*/true);
    const Tensor dz32 = softmax_bwd().call(dy.to(at::kFloat), y32 / at::where(row_sum == 0, 1.0, row_sum), 1.0);
    return {need_x ? (dz32 * scale).to(y.scalar_type()) : Tensor(),
            broadcast_mask_grad(dz32, mask, y.scalar_type(), true), Tensor(), Tensor()};
  }
};

struct AttentionFwd : torch::autograd::Function<AttentionFwd> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const OptTensor& mask, double scale, bool causal, std::optional<int64_t> window,
                               double dropout_p, const OptTensor& dropout_seed, double softcap,
                               const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k) {
    ctx->set_materialize_grads(false);
    Given({true, true, true, mask.has_value()}).save(ctx);
    at::AutoDispatchBelowADInplaceOrView below;
    auto [o, lse, row_stats] = attention_fwd().call(q, k, v, mask, scale, causal, window, dropout_p, dropout_seed,
                                                    softcap, cu_seqlens_q, cu_seqlens_k);
    ctx->mark_non_differentiable({row_stats});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["window"] = window.has_value() ? c10::IValue(*window) : c10::IValue();
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["softcap"] = softcap;
    ctx->save_for_backward({q, k, v, o, row_stats, mask.value_or(Tensor()), dropout_seed.value_or(Tensor()),
                            cu_seqlens_q.value_or(Tensor()), cu_seqlens_k.value_or(Tensor())});
    return {o, lse, row_stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor o = saved[3].contiguous();  // the backward takes contiguous tensors
    const bool mask_grad = Given(ctx).needed(ctx, 3);
    const auto& window = ctx->saved_data["window"];
    auto [dq, dk, dv, dmask] = attention_bwd().call(
        upstream_grad(grads[0], o), saved[0].contiguous(), saved[1].contiguous(), saved[2].contiguous(), o,
        saved[4], grads[1].defined() ? OptTensor(grads[1].contiguous()) : std::nullopt, defined_or_none(saved[5]),
        ctx->saved_data["scale"].toDouble(), ctx->saved_data["causal"].toBool(),
        window.isNone() ? std::nullopt : std::optional<int64_t>(window.toInt()), mask_grad,
        ctx->saved_data["dropout_p"].toDouble(), defined_or_none(saved[6]), ctx->saved_data["softcap"].toDouble(),
        defined_or_none(saved[7]), defined_or_none(saved[8]));
    // dmask comes unrounded (ops.h): summed over the mask's broadcast dims, then rounded
    const Tensor dmask_out =
        mask_grad ? broadcast_mask_grad(dmask, saved[5], saved[5].scalar_type(), false) : Tensor();
    return {dq, dk, dv, dmask_out, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

// ---- Autograd-key kernels of the kernel ops -----------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd_autograd(const Tensor& x, const OptTensor& weight,
                                                                   const OptTensor& bias, const OptTensor& residual,
                                                                   double eps) {
  if (!grad_wanted({&weight, &bias, &residual}, {&x})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return layer_norm_fwd().call(x, weight, bias, residual, eps);
  }
  auto out = LayerNormFwd::apply(x, weight, bias, residual, eps);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd_autograd(const Tensor& x, const OptTensor& weight,
                                                         const OptTensor& residual, double eps,
                                                         double weight_offset) {
  if (!grad_wanted({&weight, &residual}, {&x})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return rms_norm_fwd().call(x, weight, residual, eps, weight_offset);
  }
  auto out = RmsNormFwd::apply(x, weight, residual, eps, weight_offset);
  return {out[0], out[1], out[2]};
}

Tensor softmax_fwd_autograd(const Tensor& x, const OptTensor& mask, double scale, bool causal) {
  if (!grad_wanted({&mask}, {&x})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return softmax_fwd().call(x, mask, scale, causal);
  }
  return SoftmaxFwd::apply(x, mask, scale, causal);
}

std::tuple<Tensor, Tensor, Tensor> attention_fwd_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                          const OptTensor& mask, double scale, bool causal,
                                                          std::optional<int64_t> window, double dropout_p,
                                                          const OptTensor& dropout_seed, double softcap,
                                                          const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k) {
  if (!grad_wanted({&mask}, {&q, &k, &v})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return attention_fwd().call(q, k, v, mask, scale, causal, window, dropout_p, dropout_seed, softcap, cu_seqlens_q,
                                cu_seqlens_k);
  }
  auto out = AttentionFwd::apply(q, k, v, mask, scale, causal, window, dropout_p, dropout_seed, softcap,
                                 cu_seqlens_q, cu_seqlens_k);
  return {out[0], out[1], out[2]};
}

// ---- public ops -----------------------------------------------------------------------------

std::tuple<Tensor, Tensor> layer_norm(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                      const OptTensor& residual, double eps) {
  checks::floating_tensor("x", x);
  checks::norm_param("weight", weight, x);
  checks::norm_param("bias", bias, x);
  checks::residual_like(residual, x);
  checks::eps(eps);
  // (the kernel takes (..., N) as it is: no views between the caller and it, in either direction)
  auto [y, s, mean, rstd] = layer_norm_fwd().call(x.contiguous(), contiguous(weight), contiguous(bias),
                                                  contiguous(residual), eps);
  return {y, s};  // s: x + residual, or an empty tensor without a residual
}

std::tuple<Tensor, Tensor> rms_norm(const Tensor& x, const OptTensor& weight, const OptTensor& residual,
                                    double eps, double weight_offset) {
  checks::floating_tensor("x", x);
  checks::norm_param("weight", weight, x);
  checks::residual_like(residual, x);
  checks::eps(eps);
  checks::weight_offset(weight_offset, weight);
  auto [y, s, rstd] = rms_norm_fwd().call(x.contiguous(), contiguous(weight), contiguous(residual), eps,
                                          weight_offset);
  return {y, s};
}

Tensor softmax(const Tensor& x, int64_t dim, double scale, const OptTensor& mask, bool causal) {
  checks::floating_tensor("x", x);
  const int64_t last = x.dim() - 1, d = checks::dim_index(dim, x.dim());
  checks::finite("scale", scale);
  checks::mask_for(mask, x, x.sym_sizes(), "mask", "x's shape");
  TORCH_CHECK_VALUE(!causal || (x.dim() >= 2 && d == last),
                    "causal=True masks over the last two dims and needs dim=-1 and x with >= 2 dims; got dim=",
                    dim, " for x of shape ", checks::shape_str(x.sym_sizes()));
  // (..., M, N) with the softmax dim last -> (B, H, M, N): missing leading dims are 1, extra
  // ones merge into B. (The common case, a 4-D x over its last dim, takes no views at all.)
  const bool moved = d != last, reshaped = x.dim() != 4;
  const Tensor xm = moved ? x.movedim(d, last) : x;
  std::vector<c10::SymInt> shape4(4, c10::SymInt(1));
  const auto sizes = xm.sym_sizes();
  for (int64_t i = 0; i < xm.dim(); ++i) {
    const int64_t slot = std::max<int64_t>(0, 4 - xm.dim() + i);
    shape4[slot] = shape4[slot] * sizes[i];
  }
  OptTensor mask4;
  if (mask.has_value()) {  // a view of the broadcast mask, unless it cannot be merged to 4-D
    Tensor m = mask->expand_symint(x.sym_sizes());
    if (moved) m = m.movedim(d, last);
    if (reshaped) m = m.reshape_symint(shape4);
    if (m.sym_size(3) > 1 && m.sym_stride(3) != 0 && m.sym_stride(3) != 1) m = m.contiguous();
    mask4 = m;  // (the kernels read mask rows with unit or zero stride)
  }
  Tensor y = softmax_fwd().call((reshaped ? xm.reshape_symint(shape4) : xm).contiguous(), mask4, scale, causal);
  if (reshaped) y = y.view_symint(sizes);
  return moved ? y.movedim(last, d) : y;
}

std::tuple<Tensor, Tensor> attention(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& attn_mask,
                                     bool causal, std::optional<double> scale, std::optional<int64_t> window,
                                     double dropout_p, const OptTensor& dropout_seed,
                                     std::optional<double> softcap, const OptTensor& cu_seqlens_q,
                                     const OptTensor& cu_seqlens_k) {
  const char* names[3] = {"q", "k", "v"};
  const Tensor* qkv[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    checks::floating_tensor(names[i], *qkv[i]);
    TORCH_CHECK_VALUE(qkv[i]->dim() == 4, names[i], " must have 4 dims (B, H, S, D), got shape ",
                      checks::shape_str(qkv[i]->sym_sizes()));
  }
  checks::same_device_and_dtype("k", k, q, "q");
  checks::same_device_and_dtype("v", v, q, "q");
  const auto qs = q.sym_sizes(), ks = k.sym_sizes(), vs = v.sym_sizes();
  TORCH_CHECK_VALUE(vs[0] == ks[0] && vs[1] == ks[1] && vs[2] == ks[2],
                    "k and v must have the same (B, Hkv, Sk) (their head dims may differ), got ",
                    checks::shape_str(ks), " and ", checks::shape_str(vs));
  TORCH_CHECK_VALUE(ks[0] == qs[0], "k and v have batch size ", ks[0], " but q has ", qs[0]);
  TORCH_CHECK_VALUE(ks[3] == qs[3], "k has head dim ", ks[3], " but q has ", qs[3], "; they must match");
  TORCH_CHECK_VALUE(ks[1] != 0 && qs[1] % ks[1] == 0, "q's ", qs[1], " heads must be a multiple of k's and v's ",
                    ks[1], " heads");
  const std::vector<c10::SymInt> shape4{qs[0], qs[1], qs[2], ks[2]};  // (B, Hq, Sq, Sk)
  checks::mask_for(attn_mask, q, shape4, "attn_mask", "(B, Hq, Sq, Sk) =");
  TORCH_CHECK_VALUE(!window.has_value() || *window >= 1,
                    "window must be >= 1 (the number of keys each query sees), got ", window.value_or(0));
  if (scale.has_value()) checks::finite("scale", *scale);
  checks::dropout(dropout_p, dropout_seed);
  if (softcap.has_value()) checks::softcap(*softcap);
  checks::documents(cu_seqlens_q, cu_seqlens_k, q);
  const double s = scale.has_value() ? *scale : std::pow(double(qs[3].guard_int(__FILE__, __LINE__)), -0.5);
  // The forward takes any strides with a contiguous head dim: the (B, S, H, D) projections
  // models transpose to (B, H, S, D) pass without a copy.
  auto rows = [](const Tensor& t) { return t.sym_size(3) <= 1 || t.sym_stride(3) == 1 ? t : t.contiguous(); };
  const OptTensor mask4 = attn_mask.has_value() ? OptTensor(attn_mask->expand_symint(shape4)) : std::nullopt;
  // The dropout mask's seed: drawn from the default generator of q's device (torch.manual_seed)
  // unless given; on q's device, where the kernels read it.
  const OptTensor seed = !(dropout_p > 0) ? std::nullopt
                         : dropout_seed.has_value()
                             ? OptTensor(dropout_seed->reshape({1}).to(q.device()))
                             : OptTensor(at::randint(int64_t(1) << 62, {1}, q.options().dtype(at::kLong)));
  auto [o, lse, row_stats] = attention_fwd().call(rows(q), rows(k), rows(v), mask4, s, causal, window, dropout_p,
                                                  seed, softcap.value_or(0.0), cu_seqlens_q, cu_seqlens_k);
  return {o, lse};  // (row_stats: for the backward only)
}

}  // namespace lmfast::api
