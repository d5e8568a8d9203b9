// GGUF Q8_0 blocks expanded to bfloat16, in place: the LM head streamed from flash at 8.5 bits a
// weight and multiplied in bfloat16.
//
// A Q8_0 block (llama.cpp `block_q8_0`) is 34 bytes: an IEEE half scale d, then 32 int8 codes q;
// its weights are w = d * q. Block b of a buffer holding n blocks back to back sits at bytes
// [34b, 34b + 34); its 32 bfloat16 weights are written to [64b, 64b + 64) of the same buffer,
// which must hold 64n bytes. Walking the blocks from the last to the first makes that safe:
// block b's output overlaps only input blocks c >= b (34c + 34 > 64b gives c > 64b/34 - 1 >=
// b - 1), which are already read, its own included (its loads precede its stores). So the
// expansion needs no scratch beyond the buffer the read landed in, and runs on one thread (the
// order is the whole argument; splitting the range over threads would break it).
//
// Values: d * q is exact in float32 (an 11-bit significand times an 8-bit integer, far above
// float32's subnormals), and it is rounded to bfloat16 to nearest even, exactly as
// `torch.Tensor.to(torch.bfloat16)` rounds the float32 product that QuantWeight.dequantize()
// computes; so the result is bit for bit the bfloat16 head the resident engine holds, for every
// finite scale (a NaN or infinite scale gives a NaN weight, whose bits may differ).
//
// AVX-512 (F + BW): a block is two vectors of 16 codes widened to int32 and float, one multiply
// each, the rounding in integer arithmetic, narrowed to 16 bits and stored as one 64-byte
// vector: ~0.1 ms per 2 MiB of output on one core (AVX2: four vectors of 8, about as fast; other
// targets: a scalar loop). Prior art: llama.cpp's dequantize_row_q8_0 (out of place, float32).
// GCC's vector extensions (simd.h) are not used here: GCC 12 widens int8 vectors lane by lane
// through general registers, six times slower than the intrinsics.
#include <torch/extension.h>

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) || defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;        // weights per block
constexpr int64_t kInBytes = 34;      // f16 scale + 32 int8 codes
constexpr int64_t kOutBytes = 64;     // 32 bfloat16

// float32 -> bfloat16 bits, round to nearest even (c10::BFloat16's rounding, NaN aside).
inline uint16_t round_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

inline float scale_of(const uint8_t* in) {
  uint16_t bits;
  std::memcpy(&bits, in, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
inline __m256i round_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i sum = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(sum, 16));
}

inline __m512 widen(const uint8_t* codes, __m512 d) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d);
}

inline void expand_block(const uint8_t* in, uint8_t* out) {
  const __m512 d = _mm512_set1_ps(scale_of(in));
  const __m512 w0 = widen(in + 2, d), w1 = widen(in + 18, d);  // both loads before the store
  const __m512i h = _mm512_inserti64x4(_mm512_castsi256_si512(round_bf16(w0)), round_bf16(w1), 1);
  _mm512_storeu_si512(out, h);
}
#elif defined(__AVX2__) && defined(__F16C__)
inline __m256i round_bf16(__m256 x) {  // the bfloat16 bits in the low half of each lane
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i sum = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
  return _mm256_srli_epi32(sum, 16);
}

inline void expand_block(const uint8_t* in, uint8_t* out) {
  const __m256 d = _mm256_set1_ps(scale_of(in));
  __m256i h[4];
  for (int j = 0; j < 4; ++j) {  // every load before the first store
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + 2 + 8 * j));
    h[j] = round_bf16(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d));
  }
  // packus interleaves the 128-bit halves ([a0 b0 a1 b1]); the permute restores the order
  const __m256i lo = _mm256_permute4x64_epi64(_mm256_packus_epi32(h[0], h[1]), 0xD8);
  const __m256i hi = _mm256_permute4x64_epi64(_mm256_packus_epi32(h[2], h[3]), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), lo);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32), hi);
}
#else
inline void expand_block(const uint8_t* in, uint8_t* out) {
  const float d = scale_of(in);
  uint16_t h[kBlock];
  for (int64_t i = 0; i < kBlock; ++i) h[i] = round_bf16(d * static_cast<int8_t>(in[2 + i]));
  std::memcpy(out, h, sizeof h);
}
#endif

void q8_0_to_bf16_inplace(torch::Tensor buffer, int64_t blocks) {
  TORCH_CHECK_VALUE(buffer.device().is_cpu() && buffer.scalar_type() == torch::kUInt8 &&
                        buffer.dim() == 1 && buffer.is_contiguous(),
                    "q8_0_to_bf16_inplace takes a contiguous 1-D uint8 CPU tensor");
  TORCH_CHECK_VALUE(blocks >= 0 && blocks * kOutBytes <= buffer.numel(), "a buffer of ",
                    buffer.numel(), " bytes cannot hold the bfloat16 form of ", blocks,
                    " Q8_0 blocks (", blocks * kOutBytes, " bytes)");
  uint8_t* base = buffer.data_ptr<uint8_t>();
  for (int64_t b = blocks - 1; b >= 0; --b) expand_block(base + b * kInBytes, base + b * kOutBytes);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q8_0_to_bf16_inplace", &q8_0_to_bf16_inplace,
        "expand `blocks` Q8_0 blocks at the start of a uint8 buffer to bfloat16, in place",
        pybind11::arg("buffer"), pybind11::arg("blocks"),
        pybind11::call_guard<pybind11::gil_scoped_release>());  // the I/O threads keep running
}
