// A decode step's decoder layers, all of them in one call: for each layer, RMSNorm, the q/k/v product
// (one matrix: the layer's q, k and v weights back to back), attention (rotary, the cache write and each
// row against its own keys), the output projection and the residual, RMSNorm, the gated MLP and the
// residual, each on the kernel the Python loop would call for it (decode_linear.cpp, rms_norm.cpp,
// decode_attention.cpp), in the same order, so a decode step's result is the Python loop's to the bit.
// A short prefill may run here too, each of its tokens a row (`slots`, `positions`): there the
// attention is ours where the loop calls torch's, the same to rounding.
//
// With the mixed path's per-row deltas (`deltas`), a projection wrapped by it gets its deltas added
// into its output as its wrapped forward would (the same sums as mixed_delta_add_, sparse_cpu.cpp),
// each thread adding to the outputs it has just computed (decode_linear_adding); a layer whose gate
// or up is wrapped computes silu(gate) * up apart, as the model's own MLP then does.
//
// What it saves is the loop around them: a dozen Python calls and their argument checks per layer,
// a sizeable part of a small batch's step on a few cores (benchmarks/RESULTS.md). The GIL is
// released for the whole call.
#include <torch/extension.h>

#include "kernels.h"

#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

enum Projection { Q, K, V, O, GATE, UP, DOWN, PROJECTIONS };

namespace {

// x @ w.T, with the deltas of the projections the mixed path wraps added in the same parallel region.
torch::Tensor project(const torch::Tensor& x, const torch::Tensor& w,
                      const std::vector<ProjectionDeltas>& projections) {
  for (const auto& p : projections)
    if (*p.deltas) return decode_linear_adding(x, w, projections);
  return decode_linear(x, w, c10::nullopt);
}

}  // namespace

// x [B, hidden] float32 (the embedded tokens); per layer i: input_norms[i] [hidden], qkv[i]
// [(heads + 2 kv_heads) * head_dim, hidden], o[i] [hidden, heads * head_dim], post_norms[i] [hidden],
// gate[i] and up[i] [inter, hidden], down[i] [hidden, inter], keys[i] and values[i] [slots, kv_heads,
// capacity, head_dim]; cos and sin [B, head_dim]; slots and positions [B] int64, each row's cache
// slot and new position (a row is a decode step's token, or one of a short prefill's tokens: rows
// of one slot at consecutive positions, each attending to those before it); deltas: empty (no projection
// wrapped) or per layer a LayerDeltas. Returns the hidden states [B, hidden] after the last layer;
// writes each row's new key and value into its cache slot.
torch::Tensor decode_layers(const torch::Tensor& x, const std::vector<torch::Tensor>& input_norms,
                            const std::vector<torch::Tensor>& qkv, const std::vector<torch::Tensor>& o,
                            const std::vector<torch::Tensor>& post_norms, const std::vector<torch::Tensor>& gate,
                            const std::vector<torch::Tensor>& up, const std::vector<torch::Tensor>& down,
                            std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                            const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& slots,
                            const torch::Tensor& positions, int64_t heads, int64_t kv_heads, double scale, double eps,
                            const std::vector<LayerDeltas>& deltas) {
  const size_t L = input_norms.size();
  TORCH_CHECK(deltas.empty() || deltas.size() == L, "decode_layers: deltas for every layer, or none");
  for (const auto& layer : deltas)
    TORCH_CHECK(layer.size() == PROJECTIONS, "decode_layers: a layer's deltas name its seven projections");
  const LayerDeltas unwrapped(PROJECTIONS);
  for (const size_t n : {qkv.size(), o.size(), post_norms.size(), gate.size(), up.size(), down.size(), keys.size(),
                         values.size()})
    TORCH_CHECK(n == L, "decode_layers: one of each weight, and a cache, per layer");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "decode_layers: x must be float32 [B, hidden]");
  const int64_t B = x.size(0), D = cos.size(-1);
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "decode_layers: kv_heads must divide heads");
  const int64_t q_width = heads * D, kv_width = kv_heads * D;
  torch::Tensor h = x.contiguous().clone();  // the residual stream, added to in place
  for (size_t i = 0; i < L; ++i) {
    TORCH_CHECK(qkv[i].dim() == 2 && qkv[i].size(0) == q_width + 2 * kv_width,
                "decode_layers: qkv must be [(heads + 2 kv_heads) * head_dim, hidden]");
    const LayerDeltas& wrapped = deltas.empty() ? unwrapped : deltas[i];
    const auto normed = rms_norm(h, input_norms[i], eps);
    // One product for q, k and v: each output row's sum is the one its own product would give.
    const auto projected = project(normed, qkv[i],
                                  {{0, q_width, &wrapped[Q]},
                                   {q_width, kv_width, &wrapped[K]},
                                   {q_width + kv_width, kv_width, &wrapped[V]}});  // [B, q + 2 kv]
    const auto q = projected.narrow(1, 0, q_width).contiguous();
    const auto k = projected.narrow(1, q_width, kv_width).contiguous();
    const auto v = projected.narrow(1, q_width + kv_width, kv_width).contiguous();
    const auto attended = attend_at_slots(q.view({B, heads, D}), k.view({B, kv_heads, D}), v.view({B, kv_heads, D}),
                                          cos, sin, keys[i], values[i], slots, positions, scale)
                              .view({B, q_width});
    h.add_(project(attended, o[i], {{0, o[i].size(0), &wrapped[O]}}));
    const auto post = rms_norm(h, post_norms[i], eps);
    torch::Tensor gated;
    if (wrapped[GATE] || wrapped[UP]) {  // the model's MLP, as it runs with a wrapped gate or up
      const auto g = project(post, gate[i], {{0, gate[i].size(0), &wrapped[GATE]}});
      gated = at::silu(g).mul(project(post, up[i], {{0, up[i].size(0), &wrapped[UP]}}));
    } else {
      gated = decode_gated_silu(post, gate[i], up[i]);
    }
    h.add_(project(gated, down[i], {{0, down[i].size(0), &wrapped[DOWN]}}));
  }
  return h;
}
