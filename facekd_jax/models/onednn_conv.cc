// 2-D convolutions for XLA:CPU through oneDNN, as three XLA FFI handlers: forward, input gradient and weight
// gradient of an NHWC x HWIO -> NHWC convolution (any kernel size, stride and explicit padding, no dilation, one
// group), float32 or bfloat16. Built and registered by facekd_jax/models/onednn_conv.py, which documents why.
#include <cstdint>
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
  int64_t n, h, w, ci, kh, kw, co, oh, ow, sh, sw, pt, pb, pl, pr;
  memory::data_type dt;
  std::string Key(char kind) const {
    std::string k(1, kind);
    for (int64_t v : {n, h, w, ci, kh, kw, co, oh, ow, sh, sw, pt, pb, pl, pr, int64_t(dt)})
      k += "," + std::to_string(v);
    return k;
  }
  memory::desc Src(tag t = tag::nhwc) const { return {{n, ci, h, w}, dt, t}; }
  memory::desc Weights(tag t = tag::hwio) const { return {{co, ci, kh, kw}, dt, t}; }
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
  if (x[3] != w[2] || y[3] != w[3] || x[0] != y[0])
    return ffi::Error::InvalidArgument("onednn_conv: operand shapes do not form an NHWC x HWIO convolution");
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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FacekdOnednnConvFwd, Fwd, BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FacekdOnednnConvBwdData, BwdData, BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(FacekdOnednnConvBwdWeights, BwdWeights, BIND);
