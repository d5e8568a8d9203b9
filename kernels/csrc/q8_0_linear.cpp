// y = x W^T straight from GGUF Q8_0 blocks: the LM head multiplied at 8.5 bits a weight, with no
// expanded copy of the weights anywhere.
//
// `q8_0_linear(x, blocks, n)`: x float32 [B, K] (K a multiple of 32), blocks the uint8 bytes of
// an [n, K] Q8_0 matrix, row by row (row r is blocks [r K/32, (r+1) K/32), each 34 bytes: an IEEE
// half scale d, then 32 int8 codes q, w = d * q); returns float32 [B, n], y[b, r] = sum_k
// x[b, k] w[r, k]. The weights are exact in float32 (an 11-bit significand times an 8-bit
// integer; see q8_0_bf16.cpp), so the only rounding is the accumulation's.
//
// Arithmetic, the same for every output: 16 lanes, lane l accumulating x[k] * w[k] for k = l
// (mod 16) with one fused multiply-add per k in ascending k, then the lanes summed by a fixed
// tree (halves: l + 8, then + 4, + 2, + 1). An output is computed by one thread, on its own
// accumulator, so it is the same bits whatever the number of threads, the batch size, the
// other rows of x or of the matrix (a chunk of rows gives the bits of the whole matrix). The
// AVX-512 path (16 lanes), the AVX2 path (two vectors of 8) and the scalar loop (std::fma)
// follow that same order, so they agree bit for bit too.
//
// Work: rows are taken four at a time (one task of at::parallel_for, OpenMP); a task converts
// its four rows' codes to float32 once (4 x K floats, in L1) and then runs every
// batch row against them, four batch rows at a time: 16 accumulators, 8 loads per 16 FMAs.
// A tail of fewer than four matrix rows is run with zero rows in the spare places (outputs
// dropped); a tail of batch rows by a narrower tile. Prior art: llama.cpp's ggml_vec_dot_q8_0_q8_0
// (it quantizes x to Q8_0 as well and multiplies in int8; here x stays float32).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;     // weights per block
constexpr int64_t kBytes = 34;     // f16 scale + 32 int8 codes
constexpr int64_t kLanes = 16;     // the accumulation's lanes (see above)
constexpr int kRows = 4;           // matrix rows per task
constexpr int kBatch = 4;          // batch rows per tile

inline float scale_of(const uint8_t* block) {
  uint16_t bits;
  std::memcpy(&bits, block, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Row `row`'s K weights as float32 (d * q, exact).
inline void decode_row(const uint8_t* row, int64_t K, float* w) {
  for (int64_t j = 0; j < K / kBlock; ++j) {
    const uint8_t* block = row + j * kBytes;
    const float d = scale_of(block);
#if defined(__AVX512F__)
    const __m512 vd = _mm512_set1_ps(d);
    for (int h = 0; h < 2; ++h) {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2 + 16 * h));
      _mm512_storeu_ps(w + j * kBlock + 16 * h, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), vd));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 vd = _mm256_set1_ps(d);
    for (int h = 0; h < 4; ++h) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 2 + 8 * h));
      _mm256_storeu_ps(w + j * kBlock + 8 * h, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), vd));
    }
#else
    for (int64_t i = 0; i < kBlock; ++i) w[j * kBlock + i] = d * static_cast<int8_t>(block[2 + i]);
#endif
  }
}

// The fixed tree over 16 lanes: halves added, 8 then 4, 2, 1.
inline float sum_lanes(float* v) {
  for (int width = 8; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) v[l] = v[l] + v[l + width];
  return v[0];
}

#if defined(__AVX512F__) || defined(__AVX2__) && defined(__FMA__)
// The last three levels of sum_lanes' tree over s8[l] = v[l] + v[l + 8].
inline float sum8(__m256 s8) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
#endif

#if defined(__AVX512F__)
struct Acc {
  __m512 v;
  void zero() { v = _mm512_setzero_ps(); }
  void fma(const float* x, const float* w) { v = _mm512_fmadd_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(w), v); }
  float sum() const {  // sum_lanes' tree, in vectors
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return sum8(_mm256_add_ps(lo, hi));
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Acc {
  __m256 lo, hi;
  void zero() { lo = hi = _mm256_setzero_ps(); }
  void fma(const float* x, const float* w) {
    lo = _mm256_fmadd_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(w), lo);
    hi = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), _mm256_loadu_ps(w + 8), hi);
  }
  float sum() const { return sum8(_mm256_add_ps(lo, hi)); }  // sum_lanes' tree, in vectors
};
#else
struct Acc {
  float v[kLanes];
  void zero() { for (float& a : v) a = 0.0f; }
  void fma(const float* x, const float* w) { for (int l = 0; l < kLanes; ++l) v[l] = std::fma(x[l], w[l], v[l]); }
  float sum() const {
    float lanes[kLanes];
    std::memcpy(lanes, v, sizeof lanes);
    return sum_lanes(lanes);
  }
};
#endif

// out[b, r] for the NB batch rows at x (stride K) and the kRows decoded rows at w (stride K).
template <int NB>
inline void tile(const float* x, const float* w, int64_t K, float* out, int64_t out_stride, int rows) {
  Acc acc[NB][kRows];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < kRows; ++r) acc[b][r].zero();
  for (int64_t k = 0; k < K; k += kLanes)
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < kRows; ++r) acc[b][r].fma(x + b * K + k, w + r * K + k);
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < rows; ++r) out[b * out_stride + r] = acc[b][r].sum();
}

torch::Tensor q8_0_linear(torch::Tensor x, torch::Tensor blocks, int64_t n) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 &&
                        x.is_contiguous(),
                    "q8_0_linear takes x as a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK_VALUE(blocks.device().is_cpu() && blocks.scalar_type() == torch::kUInt8 &&
                        blocks.dim() == 1 && blocks.is_contiguous(),
                    "q8_0_linear takes the blocks as a contiguous 1-D uint8 CPU tensor");
  const int64_t B = x.size(0), K = x.size(1);
  TORCH_CHECK_VALUE(K % kBlock == 0, "q8_0_linear needs K a multiple of 32, not ", K);
  TORCH_CHECK_VALUE(n >= 0 && blocks.numel() == n * (K / kBlock) * kBytes, "blocks of ",
                    blocks.numel(), " bytes are not ", n, " rows of ", K / kBlock, " Q8_0 blocks (",
                    n * (K / kBlock) * kBytes, " bytes)");
  auto out = torch::empty({B, n}, x.options());
  if (B == 0 || n == 0) return out;
  const float* xp = x.data_ptr<float>();
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t row_bytes = K / kBlock * kBytes;
  const int64_t tasks = (n + kRows - 1) / kRows;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> decoded(kRows * K);  // this thread's kRows rows as float32
    float* w = decoded.data();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * kRows;
      const int rows = static_cast<int>(std::min<int64_t>(kRows, n - r0));
      for (int r = 0; r < kRows; ++r) {
        if (r < rows) decode_row(bp + (r0 + r) * row_bytes, K, w + r * K);
        else std::memset(w + r * K, 0, K * sizeof(float));
      }
      int64_t b = 0;
      for (; b + kBatch <= B; b += kBatch) tile<kBatch>(xp + b * K, w, K, op + b * n + r0, n, rows);
      switch (B - b) {
        case 3: tile<3>(xp + b * K, w, K, op + b * n + r0, n, rows); break;
        case 2: tile<2>(xp + b * K, w, K, op + b * n + r0, n, rows); break;
        case 1: tile<1>(xp + b * K, w, K, op + b * n + r0, n, rows); break;
        default: break;
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q8_0_linear", &q8_0_linear,
        "x float32 [B, K] times the n x K matrix of Q8_0 `blocks`, transposed: float32 [B, n]",
        pybind11::arg("x"), pybind11::arg("blocks"), pybind11::arg("n"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
