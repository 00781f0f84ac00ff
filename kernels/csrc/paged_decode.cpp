// Decode attention for the CPU, read in place from the paged KV cache: one query per sequence.
//
// Built at run time by kernels/cpu_decode.py (the host's C++ compiler, -O3 -march=native -fopenmp) and called
// through ctypes, so it needs no torch headers. Each task is one sequence (or, when there are too few sequences to
// keep every thread busy, a range of its KV heads). A task walks its sequence's blocks once, in table order, and
// for each block and KV head updates an online softmax (running maximum m, running sum l, unnormalised output
// acc) for the head's G = heads / kv_heads queries. So every key and value is read once, straight from its block,
// a block's rows one after another, and nothing is gathered or padded. Arithmetic is float32 whatever the cache
// holds.
//
// Layouts (all contiguous): q and out [seqs, heads, dim]; caches [blocks, block_size, kv_heads, dim];
// block_tables [seqs, table_width] int64; context_lens [seqs] int64. The query of sequence s sits at position
// context_lens[s] - 1 and sees keys max(0, context_lens[s] - window) .. context_lens[s] - 1 (window 0: all).

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Conversions written with integer operations only, so that loops over them vectorise.
inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }
inline float to_float(f16 x) {
  // The half's exponent and mantissa shifted into a float's, then scaled by 2^112 (the exponent bias difference):
  // exact for normal and subnormal halves. Infinities and NaNs keep an all-ones exponent.
  const uint32_t magnitude = uint32_t(x.bits & 0x7fffu) << 13;
  uint32_t u = float_to_bits(bits_to_float(magnitude) * 0x1p112f);
  if ((x.bits & 0x7c00u) == 0x7c00u) u = magnitude | 0x7f800000u;
  return bits_to_float(u | (uint32_t(x.bits & 0x8000u) << 16));
}

inline void store(float& dst, float x) { dst = x; }
inline void store(bf16& dst, float x) {  // round to nearest even, as torch converts
  const uint32_t u = float_to_bits(x);
  dst.bits = std::isnan(x) ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline void store(f16& dst, float x) {  // round to nearest even; overflow to infinity, as torch converts
  const uint32_t u = float_to_bits(x);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const float a = std::fabs(x);
  if (std::isnan(x)) {
    dst.bits = sign | 0x7e00u;
  } else if (a >= 65520.0f) {  // rounds past the largest half, 65504
    dst.bits = sign | 0x7c00u;
  } else if (a < 6.103515625e-05f) {  // subnormal half: a multiple of 2^-24, rounded to nearest even by the FPU
    dst.bits = sign | uint16_t(std::nearbyint(a * 0x1p24f));
  } else {
    const uint32_t m = float_to_bits(a);
    const uint32_t rounded = m + 0xfffu + ((m >> 13) & 1u);
    dst.bits = sign | uint16_t((rounded >> 13) - (112u << 10));
  }
}

// exp(x) for x <= 0, written so that the compiler vectorises loops over it: x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by Cephes' expf polynomial (within 2 ulp), times 2^n built in the exponent bits.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // exp(-87) ~ 1.6e-38, the smallest normal float's order; below it weights are ~0
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float(uint32_t(int32_t(n) + 127) << 23);
}

// One KV head's queries (qf [group, dim], pre-scaled) against n consecutive keys and values of one block (rows
// token_stride elements apart), folded into each query's online softmax state (m, l, acc).

// Any head size: plain loops the compiler vectorises along the head dimension.
template <typename T>
inline void attend_any(const float* qf, const T* keys, const T* values, int64_t n, int64_t token_stride,
                       int64_t group, int64_t dim, float* scores, float* acc, float* m, float* l) {
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = qf + g * dim;
    float* ag = acc + g * dim;
    float top = m[g];
    for (int64_t t = 0; t < n; ++t) {
      const T* key = keys + t * token_stride;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dim; ++d) dot += qg[d] * to_float(key[d]);
      scores[t] = dot;
      top = std::max(top, dot);
    }
    float sum = 0.0f;
    for (int64_t t = 0; t < n; ++t) {
      scores[t] = exp_nonpositive(scores[t] - top);
      sum += scores[t];
    }
    if (top > m[g]) {  // the maximum moved: rescale what was summed under the old one
      const float correction = std::isinf(m[g]) ? 0.0f : std::exp(m[g] - top);
      l[g] *= correction;
      for (int64_t d = 0; d < dim; ++d) ag[d] *= correction;
      m[g] = top;
    }
    l[g] += sum;
    for (int64_t t = 0; t < n; ++t) {
      const T* value = values + t * token_stride;
      const float p = scores[t];
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) ag[d] += p * to_float(value[d]);
    }
  }
}

#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
#define ATTNSERVE_VECTORS 1
// Head sizes that are multiples of 16, in 16-float vectors (GCC/clang vector extensions: one AVX-512 register, or
// two AVX2 ones): a head's query and accumulator stay in registers for a whole block.
typedef float v16 __attribute__((vector_size(64)));

typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

// 16 consecutive cache values as floats (the same conversions as to_float, on whole vectors).
inline v16 load16(const float* p) {
  v16 r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline v16i load16_bits(const void* p) {
  v16h h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, v16i);  // zero-extended
}
inline v16 load16(const bf16* p) { return (v16)(load16_bits(p) << 16); }
inline v16 load16(const f16* p) {
  const v16i bits = load16_bits(p);
  const v16i magnitude = (bits & 0x7fff) << 13;
  v16i u = (v16i)((v16)magnitude * 0x1p112f);
  u = (bits & 0x7c00) == 0x7c00 ? (magnitude | 0x7f800000) : u;
  return (v16)(u | ((bits & 0x8000) << 16));
}

// The 16 lane-sums of 16 vectors, as one vector: a transpose-and-add tree (45 vector operations where summing
// each vector's lanes one by one would take 16 dependent additions apiece). Each level adds pairs of vectors
// after interleaving them, halving the partial sums per row and doubling the rows per vector.
inline v16i lane_index() { return v16i{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }
inline v16 ones() { return v16{} + 1.0f; }

// exp_nonpositive, lane by lane. Rounding x / ln2 to the nearest integer: for y <= 0, -(int)(0.5 - y), as the
// conversion truncates and 0.5 - y > 0.
inline v16 exp16(v16 x) {
  const v16 floor_x = v16{} - 87.0f;
  x = x > floor_x ? x : floor_x;
  const v16i ni = -__builtin_convertvector(0.5f - x * 1.44269504088896341f, v16i);
  const v16 n = __builtin_convertvector(ni, v16);
  const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (v16)((ni + 127) << 23);
}

#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
inline v16 sum_lanes(const v16* v) {
  v16 w[8], z[4], y[2];
  for (int i = 0; i < 8; ++i) {
    w[i] = SHUFFLE(v[2 * i], v[2 * i + 1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           SHUFFLE(v[2 * i], v[2 * i + 1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  }
  for (int i = 0; i < 4; ++i) {
    z[i] = SHUFFLE(w[2 * i], w[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           SHUFFLE(w[2 * i], w[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    y[i] = SHUFFLE(z[2 * i], z[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           SHUFFLE(z[2 * i], z[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  }
  return SHUFFLE(y[0], y[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         SHUFFLE(y[0], y[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
#undef SHUFFLE

template <typename T, int DIM>
inline void attend_vec(const float* qf, const T* keys, const T* values, int64_t n, int64_t token_stride,
                       int64_t group, float* acc, float* m, float* l) {
  constexpr int C = DIM / 16;
  for (int64_t g = 0; g < group; ++g) {
    v16 qv[C], av[C];
    std::memcpy(qv, qf + g * DIM, sizeof qv);
    std::memcpy(av, acc + g * DIM, sizeof av);
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
      const int tn = int(std::min<int64_t>(16, n - t0));
      v16 parts[16];  // per key, its products summed per lane
      for (int t = 0; t < 16; ++t) {
        if (t < tn) {
          const T* key = keys + (t0 + t) * token_stride;
          v16 p = qv[0] * load16(key);
#pragma GCC unroll 16
          for (int c = 1; c < C; ++c) p += qv[c] * load16(key + 16 * c);
          parts[t] = p;
        } else {
          parts[t] = v16{};
        }
      }
      const v16 dots = sum_lanes(parts);
      float top = m[g];
      for (int t = 0; t < tn; ++t) top = std::max(top, dots[t]);
      // Lanes past the block's keys get a large negative argument, not dots - top: that could be large and
      // positive (every real score far below zero), and an overflowed exp times a zero mask would be NaN.
      const v16i real = lane_index() < tn;
      const v16 weights = exp16(real ? dots - top : v16{} - 100.0f) * (real ? ones() : v16{});
      float sum = 0.0f;
      for (int t = 0; t < 16; ++t) sum += weights[t];
      if (top > m[g]) {  // the maximum moved: rescale what was summed under the old one
        const float correction = std::isinf(m[g]) ? 0.0f : std::exp(m[g] - top);
        l[g] *= correction;
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) av[c] *= correction;
        m[g] = top;
      }
      l[g] += sum;
      for (int t = 0; t < tn; ++t) {
        const T* value = values + (t0 + t) * token_stride;
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) av[c] += weights[t] * load16(value + 16 * c);
      }
    }
    std::memcpy(acc + g * DIM, av, sizeof av);
  }
}
#endif

template <typename T, int DIM>
inline void attend(const float* qf, const T* keys, const T* values, int64_t n, int64_t token_stride, int64_t group,
                   int64_t dim, float* scores, float* acc, float* m, float* l) {
#ifdef ATTNSERVE_VECTORS
  if constexpr (DIM > 0 && DIM % 16 == 0) {
    attend_vec<T, DIM>(qf, keys, values, n, token_stride, group, acc, m, l);
    return;
  }
#endif
  attend_any<T>(qf, keys, values, n, token_stride, group, dim, scores, acc, m, l);
}

template <typename T, int DIM>
void decode(const T* q, const T* k_cache, const T* v_cache, const int64_t* block_tables, int64_t table_width,
            const int64_t* context_lens, T* out, int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim_rt,
            int64_t block_size, float scale, int64_t window, int threads) {
  const int64_t dim = DIM > 0 ? DIM : dim_rt;
  const int64_t group = heads / kv_heads;
  const int64_t token_stride = kv_heads * dim;  // from one key of a KV head to the next in a block
  // Whole sequences per task, unless that leaves threads idle (few sequences): then ranges of KV heads.
  const int64_t wanted = 4 * int64_t(threads);
  const int64_t splits = std::min(kv_heads, std::max<int64_t>(1, (wanted + seqs - 1) / seqs));
  const int64_t heads_per_task = (kv_heads + splits - 1) / splits;
  const int64_t tasks_per_seq = (kv_heads + heads_per_task - 1) / heads_per_task;
  const int64_t state = heads_per_task * group;  // query heads per task
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> qf(state * dim), acc(state * dim), scores(block_size), m(state), l(state);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < seqs * tasks_per_seq; ++task) {
      const int64_t s = task / tasks_per_seq;
      const int64_t h0 = (task % tasks_per_seq) * heads_per_task;
      const int64_t h1 = std::min(kv_heads, h0 + heads_per_task);
      const int64_t ctx = context_lens[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
      const T* q_rows = q + (s * heads + h0 * group) * dim;
      const int64_t rows = (h1 - h0) * group;
      for (int64_t i = 0; i < rows * dim; ++i) qf[i] = to_float(q_rows[i]) * scale;
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      // Blocks lie anywhere in the pool, so no hardware prefetcher foresees the next one: its rows are requested
      // while this block computes, into L2 (L1 holds the block being computed). Further ahead measured no better.
      const int64_t row_bytes = (h1 - h0) * dim * int64_t(sizeof(T));
      auto prefetch = [&](int64_t index) {
        const int64_t start = index * block_size;
        if (start >= ctx) return;
        const int64_t base = block_tables[s * table_width + index] * block_size * kv_heads;
        for (int64_t t = 0; t < std::min(block_size, ctx - start); ++t) {
          const char* k_row = reinterpret_cast<const char*>(k_cache + (base + t * kv_heads + h0) * dim);
          const char* v_row = reinterpret_cast<const char*>(v_cache + (base + t * kv_heads + h0) * dim);
          for (int64_t b = 0; b < row_bytes; b += 64) {
            __builtin_prefetch(k_row + b, 0, 1);
            __builtin_prefetch(v_row + b, 0, 1);
          }
        }
      };
      for (int64_t pos = first; pos < ctx;) {
        const int64_t offset = pos % block_size;
        const int64_t n = std::min(block_size - offset, ctx - pos);
        const int64_t row0 = (block_tables[s * table_width + pos / block_size] * block_size + offset) * kv_heads;
        prefetch(pos / block_size + 1);
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t r = (h - h0) * group;
          attend<T, DIM>(qf.data() + r * dim, k_cache + (row0 + h) * dim, v_cache + (row0 + h) * dim, n,
                         token_stride, group, dim, scores.data(), acc.data() + r * dim, m.data() + r,
                         l.data() + r);
        }
        pos += n;
      }
      T* out_rows = out + (s * heads + h0 * group) * dim;
      for (int64_t i = 0; i < rows; ++i) {
        const float inv = 1.0f / l[i];
        for (int64_t d = 0; d < dim; ++d) store(out_rows[i * dim + d], acc[i * dim + d] * inv);
      }
    }
  }
}

template <typename T>
void decode_any_dim(const void* q, const void* k, const void* v, const int64_t* tables, int64_t width,
                    const int64_t* lens, void* out, int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim,
                    int64_t block_size, float scale, int64_t window, int threads) {
  auto run = [&](auto fn) {
    fn(static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), tables, width, lens,
       static_cast<T*>(out), seqs, heads, kv_heads, dim, block_size, scale, window, threads);
  };
  switch (dim) {
    case 64: run(decode<T, 64>); break;
    case 128: run(decode<T, 128>); break;
    default: run(decode<T, 0>); break;
  }
}

}  // namespace

// dtype: 0 float32, 1 bfloat16, 2 float16. Returns 0, or -1 for an unknown dtype.
extern "C" int attnserve_paged_decode(int dtype, const void* q, const void* k_cache, const void* v_cache,
                                      const int64_t* block_tables, int64_t table_width, const int64_t* context_lens,
                                      void* out, int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim,
                                      int64_t block_size, float scale, int64_t window, int threads) {
  switch (dtype) {
    case 0:
      decode_any_dim<float>(q, k_cache, v_cache, block_tables, table_width, context_lens, out, seqs, heads, kv_heads,
                            dim, block_size, scale, window, threads);
      return 0;
    case 1:
      decode_any_dim<bf16>(q, k_cache, v_cache, block_tables, table_width, context_lens, out, seqs, heads, kv_heads,
                           dim, block_size, scale, window, threads);
      return 0;
    case 2:
      decode_any_dim<f16>(q, k_cache, v_cache, block_tables, table_width, context_lens, out, seqs, heads, kv_heads,
                          dim, block_size, scale, window, threads);
      return 0;
    default:
      return -1;
  }
}
