// Paged-attention decode and the KV write for CPU tensors, reading the cache in place.
//
// Decode: one work unit is (sequence, context split) and covers all of the sequence's heads.
// A unit first turns its token range into the offsets of each token's K and V row (all KV
// heads) through the block table (no gather copy), then walks it in chunks of kChunk tokens
// (8 blocks of 16). Within a chunk, KV head by KV head: the scores of the head's group of
// query heads against the chunk's K rows (GQA: each K/V row is read once per group), one
// online-softmax step in float32 that rescales the group's running max/sum/accumulator, and
// the accumulation of the V rows. A chunk's rows come from memory with the first head's
// passes and stay in L2 for the others. (Units of one (sequence, KV head), as before, streamed
// a sequence's whole context once per KV head; past what L2 holds, the same rows came from
// memory again for each head, whose lines the stream prefetcher had likely fetched already:
// batch 8 x context 2048 took 2.75 ms then, 2.15 ms now, on the compact copy.)
//
// Memory-level parallelism: a block is one short run of memory (24 KiB of K and V per layer
// for SmolLM2), and the hardware stream prefetcher starts over at each run, so reading a
// sequence's blocks one after another loses against the same bytes in order, where the
// stream runs on from block to block (a C scan of 8 layers of 512 such runs, 1 thread, load
// ~5: 12 GB/s scattered, 15-20 GB/s in order). The kernel therefore takes a chunk's 4-token
// tiles from kWays evenly spaced parts of it in turn (attention does not depend on the order
// of its keys), so kWays streams, each about two blocks long, are in flight at once (the
// scan reading 4-8 runs at a time: 15 GB/s scattered). On top of the hardware streams, K rows are
// prefetched kPrefetch tokens ahead (in the tiles' order) into L1 and each tile's V rows into
// L2 during the score pass, V rows kPrefetch ahead into L1 during the accumulation.
// `kvmm bench decode --attention-only` measures paged against the same data in order.
// Splits exist only for parallelism (batch 1-2 has fewer sequences than threads can share
// evenly); the partial results of a unit's splits are merged by their log-sum-exp afterwards,
// as in vLLM's paged_attention_v2 / flash-decoding.
//
// The inner loops run over head_dim in GCC vector types of the target's width (simd.h: 16
// floats with AVX-512, as -march=native gives here), rows taken 4 tokens at a time: one query
// load serves four K rows, the four dot products are reduced together by one shuffle tree, and
// one accumulator load/store serves four V rows. exp is a branch-free polynomial on whole
// vectors (libm's expf does not vectorize without -ffast-math), accurate to a few ulps.
//
// Caches are [num_blocks, block_size, num_kv_heads, head_dim] with the three inner dims
// contiguous and any block stride (per-layer views of the KV arena, kvmm_daemon/kv/
// kv_cache.py: block-major by default, so a layer's blocks lie 30 layers' worth apart);
// float32 or bfloat16 (bfloat16 rows are widened to float32 in a small tile buffer); head_dim
// a multiple of the vector width (the Python side sends only multiples of 16). The metadata
// is validated before any cache row is touched: a block id outside [0, num_blocks) inside a
// sequence's context raises ValueError, so -1 padding past a sequence's blocks is never
// dereferenced, whatever the caller checked.
//
// Prior art: vLLM's csrc/cpu attention kernels (which reshape K into a vector-friendly layout;
// here K keeps the engine's layout, since swapfs moves blocks byte for byte). Left out: float16
// (served by the torch path), prefill (SDPA over gathered blocks is compute-bound and BLAS-fast),
// quantized caches.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

using namespace kvmm_simd;

constexpr int64_t kTile = 4;            // tokens whose K (or V) rows are combined at once
constexpr int64_t kChunk = 128;         // tokens per online-softmax step, a multiple of kLanes
constexpr int64_t kWays = 4;            // memory streams a chunk's tiles are taken from in turn
constexpr int64_t kPrefetch = 32;       // tokens ahead whose rows are prefetched, a multiple of kTile
constexpr int64_t kMinSplitTokens = 64;  // a context split covers at least this many tokens
constexpr int64_t kMinTaskTokens = 512;  // a thread is woken for at least this many K/V rows
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float load_scalar(const float* p) { return *p; }
inline float load_scalar(const uint16_t* p) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(*p) << 16);
}
inline void store_scalar(float* p, float x) { *p = x; }
inline void store_scalar(uint16_t* p, float x) {
  *p = c10::BFloat16(x).x;  // round to nearest even, NaN kept
}

// Everything a decode unit reads; element offsets, T the storage type (float or uint16_t).
template <typename T>
struct DecodeArgs {
  const T* q;
  int64_t q_seq_stride, q_head_stride;
  const T* k;
  const T* v;
  int64_t k_block_stride, v_block_stride;
  const int32_t* tables;
  int64_t table_cols;
  const int32_t* lens;
  T* out;                  // [num_seqs, num_heads, head_dim], contiguous
  float* partial;          // [num_seqs * splits, num_heads, head_dim + 2] when splits > 1
  int64_t num_heads, kv_heads, head_dim, block_size, group, splits;
  float scale;
};

// Per-thread buffers of a decode unit: the query, scores, running max/sum and accumulator of
// every query head, a bfloat16 tile widened, and the row offsets of the unit's tokens.
struct Scratch {
  std::vector<float> q, scores, acc, m, l, tile;
  std::vector<int64_t> k_rows, v_rows;
  Scratch(int64_t heads, int64_t head_dim)
      : q(heads * head_dim), scores(heads * kChunk), acc(heads * head_dim), m(heads), l(heads),
        tile(kTile * head_dim) {}
};

// Issues a prefetch of the kTile rows at rows[0..kTile) of base (element offsets), each
// `bytes` long, into L1 (kLocality 3) or L2 (kLocality 2).
template <int kLocality, typename T>
inline void prefetch_rows(const T* base, const int64_t* rows, int64_t bytes) {
  for (int64_t t = 0; t < kTile; ++t) {
    const char* p = reinterpret_cast<const char*>(base + rows[t]);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, kLocality);
  }
}

// Pointers to the float32 rows of tokens rows[0..kTile): float rows where they lie, bfloat16
// rows widened into buf.
inline void tile_rows(const float* base, const int64_t* rows, float*, int64_t,
                      const float* out[kTile]) {
  for (int64_t t = 0; t < kTile; ++t) out[t] = base + rows[t];
}
inline void tile_rows(const uint16_t* base, const int64_t* rows, float* buf, int64_t D,
                      const float* out[kTile]) {
  for (int64_t t = 0; t < kTile; ++t) {
    for (int64_t j = 0; j < D; j += kLanes) vstore(buf + t * D + j, vload(base + rows[t] + j));
    out[t] = buf + t * D;
  }
}

// Reorders each chunk's whole tiles so that tile after tile comes from kWays evenly spaced
// parts of the chunk in turn (a chunk of 32 tiles: 0, 8, 16, 24, 1, 9, ...); a partial last
// tile stays last, where the score pass masks it. tmp holds kChunk offsets.
inline void interleave_tiles(int64_t* rows, int64_t n_all, int64_t* tmp) {
  for (int64_t c0 = 0; c0 < n_all; c0 += kChunk) {
    const int64_t tiles = std::min(kChunk, n_all - c0) / kTile;
    const int64_t per_way = (tiles + kWays - 1) / kWays;
    int64_t at = 0;
    for (int64_t r = 0; r < per_way; ++r) {
      for (int64_t way = 0; way < kWays; ++way) {
        const int64_t tile = way * per_way + r;
        if (tile >= tiles) continue;
        std::memcpy(tmp + at, rows + c0 + tile * kTile, kTile * sizeof(int64_t));
        at += kTile;
      }
    }
    std::memcpy(rows + c0, tmp, at * sizeof(int64_t));
  }
}

// The K and V row offsets (all KV heads) of sequence s's tokens [t0, t1), n = t1 - t0 of
// them, in the order the chunks read them.
template <typename T>
void fill_rows(const DecodeArgs<T>& a, int64_t s, int64_t t0, int64_t n, int64_t* k_rows,
               int64_t* v_rows) {
  const int64_t bs = a.block_size, row_stride = a.kv_heads * a.head_dim;
  const int32_t* table = a.tables + s * a.table_cols;
  int64_t col = t0 / bs, slot = t0 % bs;
  for (int64_t i = 0; i < n;) {
    const int64_t block = table[col];
    const int64_t k_base = block * a.k_block_stride, v_base = block * a.v_block_stride;
    for (; slot < bs && i < n; ++slot, ++i) {
      k_rows[i] = k_base + slot * row_stride;
      v_rows[i] = v_base + slot * row_stride;
    }
    slot = 0;
    ++col;
  }
  int64_t tmp[kChunk];
  interleave_tiles(k_rows, n, tmp);
  interleave_tiles(v_rows, n, tmp);
}

// A unit's row offsets (fill_rows) in w.k_rows / w.v_rows, followed by kTile repeats of the
// last (a partial last tile reads them) and then the first kPrefetch rows of the unit the
// thread runs next, tokens [n0, n1) of sequence ns (ns < 0: none; the last row repeats), so
// that the prefetches of the last chunk, kPrefetch tokens ahead, start on the next unit's
// blocks instead of idling.
template <typename T>
void row_offsets(const DecodeArgs<T>& a, int64_t s, int64_t t0, int64_t t1, int64_t ns,
                 int64_t n0, int64_t n1, Scratch& w) {
  const int64_t n_all = t1 - t0, size = n_all + kTile + kChunk;
  if (static_cast<int64_t>(w.k_rows.size()) < size) {
    w.k_rows.resize(size);
    w.v_rows.resize(size);
  }
  int64_t* k_rows = w.k_rows.data();
  int64_t* v_rows = w.v_rows.data();
  fill_rows(a, s, t0, n_all, k_rows, v_rows);
  for (int64_t i = n_all; i < n_all + kTile; ++i) {
    k_rows[i] = k_rows[n_all - 1];
    v_rows[i] = v_rows[n_all - 1];
  }
  const int64_t ahead = n_all + kTile;
  int64_t filled = 0;
  if (ns >= 0 && n1 > n0) {
    filled = std::min(kChunk, n1 - n0);
    fill_rows(a, ns, n0, filled, k_rows + ahead, v_rows + ahead);
  }
  for (int64_t i = ahead + filled; i < ahead + kPrefetch; ++i) {
    k_rows[i] = k_rows[i - 1];
    v_rows[i] = v_rows[i - 1];
  }
}

// One online-softmax step of query head g over the scores sg[0..n) of a chunk: leaves
// exp(score - new max) in sg (0 past n, up to `padded`) and rescales l, m and acc.
inline void softmax_step(float* sg, int64_t n, int64_t padded, float& m, float& l, float* acc,
                         int64_t D) {
  for (int64_t i = n; i < padded; ++i) sg[i] = kNegInf;
  vfloat top = vbroadcast(kNegInf);
  for (int64_t i = 0; i < padded; i += kLanes) {
    const vfloat x = vload(sg + i);
    top = x > top ? x : top;
  }
  const float m_new = std::max(m, hmax(top));
  const float alpha = m == kNegInf ? 0.0f : std::exp(m - m_new);
  const vfloat shift = vbroadcast(m_new);
  for (int64_t i = 0; i < padded; i += kLanes) vstore(sg + i, vexp(vload(sg + i) - shift));
  for (int64_t i = n; i < padded; ++i) sg[i] = 0.0f;
  vfloat sum{};
  for (int64_t i = 0; i < padded; i += kLanes) sum += vload(sg + i);
  l = l * alpha + hsum(sum);
  m = m_new;
  if (alpha != 1.0f) {
    for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
  }
}

// Attention of all query heads of sequence s over tokens [t0, t1): leaves per query head
// the running max in m, the sum of exp(score - max) in l and the unnormalized output in acc.
// kD is head_dim when it is a compile-time constant, else 0; head_dim is a multiple of kLanes.
template <typename T, int kD>
void attend(const DecodeArgs<T>& a, int64_t s, int64_t t0, int64_t t1, int64_t ns, int64_t n0,
            int64_t n1, Scratch& w) {
  const int64_t D = kD > 0 ? kD : a.head_dim;
  const int64_t G = a.group, H = a.num_heads;
  float* __restrict qf = w.q.data();
  float* __restrict sc = w.scores.data();
  float* __restrict acc = w.acc.data();
  for (int64_t h = 0; h < H; ++h) {
    const T* src = a.q + s * a.q_seq_stride + h * a.q_head_stride;
    for (int64_t d = 0; d < D; ++d) qf[h * D + d] = load_scalar(src + d) * a.scale;
  }
  std::fill(acc, acc + H * D, 0.0f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  row_offsets(a, s, t0, t1, ns, n0, n1, w);
  const int64_t n_all = t1 - t0, row_bytes = D * static_cast<int64_t>(sizeof(T));
  const float* rows[kTile];
  for (int64_t c0 = 0; c0 < n_all; c0 += kChunk) {
    const int64_t n = std::min(kChunk, n_all - c0);
    const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
    const int64_t* k_rows = w.k_rows.data() + c0;
    const int64_t* v_rows = w.v_rows.data() + c0;
    for (int64_t kv = 0; kv < a.kv_heads; ++kv) {
      const T* k = a.k + kv * D;        // the head's rows begin kv * D into each token's row
      const T* v = a.v + kv * D;
      const int64_t first = kv * G;     // its query heads: first .. first + G
      for (int64_t i = 0; i < n; i += kTile) {   // scores: q . k for the group, a tile at a time
        prefetch_rows<3>(k, k_rows + i + kPrefetch, row_bytes);
        prefetch_rows<2>(v, v_rows + i, row_bytes);
        tile_rows(k, k_rows + i, w.tile.data(), D, rows);
        for (int64_t g = first; g < first + G; ++g) {
          const float* qg = qf + g * D;
          vfloat s0{}, s1{}, s2{}, s3{};
          for (int64_t j = 0; j < D; j += kLanes) {
            const vfloat qj = vload(qg + j);
            s0 += qj * vload(rows[0] + j);
            s1 += qj * vload(rows[1] + j);
            s2 += qj * vload(rows[2] + j);
            s3 += qj * vload(rows[3] + j);
          }
          const vf4 dots = sum4(s0, s1, s2, s3);
          std::memcpy(sc + g * kChunk + i, &dots, sizeof dots);
        }
      }
      for (int64_t g = first; g < first + G; ++g) {
        softmax_step(sc + g * kChunk, n, padded, w.m[g], w.l[g], acc + g * D, D);
      }
      for (int64_t i = 0; i < n; i += kTile) {   // acc += p v, a tile of V rows at a time
        prefetch_rows<3>(v, v_rows + i + kPrefetch, row_bytes);
        tile_rows(v, v_rows + i, w.tile.data(), D, rows);
        for (int64_t g = first; g < first + G; ++g) {
          const float* pg = sc + g * kChunk + i;   // past n the weights are 0
          const vfloat p0 = vbroadcast(pg[0]), p1 = vbroadcast(pg[1]), p2 = vbroadcast(pg[2]),
                       p3 = vbroadcast(pg[3]);
          float* ag = acc + g * D;
          for (int64_t j = 0; j < D; j += kLanes) {
            vfloat x = vload(ag + j);
            x += p0 * vload(rows[0] + j);
            x += p1 * vload(rows[1] + j);
            x += p2 * vload(rows[2] + j);
            x += p3 * vload(rows[3] + j);
            vstore(ag + j, x);
          }
        }
      }
    }
  }
}

template <typename T, int kD>
void decode_units(const DecodeArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t D = kD > 0 ? kD : a.head_dim, H = a.num_heads;
  Scratch w(H, D);
  auto range = [&](int64_t unit, int64_t& s, int64_t& t0, int64_t& t1) {
    const int64_t part = unit % a.splits, len = a.lens[unit / a.splits];
    s = unit / a.splits;
    t0 = len * part / a.splits;
    t1 = len * (part + 1) / a.splits;
  };
  for (int64_t unit = begin; unit < end; ++unit) {
    int64_t s, t0, t1, ns = -1, n0 = 0, n1 = 0;
    range(unit, s, t0, t1);
    if (t0 == t1) {                      // an empty split (context shorter than splits)
      float* dst = a.partial + unit * H * (D + 2);
      for (int64_t h = 0; h < H; ++h, dst += D + 2) dst[D + 1] = 0.0f;
      continue;
    }
    if (unit + 1 < end) range(unit + 1, ns, n0, n1);
    attend<T, kD>(a, s, t0, t1, ns, n0, n1, w);
    if (a.splits == 1) {
      for (int64_t h = 0; h < H; ++h) {
        const float inv = 1.0f / w.l[h];
        T* out = a.out + (s * H + h) * D;
        for (int64_t d = 0; d < D; ++d) store_scalar(out + d, w.acc[h * D + d] * inv);
      }
    } else {
      float* dst = a.partial + unit * H * (D + 2);
      for (int64_t h = 0; h < H; ++h, dst += D + 2) {
        std::copy(w.acc.begin() + h * D, w.acc.begin() + (h + 1) * D, dst);
        dst[D] = w.m[h];
        dst[D + 1] = w.l[h];
      }
    }
  }
}

// Merges the splits of sequences [begin, end) into the output.
template <typename T>
void merge_splits(const DecodeArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t D = a.head_dim, H = a.num_heads, S = a.splits, width = H * (D + 2);
  std::vector<float> acc(D);
  for (int64_t s = begin; s < end; ++s) {
    const float* first = a.partial + s * S * width;
    for (int64_t h = 0; h < H; ++h) {
      float top = kNegInf;
      for (int64_t p = 0; p < S; ++p) {
        const float* part = first + p * width + h * (D + 2);
        if (part[D + 1] != 0.0f) top = std::max(top, part[D]);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float total = 0.0f;
      for (int64_t p = 0; p < S; ++p) {
        const float* part = first + p * width + h * (D + 2);
        if (part[D + 1] == 0.0f) continue;   // an empty split
        const float weight = std::exp(part[D] - top);
        total += weight * part[D + 1];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += weight * part[d];
      }
      const float inv = 1.0f / total;
      T* dst = a.out + (s * H + h) * D;
      for (int64_t d = 0; d < D; ++d) store_scalar(dst + d, acc[d] * inv);
    }
  }
}

// Context splits per sequence: enough units to share evenly among the threads, none shorter
// than kMinSplitTokens; none when the whole call (`rows` K rows of one head each) is one
// task's worth (kMinTaskTokens) or less, too small to wake a second thread.
int64_t choose_splits(int64_t seqs, int64_t longest, int64_t rows) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t most =
      rows <= kMinTaskTokens ? 1 : std::max<int64_t>(1, longest / kMinSplitTokens);
  int64_t splits = 1;
  while (splits < most && threads > 1 &&
         (seqs * splits < 4 * threads || (seqs * splits) % threads != 0)) {
    ++splits;
  }
  return splits;
}

[[noreturn]] void bad_metadata(const std::string& what) {
  throw pybind11::value_error("paged_attention_decode: " + what);
}

// Every block a sequence's context touches is a block id; returns the longest context and
// adds every context's length to total.
int64_t validate_metadata(const int32_t* tables, int64_t cols, const int32_t* lens,
                          int64_t num_seqs, int64_t num_blocks, int64_t block_size,
                          int64_t& total) {
  int64_t longest = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t len = lens[s];
    if (len < 1) {
      bad_metadata("seq_lens[" + std::to_string(s) + "] = " + std::to_string(len) + " < 1");
    }
    const int64_t needed = (len + block_size - 1) / block_size;
    if (needed > cols) {
      bad_metadata("sequence " + std::to_string(s) + " needs " + std::to_string(needed) +
                   " blocks but block_tables has " + std::to_string(cols) + " columns");
    }
    for (int64_t c = 0; c < needed; ++c) {
      const int32_t id = tables[s * cols + c];
      if (id < 0 || id >= num_blocks) {
        bad_metadata("block_tables[" + std::to_string(s) + ", " + std::to_string(c) + "] = " +
                     std::to_string(id) + " is not a block id");
      }
    }
    longest = std::max(longest, len);
    total += len;
  }
  return longest;
}

void check_cache(const torch::Tensor& c, const char* name) {
  TORCH_CHECK(c.dim() == 4 && c.device().is_cpu(), name, " must be a 4-d CPU tensor");
  const int64_t block_size = c.size(1), kv_heads = c.size(2), head_dim = c.size(3);
  TORCH_CHECK((block_size == 1 || c.stride(1) == kv_heads * head_dim) &&
                  (kv_heads == 1 || c.stride(2) == head_dim) && c.stride(3) == 1,
              name, " must be contiguous in its inner three dims");
}

template <typename T>
void run_decode(DecodeArgs<T>& a, int64_t num_seqs, int64_t longest, int64_t total) {
  const int64_t rows = total * a.kv_heads;
  a.splits = choose_splits(num_seqs, longest, rows);
  // units per task such that a small call stays on the calling thread (waking the others
  // costs more than a few hundred rows)
  const int64_t units = num_seqs * a.splits;
  const int64_t grain = std::max<int64_t>(1, kMinTaskTokens / std::max<int64_t>(1, rows / units));
  torch::Tensor partial;
  if (a.splits > 1) {
    partial = torch::empty({units * a.num_heads * (a.head_dim + 2)}, torch::kFloat32);
    a.partial = partial.data_ptr<float>();
  }
  auto body = [&](int64_t begin, int64_t end) {
    switch (a.head_dim) {
      case 64: decode_units<T, 64>(a, begin, end); break;
      case 128: decode_units<T, 128>(a, begin, end); break;
      default: decode_units<T, 0>(a, begin, end); break;
    }
  };
  at::parallel_for(0, units, grain, body);
  if (a.splits > 1) merge_splits<T>(a, 0, num_seqs);  // H * D * splits flops a sequence: no threads
}

torch::Tensor paged_attention_decode(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor seq_lens, double scale) {
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "k_cache and v_cache differ in shape or dtype");
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16,
              "the native kernel serves float32 and bfloat16 caches, not ", dtype);
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == dtype && q.device().is_cpu(),
              "q must be a 3-d CPU tensor of the cache dtype");
  TORCH_CHECK(k_cache.size(3) % kLanes == 0, "the native kernel needs head_dim a multiple of ",
              kLanes, ", not ", k_cache.size(3));
  if (q.stride(2) != 1) q = q.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && block_tables.device().is_cpu() &&
                  seq_lens.scalar_type() == torch::kInt32 && seq_lens.device().is_cpu(),
              "block_tables and seq_lens must be int32 CPU tensors");
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  const int64_t kv_heads = k_cache.size(2);
  TORCH_CHECK(head_dim == k_cache.size(3) && num_heads % kv_heads == 0 &&
                  block_tables.dim() == 2 && block_tables.size(0) == num_seqs &&
                  seq_lens.dim() == 1 && seq_lens.size(0) == num_seqs,
              "q, block_tables and seq_lens do not match the cache");
  auto out = torch::empty({num_seqs, num_heads, head_dim}, q.options());
  if (num_seqs == 0) return out;
  int64_t total = 0;
  const int64_t longest = validate_metadata(block_tables.data_ptr<int32_t>(), block_tables.size(1),
                                            seq_lens.data_ptr<int32_t>(), num_seqs, num_blocks,
                                            block_size, total);
  auto fill = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    DecodeArgs<T> a{};
    a.q = static_cast<const T*>(q.data_ptr());
    a.q_seq_stride = q.stride(0);
    a.q_head_stride = q.stride(1);
    a.k = static_cast<const T*>(k_cache.data_ptr());
    a.v = static_cast<const T*>(v_cache.data_ptr());
    a.k_block_stride = k_cache.stride(0);
    a.v_block_stride = v_cache.stride(0);
    a.tables = block_tables.data_ptr<int32_t>();
    a.table_cols = block_tables.size(1);
    a.lens = seq_lens.data_ptr<int32_t>();
    a.out = static_cast<T*>(out.data_ptr());
    a.partial = nullptr;
    a.num_heads = num_heads;
    a.kv_heads = kv_heads;
    a.head_dim = head_dim;
    a.block_size = block_size;
    a.group = num_heads / kv_heads;
    a.splits = 1;
    a.scale = static_cast<float>(scale);
    run_decode<T>(a, num_seqs, longest, total);
  };
  if (dtype == torch::kFloat32) {
    fill(static_cast<float*>(nullptr));
  } else {
    fill(static_cast<uint16_t*>(nullptr));
  }
  return out;
}

// Copies token i's K and V rows to cache slot slot_mapping[i] (block slot / block_size, offset
// slot % block_size); slot -1 skips the token. Every slot is validated before anything is written.
void reshape_and_cache(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache,
                       torch::Tensor v_cache, torch::Tensor slot_mapping) {
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  const int64_t num_tokens = k.size(0), block_size = k_cache.size(1);
  const int64_t row = k_cache.size(2) * k_cache.size(3);
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(1) * k.size(2) == row &&
                  k.device().is_cpu() && v.device().is_cpu() && slot_mapping.device().is_cpu() &&
                  k.scalar_type() == k_cache.scalar_type() &&
                  v.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "k, v must be [num_tokens, num_kv_heads, head_dim] of the cache dtype");
  auto rows_contiguous = [](const torch::Tensor& t) {
    return (t.size(2) == 1 || t.stride(2) == 1) && (t.size(1) == 1 || t.stride(1) == t.size(2));
  };
  if (!rows_contiguous(k)) k = k.contiguous();
  if (!rows_contiguous(v)) v = v.contiguous();
  slot_mapping = slot_mapping.to(torch::kInt64).contiguous();
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == num_tokens,
              "slot_mapping must hold one slot per token");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * block_size;
  for (int64_t i = 0; i < num_tokens; ++i) {
    if (slots[i] < -1 || slots[i] >= num_slots) {
      throw pybind11::value_error("reshape_and_cache: slot_mapping[" + std::to_string(i) + "] = " +
                                  std::to_string(slots[i]) + " is outside [-1, " +
                                  std::to_string(num_slots) + ")");
    }
  }
  const int64_t bytes = row * static_cast<int64_t>(k.element_size());
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* ks = static_cast<const char*>(k.data_ptr());
  const auto* vs = static_cast<const char*>(v.data_ptr());
  const int64_t esize = k.element_size();
  for (int64_t i = 0; i < num_tokens; ++i) {
    if (slots[i] < 0) continue;
    const int64_t block = slots[i] / block_size, offset = slots[i] % block_size;
    std::memcpy(kc + (block * k_cache.stride(0) + offset * row) * esize,
                ks + i * k.stride(0) * esize, bytes);
    std::memcpy(vc + (block * v_cache.stride(0) + offset * row) * esize,
                vs + i * v.stride(0) * esize, bytes);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kvmm paged attention for CPU tensors (decode, KV write), reading blocks in place";
  // The GIL is released while a kernel runs, as torch's own operators do.
  m.def("paged_attention_decode", &paged_attention_decode,
        "decode attention over a paged KV cache (float32 / bfloat16)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("reshape_and_cache", &reshape_and_cache, "write K/V rows into their cache slots",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("decode_splits", &choose_splits,
        "context splits per sequence for (sequences, longest context, K rows of one head in all)");
}
