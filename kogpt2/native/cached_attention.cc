// KogptCachedAttention: the cached attention of one GPT-2 layer for one new token per row, on the CPU.
//
// Built on first use by kogpt2/native_ops.py (g++, TensorFlow's headers, -march=native) and used by
// kogpt2/decoder.py in place of its XLA attention. One call per layer:
//
//   - writes each row's new key and value (from qkv) into cache slot `slot`, in place;
//   - attends over the slots starts[b] .. slot of row b only (the filled ones), where the XLA
//     attention reads every slot of the cache's capacity and masks;
//   - splits the (row, head) pairs over TensorFlow's intra-op threads.
//
// Measured on a 2-core AVX-512 VM (KoGPT2 shape, 64 rows, slot 54 of 64): 12 layers in 15-18 ms
// against 24-29 ms for the XLA attention in two head groups; streaming the same keys and values
// and nothing else took 12 ms (docs/BENCHMARKS.md).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace kogpt2 {
namespace {

using ::tensorflow::DT_FLOAT;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::Var;

REGISTER_OP("KogptCachedAttention")
    .Input("keys: resource")    // (B, H, S, D) float32 variable, updated in place
    .Input("values: resource")  // (B, H, S, D) float32 variable, updated in place
    .Input("qkv: float")        // (B, 3 * H * D): queries, keys, values of the new token, heads in order
    .Input("starts: int32")     // (B,): each row's first slot
    .Input("slot: int32")       // (): where the new key and value go; the last slot attended
    .Output("out: float")       // (B, H * D)
    .SetIsStateful()
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      ::tensorflow::shape_inference::ShapeHandle qkv;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &qkv));
      ::tensorflow::shape_inference::DimensionHandle width;
      TF_RETURN_IF_ERROR(c->Divide(c->Dim(qkv, 1), 3, /*evenly_divisible=*/true, &width));
      c->set_output(0, c->Matrix(c->Dim(qkv, 0), width));
      return absl::OkStatus();
    });

typedef float v16 __attribute__((vector_size(64), aligned(4)));  // 16 floats; unaligned loads allowed
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));

inline v16 Load(const float* p) { return *reinterpret_cast<const v16*>(p); }

inline float HSum(v16 x) {
  const v8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// exp(x) for x <= 0: Cephes' expf (range reduction by ln 2, a degree-6 polynomial; about 1 ulp),
// written so that the compiler vectorizes the loop calling it. Below -87 it returns exp(-87).
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// p[0 .. n-1] <- softmax(p[0 .. n-1]); returns nothing, p holds the unnormalized weights and *sum their sum.
inline void Softmax(float* __restrict p, int n, float* sum) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < n; ++i) mx = std::max(mx, p[i]);
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) {
    p[i] = ExpNonPositive(p[i] - mx);
    s += p[i];
  }
  *sum = s;
}

// One (row, head) of head_dim 16 * NV: k and v point at its slots 0 .. (D floats each); attends
// over slots first .. last. p: scratch of at least last - first + 1 floats.
template <int NV>
void AttendVectors(const float* q, const float* k, const float* v, int first, int last, float scale, float* p,
                   float* out) {
  constexpr int D = 16 * NV;
  v16 qv[NV];
  for (int j = 0; j < NV; ++j) qv[j] = Load(q + 16 * j);
  const int n = last + 1 - first;
  const float* kf = k + static_cast<int64_t>(first) * D;
  int s = 0;
  for (; s + 4 <= n; s += 4) {  // four slots at a time: four independent sums
    v16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const float* k0 = kf + s * D;
    for (int j = 0; j < NV; ++j) {
      a0 += qv[j] * Load(k0 + 16 * j);
      a1 += qv[j] * Load(k0 + D + 16 * j);
      a2 += qv[j] * Load(k0 + 2 * D + 16 * j);
      a3 += qv[j] * Load(k0 + 3 * D + 16 * j);
    }
    p[s] = HSum(a0) * scale;
    p[s + 1] = HSum(a1) * scale;
    p[s + 2] = HSum(a2) * scale;
    p[s + 3] = HSum(a3) * scale;
  }
  for (; s < n; ++s) {
    v16 a = {};
    for (int j = 0; j < NV; ++j) a += qv[j] * Load(kf + s * D + 16 * j);
    p[s] = HSum(a) * scale;
  }
  float sum;
  Softmax(p, n, &sum);
  v16 acc[NV] = {};
  const float* vf = v + static_cast<int64_t>(first) * D;
  for (int i = 0; i < n; ++i) {
    const float w = p[i];
    for (int j = 0; j < NV; ++j) acc[j] += w * Load(vf + i * D + 16 * j);
  }
  const float inv = 1.f / sum;
  for (int j = 0; j < NV; ++j) {
    const v16 o = acc[j] * inv;
    std::memcpy(out + 16 * j, &o, sizeof o);
  }
}

// The same for any head_dim.
void AttendScalar(const float* q, const float* k, const float* v, int64_t D, int first, int last, float scale,
                  float* p, float* out) {
  const int n = last + 1 - first;
  for (int s = 0; s < n; ++s) {
    const float* ks = k + (first + s) * D;
    float a = 0.f;
    for (int64_t d = 0; d < D; ++d) a += q[d] * ks[d];
    p[s] = a * scale;
  }
  float sum;
  Softmax(p, n, &sum);
  std::fill_n(out, D, 0.f);
  for (int s = 0; s < n; ++s) {
    const float* vs = v + (first + s) * D;
    for (int64_t d = 0; d < D; ++d) out[d] += p[s] * vs[d];
  }
  const float inv = 1.f / sum;
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}

// Make the variable's tensor the only owner of its buffer, so that writing it in place changes no
// other tensor (a copy when a read of it is still alive).
absl::Status MakeExclusive(OpKernelContext* ctx, Var* var) {
  Tensor* t = var->tensor();
  if (!t->IsInitialized() || t->dtype() != DT_FLOAT) {
    return absl::InvalidArgumentError("the key/value cache must be an initialized float32 variable");
  }
  if (!t->RefCountIsOne()) {
    Tensor copy;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(DT_FLOAT, t->shape(), &copy));
    std::copy_n(t->flat<float>().data(), t->NumElements(), copy.flat<float>().data());
    *t = copy;
  }
  return absl::OkStatus();
}

class CachedAttentionOp : public OpKernel {
 public:
  explicit CachedAttentionOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    ::tensorflow::core::RefCountPtr<Var> keys, values;
    OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, 0), &keys));
    OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, 1), &values));
    OP_REQUIRES(ctx, keys.get() != values.get(), absl::InvalidArgumentError("keys and values must be two variables"));
    const Tensor& qkv = ctx->input(2);
    const Tensor& starts = ctx->input(3);
    OP_REQUIRES(ctx, ::tensorflow::TensorShapeUtils::IsScalar(ctx->input(4).shape()),
                absl::InvalidArgumentError("slot must be a scalar"));
    const int slot = ctx->input(4).scalar<int32_t>()();
    // Always lock in one order (by address), as TensorFlow's own kernels do.
    Var* first_var = std::min(keys.get(), values.get());
    Var* second_var = std::max(keys.get(), values.get());
    ::tensorflow::mutex_lock lock1(*first_var->mu());
    ::tensorflow::mutex_lock lock2(*second_var->mu());
    OP_REQUIRES_OK(ctx, MakeExclusive(ctx, keys.get()));
    OP_REQUIRES_OK(ctx, MakeExclusive(ctx, values.get()));
    Tensor* K = keys->tensor();
    Tensor* V = values->tensor();
    OP_REQUIRES(ctx, K->dims() == 4 && K->shape() == V->shape(),
                absl::InvalidArgumentError(absl::StrCat("keys and values must be (B, H, S, D) of one shape, got ",
                                                        K->shape().DebugString(), " and ", V->shape().DebugString())));
    const int64_t B = K->dim_size(0), H = K->dim_size(1), S = K->dim_size(2), D = K->dim_size(3);
    const int64_t E = H * D;
    OP_REQUIRES(ctx, qkv.dims() == 2 && qkv.dim_size(0) == B && qkv.dim_size(1) == 3 * E,
                absl::InvalidArgumentError(absl::StrCat("qkv must be (", B, ", ", 3 * E, "), got ",
                                                        qkv.shape().DebugString())));
    OP_REQUIRES(ctx, starts.dims() == 1 && starts.dim_size(0) == B,
                absl::InvalidArgumentError(absl::StrCat("starts must be (", B, ",), got ", starts.shape().DebugString())));
    OP_REQUIRES(ctx, 0 <= slot && slot < S,
                absl::InvalidArgumentError(absl::StrCat("slot ", slot, " outside the cache's ", S, " slots")));
    const int32_t* st = starts.flat<int32_t>().data();
    for (int64_t b = 0; b < B; ++b) {
      OP_REQUIRES(ctx, 0 <= st[b] && st[b] <= slot,
                  absl::InvalidArgumentError(absl::StrCat("starts[", b, "] = ", st[b], " outside [0, slot ", slot, "]")));
    }
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({B, E}), &out));
    const float* q_all = qkv.flat<float>().data();
    float* kd = K->flat<float>().data();
    float* vd = V->flat<float>().data();
    float* od = out->flat<float>().data();
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    auto work = [&](int64_t lo, int64_t hi) {
      std::vector<float> p(slot + 1);
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t b = i / H, h = i % H;
        const float* q = q_all + b * 3 * E + h * D;
        float* k = kd + (b * H + h) * S * D;
        float* v = vd + (b * H + h) * S * D;
        std::memcpy(k + slot * D, q + E, D * sizeof(float));
        std::memcpy(v + slot * D, q + 2 * E, D * sizeof(float));
        if (i + 1 < hi) {  // the next pair's first filled slots
          const int64_t nb = (i + 1) / H;
          __builtin_prefetch(k + S * D + st[nb] * D);
          __builtin_prefetch(v + S * D + st[nb] * D);
        }
        float* o = od + b * E + h * D;
        switch (D) {
          case 16: AttendVectors<1>(q, k, v, st[b], slot, scale, p.data(), o); break;
          case 32: AttendVectors<2>(q, k, v, st[b], slot, scale, p.data(), o); break;
          case 64: AttendVectors<4>(q, k, v, st[b], slot, scale, p.data(), o); break;
          case 128: AttendVectors<8>(q, k, v, st[b], slot, scale, p.data(), o); break;
          default: AttendScalar(q, k, v, D, st[b], slot, scale, p.data(), o);
        }
      }
    };
    const int64_t cost = 8 * (slot + 1) * D;  // about the cycles of one (row, head): two passes over its slots
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(B * H, cost, work);
  }
};

REGISTER_KERNEL_BUILDER(Name("KogptCachedAttention").Device(::tensorflow::DEVICE_CPU), CachedAttentionOp);

}  // namespace
}  // namespace kogpt2
