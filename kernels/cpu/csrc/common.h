// Shared pieces of the CPU kernels: SIMD vectors across a block of channels, and their loads and stores.
//
// The ATen vector headers pick their implementation (AVX-512, AVX2, or a scalar fallback) from the CPU_CAPABILITY*
// macros, which the Python loader sets from torch.backends.cpu.get_cpu_capability() together with the matching
// compiler flags (kernels/cpu/build.py).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <vector>

namespace vim_cpu {

#if defined(CPU_CAPABILITY_AVX512)
constexpr const char* kCapability = "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
constexpr const char* kCapability = "AVX2";
#else
constexpr const char* kCapability = "DEFAULT";  // ATen's scalar fallback
#endif

// Channels per task: the width of a task's state tile (8 AVX2 float vectors, 4 AVX-512 ones). 64 channels = 256
// contiguous bytes of each token-major row per token, four cache lines fetched together; measured (one thread, CPU
// time, Vim-Ti shape) 1.7-2.5 ms per forward at 197 tokens against 2.9 ms with 16 channels.
constexpr int64_t kBlockChannels = 64;
// Vectors the fp32 activation functions (softplus_n, sigmoid_n below) interleave at a time: 4 chains keep their
// temporaries in the 16 AVX2 registers; measured (one thread, Vim-Ti shape) 4 beat 8 on the conv by ~10% and tied on
// the scan.
constexpr int64_t kGroupVectors = 4;

template <typename scalar_t>
struct Block {
  using Vec = at::vec::Vectorized<scalar_t>;
  static constexpr int64_t V = Vec::size();
  static constexpr int64_t K = (kBlockChannels + V - 1) / V;  // vectors per block
  static constexpr int64_t C = K * V;                         // channels per block

  int64_t count[K];  // valid lanes of each vector: V, fewer at the end of the channel axis, or 0

  Block(int64_t c0, int64_t dim) {
    for (int64_t k = 0; k < K; ++k) count[k] = std::clamp<int64_t>(dim - c0 - k * V, 0, V);
  }
  // Lanes past the end of the channel axis read as zero and are never written.
  void load(const scalar_t* p, Vec* out) const {
    for (int64_t k = 0; k < K; ++k) {
      out[k] = count[k] == V ? Vec::loadu(p + k * V) : count[k] > 0 ? Vec::loadu(p + k * V, count[k]) : Vec(0);
    }
  }
  void store(scalar_t* p, const Vec* in) const {
    for (int64_t k = 0; k < K; ++k) {
      if (count[k] == V) in[k].store(p + k * V);
      else if (count[k] > 0) in[k].store(p + k * V, count[k]);
    }
  }
};

// K vectors left uninitialised, for a token loop's temporaries: ATen's Vectorized() stores zeros, which GCC keeps when
// the array is then filled through branches (Block::load), e.g. 48 stores per token in the scan's forward
template <typename Vec, int64_t K>
struct UninitVecs {
  alignas(Vec) unsigned char raw[K * sizeof(Vec)];
  Vec* data() { return reinterpret_cast<Vec*>(raw); }
};

// Software prefetch of one token's row of a block (Blk::C channels, e.g. 256 bytes in fp32) a few tokens ahead of
// its use. The kernels walk token-major rows whose token stride is the whole channel axis (1.5-3 KiB): a few cache
// lines, then a jump, which the hardware prefetchers follow poorly, so without this the token loops wait on memory
// once the activations outgrow L2 (measured: at 1024 tokens most of the scan's time did not depend on the state size).
constexpr int64_t kPrefetchTokens = 4;
template <typename Blk, typename scalar_t>
inline void prefetch_row(const scalar_t* p) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < Blk::C * int64_t(sizeof(scalar_t)); i += 64) __builtin_prefetch(c + i);
}

template <typename scalar_t>
inline scalar_t horizontal_sum(const at::vec::Vectorized<scalar_t>* v, int64_t K) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec s = v[0];
  for (int64_t k = 1; k < K; ++k) s = s + v[k];
  __at_align__ scalar_t lanes[Vec::size()];
  s.store(lanes);
  scalar_t r = 0;
  for (int64_t i = 0; i < Vec::size(); ++i) r += lanes[i];
  return r;
}

// 2**x of the decays, x = delta * A * log2(e) (A pre-scaled once per task). fp32: x clamped to [-125, 127] (a decay
// below 2**-125 is as good as zero next to any state, and the result stays a normal number), rounded to the nearest
// integer n by the magic-number trick (adding 1.5 * 2**23 leaves n in the low mantissa bits), a degree-5 polynomial
// for 2**f on f = x - n in [-0.5, 0.5] (relative error 1.9e-7 evaluated in fp32; fitted to the relative error), and
// n added to the result's exponent bits with an integer add: 12 vector operations, 5 of them FMAs (the degree-6
// version with a float round, a conversion and a multiply took 14, 6 of them on the FMA ports). float64: ATen's exp2.
constexpr float kExp2Poly[5] = {1.3264719e-3f, 9.6715139e-3f, 5.5507340e-2f, 2.4022242e-1f, 6.9314700e-1f};
constexpr float kRoundMagic = 12582912.f;  // 1.5 * 2**23

// The fp32 functions below work on G vectors at once, one step over all G before the next: the G independent
// dependency chains then interleave in the instruction stream. One vector's softplus is a chain of ~30 operations
// (~100 cycles of latency); written one vector after another, out-of-order execution overlapped only one or two such
// chains (the scheduler fills with their waiting operations): the scan's softplus loop held ~35% of its samples at
// N = 1 (perf annotate). G = 1 is the plain one-vector function.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
namespace raw {  // the intrinsics fast_exp2 needs, at the compiled vector width
#if defined(CPU_CAPABILITY_AVX512)
#define VIM_MM(name) _mm512_##name
using F = __m512;
inline __m512i bits(F x) { return _mm512_castps_si512(x); }
inline F from_bits(__m512i x) { return _mm512_castsi512_ps(x); }
#else
#define VIM_MM(name) _mm256_##name
using F = __m256;
inline __m256i bits(F x) { return _mm256_castps_si256(x); }
inline F from_bits(__m256i x) { return _mm256_castsi256_ps(x); }
#endif
inline F set1(float v) { return VIM_MM(set1_ps)(v); }
inline F max(F a, F b) { return VIM_MM(max_ps)(a, b); }
inline F min(F a, F b) { return VIM_MM(min_ps)(a, b); }
inline F add(F a, F b) { return VIM_MM(add_ps)(a, b); }
inline F sub(F a, F b) { return VIM_MM(sub_ps)(a, b); }
inline F fmadd(F a, F b, F c) { return VIM_MM(fmadd_ps)(a, b, c); }
// p * 2**n for t = n + magic: n << 23 (the magic's bits shift out) added to p's exponent bits
inline F scale(F p, F t) { return from_bits(VIM_MM(add_epi32)(bits(p), VIM_MM(slli_epi32)(bits(t), 23))); }
#undef VIM_MM
}  // namespace raw

// x[g] = 2**x[g] for g < G. kClampHigh = false: the caller guarantees x <= 0 or NaN (the decays when A <= 0 and
// delta >= 0, the softplus), which saves the upper clamp, one of the state loop's ~20 vector operations. kClampLow =
// false: the caller guarantees x >= -125 (not NaN) as well, which saves the lower one.
template <int64_t G, bool kClampHigh = true, bool kClampLow = true>
inline void fast_exp2_n(at::vec::Vectorized<float>* x) {
  raw::F v[G], t[G], p[G];
#pragma GCC unroll 16
  for (int64_t g = 0; g < G; ++g) {
    v[g] = x[g];
    if constexpr (kClampLow) v[g] = raw::max(v[g], raw::set1(-125.f));  // max(NaN, -125) is -125
    if constexpr (kClampHigh) v[g] = raw::min(v[g], raw::set1(127.f));
  }
#pragma GCC unroll 16
  for (int64_t g = 0; g < G; ++g) t[g] = raw::add(v[g], raw::set1(kRoundMagic));
#pragma GCC unroll 16
  for (int64_t g = 0; g < G; ++g) v[g] = raw::sub(v[g], raw::sub(t[g], raw::set1(kRoundMagic)));  // f
#pragma GCC unroll 16
  for (int64_t g = 0; g < G; ++g) p[g] = raw::set1(kExp2Poly[0]);
#pragma GCC unroll 4
  for (int i = 1; i < 5; ++i) {
#pragma GCC unroll 16
    for (int64_t g = 0; g < G; ++g) p[g] = raw::fmadd(p[g], v[g], raw::set1(kExp2Poly[i]));
  }
#pragma GCC unroll 16
  for (int64_t g = 0; g < G; ++g) x[g] = raw::scale(raw::fmadd(p[g], v[g], raw::set1(1.f)), t[g]);
}
#else
template <int64_t G, bool kClampHigh = true, bool kClampLow = true>
inline void fast_exp2_n(at::vec::Vectorized<float>* x) {
  for (int64_t g = 0; g < G; ++g) x[g] = (x[g] * at::vec::Vectorized<float>(0.6931471805599453f)).exp_u20();
}
#endif
template <bool kClampHigh = true, bool kClampLow = true>
inline at::vec::Vectorized<float> fast_exp2(at::vec::Vectorized<float> x) {
  fast_exp2_n<1, kClampHigh, kClampLow>(&x);
  return x;
}
template <bool kClampHigh = true, bool kClampLow = true>
inline at::vec::Vectorized<double> fast_exp2(const at::vec::Vectorized<double>& x) { return x.exp2(); }

constexpr double kLog2e = 1.4426950408889634;
constexpr float kLog2eLow = 1.925962989091e-08f;  // log2(e) - float(log2(e))
constexpr float kLn2f = 0.6931471805599453f;

// The per-token activations (silu, gate, softplus) take exp(x) in fp32 as 2**(x log2 e) with the decays' exp2 above
// (one multiply more; relative error ~2e-7 plus the rounding of x log2 e, about 2e-7 x |x log2 e|, which softplus
// adds back), which takes about two thirds of the operations of ATen's exp_u20 (its special-case handling
// included); arguments are clamped, so a NaN argument gives a finite result and the callers keep NaN propagation
// through their other factors. The accurate exp in float64.
//
// out[i] = sigmoid(x[i]) for i < n, kGroupVectors at a time in fp32
template <int64_t n>
inline void sigmoid_n(const at::vec::Vectorized<float>* x, at::vec::Vectorized<float>* out) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t G = n < kGroupVectors ? n : kGroupVectors;
  static_assert(n % G == 0);
  for (int64_t i = 0; i < n; i += G) {
    Vec e[G];
#pragma GCC unroll 16
    for (int64_t g = 0; g < G; ++g) e[g] = x[i + g].neg() * Vec(static_cast<float>(kLog2e));
    fast_exp2_n<G>(e);
#pragma GCC unroll 16
    for (int64_t g = 0; g < G; ++g) out[i + g] = Vec(1) / (Vec(1) + e[g]);
  }
}
template <int64_t n>
inline void sigmoid_n(const at::vec::Vectorized<double>* x, at::vec::Vectorized<double>* out) {
  using Vec = at::vec::Vectorized<double>;
  for (int64_t i = 0; i < n; ++i) out[i] = Vec(1) / (Vec(1) + x[i].neg().exp());
}

// torch.nn.functional.softplus with beta 1 and threshold 20, in place on x[i] for i < n (kGroupVectors at a time in
// fp32). float64: log1p(exp(x)) with Sleef's accurate functions. fp32: max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1],
// with log1p(e) = 2 atanh(e / (2 + e)) as an odd series in t = e / (2 + e) <= 1/3 (terms to t**11: relative error
// ~1e-7, no cancellation for small e); Sleef's log1p costs about as much as the rest of a token's per-channel work.
template <int64_t n>
inline void softplus_n(at::vec::Vectorized<double>* x) {
  using Vec = at::vec::Vectorized<double>;
  for (int64_t i = 0; i < n; ++i) x[i] = Vec::blendv(x[i].exp().log1p(), x[i], x[i] > Vec(20));
}
template <int64_t n>
inline void softplus_n(at::vec::Vectorized<float>* xs) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t G = n < kGroupVectors ? n : kGroupVectors;
  static_assert(n % G == 0);
  for (int64_t i = 0; i < n; i += G) {
    Vec* x = xs + i;
    Vec e[G], r[G], p[G];
    // e = 2**(a log2 e) for a = -|x|, with the rounding error r of the product a log2(e) (and a times log2(e)'s
    // low part) added back to first order: at |x| = 30 that rounding alone costs up to 1.8e-6 relative
#pragma GCC unroll 16
    for (int64_t g = 0; g < G; ++g) {
      const Vec a = x[g].abs().neg();
      e[g] = a * Vec(static_cast<float>(kLog2e));
      r[g] = at::vec::fmadd(a, Vec(static_cast<float>(kLog2e)), e[g].neg()) + a * Vec(kLog2eLow);
    }
    fast_exp2_n<G, false>(e);  // the argument is <= 0 (or NaN)
#pragma GCC unroll 16
    for (int64_t g = 0; g < G; ++g) e[g] = at::vec::fmadd(e[g] * r[g], Vec(kLn2f), e[g]);
    // log1p(e) for e in [0, 1] as e (1 + e Q(e)), Q of degree 7 fitted for relative error (1.6e-7 in fp32 with
    // FMA; the Triton kernels' _log1p_unit): no division
#pragma GCC unroll 16
    for (int64_t g = 0; g < G; ++g) p[g] = Vec(0.0053646355f);
#pragma GCC unroll 8
    for (float c : {-0.030065037f, 0.07920331f, -0.13753699f, 0.19153607f, -0.24857152f, 0.3332132f, -0.49999648f}) {
#pragma GCC unroll 16
      for (int64_t g = 0; g < G; ++g) p[g] = at::vec::fmadd(p[g], e[g], Vec(c));
    }
#pragma GCC unroll 16
    for (int64_t g = 0; g < G; ++g) {
      const Vec log1p_e = at::vec::fmadd(e[g], p[g] * e[g], e[g]);
      x[g] = Vec::blendv(at::vec::maximum(x[g], Vec(0)) + log1p_e, x[g], x[g] > Vec(20));
    }
  }
}

// Loads a (rows, dim) slice with any strides as vectors over a block of channels: out[r * K + k], rows x K.
template <typename Blk, typename scalar_t>
inline void load_strided_rows(const Blk& blk, const scalar_t* p, int64_t rows, int64_t row_stride,
                              int64_t chan_stride, int64_t c0, int64_t dim, typename Blk::Vec* out) {
  __at_align__ scalar_t tmp[Blk::C];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < Blk::C; ++c) tmp[c] = c0 + c < dim ? p[r * row_stride + (c0 + c) * chan_stride] : 0;
    for (int64_t k = 0; k < Blk::K; ++k) out[r * Blk::K + k] = Blk::Vec::loadu(tmp + k * Blk::V);
  }
}

inline void check_channels_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-2) == 1 || t.size(-2) == 1, name, " must have channel stride 1");
}

}  // namespace vim_cpu
