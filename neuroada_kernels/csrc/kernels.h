// The kernels one C++ file calls from another: the decode step's (decode_linear.cpp, rms_norm.cpp,
// decode_attention.cpp, decode_layers.cpp) and the mixed path's delta (sparse_cpu.cpp), declared once.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

torch::Tensor decode_linear(const torch::Tensor& x, const torch::Tensor& weight,
                            const c10::optional<torch::Tensor>& bias);
torch::Tensor decode_gated_silu(const torch::Tensor& x, const torch::Tensor& gate, const torch::Tensor& up);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& keys,
                               torch::Tensor& values, int64_t first, const torch::Tensor& positions, double scale);
torch::Tensor attend_at_slots(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& keys,
                              torch::Tensor& values, const torch::Tensor& slots, const torch::Tensor& positions,
                              double scale);
void mixed_delta_add_(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& indices,
                      const torch::Tensor& values, const torch::Tensor& slots, bool check_ranges);

// One bound index set's delta on one projection: indices [k, d_out], values [slots, k, d_out], and
// each row's slot [B] (0: none).
using Delta = std::tuple<torch::Tensor, torch::Tensor, torch::Tensor>;
// Per projection (q, k, v, o, gate, up, down): nullopt where it is not wrapped, else its deltas.
using LayerDeltas = std::vector<std::optional<std::vector<Delta>>>;

// A delta's tensors as add_delta_rows reads them, for `rows` token rows and d_out outputs (their
// indices' range was checked when the adapter was loaded).
void check_delta(const Delta& delta, int64_t rows, int64_t d_out);
// out[m, lo:hi] += token row m's delta (m < rows; x rows ldx apart, out rows ldo apart), summed as
// mixed_delta_add_ sums it: no parallel region of its own, for a caller's thread's share of outputs.
void add_delta_rows(const Delta& delta, const float* x, int64_t ldx, float* out, int64_t ldo, int64_t rows, int64_t lo,
                    int64_t hi);

// The deltas of one projection whose outputs are a linear's columns [offset, offset + width): q, k
// and v share the one product of a layer's qkv matrix. nullptr or nullopt: none.
struct ProjectionDeltas {
  int64_t offset, width;
  const std::optional<std::vector<Delta>>* deltas;
};
// decode_linear (no bias), with each projection's deltas added by the thread that computed its
// outputs, right after their base sums: the same sums as decode_linear then mixed_delta_add_, in
// one parallel region instead of one per index set.
torch::Tensor decode_linear_adding(const torch::Tensor& x, const torch::Tensor& weight,
                                   const std::vector<ProjectionDeltas>& projections);

torch::Tensor decode_layers(const torch::Tensor& x, const std::vector<torch::Tensor>& input_norms,
                            const std::vector<torch::Tensor>& qkv, const std::vector<torch::Tensor>& o,
                            const std::vector<torch::Tensor>& post_norms, const std::vector<torch::Tensor>& gate,
                            const std::vector<torch::Tensor>& up, const std::vector<torch::Tensor>& down,
                            std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                            const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& slots,
                            const torch::Tensor& positions, int64_t heads, int64_t kv_heads, double scale, double eps,
                            const std::vector<LayerDeltas>& deltas);
