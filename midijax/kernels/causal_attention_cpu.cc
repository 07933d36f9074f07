// Causal self-attention forward and backward for XLA:CPU, as XLA FFI custom calls.
//
// Why: XLA:CPU runs attention as separate batched matmul / softmax passes over the
// [heads, queries, keys] logits, each streaming them through memory, and its small
// batched matmuls reach about half the machine's matmul peak. Here each (batch, head)
// is one work item: its query blocks' logits stay in a thread's cache between the
// matmuls (OpenBLAS sgemm, single-threaded per call) and the softmax, and the items
// are spread over XLA's intra-op thread pool. Keys above the causal diagonal are never
// computed; the backward pass recomputes the probabilities from the saved log-sum-exp
// (as flash attention does) instead of storing them.
//
// Layout: q, k, v, o, do, dq, dk, dv are float32 [B, T, H, D], the model's own layout (a
// head's rows are read with a stride of H * D, so nothing is transposed around the call);
// lse is float32 [B, H, T]. `block` divides T; `scale` multiplies q . k.
//
// Also the sampler's decode step (one new token per row against the key/value cache),
// where XLA's batched matrix-vector products over the cache ran on one thread, with the
// cache in float32 or in int8 (one float32 scale per cached key / value vector: a quarter
// of the bytes to read per step, which bounds the step at large batch x length).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using F32R3 = ffi::Buffer<ffi::F32, 3>;
using F32R4 = ffi::Buffer<ffi::F32, 4>;
using S32R0 = ffi::Buffer<ffi::S32, 0>;
using S8R4 = ffi::Buffer<ffi::S8, 4>;

namespace {

// scipy-openblas32 prefixes its symbols with scipy_.
inline void Sgemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int64_t m, int64_t n, int64_t k,
                  float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                  float beta, float* c, int64_t ldc) {
  scipy_cblas_sgemm(CblasRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

struct Shape {
  int64_t b, t, h, d;
  int64_t ld() const { return h * d; }  // row stride of a head's [T, D] slice
  // Offset of (batch, head) item i = b * H + h in a [B, T, H, D] array.
  int64_t base(int64_t i) const { return (i / h) * t * ld() + (i % h) * d; }
};

// Runs fn(item) for item in [0, total) on the caller and on the pool's other threads.
// A helper that starts late finds no work and touches nothing; the caller returns once
// every claimed item is done.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t total, F fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto run = [state, total, &fn]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < total;) {
      fn(i);
      state->done.fetch_add(1);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  // Helpers only ever call `fn` for items claimed before the caller returns, so the
  // reference to it stays valid; the shared state outlives the call.
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([run]() { run(); });
  run();
  while (state->done.load() < total) std::this_thread::yield();
}

thread_local std::vector<float> scratch_a, scratch_b;

float* Scratch(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// Row r of a query block starting at `lo` sees keys 0..lo+r.
inline int64_t Visible(int64_t lo, int64_t r) { return lo + r + 1; }

void ForwardItem(const Shape& s, int64_t block, float scale, const float* q, const float* k,
                 const float* v, float* o, float* lse) {
  const int64_t ld = s.ld();
  float* p = Scratch(scratch_a, block * s.t);
  for (int64_t lo = 0; lo < s.t; lo += block) {
    const int64_t hi = lo + block;
    // p[block, hi] = scale * q[lo:hi] . k[:hi]^T
    Sgemm(CblasNoTrans, CblasTrans, block, hi, s.d, scale, q + lo * ld,
          ld, k, ld, 0.0f, p, hi);
    for (int64_t r = 0; r < block; ++r) {
      float* row = p + r * hi;
      const int64_t n = Visible(lo, r);
      float m = row[0];
      for (int64_t c = 1; c < n; ++c) m = std::max(m, row[c]);
      float sum = 0.0f;
      for (int64_t c = 0; c < n; ++c) {
        row[c] = std::exp(row[c] - m);
        sum += row[c];
      }
      const float inv = 1.0f / sum;
      for (int64_t c = 0; c < n; ++c) row[c] *= inv;
      for (int64_t c = n; c < hi; ++c) row[c] = 0.0f;
      lse[lo + r] = m + std::log(sum);
    }
    // o[lo:hi] = p . v[:hi]
    Sgemm(CblasNoTrans, CblasNoTrans, block, s.d, hi, 1.0f, p, hi, v, ld,
          0.0f, o + lo * ld, ld);
  }
}

void BackwardItem(const Shape& s, int64_t block, float scale, const float* q, const float* k,
                  const float* v, const float* o, const float* lse, const float* d_o, float* dq,
                  float* dk, float* dv) {
  float* p = Scratch(scratch_a, block * s.t);
  float* dp = Scratch(scratch_b, block * s.t);
  const int64_t ld = s.ld();
  for (int64_t r = 0; r < s.t; ++r) {
    std::fill(dk + r * ld, dk + r * ld + s.d, 0.0f);
    std::fill(dv + r * ld, dv + r * ld + s.d, 0.0f);
  }
  for (int64_t lo = 0; lo < s.t; lo += block) {
    const int64_t hi = lo + block;
    const float* q_i = q + lo * ld;
    const float* do_i = d_o + lo * ld;
    Sgemm(CblasNoTrans, CblasTrans, block, hi, s.d, scale, q_i, ld, k, ld,
          0.0f, p, hi);
    for (int64_t r = 0; r < block; ++r) {
      float* row = p + r * hi;
      const int64_t n = Visible(lo, r);
      const float l = lse[lo + r];
      for (int64_t c = 0; c < n; ++c) row[c] = std::exp(row[c] - l);
      for (int64_t c = n; c < hi; ++c) row[c] = 0.0f;
    }
    // dv[:hi] += p^T . do_i
    Sgemm(CblasTrans, CblasNoTrans, hi, s.d, block, 1.0f, p, hi, do_i, ld,
          1.0f, dv, ld);
    // dp = do_i . v[:hi]^T
    Sgemm(CblasNoTrans, CblasTrans, block, hi, s.d, 1.0f, do_i, ld, v, ld,
          0.0f, dp, hi);
    for (int64_t r = 0; r < block; ++r) {
      // sum_c p[r, c] dp[r, c] = do[r] . o[r]: the softmax backward without a row reduce.
      const float* o_r = o + (lo + r) * ld;
      const float* do_r = do_i + r * ld;
      float delta = 0.0f;
      for (int64_t j = 0; j < s.d; ++j) delta += do_r[j] * o_r[j];
      float* prow = p + r * hi;
      const float* dprow = dp + r * hi;
      const int64_t n = Visible(lo, r);
      for (int64_t c = 0; c < n; ++c) prow[c] *= dprow[c] - delta;  // p becomes d_logits
    }
    // dq_i = scale * ds . k[:hi];  dk[:hi] += scale * ds^T . q_i
    Sgemm(CblasNoTrans, CblasNoTrans, block, s.d, hi, scale, p, hi, k, ld,
          0.0f, dq + lo * ld, ld);
    Sgemm(CblasTrans, CblasNoTrans, hi, s.d, block, scale, p, hi, q_i, ld,
          1.0f, dk, ld);
  }
}

ffi::Error CheckShape(const F32R4& q, int64_t block, Shape* s) {
  auto dims = q.dimensions();
  *s = Shape{dims[0], dims[1], dims[2], dims[3]};  // [B, T, H, D]
  if (block <= 0 || s->t % block != 0)
    return ffi::Error::InvalidArgument("causal attention: block must divide the sequence length");
  return ffi::Error::Success();
}

std::once_flag blas_threads_once;

void SingleThreadedBlas() {
  // Parallelism comes from the (batch, head) items; each sgemm runs on its caller's thread.
  std::call_once(blas_threads_once, []() { scipy_openblas_set_num_threads(1); });
}

ffi::Error Forward(ffi::ThreadPool pool, F32R4 q, F32R4 k,
                   F32R4 v, ffi::ResultBuffer<ffi::F32, 4> o,
                   ffi::ResultBuffer<ffi::F32, 3> lse, int64_t block, float scale) {
  Shape s;
  if (auto e = CheckShape(q, block, &s); e.failure()) return e;
  SingleThreadedBlas();
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  ParallelFor(pool, s.b * s.h, [&](int64_t i) {
    const int64_t n = s.base(i);
    ForwardItem(s, block, scale, qp + n, kp + n, vp + n, op + n, lp + i * s.t);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, F32R4 q, F32R4 k,
                    F32R4 v, F32R4 o,
                    F32R3 lse, F32R4 d_o,
                    ffi::ResultBuffer<ffi::F32, 4> dq, ffi::ResultBuffer<ffi::F32, 4> dk,
                    ffi::ResultBuffer<ffi::F32, 4> dv, int64_t block, float scale) {
  Shape s;
  if (auto e = CheckShape(q, block, &s); e.failure()) return e;
  SingleThreadedBlas();
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = o.typed_data(), *lp = lse.typed_data(), *dop = d_o.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  ParallelFor(pool, s.b * s.h, [&](int64_t i) {
    const int64_t n = s.base(i);
    BackwardItem(s, block, scale, qp + n, kp + n, vp + n, op + n, lp + i * s.t, dop + n,
                 dqp + n, dkp + n, dvp + n);
  });
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------------- decoding
// One new token per row: writes its key/value into cache slot `pos` and attends over
// slots 0..pos. Reads exactly the filled slots, whatever the cache's length L.
//
// q, k_new, v_new, out: float32 [B, H, D]; caches: float32 [B, H, L, D], updated in place
// (the outputs alias them); pos: int32 scalar.

void DecodeItem(int64_t length, int64_t d, int64_t pos, float scale, const float* q,
                const float* k_new, const float* v_new, float* keys, float* values, float* out) {
  std::copy(k_new, k_new + d, keys + pos * d);
  std::copy(v_new, v_new + d, values + pos * d);
  float* s = Scratch(scratch_a, pos + 1);
  float m = 0.0f;
  for (int64_t j = 0; j <= pos; ++j) {
    const float* key = keys + j * d;
    float dot = 0.0f;
    for (int64_t c = 0; c < d; ++c) dot += q[c] * key[c];
    s[j] = dot * scale;
    m = j == 0 ? s[j] : std::max(m, s[j]);
  }
  float sum = 0.0f;
  for (int64_t j = 0; j <= pos; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  std::fill(out, out + d, 0.0f);
  for (int64_t j = 0; j <= pos; ++j) {
    const float* value = values + j * d;
    const float p = s[j];
    for (int64_t c = 0; c < d; ++c) out[c] += p * value[c];
  }
  const float inv = 1.0f / sum;
  for (int64_t c = 0; c < d; ++c) out[c] *= inv;
}

// The decode outputs alias the caches (input_output_aliases); should XLA ever hand over
// fresh buffers, the cache is copied into them first.
template <typename In, typename Out>
void CopyUnlessAliased(const In& in, Out& out, int64_t n) {
  if (out->typed_data() != in.typed_data())
    std::copy(in.typed_data(), in.typed_data() + n, out->typed_data());
}

// int8 cache: a vector x is stored as round(x / s) with s = max|x| / 127 (s = 0 for a zero
// vector). The scale factors out of both sums: q . k_j = s_j (q . kq_j) and
// sum_j p_j v_j = sum_j (p_j s_j) vq_j, so the loops read one byte per element.
// Quantize is the same formula as sampling.quantize_kv (round half to even).
float Quantize(const float* x, int64_t d, int8_t* out) {
  float top = 0.0f;
  for (int64_t c = 0; c < d; ++c) top = std::max(top, std::fabs(x[c]));
  const float s = top / 127.0f;
  const float inv = s > 0.0f ? 1.0f / s : 0.0f;
  for (int64_t c = 0; c < d; ++c)
    out[c] = static_cast<int8_t>(std::clamp(std::nearbyint(x[c] * inv), -127.0f, 127.0f));
  return s;
}

#if defined(__AVX512F__)
// 16 int8 as float32.
inline __m512 Load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Lane i of the result = the sum of v[i]'s 16 lanes: a shuffle-and-add tree (15 steps for
// 16 vectors instead of a full horizontal sum per vector). The tree leaves input u at lane
// 4 * (u % 4) + u / 4, so the inputs are read in that (self-inverse) order.
inline __m512 Sum16(const __m512* v) {
  auto in = [v](int m) { return v[(m % 4) * 4 + m / 4]; };
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i) {  // 128-bit blocks 0-1: input 2i, 2-3: input 2i+1
    const __m512 a = in(2 * i), b = in(2 * i + 1);
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; ++i)  // block k: input 4i + k
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_ps(_mm512_unpacklo_ps(y[2 * i], y[2 * i + 1]),
                         _mm512_unpackhi_ps(y[2 * i], y[2 * i + 1]));
  const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(z[0]), _mm512_castps_pd(z[1]));
  const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(z[0]), _mm512_castps_pd(z[1]));
  return _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
}

// Scores s[j] = (q . key_j) * k_scales[j] * scale for j in [0, n), n a multiple of 16, and
// the output sum over j of p[j] v_scales[j] value_j, for head dims D = 16 * C.
template <int C>
void Int8Scores(const float* q, const int8_t* keys, const float* k_scales, float scale,
                int64_t n, float* s) {
  __m512 qv[C];
  for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < n; j += 16) {
    __m512 acc[16];
    for (int t = 0; t < 16; ++t) {
      const int8_t* key = keys + (j + t) * 16 * C;
      __m512 a = _mm512_mul_ps(qv[0], Load16(key));
      for (int c = 1; c < C; ++c) a = _mm512_fmadd_ps(qv[c], Load16(key + 16 * c), a);
      acc[t] = a;
    }
    const __m512 dots = _mm512_mul_ps(_mm512_mul_ps(Sum16(acc), _mm512_loadu_ps(k_scales + j)), sc);
    _mm512_storeu_ps(s + j, dots);
  }
}

template <int C>
void Int8Values(const float* p, const int8_t* values, const float* v_scales, int64_t n,
                float* out) {
  __m512 o[C];
  for (int c = 0; c < C; ++c) o[c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m512 w = _mm512_set1_ps(p[j] * v_scales[j]);
    const int8_t* value = values + j * 16 * C;
    for (int c = 0; c < C; ++c) o[c] = _mm512_fmadd_ps(w, Load16(value + 16 * c), o[c]);
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + 16 * c, o[c]);
}
#endif

// Vectorized paths for head dims 32, 64 and 128 on AVX-512 machines; the loops below for
// the rest (and for the last n % 16 keys).
bool Int8ScoresFast(int64_t d, const float* q, const int8_t* keys, const float* k_scales,
                    float scale, int64_t n, float* s) {
#if defined(__AVX512F__)
  switch (d) {
    case 32: Int8Scores<2>(q, keys, k_scales, scale, n, s); return true;
    case 64: Int8Scores<4>(q, keys, k_scales, scale, n, s); return true;
    case 128: Int8Scores<8>(q, keys, k_scales, scale, n, s); return true;
  }
#endif
  return false;
}

bool Int8ValuesFast(int64_t d, const float* p, const int8_t* values, const float* v_scales,
                    int64_t n, float* out) {
#if defined(__AVX512F__)
  switch (d) {
    case 32: Int8Values<2>(p, values, v_scales, n, out); return true;
    case 64: Int8Values<4>(p, values, v_scales, n, out); return true;
    case 128: Int8Values<8>(p, values, v_scales, n, out); return true;
  }
#endif
  return false;
}

void DecodeItemInt8(int64_t length, int64_t d, int64_t pos, float scale, const float* q,
                    const float* k_new, const float* v_new, int8_t* keys, int8_t* values,
                    float* k_scales, float* v_scales, float* out) {
  k_scales[pos] = Quantize(k_new, d, keys + pos * d);
  v_scales[pos] = Quantize(v_new, d, values + pos * d);
  const int64_t n = pos + 1;
  float* s = Scratch(scratch_a, n);
  int64_t j = Int8ScoresFast(d, q, keys, k_scales, scale, n / 16 * 16, s) ? n / 16 * 16 : 0;
  for (; j < n; ++j) {
    const int8_t* key = keys + j * d;
    float dot = 0.0f;
    for (int64_t c = 0; c < d; ++c) dot += q[c] * static_cast<float>(key[c]);
    s[j] = dot * k_scales[j] * scale;
  }
  const float m = *std::max_element(s, s + n);
  float sum = 0.0f;
  for (j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  const int64_t fast = n / 16 * 16;
  float* tail = Scratch(scratch_b, d);
  if (Int8ValuesFast(d, s, values, v_scales, fast, out)) {
    j = fast;
  } else {
    std::fill(out, out + d, 0.0f);
    j = 0;
  }
  std::fill(tail, tail + d, 0.0f);
  for (; j < n; ++j) {
    const int8_t* value = values + j * d;
    const float p = s[j] * v_scales[j];
    for (int64_t c = 0; c < d; ++c) tail[c] += p * static_cast<float>(value[c]);
  }
  const float inv = 1.0f / sum;
  for (int64_t c = 0; c < d; ++c) out[c] = (out[c] + tail[c]) * inv;
}

ffi::Error DecodeInt8(ffi::ThreadPool pool, F32R3 q, F32R3 k_new, F32R3 v_new, S8R4 k_cache,
                      S8R4 v_cache, F32R3 k_scale, F32R3 v_scale, S32R0 pos_buffer,
                      ffi::ResultBuffer<ffi::F32, 3> out, ffi::ResultBuffer<ffi::S8, 4> k_out,
                      ffi::ResultBuffer<ffi::S8, 4> v_out,
                      ffi::ResultBuffer<ffi::F32, 3> ks_out,
                      ffi::ResultBuffer<ffi::F32, 3> vs_out, float scale) {
  auto dims = k_cache.dimensions();
  const int64_t items = dims[0] * dims[1], length = dims[2], d = dims[3];
  const int64_t pos = pos_buffer.typed_data()[0];
  if (pos < 0 || pos >= length)
    return ffi::Error::InvalidArgument("decode attention: position outside the cache");
  CopyUnlessAliased(k_cache, k_out, items * length * d);
  CopyUnlessAliased(v_cache, v_out, items * length * d);
  CopyUnlessAliased(k_scale, ks_out, items * length);
  CopyUnlessAliased(v_scale, vs_out, items * length);
  const float *qp = q.typed_data(), *kn = k_new.typed_data(), *vn = v_new.typed_data();
  int8_t *kp = k_out->typed_data(), *vp = v_out->typed_data();
  float *ksp = ks_out->typed_data(), *vsp = vs_out->typed_data(), *op = out->typed_data();
  ParallelFor(pool, items, [&](int64_t i) {
    DecodeItemInt8(length, d, pos, scale, qp + i * d, kn + i * d, vn + i * d,
                   kp + i * length * d, vp + i * length * d, ksp + i * length,
                   vsp + i * length, op + i * d);
  });
  return ffi::Error::Success();
}

ffi::Error Decode(ffi::ThreadPool pool, F32R3 q, F32R3 k_new, F32R3 v_new, F32R4 k_cache,
                  F32R4 v_cache, S32R0 pos_buffer,
                  ffi::ResultBuffer<ffi::F32, 3> out, ffi::ResultBuffer<ffi::F32, 4> k_out,
                  ffi::ResultBuffer<ffi::F32, 4> v_out, float scale) {
  auto dims = k_cache.dimensions();
  const int64_t items = dims[0] * dims[1], length = dims[2], d = dims[3];
  const int64_t pos = pos_buffer.typed_data()[0];
  if (pos < 0 || pos >= length)
    return ffi::Error::InvalidArgument("decode attention: position outside the cache");
  CopyUnlessAliased(k_cache, k_out, items * length * d);
  CopyUnlessAliased(v_cache, v_out, items * length * d);
  const float *qp = q.typed_data(), *kn = k_new.typed_data(), *vn = v_new.typed_data();
  float *kp = k_out->typed_data(), *vp = v_out->typed_data(), *op = out->typed_data();
  ParallelFor(pool, items, [&](int64_t i) {
    DecodeItem(length, d, pos, scale, qp + i * d, kn + i * d, vn + i * d, kp + i * length * d,
               vp + i * length * d, op + i * d);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MidijaxCausalAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32R4>()
                                  .Arg<F32R4>()
                                  .Arg<F32R4>()
                                  .Ret<F32R4>()
                                  .Ret<F32R3>()
                                  .Attr<int64_t>("block")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MidijaxCausalAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32R4>()
                                  .Arg<F32R4>()
                                  .Arg<F32R4>()
                                  .Arg<F32R4>()
                                  .Arg<F32R3>()
                                  .Arg<F32R4>()
                                  .Ret<F32R4>()
                                  .Ret<F32R4>()
                                  .Ret<F32R4>()
                                  .Attr<int64_t>("block")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MidijaxDecodeAttention, Decode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32R3>()
                                  .Arg<F32R3>()
                                  .Arg<F32R3>()
                                  .Arg<F32R4>()
                                  .Arg<F32R4>()
                                  .Arg<S32R0>()
                                  .Ret<F32R3>()
                                  .Ret<F32R4>()
                                  .Ret<F32R4>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MidijaxDecodeAttentionInt8, DecodeInt8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32R3>()
                                  .Arg<F32R3>()
                                  .Arg<F32R3>()
                                  .Arg<S8R4>()
                                  .Arg<S8R4>()
                                  .Arg<F32R3>()
                                  .Arg<F32R3>()
                                  .Arg<S32R0>()
                                  .Ret<F32R3>()
                                  .Ret<S8R4>()
                                  .Ret<S8R4>()
                                  .Ret<F32R3>()
                                  .Ret<F32R3>()
                                  .Attr<float>("scale"));
