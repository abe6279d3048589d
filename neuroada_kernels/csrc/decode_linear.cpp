// The linear layer of a decode step: a few token rows (M, tens at most) against a [N, K] weight.
//
// At that size a linear is one pass over the weight's bytes. MKL's sgemm, which F.linear calls,
// reads the weight at a fraction of the memory bandwidth for such a skinny product and keeps it
// on one thread; here every weight row is read once for all M tokens, their sums held in
// registers (4 or 6 tokens a pass; more tokens pass again over a block of rows still in cache), and
// the rows split across threads.
// x, bias and the output are float32; the weight is float32 or bfloat16. A bf16 weight is widened in
// registers as it loads (bf16 is float32's top half): half the bytes read, float32 arithmetic. What
// that gains depends on the CPU kind (benchmarks/RESULTS.md).
#include <torch/extension.h>

#include "kernels.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

// Weight rows per pass: more rows read side by side keep more of memory's bandwidth busy, as long
// as their sums (rows x M vectors) fit in registers beside the M token vectors and a weight vector.
// Token rows per pass: more tokens share each weight load, fewer rows fit beside them. AVX-512:
// 6 tokens x 4 rows (24 sums + 6 + 1 = 31 registers); AVX2: 4 tokens x 2 rows (8 + 4 + 1 = 13).
#ifdef __AVX512F__
constexpr int64_t VL = 16;  // floats per vector: a 512-bit register (32 of them)
constexpr int64_t TOKENS_PER_PASS = 6;
constexpr int rows_per_pass(int) { return 4; }
#else
constexpr int64_t VL = 8;  // a 256-bit register (16 of them)
constexpr int64_t TOKENS_PER_PASS = 4;
constexpr int rows_per_pass(int M) { return M <= 2 ? 4 : 2; }
#endif
constexpr int MAX_ROWS_PER_PASS = 4;
typedef float vec __attribute__((vector_size(VL * 4)));
constexpr int64_t BLOCK_BYTES = 16 * 1024;  // weight bytes a group of passes shares from cache
constexpr int64_t MIN_WORK = 1 << 16;  // weights per thread below which waking another is not worth it
constexpr int64_t PREFETCH_PASSES = 2;  // how far ahead weight rows are prefetched, in passes

typedef uint16_t half_vec __attribute__((vector_size(VL * 2)));
typedef uint32_t bits_vec __attribute__((vector_size(VL * 4)));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline vec load(const c10::BFloat16* p) {
  half_vec h;
  std::memcpy(&h, p, sizeof h);
  const bits_vec bits = __builtin_convertvector(h, bits_vec) << 16;
  vec v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// The value, held in a register. Without it GCC folds each token's load into every FMA that uses
// it (a memory operand), so a pass loads its token vectors once per weight row: with 6 tokens x 4
// rows that is 24 loads beside 24 FMAs, and the pass is bound by loads, not by memory or the FMAs.
inline vec in_register(vec v) {
  asm("" : "+v"(v));
  return v;
}

inline float hsum(vec v) {
  float s = 0.f;
  for (int64_t i = 0; i < VL; ++i) s += v[i];
  return s;
}

// out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for rows n in [begin, end), R weight rows at a time.
template <int M, int R, typename W>
void rows_pass(const float* x, const W* w, const float* bias, float* out, int64_t begin, int64_t end, int64_t N,
               int64_t K) {
  int64_t n = begin;
  for (; n + R <= end; n += R) {
    vec acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = vec{};
    // The rows PREFETCH_PASSES passes on start loading now: without it the core stalls on each new
    // row's first lines while its FMAs wait, and memory idles while they run. They load into L2, not
    // L1: passes ahead of a [*, 1536] weight are 48 KB, more than an L1 holds (Zen 4's is 32 KB), and
    // evicting the rows being read slowed every product there (benchmarks/RESULTS.md); L1's own
    // prefetcher brings each line the last step from L2.
    const W* ahead[R];
    for (int r = 0; r < R; ++r) {
      const int64_t row = n + r + PREFETCH_PASSES * R;
      ahead[r] = w + (row < N ? row : n + r) * K;
    }
    int64_t k = 0;
    for (; k + VL <= K; k += VL) {
      vec xv[M];
      for (int m = 0; m < M; ++m) xv[m] = in_register(load(x + m * K + k));
      for (int r = 0; r < R; ++r) {
        const vec wv = load(w + (n + r) * K + k);
        __builtin_prefetch(ahead[r] + k, 0, 2);  // read, into L2 (prefetcht1)
        for (int m = 0; m < M; ++m) acc[r][m] += wv * xv[m];
      }
    }
    for (int r = 0; r < R; ++r) {
      const W* row = w + (n + r) * K;
      for (int m = 0; m < M; ++m) {
        float s = hsum(acc[r][m]);
        for (int64_t kk = k; kk < K; ++kk) s += static_cast<float>(row[kk]) * x[m * K + kk];
        out[m * N + n + r] = bias != nullptr ? s + bias[n + r] : s;
      }
    }
  }
  if (n < end) rows_pass<M, 1>(x, w, bias, out, n, end, N, K);
}

// rows_pass for M token rows, 1 <= M <= TOKENS_PER_PASS (each M its own unrolled pass).
template <int MAX_M = TOKENS_PER_PASS, typename W>
void rows_pass_any(int64_t M, const float* x, const W* w, const float* bias, float* out, int64_t begin, int64_t end,
                   int64_t N, int64_t K) {
  if (M == MAX_M) return rows_pass<MAX_M, rows_per_pass(MAX_M)>(x, w, bias, out, begin, end, N, K);
  if constexpr (MAX_M > 1) rows_pass_any<MAX_M - 1>(M, x, w, bias, out, begin, end, N, K);
}

// Output features [begin, end) of x @ w.T (+ bias). More token rows than a pass takes: a block of
// weight rows is read from memory once, then stays in L1/L2 while each group of tokens passes over
// it. A block is whole passes: a row left over takes the one-row pass, which reads slower.
template <typename W>
void linear_rows(int64_t M, const float* x, const W* w, const float* bias, float* out, int64_t begin, int64_t end,
                 int64_t N, int64_t K) {
  const int64_t rows = BLOCK_BYTES / (std::max<int64_t>(K, 1) * int64_t(sizeof(W)));
  const int64_t block = std::max<int64_t>(1, rows / MAX_ROWS_PER_PASS) * MAX_ROWS_PER_PASS;
  for (int64_t b = begin; b < end; b += block) {
    for (int64_t m = 0; m < M; m += TOKENS_PER_PASS) {
      rows_pass_any(std::min(TOKENS_PER_PASS, M - m), x + m * K, w, bias, out + m * N, b, std::min(end, b + block), N, K);
    }
  }
}

int64_t grain_rows(int64_t K) { return std::max<int64_t>(4, MIN_WORK / std::max<int64_t>(K, 1)); }

void check_linear(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "decode_linear: x [M, K], weight [N, K]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "decode_linear: x must be contiguous float32");
  TORCH_CHECK(weight.is_contiguous(), "decode_linear: weight must be contiguous");
}

}  // namespace

// The weight's element type as a C++ type: float32 or bfloat16, anything else refused.
template <typename F>
void with_weight_type(const char* op, const torch::Tensor& w, F&& f) {
  if (w.scalar_type() == torch::kFloat32) return f(w.data_ptr<float>());
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16, op, ": weights must be float32 or bfloat16");
  return f(w.data_ptr<c10::BFloat16>());
}

// x [M, K] float32, weight [N, K] float32 or bfloat16, bias [N] float32 or None -> [M, N] float32.
torch::Tensor decode_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  check_linear(x, weight);
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N,
                "decode_linear: bias must be contiguous float32 [N]");
    b = bias->data_ptr<float>();
  }
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  with_weight_type("decode_linear", weight, [&](const auto* wp) {
    if (M > 0)
      at::parallel_for(0, N, grain_rows(K), [&](int64_t begin, int64_t end) { linear_rows(M, xp, wp, b, op, begin, end, N, K); });
  });
  return out;
}

torch::Tensor decode_linear_adding(const torch::Tensor& x, const torch::Tensor& weight,
                                   const std::vector<ProjectionDeltas>& projections) {
  check_linear(x, weight);
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  for (const auto& [offset, width, deltas] : projections) {
    TORCH_CHECK(offset >= 0 && width >= 0 && offset + width <= N, "decode_linear: a projection outside the outputs");
    if (deltas != nullptr && *deltas)
      for (const auto& delta : **deltas) check_delta(delta, M, width);
  }
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Threads take whole vectors of outputs, so a delta's vectors are rarely cut (add_row_delta's
  // sums do not depend on it).
  const int64_t groups = (N + VL - 1) / VL;
  with_weight_type("decode_linear", weight, [&](const auto* wp) {
    if (M == 0) return;
    at::parallel_for(0, groups, std::max<int64_t>(1, grain_rows(K) / VL), [&](int64_t first, int64_t last) {
      const int64_t begin = first * VL, end = std::min(N, last * VL);
      linear_rows(M, xp, wp, nullptr, op, begin, end, N, K);
      for (const auto& [offset, width, deltas] : projections) {
        const int64_t lo = std::max(begin, offset), hi = std::min(end, offset + width);
        if (deltas == nullptr || !*deltas || lo >= hi) continue;
        for (const auto& delta : **deltas) add_delta_rows(delta, xp, K, op + offset, N, M, lo - offset, hi - offset);
      }
    });
  });
  return out;
}

// silu(x @ gate.T) * (x @ up.T): a gated MLP's first half in one call, x [M, K] float32, gate and up
// [N, K] (float32 or bfloat16, the same). Each thread's output features come from both weights while
// the gate's sums are still in cache.
torch::Tensor decode_gated_silu(const torch::Tensor& x, const torch::Tensor& gate, const torch::Tensor& up) {
  TORCH_CHECK(x.dim() == 2 && gate.dim() == 2 && gate.sizes() == up.sizes() && x.size(1) == gate.size(1),
              "decode_gated_silu: x [M, K], gate and up [N, K]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "decode_gated_silu: x must be contiguous float32");
  TORCH_CHECK(gate.scalar_type() == up.scalar_type() && gate.is_contiguous() && up.is_contiguous(),
              "decode_gated_silu: gate and up must be contiguous, of one dtype");
  const int64_t M = x.size(0), N = gate.size(0), K = x.size(1);
  auto out = torch::empty({M, N}, x.options());
  auto gated = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float *op = out.data_ptr<float>(), *gv = gated.data_ptr<float>();
  with_weight_type("decode_gated_silu", gate, [&](const auto* gp) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(gp)>>;
    const W* up_p = up.data_ptr<W>();
    if (M > 0)
      at::parallel_for(0, N, grain_rows(K), [&](int64_t begin, int64_t end) {
        linear_rows(M, xp, gp, nullptr, gv, begin, end, N, K);
        linear_rows(M, xp, up_p, nullptr, op, begin, end, N, K);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = begin; n < end; ++n) {
            const float g = gv[m * N + n];
            op[m * N + n] *= g / (1.f + std::exp(-g));
          }
      });
  });
  return out;
}
