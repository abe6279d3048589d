// A decode step's decoder layers, all of them in one call: for each layer, RMSNorm, the q/k/v product
// (one matrix: the layer's q, k and v weights back to back), attention (rotary, the cache write and each
// row against its own keys), the output projection and the residual, RMSNorm, the gated MLP and the
// residual, each on the kernel the Python loop would call for it (decode_linear.cpp, rms_norm.cpp,
// decode_attention.cpp), in the same order, so the result is the Python loop's to the bit.
//
// What it saves is the loop around them: a dozen Python calls and their argument checks per layer,
// about a sixth of a small batch's step on two cores. The GIL is released for the whole call.
#include <torch/extension.h>

#include <initializer_list>
#include <vector>

torch::Tensor decode_linear(const torch::Tensor& x, const torch::Tensor& weight,
                            const c10::optional<torch::Tensor>& bias);  // decode_linear.cpp
torch::Tensor decode_gated_silu(const torch::Tensor& x, const torch::Tensor& gate,
                                const torch::Tensor& up);  // decode_linear.cpp
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);  // rms_norm.cpp
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& keys,
                               torch::Tensor& values, int64_t first, const torch::Tensor& positions,
                               double scale);  // decode_attention.cpp

// x [B, hidden] float32 (the embedded tokens); per layer i: input_norms[i] [hidden], qkv[i]
// [(heads + 2 kv_heads) * head_dim, hidden], o[i] [hidden, heads * head_dim], post_norms[i] [hidden],
// gate[i] and up[i] [inter, hidden], down[i] [hidden, inter], keys[i] and values[i] [slots, kv_heads,
// capacity, head_dim]; cos and sin [B, head_dim]; positions [B] int64. Returns the hidden states
// [B, hidden] after the last layer; writes each row's new key and value into its cache slot.
torch::Tensor decode_layers(const torch::Tensor& x, const std::vector<torch::Tensor>& input_norms,
                            const std::vector<torch::Tensor>& qkv, const std::vector<torch::Tensor>& o,
                            const std::vector<torch::Tensor>& post_norms, const std::vector<torch::Tensor>& gate,
                            const std::vector<torch::Tensor>& up, const std::vector<torch::Tensor>& down,
                            std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                            const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& positions,
                            int64_t first, int64_t heads, int64_t kv_heads, double scale, double eps) {
  const size_t L = input_norms.size();
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
    const auto projected = decode_linear(rms_norm(h, input_norms[i], eps), qkv[i], c10::nullopt);  // [B, q + 2 kv]
    const auto q = projected.narrow(1, 0, q_width).reshape({B, heads, D}).contiguous();
    const auto k = projected.narrow(1, q_width, kv_width).reshape({B, kv_heads, D}).contiguous();
    const auto v = projected.narrow(1, q_width + kv_width, kv_width).reshape({B, kv_heads, D}).contiguous();
    const auto attended = decode_attention(q, k, v, cos, sin, keys[i], values[i], first, positions, scale);
    h.add_(decode_linear(attended.view({B, q_width}), o[i], c10::nullopt));
    const auto normed = rms_norm(h, post_norms[i], eps);
    h.add_(decode_linear(decode_gated_silu(normed, gate[i], up[i]), down[i], c10::nullopt));
  }
  return h;
}
