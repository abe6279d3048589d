// A decode step's attention for every row of a batch, one call per layer: rotary on the new token's
// query and key, its key and value written into the row's cache slot, and each query head against
// its own row's keys, position 0 to the new token's and no further. Rows may also be a short
// prefill's tokens (`attend_at_slots`): several rows of one slot, each at its own position.
//
// In torch this is about twenty dispatched ops a layer (rotary's halves, muls and adds, two indexed
// writes, a mask, two batched products, softmax, views): at a decode step's size their overhead costs
// more than their arithmetic, thirty times a step. Reading only each row's own positions also means no
// mask and nothing read past a row's length.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <vector>

namespace {

// HF's rotate_half convention: out = x * cos + cat(-x[half:], x[:half]) * sin.
inline void rotate(const float* x, const float* cos, const float* sin, float* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] - x[i + half] * sin[i];
  for (int64_t i = half; i < D; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

inline float dot(const float* a, const float* b, int64_t D) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < D; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

// q [B, H, D], k and v [B, KV, D], cos and sin [B, D], all float32 contiguous; keys and values
// [S, KV, C, D]; slots [B] int64, each row's cache slot; positions [B] int64, each row's new
// position. Writes every row's rotated key and value at its position first, then attends each row
// to its slot's positions 0 to its own: rows may share a slot (a prefill's tokens, each at its own
// position, each seeing the ones before it). Returns the output [B, H, D].
torch::Tensor attend_at_slots(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& keys,
                              torch::Tensor& values, const torch::Tensor& slots, const torch::Tensor& positions,
                              double scale) {
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&q, &k, &v, &cos, &sin, &keys, &values})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous(),
                "decode_attention: q, k, v, cos, sin, keys and values must be contiguous float32");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && keys.dim() == 4, "decode_attention: q [B, H, D], k [B, KV, D], keys [S, KV, C, D]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KV = k.size(1);
  const int64_t S = keys.size(0), C = keys.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(2) == D && KV > 0 && H % KV == 0,
              "decode_attention: k and v must be [B, KV, D] with KV dividing H");
  TORCH_CHECK(keys.sizes() == values.sizes() && keys.size(1) == KV && keys.size(3) == D,
              "decode_attention: keys and values must be [S, KV, C, D]");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == B && cos.size(1) == D && D % 2 == 0,
              "decode_attention: cos and sin must be [B, D], D even");
  for (const torch::Tensor* t : {&slots, &positions})
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->dim() == 1 && t->size(0) == B,
                "decode_attention: slots and positions must be int64 [B]");
  const auto slot_tensor = slots.contiguous(), pos = positions.contiguous();
  const int64_t *slot = slot_tensor.data_ptr<int64_t>(), *at = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slot[b] >= 0 && slot[b] < S, "decode_attention: a row's slot is outside the cache");
    TORCH_CHECK(at[b] >= 0 && at[b] < C, "decode_attention: a position is outside the cache's capacity");
  }

  auto out = torch::empty_like(q);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *keys_p = keys.data_ptr<float>(), *values_p = values.data_ptr<float>(), *op = out.data_ptr<float>();
  const int64_t G = H / KV;  // query heads per key/value head
  const float s = static_cast<float>(scale);
  const auto cache_of = [&](float* cache, int64_t b, int64_t g) { return cache + (slot[b] * KV + g) * C * D; };

  // Every new key and value in place before any row reads: a few hundred floats, not worth threads.
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < KV; ++g) {
      rotate(kp + (b * KV + g) * D, cp + b * D, sp + b * D, cache_of(keys_p, b, g) + at[b] * D, D);
      std::copy_n(vp + (b * KV + g) * D, D, cache_of(values_p, b, g) + at[b] * D);
    }
  }
  // One work item per (row, kv head): its G query heads against its slot's keys 0..position.
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(D), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / KV, g = item % KV, L = at[b] + 1;
      const float *cos_b = cp + b * D, *sin_b = sp + b * D;
      const float *kc = cache_of(keys_p, b, g), *vc = cache_of(values_p, b, g);  // [C, D] of this slot and head
      scores.resize(L);
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        rotate(qp + (b * H + h) * D, cos_b, sin_b, query.data(), D);
        float top = -INFINITY;
        for (int64_t t = 0; t < L; ++t) {
          scores[t] = dot(query.data(), kc + t * D, D) * s;
          top = std::max(top, scores[t]);
        }
        float total = 0.f;
        for (int64_t t = 0; t < L; ++t) total += scores[t] = std::exp(scores[t] - top);
        float* o = op + (b * H + h) * D;
        std::fill_n(o, D, 0.f);
        for (int64_t t = 0; t < L; ++t) {
          const float w = scores[t] / total;
          const float* vt = vc + t * D;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) o[i] += w * vt[i];
        }
      }
    }
  });
  return out;
}

// A decode step's rows, one token each, row b in slot first + b.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& keys,
                               torch::Tensor& values, int64_t first, const torch::Tensor& positions, double scale) {
  TORCH_CHECK(q.dim() >= 1 && keys.dim() >= 1 && first >= 0 && first + q.size(0) <= keys.size(0),
              "decode_attention: slots [first, first + B) outside the cache");
  const auto slots = torch::arange(first, first + q.size(0), torch::kInt64);
  return attend_at_slots(q, k, v, cos, sin, keys, values, slots, positions, scale);
}
