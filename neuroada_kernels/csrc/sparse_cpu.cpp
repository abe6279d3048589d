// CPU kernels for NeuroAda's sparse products, compiled on first use by kernels/cpu.py.
//
// torch's gather/index ops run each product as several passes over [tokens, d_out] temporaries
// at about 1 GMAC/s on a server CPU; these loops make one pass with nothing in between.
//
// Training (sparse_fwd_add_ / sparse_bwd_add_): tokens are taken a tile at a time and the tile's
// inputs are transposed, so the tile's values of one selected column are contiguous: one
// (row, j) term is then a few vector FMAs over tokens instead of scalar gathers.
// Switching (switch_weights_ / restore_weights_): the merged path's in-place apply and restore.
// Training's frozen linear (merge_rows_ / unmerge_rows_): the deltas scattered into the weight for
// one GEMM and taken out again, bit for bit.
// Serving (mixed_delta_add_, and add_delta_rows inside the decode step's linears): a decode batch has
// a handful of tokens, each with its own adapter, so the loop runs along the output dim (contiguous
// indices and values, gathered inputs).
#include <torch/extension.h>

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#ifdef __AVX__
#include <immintrin.h>
#endif

namespace {

// 16 floats. Explicit vectors rather than auto-vectorised loops: GCC's -O3 loop transforms
// (unroll-and-jam) turned the token loop scalar and made the forward several times slower.
typedef float vec __attribute__((vector_size(64)));
constexpr int64_t VL = 16;
constexpr int64_t TB = 32;  // tokens per forward tile (two vectors); a tile's columns stay in L2
constexpr int64_t TB_BWD = 64;  // backward tile: four vectors per dot product before a horizontal sum
constexpr int64_t OB = 256;  // outputs per block of the mixed kernel
constexpr int64_t MIN_WORK = 1 << 15;  // multiply-adds below which a thread is not worth waking

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

inline float hsum(vec v) {  // a halving tree: four dependent adds rather than fifteen
  typedef float half __attribute__((vector_size(32)));
  typedef float quarter __attribute__((vector_size(16)));
  const half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

#ifdef __AVX__
// dst[c * ldd + r] (+)= src[r * lds + c] for an 8 x 8 block, in registers.
template <bool ACC>
inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) {
    _mm256_storeu_ps(dst + i * ldd, ACC ? _mm256_add_ps(_mm256_loadu_ps(dst + i * ldd), t[i]) : t[i]);
  }
}
#endif

template <bool ACC>
inline void put(float& dst, float v) {
  dst = ACC ? dst + v : v;
}

// dst[c * ldd + r] (+)= src[r * lds + c] for r < rows, c < cols: 8 x 8 register blocks where the
// CPU has AVX, element by element at the edges. The blocks are walked along the rows of src
// (SRC_ROWS) or of dst, whichever is the big tensor in memory, so that it streams row by row and
// the tile (in L2) takes the strided accesses: the other order ran several times slower, memory bound.
template <bool ACC, bool SRC_ROWS>
void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  int64_t R = 0, C = 0;  // the part done in 8 x 8 blocks: [0, R) x [0, C)
#ifdef __AVX__
  R = rows / 8 * 8;
  C = cols / 8 * 8;
  if (SRC_ROWS) {
    for (int64_t r0 = 0; r0 < R; r0 += 8)
      for (int64_t c0 = 0; c0 < C; c0 += 8) transpose8x8<ACC>(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
  } else {
    for (int64_t c0 = 0; c0 < C; c0 += 8)
      for (int64_t r0 = 0; r0 < R; r0 += 8) transpose8x8<ACC>(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
  }
#endif
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = (r < R ? C : 0); c < cols; ++c) put<ACC>(dst[c * ldd + r], src[r * lds + c]);
}

// tile[c * W + u] = src[u * ld + c] for u < n; zero for n <= u < W.
template <int64_t W>
void transpose_in(const float* src, int64_t ld, int64_t n, int64_t d, float* tile) {
  transpose<false, true>(src, ld, n, d, tile, W);
  if (n < W) {
    for (int64_t c = 0; c < d; ++c) std::fill(tile + c * W + n, tile + (c + 1) * W, 0.0f);
  }
}

// dst[u * ld + c] += tile[c * W + u] for u < n.
template <int64_t W>
void transpose_add_out(const float* tile, int64_t n, int64_t d, float* dst, int64_t ld) {
  transpose<true, false>(tile, W, d, n, dst, ld);
}

void check_2d_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == 2 && t.is_contiguous(),
              name, " must be a contiguous 2-D float32 CPU tensor");
}

void check_index_layout(const torch::Tensor& idx) {
  TORCH_CHECK(idx.device().is_cpu() && idx.dim() == 2 && idx.is_contiguous(),
              "indices must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(idx.scalar_type() == torch::kInt32 || idx.scalar_type() == torch::kInt64,
              "indices must be int32 or int64");
}

void check_range(const torch::Tensor& t, int64_t end, const char* name) {
  if (t.numel() > 0) {
    auto [lo, hi] = t.aminmax();
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < end, name, " must lie in [0, ", end, ")");
  }
}

// A tile's rows of x as float32: float32 rows are used where they lie; bfloat16 rows (inputs kept
// narrow for grad_values) are widened, exactly, into `buf`, a tile at a time while in cache.
inline const float* rows_as_float(const float* x, int64_t, std::vector<float>&) { return x; }

inline const float* rows_as_float(const at::BFloat16* x, int64_t n, std::vector<float>& buf) {
  buf.resize(n);
  for (int64_t e = 0; e < n; ++e) buf[e] = static_cast<float>(x[e]);
  return buf.data();
}

template <typename index_t>
void sparse_fwd_impl(const float* x, const index_t* idx, const float* val, float* out, int64_t T, int64_t d_in,
                     int64_t d_out, int64_t k) {
  const int64_t tiles = (T + TB - 1) / TB;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xt(d_in * TB), ot(d_out * TB);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * TB, n = std::min(TB, T - t0);
      transpose_in<TB>(x + t0 * d_in, d_in, n, d_in, xt.data());
      for (int64_t i = 0; i < d_out; ++i) {
        vec a0 = {}, a1 = {};
        for (int64_t j = 0; j < k; ++j) {
          const float v = val[i * k + j];
          const float* col = xt.data() + static_cast<int64_t>(idx[i * k + j]) * TB;
          a0 += v * load(col);
          a1 += v * load(col + VL);
        }
        store(ot.data() + i * TB, a0);
        store(ot.data() + i * TB + VL, a1);
      }
      transpose_add_out<TB>(ot.data(), n, d_out, out + t0 * d_out, d_out);
    }
  });
}

// grad_x[t, c] += sum over (i, j) with idx[i, j] = c of val[i, j] * gy[t, i] (into grad_x as given),
// and grad_val[i, j] = sum_t gy[t, i] * x[t, idx[i, j]], in one pass over token tiles.
// grad_x walks the pattern by input column (a counting sort of idx, made per call: O(d_out * k)),
// so each column's sum stays in registers: scattering row by row instead made read-modify-write
// chains through memory wherever rows share columns, as magnitude-selected rows do.
// Each thread sums grad_val over its tiles; the partials add up at the end.
template <typename index_t, typename x_t>
void sparse_bwd_impl(const float* gy, const x_t* x, const index_t* idx, const float* val, float* gx, float* gv,
                     int64_t T, int64_t d_in, int64_t d_out, int64_t k) {
  constexpr int64_t W = TB_BWD;
  const int64_t tiles = (T + W - 1) / W, nnz = d_out * k;
  std::vector<int64_t> col_start(d_in + 1, 0);
  std::vector<int32_t> col_rows(gx ? nnz : 0);
  std::vector<float> col_vals(gx ? nnz : 0);
  if (gx) {
    for (int64_t m = 0; m < nnz; ++m) ++col_start[static_cast<int64_t>(idx[m]) + 1];
    for (int64_t c = 0; c < d_in; ++c) col_start[c + 1] += col_start[c];
    std::vector<int64_t> next(col_start.begin(), col_start.end() - 1);
    for (int64_t m = 0; m < nnz; ++m) {
      const int64_t p = next[static_cast<int64_t>(idx[m])]++;
      col_rows[p] = static_cast<int32_t>(m / k);
      col_vals[p] = val[m];
    }
  }
  const int64_t threads = at::get_num_threads();
  std::vector<float> partials(gv ? threads * nnz : 0, 0.0f);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    float* part = gv ? partials.data() + at::get_thread_num() * nnz : nullptr;
    std::vector<float> gyt(d_out * W), xt(gv ? d_in * W : 0), gxt(gx ? d_in * W : 0), xrows;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * W, n = std::min(W, T - t0);
      transpose_in<W>(gy + t0 * d_out, d_out, n, d_out, gyt.data());
      if (gx) {
        for (int64_t c = 0; c < d_in; ++c) {
          vec a0 = {}, a1 = {}, a2 = {}, a3 = {};
          for (int64_t e = col_start[c]; e < col_start[c + 1]; ++e) {
            const float v = col_vals[e];
            const float* g = gyt.data() + static_cast<int64_t>(col_rows[e]) * W;
            a0 += v * load(g);
            a1 += v * load(g + VL);
            a2 += v * load(g + 2 * VL);
            a3 += v * load(g + 3 * VL);
          }
          float* dst = gxt.data() + c * W;
          store(dst, a0);
          store(dst + VL, a1);
          store(dst + 2 * VL, a2);
          store(dst + 3 * VL, a3);
        }
        transpose_add_out<W>(gxt.data(), n, d_in, gx + t0 * d_in, d_in);
      }
      if (gv) {
        transpose_in<W>(rows_as_float(x + t0 * d_in, n * d_in, xrows), d_in, n, d_in, xt.data());
        for (int64_t i = 0; i < d_out; ++i) {
          const float* g = gyt.data() + i * W;
          const vec g0 = load(g), g1 = load(g + VL), g2 = load(g + 2 * VL), g3 = load(g + 3 * VL);
          for (int64_t j = 0; j < k; ++j) {
            const float* col = xt.data() + static_cast<int64_t>(idx[i * k + j]) * W;
            part[i * k + j] += hsum((g0 * load(col) + g1 * load(col + VL)) +
                                    (g2 * load(col + 2 * VL) + g3 * load(col + 3 * VL)));
          }
        }
      }
    }
  });
  if (gv) {
    std::fill(gv, gv + nnz, 0.0f);
    for (int64_t p = 0; p < threads; ++p) {
      const float* part = partials.data() + p * nnz;
      for (int64_t m = 0; m < nnz; ++m) gv[m] += part[m];
    }
  }
}

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const at::BFloat16* p) {  // bf16 is a float32's top half: widen and shift, exactly
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

inline __m512 gather16(const float* base, const int32_t* idx) {
  return _mm512_i32gather_ps(_mm512_loadu_si512(idx), base, 4);
}

inline __m512 gather16(const float* base, const int64_t* idx) {
  const __m256 lo = _mm512_i64gather_ps(_mm512_loadu_si512(idx), base, 4);
  const __m256 hi = _mm512_i64gather_ps(_mm512_loadu_si512(idx + 8), base, 4);
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}
#endif

#ifdef __AVX512F__
// dst[o : o + N * 16] += the delta's sums there, each output's over j in order, one FMA per term.
template <int N, typename index_t, typename value_t>
inline void fused_vectors(const float* xr, const index_t* idx, const value_t* val, float* dst, int64_t o, int64_t d_out,
                          int64_t k) {
  __m512 sum[N];
  for (int n = 0; n < N; ++n) sum[n] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; ++j)
    for (int n = 0; n < N; ++n) {
      const int64_t at = j * d_out + o + n * VL;
      sum[n] = _mm512_fmadd_ps(load16(val + at), gather16(xr, idx + at), sum[n]);
    }
  for (int n = 0; n < N; ++n)
    _mm512_storeu_ps(dst + o + n * VL, _mm512_add_ps(_mm512_loadu_ps(dst + o + n * VL), sum[n]));
}
#endif

// One token's delta on outputs [lo, hi): dst[o] += sum_j val[j, o] * xr[idx[j, o]], val its adapter's
// [k, d_out]. An output's sum is the same arithmetic whatever range it is computed in: outputs fall
// in blocks of OB, and a block's first whole vectors of outputs are summed with fused multiply-adds
// (16 at a time, or one by one where a range cuts a vector), the rest with the scalar loop. The
// mixed kernel passes whole blocks; the decode step's linears each thread's share of their outputs.
template <typename index_t, typename value_t>
void add_row_delta(const float* xr, const index_t* idx, const value_t* val, float* dst, int64_t lo, int64_t hi,
                   int64_t d_out, int64_t k) {
  for (int64_t o0 = lo / OB * OB; o0 < hi; o0 += OB) {
    const int64_t end = std::min({hi, o0 + OB, d_out});
    int64_t o = std::max(lo, o0);
#ifdef __AVX512F__
    const int64_t fused_end = std::min(end, o0 + (std::min(OB, d_out - o0) / VL) * VL);
    const auto fused = [&](int64_t r) {  // one output as its vector's lane computes it
      float sum = 0.0f;
      for (int64_t j = 0; j < k; ++j)
        sum = std::fma(static_cast<float>(val[j * d_out + r]), xr[idx[j * d_out + r]], sum);
      dst[r] += sum;
    };
    for (; o < fused_end && (o - o0) % VL != 0; ++o) fused(o);
    // GCC does not emit gathers for the scalar loop below; one vgatherdps fetches 16 inputs. A
    // gather's latency, not memory, bounds one vector's chain of k of them: eight chains side by side.
    for (; o + 8 * VL <= fused_end; o += 8 * VL) fused_vectors<8>(xr, idx, val, dst, o, d_out, k);
    for (; o + 4 * VL <= fused_end; o += 4 * VL) fused_vectors<4>(xr, idx, val, dst, o, d_out, k);
    for (; o + VL <= fused_end; o += VL) fused_vectors<1>(xr, idx, val, dst, o, d_out, k);
    for (; o < fused_end; ++o) fused(o);
#endif
    if (o == end) continue;
    float acc[OB];
    std::fill(acc, acc + (end - o), 0.0f);
    for (int64_t j = 0; j < k; ++j) {
      const index_t* ij = idx + j * d_out;
      const value_t* vj = val + j * d_out;
      for (int64_t r = o; r < end; ++r) acc[r - o] += static_cast<float>(vj[r]) * xr[ij[r]];
    }
    for (int64_t r = o; r < end; ++r) dst[r] += acc[r - o];
  }
}

// out[t, o] += sum_j val[slots[t / L], j, o] * x[t, idx[j, o]] for the L tokens of each batch row;
// rows of slot 0 ("no adapter") are not touched.
template <typename index_t, typename value_t>
void mixed_delta_add_impl(const float* x, const index_t* idx, const value_t* val, const int64_t* slots, float* out,
                          int64_t T, int64_t L, int64_t d_in, int64_t d_out, int64_t k) {
  const int64_t blocks = (d_out + OB - 1) / OB;
  const int64_t grain = std::max<int64_t>(1, MIN_WORK / (OB * std::max<int64_t>(k, 1)));
  at::parallel_for(0, T * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t = w / blocks, o0 = (w % blocks) * OB, slot = slots[t / L];
      if (slot != 0)
        add_row_delta(x + t * d_in, idx, val + slot * k * d_out, out + t * d_out, o0, o0 + OB, d_out, k);
    }
  });
}

// The index and value types of a delta's tensors as C++ types, for f(idx, val).
template <typename F>
void with_delta_types(const torch::Tensor& indices, const torch::Tensor& values, F&& f) {
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "a delta's indices", [&] {
    if (values.scalar_type() == torch::kBFloat16) {
      f(indices.data_ptr<index_t>(), values.data_ptr<at::BFloat16>());
    } else {
      f(indices.data_ptr<index_t>(), values.data_ptr<float>());
    }
  });
}

// buffer[off[m]] = round(float(saved[m]) + float(values[m])), after saving buffer[off[m]] into
// saved first when SAVE (apply) or reading the originals already there (reapply). The sum is
// rounded once to the weight dtype, to nearest even, as torch's own conversion does.
template <bool SAVE, typename w_t, typename v_t>
void switch_impl(w_t* buf, const int64_t* off, const v_t* val, w_t* saved, int64_t n) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      if (SAVE) saved[m] = buf[off[m]];
      buf[off[m]] = static_cast<w_t>(static_cast<float>(saved[m]) + static_cast<float>(val[m]));
    }
  });
}

template <typename bits_t>
void restore_impl(bits_t* buf, const int64_t* off, const bits_t* saved, int64_t n) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) buf[off[m]] = saved[m];
  });
}

// The training forward's merge: w[i, idx[i, j]] += val[i, j] in float32, the old weights saved
// first, walking each row in order; unmerge walks each row backwards, so a column listed twice in
// a row still comes back to its original bits. Rows are disjoint memory, so threads split rows.
template <typename index_t>
void merge_rows_impl(float* w, const index_t* idx, const float* val, float* saved, int64_t d_out, int64_t d_in,
                     int64_t k) {
  at::parallel_for(0, d_out, std::max<int64_t>(1, (1 << 14) / k), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = w + i * d_in;
      for (int64_t j = 0; j < k; ++j) {
        float& cell = row[static_cast<int64_t>(idx[i * k + j])];
        saved[i * k + j] = cell;
        cell += val[i * k + j];
      }
    }
  });
}

template <typename index_t>
void unmerge_rows_impl(float* w, const index_t* idx, const float* saved, int64_t d_out, int64_t d_in, int64_t k) {
  at::parallel_for(0, d_out, std::max<int64_t>(1, (1 << 14) / k), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = k - 1; j >= 0; --j) w[i * d_in + static_cast<int64_t>(idx[i * k + j])] = saved[i * k + j];
    }
  });
}

void check_flat(const torch::Tensor& buffer, const torch::Tensor& offsets, const torch::Tensor& saved,
                bool check_ranges) {
  TORCH_CHECK(buffer.device().is_cpu() && buffer.dim() == 1 && buffer.is_contiguous(),
              "buffer must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && offsets.dim() == 1 && offsets.is_contiguous(),
              "offsets must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(saved.scalar_type() == buffer.scalar_type() && saved.sizes() == offsets.sizes() && saved.is_contiguous(),
              "saved must be contiguous, shaped like offsets, in the buffer's dtype");
  if (check_ranges) check_range(offsets, buffer.numel(), "offsets");
}

// merge_rows_ / unmerge_rows_'s common arguments: weight [d_out, d_in], indices and saved [d_out, k].
void check_rows(const torch::Tensor& weight, const torch::Tensor& indices, const torch::Tensor& saved) {
  check_2d_float(weight, "weight");
  check_2d_float(saved, "saved");
  check_index_layout(indices);
  check_range(indices, weight.size(1), "indices");
  TORCH_CHECK(indices.size(0) == weight.size(0) && saved.sizes() == indices.sizes(),
              "indices and saved must both be [d_out, k]");
}

// The training products' common arguments: a [T, d_out] tensor (out or grad_out), x [T, d_in]
// (float32, or bfloat16 where bf16_x_ok), indices and values [d_out, k].
void check_product_args(const torch::Tensor& t_by_out, const char* name, const torch::Tensor& x,
                        const torch::Tensor& indices, const torch::Tensor& values, bool bf16_x_ok = false) {
  check_2d_float(t_by_out, name);
  if (bf16_x_ok && x.scalar_type() == torch::kBFloat16) {
    TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CPU tensor");
  } else {
    check_2d_float(x, "x");
  }
  check_2d_float(values, "values");
  check_index_layout(indices);
  check_range(indices, x.size(1), "indices");
  TORCH_CHECK(values.sizes() == indices.sizes(), "indices and values must both be [d_out, k]");
  TORCH_CHECK(t_by_out.size(0) == x.size(0) && t_by_out.size(1) == indices.size(0), name, " must be [T, d_out]");
}

}  // namespace

// out [T, d_out] += delta(x), with x [T, d_in], indices [d_out, k], values [d_out, k].
void sparse_fwd_add_(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& indices,
                     const torch::Tensor& values) {
  check_product_args(out, "out", x, indices, values);
  const int64_t T = x.size(0), d_in = x.size(1), d_out = indices.size(0), k = indices.size(1);
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_fwd_add_", [&] {
    sparse_fwd_impl<index_t>(x.data_ptr<float>(), indices.data_ptr<index_t>(), values.data_ptr<float>(),
                             out.data_ptr<float>(), T, d_in, d_out, k);
  });
}

// With grad_out [T, d_out] and x [T, d_in]: adds the delta's grad_x into grad_x [T, d_in] if given,
// and returns grad_values [d_out, k] if asked for (else None).
std::optional<torch::Tensor> sparse_bwd_add_(const torch::Tensor& grad_out, const torch::Tensor& x,
                                             const torch::Tensor& indices, const torch::Tensor& values,
                                             std::optional<torch::Tensor> grad_x, bool need_grad_values) {
  const bool narrow_x = x.scalar_type() == torch::kBFloat16;  // inputs kept in bf16 for grad_values
  check_product_args(grad_out, "grad_out", x, indices, values, true);
  if (grad_x) {
    check_2d_float(*grad_x, "grad_x");
    TORCH_CHECK(grad_x->sizes() == x.sizes(), "grad_x must be shaped like x");
  }
  const int64_t T = x.size(0), d_in = x.size(1), d_out = indices.size(0), k = indices.size(1);
  std::optional<torch::Tensor> grad_values;
  if (need_grad_values) grad_values = torch::empty({d_out, k}, values.options());
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_bwd_add_", [&] {
    const auto run = [&](const auto* xp) {
      sparse_bwd_impl(grad_out.data_ptr<float>(), xp, indices.data_ptr<index_t>(), values.data_ptr<float>(),
                      grad_x ? grad_x->data_ptr<float>() : nullptr,
                      grad_values ? grad_values->data_ptr<float>() : nullptr, T, d_in, d_out, k);
    };
    if (narrow_x) {
      run(x.data_ptr<at::BFloat16>());
    } else {
      run(x.data_ptr<float>());
    }
  });
  return grad_values;
}

// out [B, ..., d_out] += each batch row's delta, with x [B, ..., d_in], indices [k, d_out] (j-major),
// values [S, k, d_out], slots [B]. On the decode hot path the caller may skip the range checks
// (check_ranges=false) for indices it validated once: two reductions per call cost a few percent
// of a small model's decode step.
void mixed_delta_add_(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& indices,
                      const torch::Tensor& values, const torch::Tensor& slots, bool check_ranges) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() >= 2 && x.is_contiguous(),
              "x must be a contiguous float32 CPU tensor [B, ..., d_in]");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == torch::kFloat32 && out.is_contiguous() &&
                  out.dim() == x.dim() && out.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
              "out must be a contiguous float32 CPU tensor shaped like x but for its last dim");
  check_index_layout(indices);  // before its sizes are read
  check_delta({indices, values, slots}, x.size(0), indices.size(1));
  TORCH_CHECK(out.size(-1) == indices.size(1), "out's last dim must be d_out = ", indices.size(1));
  const int64_t d_in = x.size(-1), k = indices.size(0), d_out = indices.size(1);
  if (check_ranges) {
    check_range(indices, d_in, "indices");
    check_range(slots, values.size(0), "slots");
  }
  const int64_t T = x.numel() / d_in, L = x.size(0) > 0 ? T / x.size(0) : 1;
  with_delta_types(indices, values, [&](const auto* idx, const auto* val) {
    mixed_delta_add_impl(x.data_ptr<float>(), idx, val, slots.data_ptr<int64_t>(), out.data_ptr<float>(), T, L, d_in,
                         d_out, k);
  });
}

void check_delta(const Delta& delta, int64_t rows, int64_t d_out) {
  const auto& [indices, values, slots] = delta;
  check_index_layout(indices);
  TORCH_CHECK(indices.size(1) == d_out, "a delta's indices must be [k, d_out] with d_out = ", d_out);
  TORCH_CHECK(values.device().is_cpu() &&
                  (values.scalar_type() == torch::kFloat32 || values.scalar_type() == torch::kBFloat16) &&
                  values.dim() == 3 && values.is_contiguous() && values.size(1) == indices.size(0) &&
                  values.size(2) == d_out,
              "a delta's values must be a contiguous float32 or bfloat16 CPU tensor [slots, k, d_out]");
  TORCH_CHECK(slots.device().is_cpu() && slots.scalar_type() == torch::kInt64 && slots.dim() == 1 &&
                  slots.is_contiguous() && slots.size(0) == rows,
              "a delta's slots must be a contiguous int64 CPU tensor [rows]");
}

void add_delta_rows(const Delta& delta, const float* x, int64_t ldx, float* out, int64_t ldo, int64_t rows, int64_t lo,
                    int64_t hi) {
  const auto& [indices, values, slots] = delta;
  const int64_t k = indices.size(0), d_out = indices.size(1);
  const int64_t* slot = slots.data_ptr<int64_t>();
  with_delta_types(indices, values, [&](const auto* idx, const auto* val) {
    for (int64_t m = 0; m < rows; ++m)
      if (slot[m] != 0) add_row_delta(x + m * ldx, idx, val + slot[m] * k * d_out, out + m * ldo, lo, hi, d_out, k);
  });
}

// The whole-model switch (kernels.scatter's flat forms): apply saves the old weights into saved;
// reapply reads the originals from saved, whatever the buffer holds now; restore copies them back.
// check_ranges=false is for offsets the caller derived from validated indices (a switch is a
// few memory passes, and a range check over the offsets would be one more).
void switch_weights_(torch::Tensor& buffer, const torch::Tensor& offsets, const torch::Tensor& values,
                     torch::Tensor& saved, bool save_first, bool check_ranges) {
  check_flat(buffer, offsets, saved, check_ranges);
  TORCH_CHECK(values.sizes() == offsets.sizes() && values.is_contiguous() && values.is_floating_point(),
              "values must be contiguous floating point, shaped like offsets");
  const int64_t n = offsets.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, buffer.scalar_type(), "switch_weights_", [&] {
    using w_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, values.scalar_type(), "switch_weights_values", [&] {
      if (save_first) {
        switch_impl<true, w_t, scalar_t>(buffer.data_ptr<w_t>(), offsets.data_ptr<int64_t>(),
                                         values.data_ptr<scalar_t>(), saved.data_ptr<w_t>(), n);
      } else {
        switch_impl<false, w_t, scalar_t>(buffer.data_ptr<w_t>(), offsets.data_ptr<int64_t>(),
                                          values.data_ptr<scalar_t>(), saved.data_ptr<w_t>(), n);
      }
    });
  });
}

void restore_weights_(torch::Tensor& buffer, const torch::Tensor& offsets, const torch::Tensor& saved,
                      bool check_ranges) {
  check_flat(buffer, offsets, saved, check_ranges);
  const int64_t n = offsets.numel();
  if (buffer.element_size() == 4) {
    restore_impl<int32_t>(static_cast<int32_t*>(buffer.data_ptr()), offsets.data_ptr<int64_t>(),
                          static_cast<const int32_t*>(saved.data_ptr()), n);
  } else {
    TORCH_CHECK(buffer.element_size() == 2, "buffer must be float32, bfloat16 or float16");
    restore_impl<int16_t>(static_cast<int16_t*>(buffer.data_ptr()), offsets.data_ptr<int64_t>(),
                          static_cast<const int16_t*>(saved.data_ptr()), n);
  }
}

// weight [d_out, d_in] float32 gets values [d_out, k] added at indices [d_out, k], the old weights
// going into saved [d_out, k]; unmerge_rows_ puts them back bit for bit.
void merge_rows_(torch::Tensor& weight, const torch::Tensor& indices, const torch::Tensor& values,
                 torch::Tensor& saved) {
  check_rows(weight, indices, saved);
  check_2d_float(values, "values");
  TORCH_CHECK(values.sizes() == indices.sizes(), "values must be [d_out, k] like indices");
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "merge_rows_", [&] {
    merge_rows_impl<index_t>(weight.data_ptr<float>(), indices.data_ptr<index_t>(), values.data_ptr<float>(),
                             saved.data_ptr<float>(), weight.size(0), weight.size(1), indices.size(1));
  });
}

void unmerge_rows_(torch::Tensor& weight, const torch::Tensor& indices, const torch::Tensor& saved) {
  check_rows(weight, indices, saved);
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "unmerge_rows_", [&] {
    unmerge_rows_impl<index_t>(weight.data_ptr<float>(), indices.data_ptr<index_t>(), saved.data_ptr<float>(),
                               weight.size(0), weight.size(1), indices.size(1));
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_fwd_add_", &sparse_fwd_add_, "out += the sparse gather product of x");
  m.def("sparse_bwd_add_", &sparse_bwd_add_, "the product's grad_x (added in place) and grad_values, one pass");
  m.def("switch_weights_", &switch_weights_, "buffer[offsets] = round(saved + values), saving first if asked");
  m.def("restore_weights_", &restore_weights_, "buffer[offsets] = saved, bit for bit");
  m.def("merge_rows_", &merge_rows_, "weight[i, indices[i, j]] += values[i, j], saving the old weights");
  m.def("unmerge_rows_", &unmerge_rows_, "puts merge_rows_'s saved weights back, bit for bit");
  // Without the GIL: the server's event loop streams tokens while a decode step reads weights.
  m.def("decode_linear", &decode_linear, "x @ weight.T + bias for a few rows of x (a decode step)",
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_gated_silu", &decode_gated_silu, "silu(x @ gate.T) * (x @ up.T) for a few rows of x",
        py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, "x / sqrt(mean(x^2, -1) + eps) * weight, one pass per row");
  m.def("decode_attention", &decode_attention, "rotary, cache write and attention of a decode step, per row");
  m.def("decode_layers", &decode_layers, "a decode step's decoder layers, all of them, on the kernels above",
        py::call_guard<py::gil_scoped_release>());
  m.def("mixed_delta_add_", &mixed_delta_add_, "adds each token's own adapter delta (one shared index set) to out");
}
