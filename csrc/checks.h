// Argument checks of the public C++ ops (csrc/api.cpp), with the messages of the Python op
// layer (lmfast/ops/_checks.py): each names the argument and what was expected, in Python's
// words (dtypes as torch.float32, shapes as (4, 8)), as ValueError or TypeError. The two
// layers must agree word for word; tests/test_validation.py runs the same cases through both.
//
// Shapes are read as SymInts: under torch.compile these checks run on fake tensors whose
// sizes may be symbolic, and a comparison then becomes a guard instead of failing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <charconv>
#include <cmath>
#include <optional>
#include <sstream>
#include <string>

namespace lmfast::checks {

using at::Tensor;

// "torch.float32", as Python prints a dtype.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kBool: return "torch.bool";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// "(4, 8)", "(8,)" or "()", as Python prints a shape tuple.
inline std::string shape_str(c10::SymIntArrayRef shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << (shape.size() == 1 ? ",)" : ")");
  return s.str();
}

// A double as Python's repr prints it: shortest round trip, "1.0" not "1".
inline std::string number_str(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[32];
  auto end = std::to_chars(buf, buf + sizeof(buf), v).ptr;
  std::string s(buf, end);
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

inline bool is_floating(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline void floating_tensor(const char* name, const Tensor& t) {
  TORCH_CHECK_TYPE(is_floating(t.scalar_type()), name,
                   " must be a float16, bfloat16, float32 or float64 tensor, got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() > 0, name, " must have at least one dimension, got a 0-dim tensor");
}

inline void same_device_and_dtype(const char* name, const Tensor& t, const Tensor& x,
                                  const char* x_name = "x") {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but ", x_name,
                    " is on ", x.device(), "; both must be on one device");
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " has dtype ",
                   dtype_name(t.scalar_type()), " but ", x_name, " has dtype ",
                   dtype_name(x.scalar_type()), "; they must match (cast with ", name, ".to(",
                   x_name, ".dtype))");
}

// weight / bias of a norm over x's last dim: None, or a (N,) tensor like x.
inline void norm_param(const char* name, const std::optional<Tensor>& t, const Tensor& x) {
  if (!t.has_value()) return;
  floating_tensor(name, *t);
  same_device_and_dtype(name, *t, x);
  const c10::SymInt& n = x.sym_size(-1);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->sym_size(0) == n, name, " must have shape (", n,
                    ",), the last dim of x ", shape_str(x.sym_sizes()), ", got ",
                    shape_str(t->sym_sizes()));
}

inline void residual_like(const std::optional<Tensor>& t, const Tensor& x) {
  if (!t.has_value()) return;
  floating_tensor("residual", *t);
  same_device_and_dtype("residual", *t, x);
  TORCH_CHECK_VALUE(t->sym_sizes() == x.sym_sizes(), "residual must have x's shape ",
                    shape_str(x.sym_sizes()), ", got ", shape_str(t->sym_sizes()));
}

inline void finite(const char* name, double v) {
  TORCH_CHECK_VALUE(std::isfinite(v), name, " must be finite, got ", number_str(v));
}

inline void eps(double v) {
  finite("eps", v);
  TORCH_CHECK_VALUE(v >= 0, "eps must be >= 0.0, got ", number_str(v));
}

// RMSNorm's weight_offset (the scale is weight_offset + weight): finite, and 0 without a weight.
inline void weight_offset(double v, const std::optional<Tensor>& weight) {
  finite("weight_offset", v);
  TORCH_CHECK_VALUE(v == 0 || weight.has_value(), "weight_offset=", number_str(v),
                    " needs a weight (without one the scale is 1)");
}

// Attention dropout: a probability in [0, 1), and a seed (if given) of one int64 element.
inline void dropout(double p, const std::optional<Tensor>& seed) {
  finite("dropout_p", p);
  TORCH_CHECK_VALUE(p >= 0 && p < 1, "dropout_p must be in [0, 1), got ", number_str(p));
  if (!seed.has_value()) return;
  TORCH_CHECK_TYPE(seed->scalar_type() == at::kLong, "dropout_seed must be an int64 tensor, got ",
                   dtype_name(seed->scalar_type()));
  TORCH_CHECK_VALUE(seed->sym_numel() == 1, "dropout_seed must have one element, got shape ",
                    shape_str(seed->sym_sizes()));
}

// Attention's logit cap: a positive finite number (None, in Python, for no cap).
inline void softcap(double c) {
  finite("softcap", c);
  TORCH_CHECK_VALUE(c > 0, "softcap must be positive (scores become softcap * tanh(s / softcap)), got ",
                    number_str(c));
}

// Packed documents (csrc/documents.h): cu_seqlens_q and cu_seqlens_k both or neither, each an
// int32/int64 (n + 1,) tensor on q's device, q a batch of one. (Their values are the kernels' check.)
inline void documents(const std::optional<Tensor>& cu_q, const std::optional<Tensor>& cu_k, const Tensor& q) {
  if (!cu_q.has_value() && !cu_k.has_value()) return;
  TORCH_CHECK_VALUE(cu_q.has_value() && cu_k.has_value(),
                    "cu_seqlens_q and cu_seqlens_k go together: pass both or neither");
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"cu_seqlens_q", &*cu_q},
                                {"cu_seqlens_k", &*cu_k}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong, name,
                     " must be an int32 or int64 tensor, got ", dtype_name(t->scalar_type()));
    TORCH_CHECK_VALUE(t->dim() == 1 && t->sym_numel() >= 1, name,
                      " must have shape (n + 1,) for n documents, got shape ", shape_str(t->sym_sizes()));
    TORCH_CHECK_VALUE(t->device() == q.device(), name, " is on ", t->device(), " but q is on ", q.device(),
                      "; both must be on one device");
  }
  TORCH_CHECK_VALUE(cu_q->sym_numel() == cu_k->sym_numel(),
                    "cu_seqlens_q and cu_seqlens_k must have the same length (n + 1 for n documents), got ",
                    cu_q->sym_numel(), " and ", cu_k->sym_numel());
  TORCH_CHECK_VALUE(q.sym_size(0) == 1, "cu_seqlens_q packs documents into one sequence: q must have batch size 1, got ",
                    q.sym_size(0));
}

// dim in [-ndim, ndim), returned as an index in [0, ndim).
inline int64_t dim_index(int64_t dim, int64_t ndim) {
  TORCH_CHECK_VALUE(-ndim <= dim && dim < ndim, "dim=", dim, " is out of range for x with ", ndim,
                    " dims");
  return dim < 0 ? dim + ndim : dim;
}

// An additive (x's dtype) or boolean (True = keep) mask broadcastable to `shape`, described
// in errors as `shape_name`.
inline void mask_for(const std::optional<Tensor>& mask, const Tensor& x, c10::SymIntArrayRef shape,
                     const char* name, const char* shape_name) {
  if (!mask.has_value()) return;
  TORCH_CHECK_VALUE(mask->device() == x.device(), name, " is on ", mask->device(), " but x is on ",
                    x.device());
  const auto t = mask->scalar_type();
  if (t != at::kBool) {
    TORCH_CHECK_TYPE(is_floating(t), name, " must be boolean (True = keep) or additive float, got ",
                     dtype_name(t));
    TORCH_CHECK_TYPE(t == x.scalar_type(), "additive ", name, " has dtype ", dtype_name(t),
                     " but x has ", dtype_name(x.scalar_type()), "; pass ", name,
                     ".to(x.dtype) or a boolean mask");
  }
  const auto m = mask->sym_sizes();
  bool broadcasts = m.size() <= shape.size();
  for (size_t i = 1; broadcasts && i <= m.size(); ++i) {
    const c10::SymInt &a = m[m.size() - i], &b = shape[shape.size() - i];
    broadcasts = a == 1 || a == b;
  }
  TORCH_CHECK_VALUE(broadcasts, name, " of shape ", shape_str(m), " does not broadcast to ",
                    shape_name, " ", shape_str(shape));
}

}  // namespace lmfast::checks
