// RMSNorm of a few rows (a decode step's hidden states): y = x / sqrt(mean(x^2) + eps) * weight.
//
// torch's CPU rms_norm is a composite of about eight ops (pow, mean, add, rsqrt, mul, casts), each
// dispatched and allocated apart: for a [4, 576] input that is tens of microseconds, sixty-one times a
// step. One pass here; rows in parallel only when there are many (a prefill).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "rms_norm: x must be contiguous float32");
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.is_contiguous() && weight.dim() == 1 &&
                  x.dim() >= 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight must be contiguous float32 [x.size(-1)]");
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  auto out = torch::empty_like(x);
  const float* in = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* y = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(H, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = in + r * H;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < H; ++i) sum += row[i] * row[i];
      const float scale = 1.f / std::sqrt(sum / static_cast<float>(H) + static_cast<float>(eps));
      float* dst = y + r * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) dst[i] = row[i] * scale * w[i];
    }
  });
  return out;
}
