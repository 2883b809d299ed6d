// Weight-only matrix-vector kernels for the quantized linear layers (CPU, AVX2/FMA/F16C with a
// scalar fallback), registered as torch custom ops in the namespace `llama2_kernels`.
//
// Every `*_mv` op takes activations x (..., K), contiguous float32 / bfloat16 / float16 (M rows in
// all), and returns (..., N) in x's dtype for a weight of N output rows, computed in float32 and
// rounded once at the end (so a bf16 decode step needs no conversion ops around the call). They
// are meant for small M (decode): each weight row is read from memory once and reused from L1 for
// all M activation rows; rows are split over torch's intra-op thread pool with at::parallel_for.
// Q4_0 and int4 take 8 weight rows per step (dot8_nibbles: the activation block is loaded once,
// the rows' int16 partial sums are reduced into one vector with hadd, one float FMA per block for
// all 8 rows); NF4 decodes its codes with four pshufb byte-plane lookups (exact float32 values).
// The `*_dequant` ops write the float32 (N, K) weight for the large-M path (dequantize, then
// torch's GEMM).
//
// Two families of numerics:
// - float activations (int8, int4, nf4, bf16, fp16): the weight is decoded to float32 in
//   registers and multiplied with the float32 activations, float32 accumulation.
// - Q8_0 activations (q8_0, q4_0, q4_k): as llama.cpp, each activation row is quantized to Q8_0
//   blocks of 32 (d = absmax / 127 stored as fp16, q = round-half-away(x / d), exactly as
//   ggml's quantize_row_q8_0_ref), then integer dot products per block of 32 are scaled by
//   d_weight * d_activation and accumulated in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define L2K_AVX2 1
#else
#define L2K_AVX2 0
#endif

namespace {

constexpr int64_t kGrain = 16;  // output rows per parallel task at least
constexpr int64_t kPrefetch = 1024;  // bytes ahead of the weight stream to prefetch

inline float half_to_float(uint16_t bits) {
  c10::Half h;
  h.x = bits;
  return static_cast<float>(h);
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline float bf16_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if L2K_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// round half away from zero, exactly (C's roundf)
inline __m256 round_half_away(__m256 v) {
  const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m256 frac = _mm256_sub_ps(v, t);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 ge = _mm256_cmp_ps(_mm256_and_ps(frac, absmask), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
  const __m256 one = _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_andnot_ps(absmask, v));  // +-1
  return _mm256_add_ps(t, _mm256_and_ps(ge, one));
}
#endif

// ------------------------------------------------------------------ Q8_0 activation quantization
// x: K floats (K % 32 == 0) -> qs: K int8, d: K/32 floats (the fp16-rounded scale, as float),
// bsum: K/32 int32 (sum of the codes of each block).
void quantize_act_q8_0(const float* x, int64_t K, int8_t* qs, float* d, int32_t* bsum) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* xb = x + 32 * b;
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float db = amax / 127.0f;
    const float id = db != 0.0f ? 1.0f / db : 0.0f;
    d[b] = static_cast<float>(c10::Half(db));
    int32_t s = 0;
#if L2K_AVX2
    const __m256 vid = _mm256_set1_ps(id);
    alignas(32) int32_t tmp[32];
    for (int i = 0; i < 32; i += 8) {
      __m256 v = round_half_away(_mm256_mul_ps(_mm256_loadu_ps(xb + i), vid));
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + i), _mm256_cvtps_epi32(v));
    }
    for (int i = 0; i < 32; ++i) {
      qs[32 * b + i] = static_cast<int8_t>(tmp[i]);
      s += tmp[i];
    }
#else
    for (int i = 0; i < 32; ++i) {
      const int q = static_cast<int>(std::round(xb[i] * id));
      qs[32 * b + i] = static_cast<int8_t>(q);
      s += q;
    }
#endif
    bsum[b] = s;
  }
}

struct ActQ8 {
  std::vector<int8_t> qs;
  std::vector<float> d;
  std::vector<int32_t> bsum;
  int64_t K;
  std::vector<int16_t> corr8;  // filled by the 4-bit 8-row kernels' callers (make_corr8)
};

ActQ8 quantize_rows(const float* xp, int64_t M, int64_t K) {
  ActQ8 a{std::vector<int8_t>(M * K), std::vector<float>(M * K / 32), std::vector<int32_t>(M * K / 32), K, {}};
  for (int64_t m = 0; m < M; ++m) {
    quantize_act_q8_0(xp + m * K, K, a.qs.data() + m * K, a.d.data() + m * K / 32, a.bsum.data() + m * K / 32);
  }
  return a;
}

#if L2K_AVX2
// sum over pairs of int8 a * int8 b as 8 int32 lanes (llama.cpp's sign trick: maddubs wants u8 x s8)
inline __m256i dot_i8(__m256i a, __m256i b) {
  const __m256i ax = _mm256_sign_epi8(a, a);
  const __m256i sb = _mm256_sign_epi8(b, a);
  return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sb), _mm256_set1_epi16(1));
}
// u8 a (0..15) * s8 b
inline __m256i dot_u8i8(__m256i a, __m256i b) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
}
#endif

// Four-bit weights against Q8_0 activations, 8 weight rows at a time (q4_0 and int4): per 32-block
// the 16 packed bytes of each row give its low nibbles (paired with activation bytes 0..15) and
// high nibbles (bytes 16..31); two 128-bit maddubs per row, minus the shared per-block correction
// corr8 = maddubs(8, qx) (so the codes act as q - 8), leave 8 int16 pair sums per row bounded by
// 4 * 8 * 127; three rounds of hadd_epi16 (bounded by 32 * 8 * 127 < 2^15, exact) put row i's block
// dot product into int16 lane i, and one int->float conversion and FMA then serve all 8 rows.
// corr8 (8 int16 per activation block): lane j = 8 * (a[2j] + a[2j+1] + a[16+2j] + a[17+2j]).
#if L2K_AVX2
void make_corr8(const int8_t* qs, int64_t nblocks, int16_t* corr8) {
  for (int64_t b = 0; b < nblocks; ++b) {
    const int8_t* a = qs + 32 * b;
    for (int j = 0; j < 8; ++j) corr8[8 * b + j] = static_cast<int16_t>(8 * (a[2 * j] + a[2 * j + 1] + a[16 + 2 * j] + a[17 + 2 * j]));
  }
}

// block b of 8 rows r[0..7] (16 packed bytes each at r[i] + off) -> int32 lane i = sum_k (q_ik - 8) a_k
inline __m256i dot8_nibbles(const uint8_t* const* r, int64_t off, const int8_t* a, const int16_t* corr8) {
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const __m128i alo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
  const __m128i ahi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + 16));
  const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(corr8));
  __m128i p[8];
  for (int i = 0; i < 8; ++i) {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[i] + off));
    p[i] = _mm_sub_epi16(_mm_add_epi16(_mm_maddubs_epi16(_mm_and_si128(t, m4), alo),
                                       _mm_maddubs_epi16(_mm_and_si128(_mm_srli_epi16(t, 4), m4), ahi)),
                         c);
  }
  const __m128i s16 = _mm_hadd_epi16(_mm_hadd_epi16(_mm_hadd_epi16(p[0], p[1]), _mm_hadd_epi16(p[2], p[3])),
                                     _mm_hadd_epi16(_mm_hadd_epi16(p[4], p[5]), _mm_hadd_epi16(p[6], p[7])));
  return _mm256_cvtepi16_epi32(s16);
}

// the fp16 values at r[i] + off, i = 0..7, as 8 floats (scalar gathers: integer ports, not vector ones)
inline __m256 gather8_f16(const uint8_t* const* r, int64_t off) {
  const uint64_t lo = static_cast<uint64_t>(load_u16(r[0] + off)) | static_cast<uint64_t>(load_u16(r[1] + off)) << 16 |
                      static_cast<uint64_t>(load_u16(r[2] + off)) << 32 | static_cast<uint64_t>(load_u16(r[3] + off)) << 48;
  const uint64_t hi = static_cast<uint64_t>(load_u16(r[4] + off)) | static_cast<uint64_t>(load_u16(r[5] + off)) << 16 |
                      static_cast<uint64_t>(load_u16(r[6] + off)) << 32 | static_cast<uint64_t>(load_u16(r[7] + off)) << 48;
  return _mm256_cvtph_ps(_mm_unpacklo_epi64(_mm_cvtsi64_si128(static_cast<int64_t>(lo)),
                                            _mm_cvtsi64_si128(static_cast<int64_t>(hi))));
}

// Q4_0 rows w, w + rb, ..., w + 7 rb against one Q8_0 activation row -> out[0..7]
void dot8_q4_0(const uint8_t* w, int64_t rb, const int8_t* qx, const float* dx, const int16_t* corr8, int64_t nb,
               float* out) {
  const uint8_t* r[8];
  for (int i = 0; i < 8; ++i) r[i] = w + i * rb;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if ((b & 1) == 0)  // the next group of 8 rows, same offset: the 8 streams advance together
      for (int i = 0; i < 8; ++i) _mm_prefetch(reinterpret_cast<const char*>(r[i] + 8 * rb + 18 * b), _MM_HINT_T0);
    const __m256i s = dot8_nibbles(r, 18 * b + 2, qx + 32 * b, corr8 + 8 * b);
    const __m256 d = _mm256_mul_ps(gather8_f16(r, 18 * b), _mm256_set1_ps(dx[b]));
    acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc);
  }
  _mm256_storeu_ps(out, acc);
}
#endif

// The activations of an `*_mv` op: x (..., K) contiguous float32 / bfloat16 / float16, seen as
// (M, K) float32 (converted into `buf` unless already float32). The op's result has x's shape with
// the last dimension N and x's dtype (computed in float32, rounded once at the end, as
// `.to(dtype)` would).
struct XIn {
  const float* p = nullptr;
  std::vector<float> buf;
  int64_t M = 0, K = 0;
};

XIn read_x(const at::Tensor& x, int64_t K) {
  const auto st = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.is_contiguous() &&
                  (st == at::kFloat || st == at::kBFloat16 || st == at::kHalf),
              "llama2_kernels: x must be a contiguous float32/bfloat16/float16 CPU tensor");
  TORCH_CHECK(x.size(-1) == K, "llama2_kernels: x has ", x.size(-1), " columns, weight expects ", K);
  XIn a;
  a.K = K;
  a.M = K ? x.numel() / K : 0;
  if (st == at::kFloat) {
    a.p = x.data_ptr<float>();
    return a;
  }
  a.buf.resize(a.M * K);
  const int64_t n = a.M * K;
  if (st == at::kBFloat16) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(x.data_ptr());
    for (int64_t i = 0; i < n; ++i) a.buf[i] = bf16_to_float(s[i]);
  } else {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(x.data_ptr());
    int64_t i = 0;
#if L2K_AVX2
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(a.buf.data() + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
    for (; i < n; ++i) a.buf[i] = half_to_float(s[i]);
  }
  a.p = a.buf.data();
  return a;
}

// the (M, N) float32 result buffer: the output tensor itself for float32 x, else a scratch tensor
at::Tensor out_f32(const at::Tensor& x, int64_t M, int64_t N) {
  if (x.scalar_type() == at::kFloat) {
    std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
    sizes.back() = N;
    return at::empty(sizes, x.options());
  }
  return at::empty({M, N}, x.options().dtype(at::kFloat));
}

// the op's result from the float32 buffer: x's shape (last dim N) and dtype
at::Tensor finish_out(const at::Tensor& outf, const at::Tensor& x, int64_t N) {
  if (x.scalar_type() == at::kFloat) return outf;
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = N;
  at::Tensor out = at::empty(sizes, x.options());
  const float* s = outf.data_ptr<float>();
  const int64_t n = outf.numel();
  uint16_t* d = reinterpret_cast<uint16_t*>(out.data_ptr());
  if (x.scalar_type() == at::kBFloat16) {
    for (int64_t i = 0; i < n; ++i) d[i] = c10::BFloat16(s[i]).x;
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = c10::Half(s[i]).x;
  }
  return out;
}

void check_u8(const at::Tensor& w, int64_t bytes_per_block, int64_t block) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "llama2_kernels: weight must be a contiguous 2-D uint8 CPU tensor");
  TORCH_CHECK(w.size(1) % bytes_per_block == 0, "llama2_kernels: weight rows must be whole blocks");
  (void)block;
}

// ------------------------------------------------------------------------------------ Q8_0 x Q8_0
float dot_q8_0(const uint8_t* w, const int8_t* qx, const float* dx, int64_t nb) {
#if L2K_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {
    const uint8_t* w0 = w + 34 * b;
    const uint8_t* w1 = w0 + 34;
    _mm_prefetch(reinterpret_cast<const char*>(w0 + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w0 + kPrefetch + 64), _MM_HINT_T0);
    __m256i p0 = dot_i8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + 2)),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + 32 * b)));
    __m256i p1 = dot_i8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1 + 2)),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + 32 * b + 32)));
    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(load_u16(w0)) * dx[b]), _mm256_cvtepi32_ps(p0), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(load_u16(w1)) * dx[b + 1]), _mm256_cvtepi32_ps(p1), acc1);
  }
  for (; b < nb; ++b) {
    const uint8_t* w0 = w + 34 * b;
    __m256i p0 = dot_i8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + 2)),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + 32 * b)));
    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(load_u16(w0)) * dx[b]), _mm256_cvtepi32_ps(p0), acc0);
  }
  return hsum(_mm256_add_ps(acc0, acc1));
#else
  float acc = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + 34 * b;
    const int8_t* q = reinterpret_cast<const int8_t*>(wb + 2);
    int32_t s = 0;
    for (int i = 0; i < 32; ++i) s += static_cast<int32_t>(q[i]) * qx[32 * b + i];
    acc += half_to_float(load_u16(wb)) * dx[b] * static_cast<float>(s);
  }
  return acc;
#endif
}

// ------------------------------------------------------------------------------------ Q4_0 x Q8_0
// sum_i (q_i - 8) qx_i = sum_i q_i qx_i - 8 bsum: unsigned codes go straight into maddubs
float dot_q4_0(const uint8_t* w, const int8_t* qx, const float* dx, const int32_t* bsum, int64_t nb) {
#if L2K_AVX2
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  float corr0 = 0.0f, corr1 = 0.0f;
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(w + 18 * b + kPrefetch), _MM_HINT_T0);
    const uint8_t* w0 = w + 18 * b;
    const uint8_t* w1 = w0 + 18;
    const __m128i t0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w0 + 2));
    const __m128i t1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w1 + 2));
    const __m256i q0 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t0, 4), t0), m4);  // q0..15 | q16..31
    const __m256i q1 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t1, 4), t1), m4);
    const __m256i p0 = dot_u8i8(q0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + 32 * b)));
    const __m256i p1 = dot_u8i8(q1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + 32 * b + 32)));
    const float d0 = _cvtsh_ss(load_u16(w0)) * dx[b], d1 = _cvtsh_ss(load_u16(w1)) * dx[b + 1];
    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0), _mm256_cvtepi32_ps(p0), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1), _mm256_cvtepi32_ps(p1), acc1);
    corr0 += d0 * static_cast<float>(bsum[b]);
    corr1 += d1 * static_cast<float>(bsum[b + 1]);
  }
  for (; b < nb; ++b) {
    const uint8_t* w0 = w + 18 * b;
    const __m128i t0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w0 + 2));
    const __m256i q0 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t0, 4), t0), m4);
    const __m256i p0 = dot_u8i8(q0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + 32 * b)));
    const float d0 = _cvtsh_ss(load_u16(w0)) * dx[b];
    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0), _mm256_cvtepi32_ps(p0), acc0);
    corr0 += d0 * static_cast<float>(bsum[b]);
  }
  return hsum(_mm256_add_ps(acc0, acc1)) - 8.0f * (corr0 + corr1);
#else
  float acc = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + 18 * b;
    int32_t s = 0;
    for (int i = 0; i < 16; ++i) {
      s += static_cast<int32_t>(wb[2 + i] & 0x0F) * qx[32 * b + i];
      s += static_cast<int32_t>(wb[2 + i] >> 4) * qx[32 * b + 16 + i];
    }
    acc += half_to_float(load_u16(wb)) * dx[b] * static_cast<float>(s - 8 * bsum[b]);
  }
  return acc;
#endif
}

// ------------------------------------------------------------------------------------ Q4_K x Q8_0
inline void scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
  }
}

// nb: super-blocks of 256; qx/dx/bsum: Q8_0 activation blocks of 32 (8 per super-block)
float dot_q4_k(const uint8_t* w, const int8_t* qx, const float* dx, const int32_t* bsum, int64_t nb) {
  float minsum = 0.0f;
#if L2K_AVX2
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
#else
  float acc = 0.0f;
#endif
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + 144 * b;
    const float d = half_to_float(load_u16(wb));
    const float dmin = half_to_float(load_u16(wb + 2));
    const uint8_t* sc = wb + 4;
    const uint8_t* qs = wb + 16;
#if L2K_AVX2
    _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetch + 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetch + 128), _MM_HINT_T0);
#endif
    for (int c = 0; c < 4; ++c) {
      uint8_t s0, m0, s1, m1;
      scale_min_k4(2 * c, sc, &s0, &m0);
      scale_min_k4(2 * c + 1, sc, &s1, &m1);
      const int64_t j0 = 8 * b + 2 * c;  // activation block index of sub-block 2c
      minsum += dmin * (dx[j0] * static_cast<float>(m0) * bsum[j0] + dx[j0 + 1] * static_cast<float>(m1) * bsum[j0 + 1]);
#if L2K_AVX2
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
      const __m256i lo = _mm256_and_si256(raw, m4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
      const __m256i p0 = dot_u8i8(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + 32 * j0)));
      const __m256i p1 = dot_u8i8(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + 32 * j0 + 32)));
      acc = _mm256_fmadd_ps(_mm256_set1_ps(d * s0 * dx[j0]), _mm256_cvtepi32_ps(p0), acc);
      acc = _mm256_fmadd_ps(_mm256_set1_ps(d * s1 * dx[j0 + 1]), _mm256_cvtepi32_ps(p1), acc);
#else
      int32_t t0 = 0, t1 = 0;
      for (int i = 0; i < 32; ++i) {
        t0 += static_cast<int32_t>(qs[32 * c + i] & 0x0F) * qx[32 * j0 + i];
        t1 += static_cast<int32_t>(qs[32 * c + i] >> 4) * qx[32 * j0 + 32 + i];
      }
      acc += d * s0 * dx[j0] * static_cast<float>(t0) + d * s1 * dx[j0 + 1] * static_cast<float>(t1);
#endif
    }
  }
#if L2K_AVX2
  return hsum(acc) - minsum;
#else
  return acc - minsum;
#endif
}

at::Tensor gguf_mv(const at::Tensor& x, const at::Tensor& w, int64_t block, int64_t bytes) {
  check_u8(w, bytes, block);
  const int64_t N = w.size(0);
  const int64_t K = w.size(1) / bytes * block;
  const XIn xin = read_x(x, K);
  const int64_t M = xin.M;
  at::Tensor out = out_f32(x, M, N);
  if (M == 0 || N == 0) return finish_out(out, x, N);
  ActQ8 a = quantize_rows(xin.p, M, K);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t rb = w.size(1), nbx = K / 32;
#if L2K_AVX2
  if (bytes == 18) {
    a.corr8.resize(M * nbx * 8);
    make_corr8(a.qs.data(), M * nbx, a.corr8.data());
  }
#endif
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
#if L2K_AVX2
    if (bytes == 18) {
      float tmp[8];
      for (; n + 8 <= n1; n += 8) {
        for (int64_t m = 0; m < M; ++m) {
          dot8_q4_0(wp + n * rb, rb, a.qs.data() + m * K, a.d.data() + m * nbx, a.corr8.data() + m * nbx * 8, nbx, tmp);
          for (int i = 0; i < 8; ++i) op[m * N + n + i] = tmp[i];
        }
      }
    }
#endif
    for (; n < n1; ++n) {
      const uint8_t* wr = wp + n * rb;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* q = a.qs.data() + m * K;
        const float* d = a.d.data() + m * nbx;
        float v;
        if (bytes == 34) {
          v = dot_q8_0(wr, q, d, K / 32);
        } else if (bytes == 18) {
          v = dot_q4_0(wr, q, d, a.bsum.data() + m * nbx, K / 32);
        } else {
          v = dot_q4_k(wr, q, d, a.bsum.data() + m * nbx, K / 256);
        }
        op[m * N + n] = v;
      }
    }
  });
  return finish_out(out, x, N);
}

at::Tensor q8_0_mv(const at::Tensor& x, const at::Tensor& w) { return gguf_mv(x, w, 32, 34); }
at::Tensor q4_0_mv(const at::Tensor& x, const at::Tensor& w) { return gguf_mv(x, w, 32, 18); }
at::Tensor q4_k_mv(const at::Tensor& x, const at::Tensor& w) { return gguf_mv(x, w, 256, 144); }

at::Tensor gguf_dequant(const at::Tensor& w, int64_t qtype, int64_t row0, int64_t row1) {
  static const int64_t blocks[3] = {32, 32, 256}, bytes[3] = {34, 18, 144};
  TORCH_CHECK(qtype >= 0 && qtype < 3, "llama2_kernels: bad GGUF qtype");
  const int64_t bs = blocks[qtype], ts = bytes[qtype];
  check_u8(w, ts, bs);
  const int64_t nb = w.size(1) / ts, K = nb * bs;
  TORCH_CHECK(0 <= row0 && row0 <= row1 && row1 <= w.size(0), "llama2_kernels: bad row range");
  at::Tensor out = at::empty({row1 - row0, K}, w.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(row0, row1, kGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = wp + n * w.size(1) + ts * b;
        float* o = op + (n - row0) * K + bs * b;
        const float d = half_to_float(load_u16(wb));
        if (qtype == 0) {
          const int8_t* q = reinterpret_cast<const int8_t*>(wb + 2);
          for (int i = 0; i < 32; ++i) o[i] = static_cast<float>(q[i]) * d;
        } else if (qtype == 1) {
          for (int i = 0; i < 16; ++i) {
            o[i] = d * static_cast<float>((wb[2 + i] & 0x0F) - 8);
            o[i + 16] = d * static_cast<float>((wb[2 + i] >> 4) - 8);
          }
        } else {
          const float dmin = half_to_float(load_u16(wb + 2));
          for (int j = 0; j < 8; ++j) {
            uint8_t s, m;
            scale_min_k4(j, wb + 4, &s, &m);
            const float dl = d * s, ml = dmin * m;
            const uint8_t* q = wb + 16 + 32 * (j / 2);
            const int shift = (j % 2) * 4;
            for (int i = 0; i < 32; ++i) o[32 * j + i] = dl * static_cast<float>((q[i] >> shift) & 0x0F) - ml;
          }
        }
      }
    }
  });
  return out;
}

// ------------------------------------------------------------------ float-activation kernels
// A weight format decodes 32 consecutive weights of a row starting at column k (k % 32 == 0)
// into four __m256 (AVX2) or 32 floats (scalar). Groups of G columns (G % 32 == 0) share one
// scale, applied as total += scale_g * sum_g + bias_g * xsum_g (int4's zero point) per group.
enum Fmt { kInt8 = 0, kInt4 = 1, kNF4 = 2, kBF16 = 3, kF16 = 4 };

struct Weight {
  Fmt fmt;
  const uint8_t* data;   // row-major bytes
  int64_t row_bytes;
  int64_t K, N;
  int64_t G;             // columns per group (K for unscaled formats)
  int64_t gpr = 1;       // groups per row, K / G
  // int4: scales_and_zeros (G count, N, 2) bf16 with strides
  const uint16_t* sz = nullptr;
  int64_t sz_s0 = 0, sz_s1 = 0;
  // nf4
  const float* absmax_f = nullptr;
  const uint8_t* absmax_q = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  float offset = 0.0f;
  float nf4_code[16] = {};
  uint8_t nf4_planes[4][16] = {};  // byte j of each code's float32 bits
  // int8
  const float* row_scale = nullptr;

  // (scale, bias) of group g of row n
  inline void group(int64_t n, int64_t g, float* s, float* z) const {
    if (fmt == kInt4) {
      const uint16_t* p = sz + g * sz_s0 + n * sz_s1;
      *s = bf16_to_float(p[0]);
      *z = bf16_to_float(p[1]) - 8.0f * *s;  // w = q * s + (zero - 8 s)
    } else if (fmt == kNF4) {
      const int64_t b = n * gpr + g;
      *s = absmax_f ? absmax_f[b] : nested_code[absmax_q[b]] * nested_absmax[b / 256] + offset;
      *z = 0.0f;
    } else {
      *s = 1.0f;
      *z = 0.0f;
    }
  }
  // scalar decode of weight (n, k) before the group scale
  inline float scalar(int64_t n, int64_t k) const {
    const uint8_t* r = data + n * row_bytes;
    switch (fmt) {
      case kInt8: return static_cast<float>(reinterpret_cast<const int8_t*>(r)[k]);
      case kInt4: return static_cast<float>((r[k / 2] >> ((k % 2) * 4)) & 0x0F);
      case kNF4: return nf4_code[(r[k / 2] >> ((1 - k % 2) * 4)) & 0x0F];
      case kBF16: return bf16_to_float(reinterpret_cast<const uint16_t*>(r)[k]);
      default: return half_to_float(reinterpret_cast<const uint16_t*>(r)[k]);
    }
  }
};

#if L2K_AVX2
template <Fmt F>
inline void decode32(const Weight& W, const uint8_t* r, int64_t k, const __m256i* tb, __m256* o) {
  if constexpr (F == kInt8) {
    const int8_t* p = reinterpret_cast<const int8_t*>(r) + k;
    for (int u = 0; u < 4; ++u)
      o[u] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * u))));
  } else if constexpr (F == kInt4) {  // even column in the low nibble
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + k / 2));
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
    const __m128i q0 = _mm_unpacklo_epi8(lo, hi), q1 = _mm_unpackhi_epi8(lo, hi);
    o[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q0));
    o[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q0, 8)));
    o[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q1));
    o[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q1, 8)));
  } else if constexpr (F == kNF4) {
    // bitsandbytes: first element in the high nibble. Indices [high nibbles | low nibbles] (even |
    // odd elements), then the four bytes of each float32 code looked up with pshufb from four
    // 16-byte tables (tb: byte planes 0..3 of the code book, in both lanes) and interleaved back
    // into floats: exact code values, no cross-lane permutes. Output order per 128-bit lane half:
    // o[u] = elements 2 (4u + l) (lower half) and 2 (4u + l) + 1 (upper half), l = 0..3; x is
    // permuted to match (nf4_x_order).
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + k / 2));
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m256i idx = _mm256_set_m128i(_mm_and_si128(b, m4), _mm_and_si128(_mm_srli_epi16(b, 4), m4));
    const __m256i b0 = _mm256_shuffle_epi8(tb[0], idx), b1 = _mm256_shuffle_epi8(tb[1], idx);
    const __m256i b2 = _mm256_shuffle_epi8(tb[2], idx), b3 = _mm256_shuffle_epi8(tb[3], idx);
    const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
    const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
    o[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
    o[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
    o[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
    o[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
  } else if constexpr (F == kBF16) {
    // even columns = low halves shifted up, odd columns = high halves masked; x is permuted to match
    const uint16_t* p = reinterpret_cast<const uint16_t*>(r) + k;
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    o[0] = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16));
    o[1] = _mm256_castsi256_ps(_mm256_and_si256(a, hi));
    o[2] = _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));
    o[3] = _mm256_castsi256_ps(_mm256_and_si256(b, hi));
  } else {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(r) + k;
    for (int u = 0; u < 4; ++u) o[u] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * u)));
  }
  (void)W;
}

// rows m0..m0+MB of x against weight row n; K32 = K rounded down to 32 (and to whole groups)
template <Fmt F, int MB>
inline void row_dot(const Weight& W, int64_t n, const float* x, int64_t K, const float* xsum, int64_t ngroups,
                    float* out) {
  const uint8_t* r = W.data + n * W.row_bytes;
  __m256i tb[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  if constexpr (F == kNF4) {
    for (int j = 0; j < 4; ++j) tb[j] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(W.nf4_planes[j])));
  }
  __m256 total[MB];
  float bias_acc[MB];
  for (int i = 0; i < MB; ++i) {
    total[i] = _mm256_setzero_ps();
    bias_acc[i] = 0.0f;
  }
  constexpr bool grouped = (F == kInt4 || F == kNF4);
  const int64_t G = grouped ? W.G : (K / 32) * 32;
  for (int64_t g = 0; g < ngroups; ++g) {
    __m256 acc[MB][4];
    for (int i = 0; i < MB; ++i)
      for (int u = 0; u < 4; ++u) acc[i][u] = _mm256_setzero_ps();
    const int64_t k0 = g * G;
    for (int64_t k = k0; k < k0 + G; k += 32) {
      constexpr int64_t bytes_num = (F == kInt8) ? 2 : (F == kBF16 || F == kF16) ? 4 : 1;  // bytes per 2 weights
      _mm_prefetch(reinterpret_cast<const char*>(r + k * bytes_num / 2 + kPrefetch), _MM_HINT_T0);
      __m256 wv[4];
      decode32<F>(W, r, k, tb, wv);
      for (int i = 0; i < MB; ++i) {
        const float* xr = x + i * K + k;
        for (int u = 0; u < 4; ++u) acc[i][u] = _mm256_fmadd_ps(wv[u], _mm256_loadu_ps(xr + 8 * u), acc[i][u]);
      }
    }
    if constexpr (grouped) {
      float s, z;
      W.group(n, g, &s, &z);
      const __m256 vs = _mm256_set1_ps(s);
      for (int i = 0; i < MB; ++i) {
        const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[i][0], acc[i][1]), _mm256_add_ps(acc[i][2], acc[i][3]));
        total[i] = _mm256_fmadd_ps(sum, vs, total[i]);
        if constexpr (F == kInt4) bias_acc[i] += z * xsum[i * ngroups + g];
      }
    } else {
      for (int i = 0; i < MB; ++i)
        total[i] = _mm256_add_ps(_mm256_add_ps(acc[i][0], acc[i][1]), _mm256_add_ps(acc[i][2], acc[i][3]));
    }
  }
  for (int i = 0; i < MB; ++i) {
    float v = hsum(total[i]) + bias_acc[i];
    if constexpr (!grouped) {
      for (int64_t k = G * ngroups; k < K; ++k) v += W.scalar(n, k) * x[i * K + k];  // K % 32 tail
    }
    out[i] = v;
  }
}
#endif

template <Fmt F>
void float_mv_rows(const Weight& W, const float* x, int64_t M, const float* xsum, int64_t ngroups, float* op,
                   int64_t n0, int64_t n1) {
  const int64_t K = W.K, N = W.N;
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
#if L2K_AVX2
    float tmp[2];
    for (; m + 2 <= M; m += 2) {
      row_dot<F, 2>(W, n, x + m * K, K, xsum + m * ngroups, ngroups, tmp);
      op[m * N + n] = tmp[0];
      op[(m + 1) * N + n] = tmp[1];
    }
    for (; m < M; ++m) {
      row_dot<F, 1>(W, n, x + m * K, K, xsum + m * ngroups, ngroups, tmp);
      op[m * N + n] = tmp[0];
    }
#else
    constexpr bool grouped = (F == kInt4 || F == kNF4);
    for (; m < M; ++m) {
      const float* xr = x + m * K;
      float v = 0.0f;
      if (grouped) {
        for (int64_t g = 0; g < ngroups; ++g) {
          float s, z, acc = 0.0f;
          W.group(n, g, &s, &z);
          for (int64_t k = g * W.G; k < (g + 1) * W.G; ++k) acc += W.scalar(n, k) * xr[k];
          v += s * acc + (F == kInt4 ? z * xsum[m * ngroups + g] : 0.0f);
        }
      } else {
        for (int64_t k = 0; k < K; ++k) v += W.scalar(n, k) * xr[k];
      }
      op[m * N + n] = v;
    }
#endif
  }
  (void)ngroups;
}

at::Tensor float_mv(const at::Tensor& x, const Weight& W) {
  const XIn xin = read_x(x, W.K);
  const int64_t M = xin.M, N = W.N, K = W.K;
  at::Tensor out = out_f32(x, M, N);
  if (M == 0 || N == 0) return finish_out(out, x, N);
  const float* xp = xin.p;
  const bool grouped = (W.fmt == kInt4 || W.fmt == kNF4);
  const int64_t ngroups = grouped ? K / W.G : ((K >= 32) ? 1 : 0);
  std::vector<float> xsum(std::max<int64_t>(M * ngroups, 1), 0.0f);
  if (W.fmt == kInt4) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < ngroups; ++g) {
        float s = 0.0f;
        for (int64_t k = g * W.G; k < (g + 1) * W.G; ++k) s += xp[m * K + k];
        xsum[m * ngroups + g] = s;
      }
  }
  float* op = out.data_ptr<float>();
#if L2K_AVX2
  std::vector<float> xperm;
  if (W.fmt == kBF16) {  // the order decode32<kBF16> produces: per 16 columns, evens then odds
    xperm.assign(xp, xp + M * K);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c + 16 <= (K / 32) * 32; c += 16)
        for (int j = 0; j < 8; ++j) {
          xperm[m * K + c + j] = xp[m * K + c + 2 * j];
          xperm[m * K + c + 8 + j] = xp[m * K + c + 2 * j + 1];
        }
    xp = xperm.data();
  }
  if (W.fmt == kNF4) {  // the order decode32<kNF4> produces (K % 32 == 0 for NF4)
    xperm.resize(M * K);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < K; c += 32)
        for (int u = 0; u < 4; ++u)
          for (int l = 0; l < 8; ++l)
            xperm[m * K + c + 8 * u + l] = xp[m * K + c + 2 * (4 * u + (l & 3)) + (l >> 2)];
    xp = xperm.data();
  }
#endif
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    switch (W.fmt) {
      case kInt8: float_mv_rows<kInt8>(W, xp, M, xsum.data(), ngroups, op, n0, n1); break;
      case kInt4: float_mv_rows<kInt4>(W, xp, M, xsum.data(), ngroups, op, n0, n1); break;
      case kNF4: float_mv_rows<kNF4>(W, xp, M, xsum.data(), ngroups, op, n0, n1); break;
      case kBF16: float_mv_rows<kBF16>(W, xp, M, xsum.data(), ngroups, op, n0, n1); break;
      default: float_mv_rows<kF16>(W, xp, M, xsum.data(), ngroups, op, n0, n1); break;
    }
  });
  if (W.fmt == kInt8) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) op[m * N + n] *= W.row_scale[n];
  }
  return finish_out(out, x, N);
}

template <Fmt F>
void dequant_rows(const Weight& W, float* op, int64_t row0, int64_t n0, int64_t n1) {
  const int64_t K = W.K;
  for (int64_t n = n0; n < n1; ++n) {
    float* o = op + (n - row0) * K;
    const uint8_t* r = W.data + n * W.row_bytes;
    if constexpr (F == kInt4 || F == kNF4) {
      for (int64_t g = 0; g < W.gpr; ++g) {
        float s, z;
        W.group(n, g, &s, &z);
        for (int64_t j = g * W.G / 2; j < (g + 1) * W.G / 2; ++j) {
          const int lo = r[j] & 0x0F, hi = r[j] >> 4;
          if constexpr (F == kInt4) {
            o[2 * j] = static_cast<float>(lo) * s + z;
            o[2 * j + 1] = static_cast<float>(hi) * s + z;
          } else {
            o[2 * j] = W.nf4_code[hi] * s;
            o[2 * j + 1] = W.nf4_code[lo] * s;
          }
        }
      }
    } else if constexpr (F == kInt8) {
      const int8_t* q = reinterpret_cast<const int8_t*>(r);
      const float s = W.row_scale[n];
      for (int64_t k = 0; k < K; ++k) o[k] = static_cast<float>(q[k]) * s;
    } else if constexpr (F == kBF16) {
      const uint16_t* q = reinterpret_cast<const uint16_t*>(r);
      for (int64_t k = 0; k < K; ++k) o[k] = bf16_to_float(q[k]);
    } else {
      const uint16_t* q = reinterpret_cast<const uint16_t*>(r);
      for (int64_t k = 0; k < K; ++k) o[k] = half_to_float(q[k]);
    }
  }
}

at::Tensor dequant(const Weight& W, int64_t row0, int64_t row1) {
  TORCH_CHECK(0 <= row0 && row0 <= row1 && row1 <= W.N, "llama2_kernels: bad row range");
  at::Tensor out = at::empty({row1 - row0, W.K}, at::TensorOptions().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(row0, row1, kGrain, [&](int64_t n0, int64_t n1) {
    switch (W.fmt) {
      case kInt8: dequant_rows<kInt8>(W, op, row0, n0, n1); break;
      case kInt4: dequant_rows<kInt4>(W, op, row0, n0, n1); break;
      case kNF4: dequant_rows<kNF4>(W, op, row0, n0, n1); break;
      case kBF16: dequant_rows<kBF16>(W, op, row0, n0, n1); break;
      default: dequant_rows<kF16>(W, op, row0, n0, n1); break;
    }
  });
  return out;
}

Weight int8_weight(const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous(),
              "llama2_kernels: int8 weight must be a contiguous 2-D int8 CPU tensor");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == w.size(0),
              "llama2_kernels: int8 scales must be contiguous float32 (N,)");
  Weight W{kInt8, reinterpret_cast<const uint8_t*>(w.data_ptr()), w.size(1), w.size(1), w.size(0), w.size(1)};
  W.row_scale = scales.data_ptr<float>();
  return W;
}

Weight int4_weight(const at::Tensor& w, const at::Tensor& sz, int64_t groupsize) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "llama2_kernels: int4 weight must be a contiguous 2-D uint8 CPU tensor");
  const int64_t N = w.size(0), K = 2 * w.size(1);
  TORCH_CHECK(groupsize % 32 == 0 && K % groupsize == 0, "llama2_kernels: int4 groupsize must divide K, % 32");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.dim() == 3 && sz.size(0) == K / groupsize &&
                  sz.size(1) == N && sz.size(2) == 2 && sz.stride(2) == 1,
              "llama2_kernels: scales_and_zeros must be bfloat16 (K/groupsize, N, 2)");
  Weight W{kInt4, w.data_ptr<uint8_t>(), w.size(1), K, N, groupsize};
  W.gpr = K / groupsize;
  W.sz = reinterpret_cast<const uint16_t*>(sz.data_ptr());
  W.sz_s0 = sz.stride(0);
  W.sz_s1 = sz.stride(1);
  return W;
}

Weight nf4_weight(const at::Tensor& packed, int64_t N, int64_t K, const at::Tensor& absmax,
                  const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                  const c10::optional<at::Tensor>& offset, const at::Tensor& code, int64_t blocksize) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == N * K / 2,
              "llama2_kernels: nf4 packed must be contiguous uint8 with N*K/2 bytes");
  TORCH_CHECK(blocksize % 32 == 0 && K % blocksize == 0, "llama2_kernels: nf4 needs K % blocksize == 0");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, "llama2_kernels: nf4 code must be 16 float32");
  TORCH_CHECK(absmax.is_contiguous() && absmax.numel() == N * K / blocksize, "llama2_kernels: bad nf4 absmax");
  Weight W{kNF4, packed.data_ptr<uint8_t>(), K / 2, K, N, blocksize};
  W.gpr = K / blocksize;
  std::memcpy(W.nf4_code, code.data_ptr<float>(), 16 * sizeof(float));
  for (int c = 0; c < 16; ++c) {
    uint32_t u;
    std::memcpy(&u, &W.nf4_code[c], 4);
    for (int j = 0; j < 4; ++j) W.nf4_planes[j][c] = static_cast<uint8_t>(u >> (8 * j));
  }
  if (absmax.scalar_type() == at::kFloat) {
    W.absmax_f = absmax.data_ptr<float>();
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kByte && nested_absmax.has_value() && nested_code.has_value(),
                "llama2_kernels: uint8 nf4 absmax needs nested_absmax and nested_code");
    TORCH_CHECK(nested_absmax->scalar_type() == at::kFloat && nested_absmax->is_contiguous() &&
                    nested_code->scalar_type() == at::kFloat && nested_code->numel() == 256 &&
                    nested_code->is_contiguous() && nested_absmax->numel() * 256 >= absmax.numel(),
                "llama2_kernels: bad nf4 nested_absmax / nested_code");
    W.absmax_q = absmax.data_ptr<uint8_t>();
    W.nested_absmax = nested_absmax->data_ptr<float>();
    W.nested_code = nested_code->data_ptr<float>();
    TORCH_CHECK(offset.has_value() && offset->numel() == 1, "llama2_kernels: double-quantized nf4 needs offset");
    W.offset = offset->to(at::kFloat).item<float>();
  }
  return W;
}

Weight dense_weight(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() &&
                  (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf),
              "llama2_kernels: dense weight must be a contiguous 2-D bfloat16/float16 CPU tensor");
  Weight W{w.scalar_type() == at::kBFloat16 ? kBF16 : kF16, reinterpret_cast<const uint8_t*>(w.data_ptr()),
           2 * w.size(1), w.size(1), w.size(0), w.size(1)};
  return W;
}

at::Tensor int8_mv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  return float_mv(x, int8_weight(w, scales));
}
at::Tensor int8_dequant(const at::Tensor& w, const at::Tensor& scales, int64_t row0, int64_t row1) {
  return dequant(int8_weight(w, scales), row0, row1);
}
at::Tensor int4_mv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t groupsize) {
  return float_mv(x, int4_weight(w, sz, groupsize));
}
at::Tensor int4_dequant(const at::Tensor& w, const at::Tensor& sz, int64_t groupsize, int64_t row0, int64_t row1) {
  return dequant(int4_weight(w, sz, groupsize), row0, row1);
}
at::Tensor nf4_mv(const at::Tensor& x, const at::Tensor& packed, int64_t N, int64_t K, const at::Tensor& absmax,
                  const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                  const c10::optional<at::Tensor>& offset, const at::Tensor& code, int64_t blocksize) {
  return float_mv(x, nf4_weight(packed, N, K, absmax, nested_absmax, nested_code, offset, code, blocksize));
}
at::Tensor nf4_dequant(const at::Tensor& packed, int64_t N, int64_t K, const at::Tensor& absmax,
                       const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                       const c10::optional<at::Tensor>& offset, const at::Tensor& code, int64_t blocksize,
                       int64_t row0, int64_t row1) {
  return dequant(nf4_weight(packed, N, K, absmax, nested_absmax, nested_code, offset, code, blocksize), row0, row1);
}
at::Tensor dense_mv(const at::Tensor& x, const at::Tensor& w) { return float_mv(x, dense_weight(w)); }
at::Tensor dense_dequant(const at::Tensor& w, int64_t row0, int64_t row1) { return dequant(dense_weight(w), row0, row1); }

// ------------------------------------------------- int8 / int4 weights x Q8_0 activations
// int8 (per-channel scale s_n): y = s_n * sum_b dx_b * sum_i w_i qx_i.
float dot_int8_q8(const int8_t* w, const int8_t* qx, const float* dx, int64_t nb) {
#if L2K_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(w + 32 * b + kPrefetch), _MM_HINT_T0);
    const __m256i p0 = dot_i8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * b)),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + 32 * b)));
    const __m256i p1 = dot_i8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * b + 32)),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + 32 * b + 32)));
    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(dx[b]), _mm256_cvtepi32_ps(p0), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_set1_ps(dx[b + 1]), _mm256_cvtepi32_ps(p1), acc1);
  }
  for (; b < nb; ++b) {
    const __m256i p0 = dot_i8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * b)),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + 32 * b)));
    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(dx[b]), _mm256_cvtepi32_ps(p0), acc0);
  }
  return hsum(_mm256_add_ps(acc0, acc1));
#else
  float acc = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    int32_t s = 0;
    for (int i = 0; i < 32; ++i) s += static_cast<int32_t>(w[32 * b + i]) * qx[32 * b + i];
    acc += dx[b] * static_cast<float>(s);
  }
  return acc;
#endif
}

// int4 (gpt-fast, codes q in [0, 15], even column in the low nibble; group g: w = q * s + z',
// z' = zero - 8 s): y = sum_g s_g * sum_b dx_b * sum_i q_i qx_i + z'_g * xsum_g, with
// xsum_g = sum_b dx_b * bsum_b. `qxp` holds each activation block reordered as the nibbles come
// out of a 16-byte load: the 16 even columns, then the 16 odd ones.
float dot_int4_q8(const Weight& W, int64_t n, const int8_t* qxp, const float* dx, const float* xsum) {
  const uint8_t* r = W.data + n * W.row_bytes;
  const int64_t bpg = W.G / 32;  // activation blocks per group
  float total = 0.0f;
#if L2K_AVX2
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256 vtot = _mm256_setzero_ps();
#endif
  for (int64_t g = 0; g < W.gpr; ++g) {
    float s, z;
    W.group(n, g, &s, &z);
#if L2K_AVX2
    __m256 gacc = _mm256_setzero_ps();
    for (int64_t j = 0; j < bpg; ++j) {
      const int64_t b = g * bpg + j;
      _mm_prefetch(reinterpret_cast<const char*>(r + 16 * b + kPrefetch), _MM_HINT_T0);
      const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 16 * b));
      const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), m4);
      const __m256i p = dot_u8i8(q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qxp + 32 * b)));
      gacc = _mm256_fmadd_ps(_mm256_set1_ps(dx[b]), _mm256_cvtepi32_ps(p), gacc);
    }
    vtot = _mm256_fmadd_ps(gacc, _mm256_set1_ps(s), vtot);
#else
    float gacc = 0.0f;
    for (int64_t j = 0; j < bpg; ++j) {
      const int64_t b = g * bpg + j;
      int32_t t = 0;
      for (int i = 0; i < 16; ++i) {
        t += static_cast<int32_t>(r[16 * b + i] & 0x0F) * qxp[32 * b + i];
        t += static_cast<int32_t>(r[16 * b + i] >> 4) * qxp[32 * b + 16 + i];
      }
      gacc += dx[b] * static_cast<float>(t);
    }
    total += s * gacc;
#endif
    total += z * xsum[g];
  }
#if L2K_AVX2
  total += hsum(vtot);
#endif
  return total;
}

#if L2K_AVX2
// int4 rows n..n+7 (needs scales_and_zeros with row stride 2: the 8 rows' (s, zero) pairs of a
// group are 32 contiguous bytes): w = (q - 8) s + zero, so y = sum_g s_g sum_b dx_b dot(q - 8, qx)_b
// + zero_g xsum_g.
void dot8_int4_q8(const Weight& W, int64_t n, const int8_t* qxp, const float* dx, const int16_t* corr8,
                  const float* xsum, float* out) {
  const uint8_t* r[8];
  for (int i = 0; i < 8; ++i) r[i] = W.data + (n + i) * W.row_bytes;
  const int64_t bpg = W.G / 32;
  const __m256i hiw = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 tot = _mm256_setzero_ps();
  for (int64_t g = 0; g < W.gpr; ++g) {
    __m256 gacc = _mm256_setzero_ps();
    for (int64_t j = 0; j < bpg; ++j) {
      const int64_t b = g * bpg + j;
      if ((b & 1) == 0)  // the next group of 8 rows, same offset: the 8 streams advance together
        for (int i = 0; i < 8; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(r[i] + 8 * W.row_bytes + 16 * b), _MM_HINT_T0);
      const __m256i s = dot8_nibbles(r, 16 * b, qxp + 32 * b, corr8 + 8 * b);
      gacc = _mm256_fmadd_ps(_mm256_set1_ps(dx[b]), _mm256_cvtepi32_ps(s), gacc);
    }
    const uint16_t* szg = W.sz + g * W.sz_s0 + n * W.sz_s1;
    _mm_prefetch(reinterpret_cast<const char*>(szg + 32 * W.sz_s1), _MM_HINT_T0);  // 4 row groups ahead
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(szg));
    tot = _mm256_fmadd_ps(gacc, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), tot);  // scales
    tot = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hiw)), _mm256_set1_ps(xsum[g]), tot);  // zeros
  }
  _mm256_storeu_ps(out, tot);
}
#endif

at::Tensor q8act_mv(const at::Tensor& x, const Weight& W) {
  const XIn xin = read_x(x, W.K);
  TORCH_CHECK(W.K % 32 == 0, "llama2_kernels: Q8_0 activations need K % 32 == 0");
  const int64_t M = xin.M, N = W.N, K = W.K;
  at::Tensor out = out_f32(x, M, N);
  if (M == 0 || N == 0) return finish_out(out, x, N);
  ActQ8 a = quantize_rows(xin.p, M, K);
  float* op = out.data_ptr<float>();
  const int64_t nbx = K / 32;
  std::vector<float> xsum;
  if (W.fmt == kInt4) {
    std::vector<int8_t> perm(a.qs.size());
    for (int64_t b = 0; b < M * nbx; ++b) {
      for (int i = 0; i < 16; ++i) {
        perm[32 * b + i] = a.qs[32 * b + 2 * i];
        perm[32 * b + 16 + i] = a.qs[32 * b + 2 * i + 1];
      }
    }
    a.qs.swap(perm);
    const int64_t bpg = W.G / 32;
    xsum.assign(M * W.gpr, 0.0f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < W.gpr; ++g)
        for (int64_t j = 0; j < bpg; ++j) {
          const int64_t b = m * nbx + g * bpg + j;
          xsum[m * W.gpr + g] += a.d[b] * static_cast<float>(a.bsum[b]);
        }
  }
#if L2K_AVX2
  const bool rows8 = W.fmt == kInt4 && W.sz_s1 == 2;
  if (rows8) {
    a.corr8.resize(M * nbx * 8);
    make_corr8(a.qs.data(), M * nbx, a.corr8.data());
  }
#endif
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
#if L2K_AVX2
    if (rows8) {
      float tmp[8];
      for (; n + 8 <= n1; n += 8) {
        for (int64_t m = 0; m < M; ++m) {
          dot8_int4_q8(W, n, a.qs.data() + m * K, a.d.data() + m * nbx, a.corr8.data() + m * nbx * 8,
                       xsum.data() + m * W.gpr, tmp);
          for (int i = 0; i < 8; ++i) op[m * N + n + i] = tmp[i];
        }
      }
    }
#endif
    for (; n < n1; ++n) {
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* q = a.qs.data() + m * K;
        const float* d = a.d.data() + m * nbx;
        float v;
        if (W.fmt == kInt8) {
          v = W.row_scale[n] * dot_int8_q8(reinterpret_cast<const int8_t*>(W.data + n * W.row_bytes), q, d, nbx);
        } else {
          v = dot_int4_q8(W, n, q, d, xsum.data() + m * W.gpr);
        }
        op[m * N + n] = v;
      }
    }
  });
  return finish_out(out, x, N);
}

at::Tensor int8_q8_mv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  return q8act_mv(x, int8_weight(w, scales));
}
at::Tensor int4_q8_mv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t groupsize) {
  return q8act_mv(x, int4_weight(w, sz, groupsize));
}

int64_t simd_level() { return L2K_AVX2 ? 2 : 0; }

}  // namespace

TORCH_LIBRARY(llama2_kernels, m) {
  m.def("q8_0_mv(Tensor x, Tensor w) -> Tensor");
  m.def("q4_0_mv(Tensor x, Tensor w) -> Tensor");
  m.def("q4_k_mv(Tensor x, Tensor w) -> Tensor");
  m.def("gguf_dequant(Tensor w, int qtype, int row0, int row1) -> Tensor");
  m.def("int8_mv(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("int8_q8_mv(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("int4_q8_mv(Tensor x, Tensor w, Tensor scales_and_zeros, int groupsize) -> Tensor");
  m.def("int8_dequant(Tensor w, Tensor scales, int row0, int row1) -> Tensor");
  m.def("int4_mv(Tensor x, Tensor w, Tensor scales_and_zeros, int groupsize) -> Tensor");
  m.def("int4_dequant(Tensor w, Tensor scales_and_zeros, int groupsize, int row0, int row1) -> Tensor");
  m.def(
      "nf4_mv(Tensor x, Tensor packed, int n, int k, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? offset, Tensor code, int blocksize) -> Tensor");
  m.def(
      "nf4_dequant(Tensor packed, int n, int k, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, Tensor code, int blocksize, int row0, int row1) -> Tensor");
  m.def("dense_mv(Tensor x, Tensor w) -> Tensor");
  m.def("dense_dequant(Tensor w, int row0, int row1) -> Tensor");
  m.def("simd_level() -> int", &simd_level);
}

TORCH_LIBRARY_IMPL(llama2_kernels, CPU, m) {
  m.impl("q8_0_mv", &q8_0_mv);
  m.impl("q4_0_mv", &q4_0_mv);
  m.impl("q4_k_mv", &q4_k_mv);
  m.impl("gguf_dequant", &gguf_dequant);
  m.impl("int8_mv", &int8_mv);
  m.impl("int8_dequant", &int8_dequant);
  m.impl("int8_q8_mv", &int8_q8_mv);
  m.impl("int4_q8_mv", &int4_q8_mv);
  m.impl("int4_mv", &int4_mv);
  m.impl("int4_dequant", &int4_dequant);
  m.impl("nf4_mv", &nf4_mv);
  m.impl("nf4_dequant", &nf4_dequant);
  m.impl("dense_mv", &dense_mv);
  m.impl("dense_dequant", &dense_dequant);
}
