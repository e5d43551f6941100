// npuinfer's W8A16 matrix-vector product for a few rows on x86-64 with AVX-512F: y = (x @ w.T) * scale, with w
// int8 [N, K] row-major (as checkpoints hold it), x [M, K] (1 <= M <= 4, any float dtype), scale [N].
//
// Why it exists (issue #13): torch._weight_int8pack_mm also widens each int8 weight to fp32 and multiplies in
// fp32, but from 4 rows on it is bound by arithmetic on this project's 2-core Xeon: 0.54-0.74x oneDNN's bf16
// time on Qwen-7B's matrices where the bytes read are 0.5x. Here each weight is widened once per call and used by
// every x row, R weight rows at a time with M x R accumulators held in registers: 0.44-0.54x at 4 rows, 2 threads
// (figures: docs/MEASUREMENTS.md, "W8 quantization vs float").
// Products of int8 and fp32 values are exact in fp32; sums accumulate in fp32 (16 lanes, then the lanes).
#include <torch/extension.h>
#include <ATen/Parallel.h>  // at::get_num_threads: the threads torch itself uses
#include <immintrin.h>

#include <algorithm>

namespace {

template <int M, int R>
void gemv_rows(const float* x, int64_t K, const int8_t* w, const float* scale, float* y, int64_t N, int64_t n0,
               int64_t n1) {
  const int64_t k16 = K / 16 * 16;
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    const int8_t* rows = w + n * K;
    for (int64_t k = 0; k < k16; k += 16) {
      __m512 wv[R];
      for (int r = 0; r < R; ++r)
        wv[r] = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + r * K + k))));
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        float sum = _mm512_reduce_add_ps(acc[m][r]);
        for (int64_t k = k16; k < K; ++k) sum += x[m * K + k] * static_cast<float>(rows[r * K + k]);
        y[m * N + n + r] = sum * scale[n + r];
      }
  }
  if (R > 1 && n < n1) gemv_rows<M, 1>(x, K, w, scale, y, N, n, n1);
}

// Weight rows are handed out in chunks to whichever thread is free (OpenMP's dynamic schedule), not split in
// equal halves up front: on a shared VM one vCPU is often held up for a while, and with a static split the
// other then waits at the end of every matrix. Chunks of 16 blocks (96 rows at 4 rows of x, ~400 KB of int8 at
// K = 4096): a sequence of Qwen-7B's matrices at 4 rows, 2 threads, streamed 1.04-1.15x the bytes/s of the
// static split (medians of 12 interleaved passes, two runs) and never less.
constexpr int64_t BLOCKS_PER_CHUNK = 16;

template <int M, int R>
void gemv(const float* x, int64_t K, const int8_t* w, const float* scale, float* y, int64_t N) {
  const int64_t blocks = (N + R - 1) / R;
  const int64_t chunks = (blocks + BLOCKS_PER_CHUNK - 1) / BLOCKS_PER_CHUNK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads()) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b0 = c * BLOCKS_PER_CHUNK, b1 = std::min(blocks, b0 + BLOCKS_PER_CHUNK);
    gemv_rows<M, R>(x, K, w, scale, y, N, b0 * R, std::min(N, b1 * R));
  }
}

}  // namespace

at::Tensor w8a16_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "w8a16_gemv: x [M, K] and weight [N, K] expected, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous() && weight.device().is_cpu(),
              "w8a16_gemv: a contiguous cpu int8 weight expected");
  TORCH_CHECK(x.device().is_cpu() && scale.numel() == weight.size(0),
              "w8a16_gemv: cpu x and one scale per weight row expected");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(M >= 1 && M <= 4, "w8a16_gemv: 1 to 4 rows of x, got ", M);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor sf = scale.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sp = sf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (M) {  // weight rows per block: as many as the 32 vector registers hold with M x R accumulators
    case 1: gemv<1, 4>(xp, K, wp, sp, yp, N); break;
    case 2: gemv<2, 4>(xp, K, wp, sp, yp, N); break;
    case 3: gemv<3, 4>(xp, K, wp, sp, yp, N); break;
    default: gemv<4, 6>(xp, K, wp, sp, yp, N); break;
  }
  return y.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("w8a16_gemv", &w8a16_gemv, "y = (x @ weight.T) * scale for 1-4 rows of x and an int8 weight");
}
