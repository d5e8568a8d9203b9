// Float vectors of the target's native width as GCC vector extensions: plain C++ arithmetic on
// whole vectors, lowered to single instructions because the width matches the registers that
// -march allows (16 lanes with AVX-512, 8 with AVX, 4 otherwise: SSE, NEON). Wider-than-native
// vectors would be split, and GCC moves their scalar broadcasts through the stack. Unaligned
// loads and stores, bfloat16 widening, the horizontal sums of four vectors at once, and e^x.
// Used by paged_attention_cpu.cpp; nothing here knows about tensors. Needs GCC >= 12 or Clang
// (__builtin_shufflevector).
#pragma once

#include <cstdint>
#include <cstring>

namespace kvmm_simd {

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#elif defined(__AVX__)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif

typedef float vfloat __attribute__((vector_size(kLanes * 4)));
typedef int32_t vint __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vuint __attribute__((vector_size(kLanes * 4)));
typedef uint16_t vhalf __attribute__((vector_size(kLanes * 2)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

inline vfloat vbroadcast(float x) { return vfloat{} + x; }

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vfloat vload(const uint16_t* p) {  // bfloat16 widened: its bits are the float's top half
  vhalf h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<vfloat>(__builtin_convertvector(h, vuint) << 16);
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

// The four horizontal sums of a, b, c, d in one vector: a shuffle tree that halves the lanes
// of two vectors at a time, about four operations a sum instead of log2(kLanes) + 1 each.
inline vf4 sum4(vfloat a, vfloat b, vfloat c, vfloat d) {
#if defined(__AVX512F__)
  const vfloat ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20,
                                            21, 22, 23) +
                    __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27,
                                            28, 29, 30, 31);
  const vfloat cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20,
                                            21, 22, 23) +
                    __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27,
                                            28, 29, 30, 31);
  // [a, b, c, d] by 4 lanes each
  const vfloat abcd = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19,
                                              24, 25, 26, 27) +
                      __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22,
                                              23, 28, 29, 30, 31);
  const vf8 pairs = __builtin_shufflevector(abcd, abcd, 0, 1, 4, 5, 8, 9, 12, 13) +
                    __builtin_shufflevector(abcd, abcd, 2, 3, 6, 7, 10, 11, 14, 15);
#elif defined(__AVX__)
  const vfloat ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
                    __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  const vfloat cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 8, 9, 10, 11) +
                    __builtin_shufflevector(c, d, 4, 5, 6, 7, 12, 13, 14, 15);
  const vf8 pairs = __builtin_shufflevector(ab, cd, 0, 1, 4, 5, 8, 9, 12, 13) +
                    __builtin_shufflevector(ab, cd, 2, 3, 6, 7, 10, 11, 14, 15);
#else
  const vfloat ab = __builtin_shufflevector(a, b, 0, 1, 4, 5) +
                    __builtin_shufflevector(a, b, 2, 3, 6, 7);
  const vfloat cd = __builtin_shufflevector(c, d, 0, 1, 4, 5) +
                    __builtin_shufflevector(c, d, 2, 3, 6, 7);
  const vf8 pairs = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 4, 5, 6, 7);
#endif
  // [a, b, c, d] by 2 lanes each
  return __builtin_shufflevector(pairs, pairs, 0, 2, 4, 6) +
         __builtin_shufflevector(pairs, pairs, 1, 3, 5, 7);
}

inline float hsum(vfloat v) { return sum4(v, vfloat{}, vfloat{}, vfloat{})[0]; }

inline float hmax(vfloat v) {
  float top = v[0];
  for (int64_t i = 1; i < kLanes; ++i) top = v[i] > top ? v[i] : top;
  return top;
}

// e^x lane by lane for x <= 88: 2^n * e^r with n = round(x / ln 2) (by the 1.5 * 2^23
// rounding trick, which also yields n's integer bits), |r| <= ln(2) / 2, e^r by its degree-7
// Taylor polynomial (truncation error < 1e-8 relative). Inputs below -87 give ~1e-38, not 0.
inline vfloat vexp(vfloat x) {
  const vfloat lo = vbroadcast(-87.0f), hi = vbroadcast(88.0f), magic = vbroadcast(12582912.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vfloat t = x * 1.44269504088896341f + magic;
  const vfloat n = t - magic;
  const vfloat r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 split in two parts
  vfloat p = vbroadcast(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vint e = (reinterpret_cast<vint>(t) - reinterpret_cast<vint>(magic) + 127) << 23;
  return p * reinterpret_cast<vfloat>(e);
}

}  // namespace kvmm_simd
