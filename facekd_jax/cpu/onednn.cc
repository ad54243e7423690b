// 2-D convolutions for XLA:CPU through oneDNN, as three XLA FFI handlers: forward, input gradient and weight
// gradient of an NHWC x HWIO -> NHWC convolution (any kernel size, stride and explicit padding, no dilation, any
// feature group count: depthwise too), float32 or bfloat16. Then the training-mode batch norm that sits between them, fused with its ReLU or
// residual add and ReLU (plain C++/OpenMP loops, forward and backward). Built and registered by
// facekd_jax/cpu/onednn.py, which documents why.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Geometry {
  int64_t n, h, w, ci, kh, kw, co, oh, ow, sh, sw, pt, pb, pl, pr, groups;
  memory::data_type dt;
  std::string Key(char kind) const {
    std::string k(1, kind);
    for (int64_t v : {n, h, w, ci, kh, kw, co, oh, ow, sh, sw, pt, pb, pl, pr, groups, int64_t(dt)})
      k += "," + std::to_string(v);
    return k;
  }
  memory::desc Src(tag t = tag::nhwc) const { return {{n, ci, h, w}, dt, t}; }
  // XLA's grouped HWIO [KH, KW, Ci/G, Co] (output channels in G contiguous blocks) is oneDNN's hwigo layout of
  // (G, Co/G, Ci/G, KH, KW) weights: the same bytes.
  memory::desc Weights(tag t = tag::hwio) const {
    if (groups == 1) return {{co, ci, kh, kw}, dt, t};
    return {{groups, co / groups, ci / groups, kh, kw}, dt, t == tag::hwio ? tag::hwigo : t};
  }
  memory::desc Dst(tag t = tag::nhwc) const { return {{n, co, oh, ow}, dt, t}; }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PadL() const { return {pt, pl}; }
  memory::dims PadR() const { return {pb, pr}; }
  dnnl::convolution_forward::primitive_desc Forward(memory::desc weights) const {
    return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
            Src(), weights, Dst(), Strides(), PadL(), PadR(), UserScratchpad()};
  }
  // Scratch memory comes from the caller (Scratch below), so one primitive can run on two threads at once.
  static dnnl::primitive_attr UserScratchpad() {
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    return attr;
  }
};

// One cached plan per (pass, shapes, dtype): the primitive, and reorders between the caller's HWIO weights
// and the layout the primitive picked (oneDNN's blocked formats are faster for small channel counts).
struct Plan {
  dnnl::primitive prim;
  memory::desc weights;        // the primitive's weights (or diff weights) layout
  memory::desc scratchpad;
  bool reorder = false;
  dnnl::reorder weights_reorder;  // HWIO -> primitive layout (fwd, bwd data) or back (bwd weights)
};

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<Plan>>& Cache() {
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<Plan>>();
  return *cache;
}

std::shared_ptr<Plan> MakePlan(char kind, const Geometry& g) {
  auto plan = std::make_shared<Plan>();
  auto any = g.Weights(tag::any);
  auto fwd = g.Forward(any);
  auto attr = Geometry::UserScratchpad();
  if (kind == 'f') {
    plan->prim = dnnl::convolution_forward(fwd);
    plan->weights = fwd.weights_desc();
    plan->scratchpad = fwd.scratchpad_desc();
  } else if (kind == 'd') {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), any, g.Dst(), g.Strides(), g.PadL(), g.PadR(),
        fwd, attr);
    plan->prim = dnnl::convolution_backward_data(pd);
    plan->weights = pd.weights_desc();
    plan->scratchpad = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), any, g.Dst(), g.Strides(), g.PadL(), g.PadR(),
        fwd, attr);
    plan->prim = dnnl::convolution_backward_weights(pd);
    plan->weights = pd.diff_weights_desc();
    plan->scratchpad = pd.scratchpad_desc();
  }
  plan->reorder = plan->weights != g.Weights();
  if (plan->reorder) {
    plan->weights_reorder = kind == 'w' ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), plan->weights, Engine(), g.Weights()))
                                        : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), g.Weights(), Engine(), plan->weights));
  }
  return plan;
}

std::shared_ptr<Plan> GetPlan(char kind, const Geometry& g) {
  std::string key = g.Key(kind);
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = Cache().find(key);
    if (it != Cache().end()) return it->second;
  }
  auto plan = MakePlan(kind, g);
  std::lock_guard<std::mutex> lock(cache_mutex);
  Cache().emplace(key, plan);
  return plan;
}

// Per-thread scratch memory that grows as needed (XLA may run two convolutions at once on different threads).
void* Scratch(int slot, size_t bytes) {
  thread_local std::vector<char> buffers[2];
  auto& b = buffers[slot];
  if (b.size() < bytes + 64) b.resize(bytes + 64);
  auto p = reinterpret_cast<uintptr_t>(b.data());
  return reinterpret_cast<void*>((p + 63) & ~uintptr_t(63));
}

ffi::Error DataType(ffi::DataType t, memory::data_type* out) {
  if (t == ffi::DataType::F32) { *out = memory::data_type::f32; return ffi::Error::Success(); }
  if (t == ffi::DataType::BF16) { *out = memory::data_type::bf16; return ffi::Error::Success(); }
  return ffi::Error::InvalidArgument("onednn_conv: only float32 and bfloat16 are supported");
}

// kind 'f': a=x [N,H,W,Ci], b=w [KH,KW,Ci,Co], out=y [N,OH,OW,Co]
// kind 'd': a=dy [N,OH,OW,Co], b=w, out=dx [N,H,W,Ci]
// kind 'w': a=x, b=dy, out=dw [KH,KW,Ci,Co]
ffi::Error Run(char kind, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out, int64_t sh,
               int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Geometry g{};
  if (auto e = DataType(a.element_type(), &g.dt); e.failure()) return e;
  if (a.dimensions().size() != 4 || b.dimensions().size() != 4 || out->dimensions().size() != 4)
    return ffi::Error::InvalidArgument("onednn_conv: operands must be 4-D (NHWC, HWIO)");
  auto x = kind == 'd' ? out->dimensions() : a.dimensions();
  auto w = kind == 'w' ? out->dimensions() : b.dimensions();
  auto y = kind == 'f' ? out->dimensions() : (kind == 'd' ? a.dimensions() : b.dimensions());
  if (w[2] < 1 || x[3] % w[2] != 0 || y[3] != w[3] || x[0] != y[0] || w[3] % (x[3] / w[2]) != 0)
    return ffi::Error::InvalidArgument("onednn_conv: operand shapes do not form an NHWC x HWIO convolution");
  g.groups = x[3] / w[2];
  g.n = x[0]; g.h = x[1]; g.w = x[2]; g.ci = x[3];
  g.kh = w[0]; g.kw = w[1]; g.co = w[3]; g.oh = y[1]; g.ow = y[2];
  g.sh = sh; g.sw = sw; g.pt = pt; g.pb = pb; g.pl = pl; g.pr = pr;
  try {
    auto plan = GetPlan(kind, g);
    dnnl::stream stream(Engine());
    memory scratch(plan->scratchpad, Engine(), Scratch(0, plan->scratchpad.get_size()));
    memory user_w(g.Weights(), Engine(), kind == 'f' || kind == 'd' ? b.untyped_data() : out->untyped_data());
    memory prim_w = plan->reorder ? memory(plan->weights, Engine(), Scratch(1, plan->weights.get_size())) : user_w;
    if (plan->reorder && kind != 'w') plan->weights_reorder.execute(stream, user_w, prim_w);
    if (kind == 'f') {
      plan->prim.execute(stream, {{DNNL_ARG_SRC, memory(g.Src(), Engine(), a.untyped_data())},
                                  {DNNL_ARG_WEIGHTS, prim_w},
                                  {DNNL_ARG_DST, memory(g.Dst(), Engine(), out->untyped_data())},
                                  {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (kind == 'd') {
      plan->prim.execute(stream, {{DNNL_ARG_DIFF_DST, memory(g.Dst(), Engine(), a.untyped_data())},
                                  {DNNL_ARG_WEIGHTS, prim_w},
                                  {DNNL_ARG_DIFF_SRC, memory(g.Src(), Engine(), out->untyped_data())},
                                  {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      plan->prim.execute(stream, {{DNNL_ARG_SRC, memory(g.Src(), Engine(), a.untyped_data())},
                                  {DNNL_ARG_DIFF_DST, memory(g.Dst(), Engine(), b.untyped_data())},
                                  {DNNL_ARG_DIFF_WEIGHTS, prim_w},
                                  {DNNL_ARG_SCRATCHPAD, scratch}});
      if (plan->reorder) plan->weights_reorder.execute(stream, prim_w, user_w);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_conv: oneDNN failed: ") + e.what() + " (status " +
                                std::to_string(int(e.status)) + ")");
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("onednn_conv: ") + e.what());
  }
  return ffi::Error::Success();
}

#define BIND                                                                                         \
  ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()                 \
      .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pb")              \
      .Attr<int64_t>("pl").Attr<int64_t>("pr")

ffi::Error Fwd(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> o, int64_t sh, int64_t sw,
               int64_t pt, int64_t pb, int64_t pl, int64_t pr) { return Run('f', a, b, o, sh, sw, pt, pb, pl, pr); }
ffi::Error BwdData(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> o, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pb, int64_t pl, int64_t pr) { return Run('d', a, b, o, sh, sw, pt, pb, pl, pr); }
ffi::Error BwdWeights(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> o, int64_t sh, int64_t sw,
                      int64_t pt, int64_t pb, int64_t pl, int64_t pr) { return Run('w', a, b, o, sh, sw, pt, pb, pl, pr); }

// ---- Batch normalisation in training mode (batch statistics) fused with what follows it in a ResNet: nothing
// (mode 0), ReLU (mode 1) or a residual add and ReLU (mode 2): y = relu(BN(x) + r). NHWC viewed as
// [rows = N*H*W, C], float32 or bfloat16 (statistics and arithmetic in float32). Memory-bound loops, two
// passes each way (oneDNN's batch norm cannot fuse the residual add on a CPU; with a separate add-ReLU pass it
// was slower than these loops). The ReLU mask of the backward pass is read from the forward's output y
// (y > 0 exactly where the pre-activation is).
// float32 or bfloat16 storage, float32 arithmetic (bfloat16 rounded to nearest even on store).
struct Bf16 {
  uint16_t bits;
};
inline float Load(float v) { return v; }
inline float Load(Bf16 v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T>
T Store(float f);
template <>
inline float Store<float>(float f) { return f; }
template <>
inline Bf16 Store<Bf16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return Bf16{uint16_t((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded)};  // NaN stays NaN
}

struct Rows {
  int64_t begin, end;
};

Rows ThreadRows(int64_t rows) {
  int t = omp_get_thread_num(), nt = omp_get_num_threads();
  int64_t per = (rows + nt - 1) / nt;
  return {std::min<int64_t>(rows, t * per), std::min<int64_t>(rows, (t + 1) * per)};
}

// Two per-channel sums over rows: term(r, f1, f2) adds row r's two terms into f1[C], f2[C]; float blocks of 64
// rows are added into doubles. The forward's terms are x and x^2 (variance E[x^2] - E[x]^2, as flax's
// use_fast_variance, but accumulated in double), the backward's g and g * (x - mean).
template <typename F>
void ChannelSums(int64_t rows, int64_t c, F term, std::vector<double>& s1, std::vector<double>& s2) {
  int nt = omp_get_max_threads();
  std::vector<double> part(2 * c * nt, 0.0);
#pragma omp parallel num_threads(nt)
  {
    Rows rr = ThreadRows(rows);
    double* p1 = part.data() + 2 * c * omp_get_thread_num();
    double* p2 = p1 + c;
    std::vector<float> f1(c), f2(c);
    for (int64_t r0 = rr.begin; r0 < rr.end; r0 += 64) {
      std::fill(f1.begin(), f1.end(), 0.f);
      std::fill(f2.begin(), f2.end(), 0.f);
      for (int64_t r = r0; r < std::min(rr.end, r0 + 64); ++r) term(r, f1.data(), f2.data());
      for (int64_t k = 0; k < c; ++k) { p1[k] += f1[k]; p2[k] += f2[k]; }
    }
  }
  s1.assign(c, 0.0);
  s2.assign(c, 0.0);
  for (int t = 0; t < nt; ++t)
    for (int64_t k = 0; k < c; ++k) { s1[k] += part[2 * c * t + k]; s2[k] += part[2 * c * t + c + k]; }
}

ffi::Error BnShape(ffi::AnyBuffer x, int64_t* rows, int64_t* c) {
  auto d = x.dimensions();
  if (d.size() != 4 || (x.element_type() != ffi::DataType::F32 && x.element_type() != ffi::DataType::BF16))
    return ffi::Error::InvalidArgument("facekd batch norm: x must be 4-D NHWC float32 or bfloat16");
  *rows = d[0] * d[1] * d[2];
  *c = d[3];
  return ffi::Error::Success();
}

// x [N,H,W,C], scale [C], shift [C], r (residual, read in mode 2) -> y, mean [C], var [C] (biased).
template <typename T>
ffi::Error BnFwdT(int64_t rows, int64_t c, ffi::AnyBuffer xb, ffi::AnyBuffer scaleb, ffi::AnyBuffer shiftb,
                  ffi::AnyBuffer rb, ffi::Result<ffi::AnyBuffer> yb, ffi::Result<ffi::AnyBuffer> meanb,
                  ffi::Result<ffi::AnyBuffer> varb, float eps, int64_t mode) {
  const T* x = static_cast<const T*>(xb.untyped_data());
  const T* res = static_cast<const T*>(rb.untyped_data());
  const float* scale = static_cast<const float*>(scaleb.untyped_data());
  const float* shift = static_cast<const float*>(shiftb.untyped_data());
  T* y = static_cast<T*>(yb->untyped_data());
  float* mean = static_cast<float*>(meanb->untyped_data());
  float* var = static_cast<float*>(varb->untyped_data());
  std::vector<double> s1, s2;
  ChannelSums(rows, c, [&](int64_t r, float* f1, float* f2) {
    const T* xr = x + r * c;
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      float v = Load(xr[k]);
      f1[k] += v;
      f2[k] += v * v;
    }
  }, s1, s2);
  std::vector<float> a(c), b(c);
  for (int64_t k = 0; k < c; ++k) {
    double m = s1[k] / rows, v = std::max(0.0, s2[k] / rows - m * m);
    mean[k] = float(m);
    var[k] = float(v);
    a[k] = float(scale[k] / std::sqrt(v + double(eps)));
    b[k] = float(shift[k] - m * a[k]);
  }
  const float* pa = a.data();
  const float* pb = b.data();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * c;
    T* yr = y + r * c;
    if (mode == 2) {
      const T* rr = res + r * c;
#pragma omp simd
      for (int64_t k = 0; k < c; ++k) yr[k] = Store<T>(std::max(Load(xr[k]) * pa[k] + pb[k] + Load(rr[k]), 0.f));
    } else if (mode == 1) {
#pragma omp simd
      for (int64_t k = 0; k < c; ++k) yr[k] = Store<T>(std::max(Load(xr[k]) * pa[k] + pb[k], 0.f));
    } else {
#pragma omp simd
      for (int64_t k = 0; k < c; ++k) yr[k] = Store<T>(Load(xr[k]) * pa[k] + pb[k]);
    }
  }
  return ffi::Error::Success();
}

// x, y (the forward's output), dy [N,H,W,C], scale, mean, var [C]
// -> dx, dscale [C], dshift [C], dr (mode 2: the gradient of r, i.e. dy where y > 0).
template <typename T>
ffi::Error BnBwdT(int64_t rows, int64_t c, ffi::AnyBuffer xb, ffi::AnyBuffer yb, ffi::AnyBuffer dyb,
                  ffi::AnyBuffer scaleb, ffi::AnyBuffer meanb, ffi::AnyBuffer varb, ffi::Result<ffi::AnyBuffer> dxb,
                  ffi::Result<ffi::AnyBuffer> dscaleb, ffi::Result<ffi::AnyBuffer> dshiftb,
                  ffi::Result<ffi::AnyBuffer> drb, float eps, int64_t mode) {
  const T* x = static_cast<const T*>(xb.untyped_data());
  const T* y = static_cast<const T*>(yb.untyped_data());
  const T* dy = static_cast<const T*>(dyb.untyped_data());
  const float* scale = static_cast<const float*>(scaleb.untyped_data());
  const float* mean = static_cast<const float*>(meanb.untyped_data());
  const float* var = static_cast<const float*>(varb.untyped_data());
  T* dx = static_cast<T*>(dxb->untyped_data());
  T* dr = static_cast<T*>(drb->untyped_data());
  // Pass 1: g = dy * (y > 0) (written to dr in mode 2), sums of g and g * (x - mean) per channel.
  std::vector<double> sg, sgx;
  ChannelSums(rows, c, [&](int64_t r, float* f1, float* f2) {
    const T* xr = x + r * c;
    const T* yr = y + r * c;
    const T* dyr = dy + r * c;
    if (mode == 0) {
#pragma omp simd
      for (int64_t k = 0; k < c; ++k) {
        float g = Load(dyr[k]);
        f1[k] += g;
        f2[k] += g * (Load(xr[k]) - mean[k]);
      }
    } else if (mode == 1) {
#pragma omp simd
      for (int64_t k = 0; k < c; ++k) {
        float g = Load(dyr[k]) * float(Load(yr[k]) > 0.f);  // branch-free: the signs are random
        f1[k] += g;
        f2[k] += g * (Load(xr[k]) - mean[k]);
      }
    } else {
      T* drr = dr + r * c;
#pragma omp simd
      for (int64_t k = 0; k < c; ++k) {
        float g = Load(dyr[k]) * float(Load(yr[k]) > 0.f);
        drr[k] = Store<T>(g);
        f1[k] += g;
        f2[k] += g * (Load(xr[k]) - mean[k]);
      }
    }
  }, sg, sgx);
  std::vector<float> a(c), b(c), m(c);
  float* dscale = static_cast<float*>(dscaleb->untyped_data());
  float* dshift = static_cast<float*>(dshiftb->untyped_data());
  for (int64_t k = 0; k < c; ++k) {
    double inv = 1.0 / std::sqrt(double(var[k]) + double(eps));
    double dsh = sg[k], dsc = sgx[k] * inv;  // sum g, sum g * xhat
    dshift[k] = float(dsh);
    dscale[k] = float(dsc);
    // dx = scale * inv * (g - dshift / rows - xhat * dscale / rows) = a * g + m * x + b
    a[k] = float(scale[k] * inv);
    m[k] = float(-scale[k] * inv * inv * dsc / rows);
    b[k] = float(-scale[k] * inv * dsh / rows - m[k] * mean[k]);
  }
  const float* pa = a.data();
  const float* pb = b.data();
  const float* pm = m.data();
  // Pass 2: dx.
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * c;
    const T* yr = y + r * c;
    const T* dyr = dy + r * c;
    T* dxr = dx + r * c;
    if (mode == 0) {
#pragma omp simd
      for (int64_t k = 0; k < c; ++k) dxr[k] = Store<T>(pa[k] * Load(dyr[k]) + pm[k] * Load(xr[k]) + pb[k]);
    } else {
#pragma omp simd
      for (int64_t k = 0; k < c; ++k)
        dxr[k] = Store<T>(pa[k] * Load(dyr[k]) * float(Load(yr[k]) > 0.f) + pm[k] * Load(xr[k]) + pb[k]);
    }
  }
  return ffi::Error::Success();
}

// The handlers: x's element type (float32 or bfloat16) picks the storage type of every N,H,W,C operand.
ffi::Error BnFwd(ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer shift, ffi::AnyBuffer r,
                 ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::AnyBuffer> var,
                 float eps, int64_t mode) {
  int64_t rows, c;
  if (auto e = BnShape(x, &rows, &c); e.failure()) return e;
  if (x.element_type() == ffi::DataType::BF16)
    return BnFwdT<Bf16>(rows, c, x, scale, shift, r, y, mean, var, eps, mode);
  return BnFwdT<float>(rows, c, x, scale, shift, r, y, mean, var, eps, mode);
}

ffi::Error BnBwd(ffi::AnyBuffer x, ffi::AnyBuffer y, ffi::AnyBuffer dy, ffi::AnyBuffer scale, ffi::AnyBuffer mean,
                 ffi::AnyBuffer var, ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dscale,
                 ffi::Result<ffi::AnyBuffer> dshift, ffi::Result<ffi::AnyBuffer> dr, float eps, int64_t mode) {
  int64_t rows, c;
  if (auto e = BnShape(x, &rows, &c); e.failure()) return e;
  if (x.element_type() == ffi::DataType::BF16)
    return BnBwdT<Bf16>(rows, c, x, y, dy, scale, mean, var, dx, dscale, dshift, dr, eps, mode);
  return BnBwdT<float>(rows, c, x, y, dy, scale, mean, var, dx, dscale, dshift, dr, eps, mode);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FacekdOnednnConvFwd, Fwd, BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FacekdOnednnConvBwdData, BwdData, BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FacekdOnednnConvBwdWeights, BwdWeights, BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FacekdBatchNormFwd, BnFwd,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>().Attr<float>("eps").Attr<int64_t>("mode"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FacekdBatchNormBwd, BnBwd,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>().Attr<float>("eps").Attr<int64_t>("mode"));
