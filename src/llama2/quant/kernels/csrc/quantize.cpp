// Fast CPU weight quantizers, registered as torch custom ops in the namespace `llama2_quantize`.
//
// Each op reproduces one pure-torch quantizer of `llama2.quant` BIT FOR BIT (the torch code is the
// reference; it is itself checked against bitsandbytes, the gguf package and llama.cpp):
//   int8_quantize   <- quant/int8.py   quantize_int8
//   int4_quantize   <- quant/int4.py   quantize_int4
//   nf4_quantize    <- quant/nf4.py    quantize_nf4 (codes + absmax; double quant is done by
//   blockwise8_quantize <- quant/nf4.py quantize_blockwise_8bit, with the offset mean in torch)
//   q8_0_quantize / q4_0_quantize / q4_k_quantize <- quant/gguf_blocks.py
//
// Exactness rules: every float32 operation is done in the same order as the torch code, each
// result rounded to float32 (the build uses -ffp-contract=off, so no fused multiply-add);
// torch.round is round-half-to-even (nearbyint), C's roundf is round-half-away; sums that the
// torch code accumulates sequentially (Q4_K's `_seq_sum`) are accumulated sequentially here,
// starting from the first term. Q4_K processes the 8 sub-blocks of a super-block in the 8 lanes of
// a vector (AVX2 when built with it, a plain 8-float struct otherwise), so each lane keeps its own
// sequential order. Work is split over blocks / rows in chunks handed out to torch's intra-op
// threads (`parallel_chunks`).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#include <tuple>

#if defined(__AVX2__)
#include <immintrin.h>
#define L2Q_AVX2 1
#else
#define L2Q_AVX2 0
#endif

namespace {

constexpr int64_t kGrainElems = 1 << 16;  // elements per parallel task at least

inline int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_item));
}

// f(i0, i1) over [0, n) in chunks of `chunk` items, handed out dynamically to torch's intra-op
// threads: on a shared machine a descheduled thread does not hold up half of the work (a static
// split, as at::parallel_for's, waits for it). Each item is independent, so the split never
// changes a result.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  const int64_t nchunks = (n + chunk - 1) / chunk;
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), nchunks);
  if (nthreads <= 1 || at::in_parallel_region()) {
    if (n > 0) f(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < nchunks; c = next.fetch_add(1)) {
      f(c * chunk, std::min(n, (c + 1) * chunk));
    }
  });
}

// torch.round / nearbyint: round half to even (default rounding mode).
inline float rint_even(float v) {
#if L2Q_AVX2
  return _mm_cvtss_f32(_mm_round_ss(_mm_setzero_ps(), _mm_set_ss(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  return std::nearbyint(v);
#endif
}

// gguf_blocks._round_half_away: copysign(f + floor(2 * (|v| - f)), v) with f = floor(|v|).
inline float round_half_away(float v) {
  const float a = std::fabs(v);
  const float f = std::floor(a);
  return std::copysign(f + std::floor(2.0f * (a - f)), v);
}

inline uint16_t half_bits(float v) { return c10::Half(v).x; }
inline float half_value(uint16_t bits) {
  c10::Half h;
  h.x = bits;
  return static_cast<float>(h);
}
inline uint16_t bf16_bits(float v) { return c10::BFloat16(v).x; }
inline float bf16_value(uint16_t bits) {
  c10::BFloat16 b;
  b.x = bits;
  return static_cast<float>(b);
}

inline void store_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), "llama2_quantize.", op, ": expects a CPU tensor");
  TORCH_CHECK(x.is_contiguous(), "llama2_quantize.", op, ": expects a contiguous tensor");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "llama2_quantize.", op,
              ": expects float32, bfloat16 or float16, got ", t);
}

// Call f with a typed pointer to x's data (float, c10::BFloat16 or c10::Half).
template <typename F>
void dispatch(const at::Tensor& x, F&& f) {
  switch (x.scalar_type()) {
    case at::kFloat:
      f(x.data_ptr<float>());
      break;
    case at::kBFloat16:
      f(reinterpret_cast<const c10::BFloat16*>(x.data_ptr<at::BFloat16>()));
      break;
    default:
      f(reinterpret_cast<const c10::Half*>(x.data_ptr<at::Half>()));
      break;
  }
}

template <typename T>
inline void load_floats(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// ------------------------------------------------------------------------------------- int8
// absmax = max|w| per row; s = max(absmax / 127, FLT_MIN); q = clamp(round_even(w / s), -127, 127).
std::tuple<at::Tensor, at::Tensor> int8_quantize(const at::Tensor& w) {
  check_input(w, "int8_quantize");
  TORCH_CHECK(w.dim() == 2, "llama2_quantize.int8_quantize: expects a 2-D weight");
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor q = at::empty({N, K}, w.options().dtype(at::kChar));
  at::Tensor scales = at::empty({N}, w.options().dtype(at::kFloat));
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  const float tiny = std::numeric_limits<float>::min();
  dispatch(w, [&](auto* wp) {
    parallel_chunks(N, grain_for(K), [&](int64_t n0, int64_t n1) {
      std::vector<float> row(K);
      for (int64_t n = n0; n < n1; ++n) {
        load_floats(wp + n * K, row.data(), K);
        float amax = 0.0f;
        for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
        const float s = std::max(amax / 127.0f, tiny);
        sp[n] = s;
        int8_t* qr = qp + n * K;
        for (int64_t k = 0; k < K; ++k) {
          const float r = std::min(std::max(rint_even(row[k] / s), -127.0f), 127.0f);
          qr[k] = static_cast<int8_t>(r);
        }
      }
    });
  });
  return {q, scales};
}

// ------------------------------------------------------------------------------------- int4
// gpt-fast groupwise asymmetric; see quant/int4.py for the formulas.
std::tuple<at::Tensor, at::Tensor> int4_quantize(const at::Tensor& w, int64_t groupsize) {
  check_input(w, "int4_quantize");
  TORCH_CHECK(w.dim() == 2 && groupsize > 0 && groupsize % 2 == 0 && w.size(1) % groupsize == 0,
              "llama2_quantize.int4_quantize: bad shape / groupsize");
  const int64_t N = w.size(0), K = w.size(1), G = K / groupsize;
  at::Tensor packed = at::empty({N, K / 2}, w.options().dtype(at::kByte));
  at::Tensor sz = at::empty({G, N, 2}, w.options().dtype(at::kBFloat16));
  uint8_t* pp = packed.data_ptr<uint8_t>();
  uint16_t* zp = reinterpret_cast<uint16_t*>(sz.data_ptr<at::BFloat16>());
  const float min_range = static_cast<float>(1e-6);
  dispatch(w, [&](auto* wp) {
    parallel_chunks(N, grain_for(K), [&](int64_t n0, int64_t n1) {
      std::vector<float> row(K);
      for (int64_t n = n0; n < n1; ++n) {
        load_floats(wp + n * K, row.data(), K);
        for (int64_t g = 0; g < G; ++g) {
          const float* x = row.data() + g * groupsize;
          float mx = x[0], mn = x[0];
          for (int64_t i = 1; i < groupsize; ++i) {
            mx = std::max(mx, x[i]);
            mn = std::min(mn, x[i]);
          }
          const float scale_f = std::max(mx - mn, min_range) / 15.0f;
          const uint16_t zb = bf16_bits(mn + scale_f * 8.0f);
          const uint16_t sb = bf16_bits(scale_f);
          zp[(g * N + n) * 2] = sb;
          zp[(g * N + n) * 2 + 1] = zb;
          const float s = bf16_value(sb);
          const float lowest = bf16_value(zb) - s * 8.0f;
          uint8_t* out = pp + n * (K / 2) + g * (groupsize / 2);
          for (int64_t i = 0; i < groupsize; i += 2) {
            const float a = std::min(std::max(rint_even((x[i] - lowest) / s), 0.0f), 15.0f);
            const float b = std::min(std::max(rint_even((x[i + 1] - lowest) / s), 0.0f), 15.0f);
            out[i / 2] = static_cast<uint8_t>(static_cast<uint8_t>(a) | (static_cast<uint8_t>(b) << 4));
          }
        }
      }
    });
  });
  return {packed, sz};
}

// -------------------------------------------------------------------------------------- NF4
constexpr float kNF4[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

struct NF4Mid {
  float m[15];
  NF4Mid() {
    for (int i = 0; i < 15; ++i) m[i] = (kNF4[i] + kNF4[i + 1]) / 2.0f;
  }
};

// torch.bucketize(v, midpoints): the number of midpoints strictly below v (branchless search).
inline uint8_t nf4_bucket(const float* m, float v) {
  int lo = 0;
  lo += (m[lo + 7] < v) ? 8 : 0;
  lo += (m[lo + 3] < v) ? 4 : 0;
  lo += (m[lo + 1] < v) ? 2 : 0;
  lo += (m[lo] < v) ? 1 : 0;
  return static_cast<uint8_t>(lo);
}

// Codes of one block, written as nibbles into `codes` (one byte per value).
template <typename T>
inline float nf4_block(const T* src, int64_t len, bool full, const float* mid, uint8_t* codes, float* buf) {
  load_floats(src, buf, len);
  float amax = 0.0f;
  for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::fabs(buf[i]));
  const float clamped = std::max(amax, static_cast<float>(1e-38));
  if (full) {  // whole * (1 / absmax.clamp(1e-38)), clamp(-1, 1)
    const float inv = 1.0f / clamped;
    int64_t i0 = 0;
#if L2Q_AVX2
    const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-1.0f), hi = _mm256_set1_ps(1.0f);
    alignas(32) int32_t cnt[8];
    for (; i0 + 8 <= len; i0 += 8) {
      const __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(buf + i0), vinv), lo), hi);
      __m256i c = _mm256_setzero_si256();
      for (int m = 0; m < 15; ++m) {  // count of midpoints strictly below v (true lanes are -1)
        c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(_mm256_set1_ps(mid[m]), v, _CMP_LT_OQ)));
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(cnt), c);
      for (int k = 0; k < 8; ++k) codes[i0 + k] = static_cast<uint8_t>(cnt[k]);
    }
#endif
    for (int64_t i = i0; i < len; ++i) {
      const float v = std::min(std::max(buf[i] * inv, -1.0f), 1.0f);
      codes[i] = nf4_bucket(mid, v);
    }
    return amax;
  }
  for (int64_t i = 0; i < len; ++i) {  // short last block: x / absmax.clamp(1e-38)
    const float v = std::min(std::max(buf[i] / clamped, -1.0f), 1.0f);
    codes[i] = nf4_bucket(mid, v);
  }
  return clamped;
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize(const at::Tensor& w, int64_t blocksize) {
  check_input(w, "nf4_quantize");
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0, "llama2_quantize.nf4_quantize: bad blocksize");
  static const NF4Mid mids;
  const int64_t n = w.numel();
  const int64_t nb = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nb}, w.options().dtype(at::kFloat));
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  dispatch(w, [&](auto* wp) {
    parallel_chunks(nb, grain_for(blocksize), [&](int64_t b0, int64_t b1) {
      std::vector<float> buf(blocksize);
      std::vector<uint8_t> codes(blocksize + 1);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        ap[b] = nf4_block(wp + start, len, len == blocksize, mids.m, codes.data(), buf.data());
        if (len % 2) codes[len] = 7;  // the zero pad of an odd total length: bucketize(0) = 7
        uint8_t* out = pp + start / 2;
        for (int64_t i = 0; i < (len + 1) / 2; ++i) {
          out[i] = static_cast<uint8_t>((codes[2 * i] << 4) | codes[2 * i + 1]);
        }
      }
    });
  });
  return {packed, absmax};
}

// bitsandbytes' CPU 8-bit blockwise quantizer through the 65536-bin lookup table `lut` (uint8
// code index per bin, built by nf4._quantize_lut). x: flat float32.
std::tuple<at::Tensor, at::Tensor> blockwise8_quantize(const at::Tensor& x, const at::Tensor& lut, int64_t blocksize) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "llama2_quantize.blockwise8_quantize: expects a contiguous CPU float32 tensor");
  TORCH_CHECK(lut.scalar_type() == at::kByte && lut.numel() == 65536 && lut.is_contiguous(),
              "llama2_quantize.blockwise8_quantize: expects a (65536,) uint8 table");
  TORCH_CHECK(blocksize > 0, "llama2_quantize.blockwise8_quantize: bad blocksize");
  const int64_t n = x.numel();
  const int64_t nb = (n + blocksize - 1) / blocksize;
  at::Tensor q = at::empty({n}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nb}, x.options().dtype(at::kFloat));
  const float* xp = x.data_ptr<float>();
  const uint8_t* lp = lut.data_ptr<uint8_t>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  parallel_chunks(nb, grain_for(blocksize), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const float* xb = xp + start;
      float amax = 0.0f;
      for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::fabs(xb[i]));
      ap[b] = amax;
      uint8_t* qb = qp + start;
      if (amax == 0.0f) {
        std::memset(qb, 0, len);
        continue;
      }
      const float inv = 1.0f / amax;
      for (int64_t i = 0; i < len; ++i) {
        const float v = std::min(std::max(xb[i] * inv, -1.0f), 1.0f);
        int64_t idx = static_cast<int64_t>(((v + 1.0f) * 0.5f) * 65535.0f + 0.5f);
        idx = std::min<int64_t>(std::max<int64_t>(idx, 0), 65535);
        qb[i] = lp[idx];
      }
    }
  });
  return {q, absmax};
}

// ---------------------------------------------------------------------------------- Q8_0/Q4_0
at::Tensor q8_0_quantize(const at::Tensor& x) {
  check_input(x, "q8_0_quantize");
  TORCH_CHECK(x.numel() % 32 == 0, "llama2_quantize.q8_0_quantize: numel must be a multiple of 32");
  const int64_t nb = x.numel() / 32;
  at::Tensor out = at::empty({nb * 34}, x.options().dtype(at::kByte));
  uint8_t* op = out.data_ptr<uint8_t>();
  dispatch(x, [&](auto* xp) {
    parallel_chunks(nb, grain_for(32), [&](int64_t b0, int64_t b1) {
      float v[32];
      for (int64_t b = b0; b < b1; ++b) {
        load_floats(xp + 32 * b, v, 32);
        float amax = 0.0f;
        for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
        const float d = amax / 127.0f;
        const float inv = d == 0.0f ? 0.0f : 1.0f / d;
        uint8_t* o = op + 34 * b;
        store_u16(o, half_bits(d));
        for (int i = 0; i < 32; ++i) {
          const int8_t q = static_cast<int8_t>(round_half_away(v[i] * inv));
          std::memcpy(o + 2 + i, &q, 1);
        }
      }
    });
  });
  return out;
}

at::Tensor q4_0_quantize(const at::Tensor& x) {
  check_input(x, "q4_0_quantize");
  TORCH_CHECK(x.numel() % 32 == 0, "llama2_quantize.q4_0_quantize: numel must be a multiple of 32");
  const int64_t nb = x.numel() / 32;
  at::Tensor out = at::empty({nb * 18}, x.options().dtype(at::kByte));
  uint8_t* op = out.data_ptr<uint8_t>();
  dispatch(x, [&](auto* xp) {
    parallel_chunks(nb, grain_for(32), [&](int64_t b0, int64_t b1) {
      float v[32];
      uint8_t q[32];
      for (int64_t b = b0; b < b1; ++b) {
        load_floats(xp + 32 * b, v, 32);
        float amax = std::fabs(v[0]);
        int imax = 0;
        for (int i = 1; i < 32; ++i) {  // first index of the largest |x|
          const float a = std::fabs(v[i]);
          if (a > amax) {
            amax = a;
            imax = i;
          }
        }
        const float d = v[imax] / -8.0f;
        const float inv = d == 0.0f ? 0.0f : 1.0f / d;
        uint8_t* o = op + 18 * b;
        store_u16(o, half_bits(d));
        for (int i = 0; i < 32; ++i) {
          const float t = std::trunc(v[i] * inv + 8.5f);
          q[i] = static_cast<uint8_t>(std::min(std::max(t, 0.0f), 15.0f));
        }
        for (int i = 0; i < 16; ++i) o[2 + i] = static_cast<uint8_t>(q[i] | (q[i + 16] << 4));
      }
    });
  });
  return out;
}

// --------------------------------------------------------------------------------------- Q4_K
// 16 lanes = the 8 sub-blocks of two super-blocks (two independent dependency chains keep the
// CPU busy while each lane's sequential float32 sums run).
constexpr int kLanes = 16;
constexpr int kBlocksPerGroup = kLanes / 8;
#if L2Q_AVX2
constexpr int kVec = kLanes / 8;
struct V8 {
  __m256 r[kVec];
};
#define L2Q_EACH(expr)             \
  V8 o;                            \
  for (int k = 0; k < kVec; ++k) { \
    o.r[k] = (expr);               \
  }                                \
  return o
#define L2Q_BIN(name, intr) \
  inline V8 name(V8 x, V8 y) { L2Q_EACH(intr(x.r[k], y.r[k])); }
inline V8 vset(float v) { L2Q_EACH(_mm256_set1_ps(v)); }
inline V8 vload(const float* p) { L2Q_EACH(_mm256_loadu_ps(p + 8 * k)); }
inline void vstore(float* p, V8 x) {
  for (int k = 0; k < kVec; ++k) _mm256_storeu_ps(p + 8 * k, x.r[k]);
}
L2Q_BIN(operator+, _mm256_add_ps)
L2Q_BIN(operator-, _mm256_sub_ps)
L2Q_BIN(operator*, _mm256_mul_ps)
L2Q_BIN(operator/, _mm256_div_ps)
L2Q_BIN(vmin, _mm256_min_ps)
L2Q_BIN(vmax, _mm256_max_ps)
L2Q_BIN(vand, _mm256_and_ps)
#undef L2Q_BIN
inline V8 vabs(V8 x) { L2Q_EACH(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x.r[k])); }
inline V8 vround(V8 x) { L2Q_EACH(_mm256_round_ps(x.r[k], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); }
inline V8 vgt(V8 x, V8 y) { L2Q_EACH(_mm256_cmp_ps(x.r[k], y.r[k], _CMP_GT_OQ)); }
inline V8 vlt(V8 x, V8 y) { L2Q_EACH(_mm256_cmp_ps(x.r[k], y.r[k], _CMP_LT_OQ)); }
inline V8 veq(V8 x, V8 y) { L2Q_EACH(_mm256_cmp_ps(x.r[k], y.r[k], _CMP_EQ_OQ)); }
inline V8 vsel(V8 mask, V8 x, V8 y) { L2Q_EACH(_mm256_blendv_ps(y.r[k], x.r[k], mask.r[k])); }  // mask ? x : y
#undef L2Q_EACH
inline bool vany(V8 mask) {
  int m = 0;
  for (int k = 0; k < kVec; ++k) m |= _mm256_movemask_ps(mask.r[k]);
  return m != 0;
}
#else
struct V8 {
  float v[kLanes];
};
#define L2Q_MAP(expr)                 \
  V8 r;                               \
  for (int l = 0; l < kLanes; ++l) {  \
    r.v[l] = (expr);                  \
  }                                   \
  return r
inline V8 vset(float a) { L2Q_MAP(a); }
inline V8 vload(const float* p) { L2Q_MAP(p[l]); }
inline void vstore(float* p, V8 a) { std::memcpy(p, a.v, sizeof(a.v)); }
inline V8 operator+(V8 a, V8 b) { L2Q_MAP(a.v[l] + b.v[l]); }
inline V8 operator-(V8 a, V8 b) { L2Q_MAP(a.v[l] - b.v[l]); }
inline V8 operator*(V8 a, V8 b) { L2Q_MAP(a.v[l] * b.v[l]); }
inline V8 operator/(V8 a, V8 b) { L2Q_MAP(a.v[l] / b.v[l]); }
inline V8 vmin(V8 a, V8 b) { L2Q_MAP(a.v[l] < b.v[l] ? a.v[l] : b.v[l]); }
inline V8 vmax(V8 a, V8 b) { L2Q_MAP(a.v[l] > b.v[l] ? a.v[l] : b.v[l]); }
inline V8 vabs(V8 a) { L2Q_MAP(std::fabs(a.v[l])); }
inline V8 vround(V8 a) { L2Q_MAP(std::nearbyint(a.v[l])); }
// masks are 1.0f (true) / 0.0f (false) in the scalar build
inline V8 vgt(V8 a, V8 b) { L2Q_MAP(a.v[l] > b.v[l] ? 1.0f : 0.0f); }
inline V8 vlt(V8 a, V8 b) { L2Q_MAP(a.v[l] < b.v[l] ? 1.0f : 0.0f); }
inline V8 veq(V8 a, V8 b) { L2Q_MAP(a.v[l] == b.v[l] ? 1.0f : 0.0f); }
inline V8 vand(V8 a, V8 b) { L2Q_MAP((a.v[l] != 0.0f && b.v[l] != 0.0f) ? 1.0f : 0.0f); }
inline V8 vsel(V8 mask, V8 a, V8 b) { L2Q_MAP(mask.v[l] != 0.0f ? a.v[l] : b.v[l]); }
inline bool vany(V8 mask) {
  for (int l = 0; l < kLanes; ++l)
    if (mask.v[l] != 0.0f) return true;
  return false;
}
#undef L2Q_MAP
#endif

inline V8 vclamp(V8 a, float lo, float hi) { return vmin(vmax(a, vset(lo)), vset(hi)); }

void q4_k_finish(const float* src, const float* scales, const float* mnv, const float (*lev)[kLanes], int lane0,
                 uint8_t* out);

// kBlocksPerGroup super-blocks of 256 floats -> 144 bytes each, as gguf_blocks.quantize_q4_k;
// lane j holds sub-block j (values src[32 j .. 32 j + 31]).
void q4_k_group(const float* src, uint8_t* out, int nblocks) {
  V8 x[32], w[32], L[32], laux[32];
  {
    alignas(32) float t[kLanes];
    for (int i = 0; i < 32; ++i) {
      for (int j = 0; j < kLanes; ++j) t[j] = src[32 * j + i];
      x[i] = vload(t);
    }
  }
  // av_x = sqrt(seq_sum(x * x) / 32) (sqrt in double, rounded to float); w = av_x + |x|
  V8 s2 = x[0] * x[0];
  for (int i = 1; i < 32; ++i) s2 = s2 + x[i] * x[i];
  s2 = s2 / vset(32.0f);
  {
    alignas(32) float t[kLanes];
    vstore(t, s2);
    for (int j = 0; j < kLanes; ++j) t[j] = static_cast<float>(std::sqrt(static_cast<double>(t[j])));
    const V8 av = vload(t);
    for (int i = 0; i < 32; ++i) w[i] = av + vabs(x[i]);
  }
  // make_qkx2_quants(x, w, nmax=15, rmin=-1, rdelta=0.1, nstep=20)
  const V8 zero = vset(0.0f);
  V8 mn = x[0], mx = x[0];
  for (int i = 1; i < 32; ++i) {
    mn = vmin(mn, x[i]);
    mx = vmax(mx, x[i]);
  }
  mn = vmin(mn, zero);
  V8 sum_w = w[0], sum_x = w[0] * x[0];
  for (int i = 1; i < 32; ++i) {
    sum_w = sum_w + w[i];
    sum_x = sum_x + w[i] * x[i];
  }
  const V8 degenerate = veq(mx, mn);
  V8 iscale = vset(15.0f) / (mx - mn);
  V8 scale = vset(1.0f) / iscale;
  for (int i = 0; i < 32; ++i) L[i] = vclamp(vround(iscale * (x[i] - mn)), 0.0f, 15.0f);
  V8 best;
  {
    V8 d = scale * L[0] + mn - x[0];
    best = w[0] * (d * d);
    for (int i = 1; i < 32; ++i) {
      d = scale * L[i] + mn - x[i];
      best = best + w[i] * (d * d);
    }
  }
  const float rdelta = 0.1f;
  V8 xm[32];  // x - mn, recomputed when mn changes
  for (int i = 0; i < 32; ++i) xm[i] = x[i] - mn;
  for (int step = 0; step <= 20; ++step) {
    const float num = -1.0f + rdelta * static_cast<float>(step) + 15.0f;
    const V8 is = vset(num) / (mx - mn);
    for (int i = 0; i < 32; ++i) laux[i] = vclamp(vround(is * xm[i]), 0.0f, 15.0f);
    V8 wl = w[0] * laux[0];
    V8 sum_l = wl, sum_l2 = wl * laux[0], sum_xl = wl * x[0];
    for (int i = 1; i < 32; ++i) {
      wl = w[i] * laux[i];
      sum_l = sum_l + wl;
      sum_l2 = sum_l2 + wl * laux[i];
      sum_xl = sum_xl + wl * x[i];
    }
    const V8 det = sum_w * sum_l2 - sum_l * sum_l;
    const V8 det_pos = vgt(det, zero);
    if (!vany(det_pos)) continue;  // no lane can improve (torch's `better` is all false)
    V8 this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
    V8 this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
    const V8 clip = vgt(this_min, zero);
    this_min = vsel(clip, zero, this_min);
    this_scale = vsel(clip, sum_xl / sum_l2, this_scale);
    V8 d = this_scale * laux[0] + this_min - x[0];
    V8 cur = w[0] * (d * d);
    for (int i = 1; i < 32; ++i) {
      d = this_scale * laux[i] + this_min - x[i];
      cur = cur + w[i] * (d * d);
    }
    const V8 better = vand(det_pos, vlt(cur, best));
    if (!vany(better)) continue;
    for (int i = 0; i < 32; ++i) L[i] = vsel(better, laux[i], L[i]);
    best = vsel(better, cur, best);
    scale = vsel(better, this_scale, scale);
    mn = vsel(better, this_min, mn);
    for (int i = 0; i < 32; ++i) xm[i] = x[i] - mn;
  }
  for (int i = 0; i < 32; ++i) L[i] = vsel(degenerate, zero, L[i]);
  scale = vsel(degenerate, zero, scale);

  alignas(32) float scale_all[kLanes], mn_all[kLanes], lev_all[32][kLanes];
  vstore(scale_all, scale);
  vstore(mn_all, mn);
  for (int i = 0; i < 32; ++i) vstore(lev_all[i], L[i]);
  for (int blk = 0; blk < nblocks; ++blk) {
    const float* scales = scale_all + 8 * blk;
    const float* mnv = mn_all + 8 * blk;
    q4_k_finish(src + 256 * blk, scales, mnv, lev_all, 8 * blk, out + 144 * blk);
  }
}

// The per-super-block tail of quantize_q4_k: 6-bit scales/mins, fp16 d/dmin, final levels.
void q4_k_finish(const float* src, const float* scales, const float* mnv, const float (*lev)[kLanes], int lane0,
                 uint8_t* out) {
  float mins[8];
  for (int j = 0; j < 8; ++j) mins[j] = -mnv[j];
  // C starts both maxima at +0 and replaces only on `>`
  float max_scale = scales[0], max_min = mins[0];
  for (int j = 1; j < 8; ++j) {
    max_scale = std::max(max_scale, scales[j]);
    max_min = std::max(max_min, mins[j]);
  }
  max_scale = max_scale > 0.0f ? max_scale : 0.0f;
  max_min = max_min > 0.0f ? max_min : 0.0f;
  const float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
  const float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
  int64_t ls[8], lm[8];
  for (int j = 0; j < 8; ++j) {
    ls[j] = std::min<int64_t>(static_cast<int64_t>(rint_even(inv_scale * scales[j])) & 0xFF, 63);
    lm[j] = std::min<int64_t>(static_cast<int64_t>(rint_even(inv_min * mins[j])) & 0xFF, 63);
  }
  const uint16_t d16 = half_bits(max_scale / 63.0f);
  const uint16_t dmin16 = half_bits(max_min / 63.0f);
  store_u16(out, d16);
  store_u16(out + 2, dmin16);
  uint8_t* sc = out + 4;
  for (int j = 0; j < 4; ++j) {
    sc[j] = static_cast<uint8_t>(ls[j] | ((ls[j + 4] >> 4) << 6));
    sc[j + 4] = static_cast<uint8_t>(lm[j] | ((lm[j + 4] >> 4) << 6));
    sc[j + 8] = static_cast<uint8_t>((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4));
  }
  const float dh = half_value(d16), dmh = half_value(dmin16);
  uint8_t q[8][32];
  for (int j = 0; j < 8; ++j) {
    const float d = dh * static_cast<float>(ls[j]);
    const float dm = dmh * static_cast<float>(lm[j]);
    for (int i = 0; i < 32; ++i) {
      float v;
      if (d == 0.0f) {
        v = lev[i][lane0 + j];
      } else {
        v = std::min(std::max(rint_even((src[32 * j + i] + dm) / d), 0.0f), 15.0f);
      }
      q[j][i] = static_cast<uint8_t>(v);
    }
  }
  uint8_t* qs = out + 16;
  for (int c = 0; c < 4; ++c) {
    for (int i = 0; i < 32; ++i) qs[32 * c + i] = static_cast<uint8_t>(q[2 * c][i] | (q[2 * c + 1][i] << 4));
  }
}

at::Tensor q4_k_quantize(const at::Tensor& x) {
  check_input(x, "q4_k_quantize");
  TORCH_CHECK(x.numel() % 256 == 0, "llama2_quantize.q4_k_quantize: numel must be a multiple of 256");
  const int64_t nb = x.numel() / 256;
  at::Tensor out = at::empty({nb * 144}, x.options().dtype(at::kByte));
  uint8_t* op = out.data_ptr<uint8_t>();
  dispatch(x, [&](auto* xp) {
    const int64_t ng = (nb + kBlocksPerGroup - 1) / kBlocksPerGroup;
    parallel_chunks(ng, 4, [&](int64_t g0, int64_t g1) {
      float v[256 * kBlocksPerGroup];
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t b = g * kBlocksPerGroup;
        const int cnt = static_cast<int>(std::min<int64_t>(kBlocksPerGroup, nb - b));
        load_floats(xp + 256 * b, v, 256 * cnt);
        std::fill(v + 256 * cnt, v + 256 * kBlocksPerGroup, 0.0f);  // lanes past the end: ignored
        q4_k_group(v, op + 144 * b, cnt);
      }
    });
  });
  return out;
}

int64_t simd_level() { return L2Q_AVX2 ? 2 : 0; }

}  // namespace

TORCH_LIBRARY(llama2_quantize, m) {
  m.def("int8_quantize(Tensor w) -> (Tensor, Tensor)");
  m.def("int4_quantize(Tensor w, int groupsize) -> (Tensor, Tensor)");
  m.def("nf4_quantize(Tensor w, int blocksize) -> (Tensor, Tensor)");
  m.def("blockwise8_quantize(Tensor x, Tensor lut, int blocksize) -> (Tensor, Tensor)");
  m.def("q8_0_quantize(Tensor x) -> Tensor");
  m.def("q4_0_quantize(Tensor x) -> Tensor");
  m.def("q4_k_quantize(Tensor x) -> Tensor");
  m.def("simd_level() -> int", &simd_level);
}

TORCH_LIBRARY_IMPL(llama2_quantize, CPU, m) {
  m.impl("int8_quantize", &int8_quantize);
  m.impl("int4_quantize", &int4_quantize);
  m.impl("nf4_quantize", &nf4_quantize);
  m.impl("blockwise8_quantize", &blockwise8_quantize);
  m.impl("q8_0_quantize", &q8_0_quantize);
  m.impl("q4_0_quantize", &q4_0_quantize);
  m.impl("q4_k_quantize", &q4_k_quantize);
}
