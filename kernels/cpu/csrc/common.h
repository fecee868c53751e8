// Shared pieces of the CPU kernels: SIMD vectors across a block of channels, and their loads and stores.
//
// The ATen vector headers pick their implementation (AVX-512, AVX2, or a scalar fallback) from the CPU_CAPABILITY*
// macros, which the Python loader sets from torch.backends.cpu.get_cpu_capability() together with the matching
// compiler flags (kernels/cpu/build.py).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

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

// Channels per block: the SIMD width of a task's state tile (2 AVX2 float vectors, 1 AVX-512 float vector).
constexpr int64_t kBlockChannels = 16;

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

// exp of the decays: ATen's polynomial exp (about 20 ulp) in fp32, the accurate one in float64.
inline at::vec::Vectorized<float> fast_exp(const at::vec::Vectorized<float>& x) { return x.exp_u20(); }
inline at::vec::Vectorized<double> fast_exp(const at::vec::Vectorized<double>& x) { return x.exp(); }

template <typename Vec>
inline Vec sigmoid(const Vec& x) {
  return Vec(1) / (Vec(1) + x.neg().exp());
}

// torch.nn.functional.softplus with beta 1 and threshold 20.
template <typename Vec>
inline Vec softplus(const Vec& x) {
  return Vec::blendv(x.exp().log1p(), x, x > Vec(20));
}

inline void check_channels_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-2) == 1 || t.size(-2) == 1, name, " must have channel stride 1");
}

}  // namespace vim_cpu
