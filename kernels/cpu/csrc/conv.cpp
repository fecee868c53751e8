// Vim's two-branch causal depthwise conv + silu on CPU, forward and backward. Semantics:
// vim.kernels.bidirectional_conv_silu_ref. Branch 0 is causal (tap width-1 on the current token, tap k on token
// t - (width-1) + k); branch 1, the causal conv of the reversed sequence, reads token t + (width-1) - k with tap k.
//
// Layouts (op.py): x and gout with channel stride 1 (x (batch, dim, L), gout (batch, 2, dim, L)), weight
// (2, dim, width) any strides, bias (2, dim) contiguous. Outputs token-major: y (batch, 2, L, dim), gx (batch, L, dim).
#include <torch/extension.h>

#include <mutex>

#include "common.h"

namespace vim_cpu {
namespace {

template <typename scalar_t>
void conv_fwd_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y,
                   at::Tensor& pre) {
  using Blk = Block<scalar_t>;
  using Vec = typename Blk::Vec;
  constexpr int64_t K = Blk::K;
  const int64_t batch = x.size(0), dim = x.size(1), L = x.size(2), W = weight.size(2);
  const int64_t nblocks = (dim + Blk::C - 1) / Blk::C;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t sxb = x.stride(0), sxt = x.stride(2);
  scalar_t* yp = y.data_ptr<scalar_t>();
  scalar_t* prep = pre.defined() ? pre.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, batch * nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vec> w(2 * W * K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblocks, c0 = (task % nblocks) * Blk::C;
      const Blk blk(c0, dim);
      for (int64_t g = 0; g < 2; ++g) {
        load_strided_rows(blk, weight.const_data_ptr<scalar_t>() + g * weight.stride(0), W, weight.stride(2),
                          weight.stride(1), c0, dim, &w[g * W * K]);
      }
      for (int64_t g = 0; g < 2; ++g) {
        Vec bv[K];
        blk.load(bias.const_data_ptr<scalar_t>() + g * dim + c0, bv);
        for (int64_t t = 0; t < L; ++t) {
          const int64_t ahead = t + (W - 1) + kPrefetchTokens;  // the newest row either branch reads, a few tokens on
          if (ahead < L) prefetch_row<Blk>(xp + b * sxb + ahead * sxt + c0);
          UninitVecs<Vec, K> acc_, xv_, sg_;
          Vec* acc = acc_.data();
          Vec* xv = xv_.data();
          Vec* sg = sg_.data();
          for (int64_t k = 0; k < K; ++k) acc[k] = bv[k];
          for (int64_t j = 0; j < W; ++j) {
            const int64_t s = g == 0 ? t - (W - 1) + j : t + (W - 1) - j;
            if (s < 0 || s >= L) continue;
            blk.load(xp + b * sxb + s * sxt + c0, xv);
            for (int64_t k = 0; k < K; ++k) acc[k] = at::vec::fmadd(w[(g * W + j) * K + k], xv[k], acc[k]);
          }
          const int64_t row = ((b * 2 + g) * L + t) * dim + c0;
          if (prep) blk.store(prep + row, acc);
          sigmoid_n<K>(acc, sg);
          for (int64_t k = 0; k < K; ++k) acc[k] = acc[k] * sg[k];
          blk.store(yp + row, acc);
        }
      }
    }
  });
}

template <typename scalar_t>
void conv_bwd_impl(const at::Tensor& gout, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& pre,
                   at::Tensor& gx, at::Tensor& gw_part, at::Tensor& gb_part) {
  using Blk = Block<scalar_t>;
  using Vec = typename Blk::Vec;
  constexpr int64_t K = Blk::K;
  const int64_t batch = x.size(0), dim = x.size(1), L = x.size(2), W = weight.size(2);
  const int64_t nblocks = (dim + Blk::C - 1) / Blk::C;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = gout.const_data_ptr<scalar_t>();
  const scalar_t* prep = pre.const_data_ptr<scalar_t>();
  const int64_t sxb = x.stride(0), sxt = x.stride(2);
  const int64_t sgb = gout.stride(0), sgg = gout.stride(1), sgt = gout.stride(3);
  scalar_t *gxp = gx.data_ptr<scalar_t>(), *gwp = gw_part.data_ptr<scalar_t>(), *gbp = gb_part.data_ptr<scalar_t>();
  at::parallel_for(0, batch * nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vec> w(2 * W * K), gw(2 * W * K), gpre(2 * L * K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblocks, c0 = (task % nblocks) * Blk::C;
      const Blk blk(c0, dim);
      for (int64_t g = 0; g < 2; ++g) {
        load_strided_rows(blk, weight.const_data_ptr<scalar_t>() + g * weight.stride(0), W, weight.stride(2),
                          weight.stride(1), c0, dim, &w[g * W * K]);
      }
      std::fill(gw.begin(), gw.end(), Vec(0));
      for (int64_t g = 0; g < 2; ++g) {
        Vec gb[K];
        for (int64_t k = 0; k < K; ++k) gb[k] = Vec(0);
        for (int64_t t = 0; t < L; ++t) {  // gradient before the silu
          Vec go[K], p[K];
          blk.load(gp + b * sgb + g * sgg + t * sgt + c0, go);
          blk.load(prep + ((b * 2 + g) * L + t) * dim + c0, p);
          Vec* dst = &gpre[(g * L + t) * K];
          Vec sg[K];
          sigmoid_n<K>(p, sg);
          for (int64_t k = 0; k < K; ++k) {
            dst[k] = go[k] * sg[k] * (Vec(1) + p[k] * (Vec(1) - sg[k]));
            gb[k] = gb[k] + dst[k];
          }
        }
        blk.store(gbp + (b * 2 + g) * dim + c0, gb);
      }
      for (int64_t s = 0; s < L; ++s) {
        Vec acc[K], xv[K];
        for (int64_t k = 0; k < K; ++k) acc[k] = Vec(0);
        blk.load(xp + b * sxb + s * sxt + c0, xv);
        for (int64_t g = 0; g < 2; ++g) {
          for (int64_t j = 0; j < W; ++j) {
            const int64_t t = g == 0 ? s + (W - 1) - j : s - (W - 1) + j;  // output token reading x[s] via tap j
            if (t < 0 || t >= L) continue;
            const Vec* gpv = &gpre[(g * L + t) * K];
            for (int64_t k = 0; k < K; ++k) {
              acc[k] = at::vec::fmadd(w[(g * W + j) * K + k], gpv[k], acc[k]);
              gw[(g * W + j) * K + k] = at::vec::fmadd(gpv[k], xv[k], gw[(g * W + j) * K + k]);
            }
          }
        }
        blk.store(gxp + (b * L + s) * dim + c0, acc);
      }
      for (int64_t i = 0; i < 2 * W; ++i) blk.store(gwp + (b * 2 * W + i) * dim + c0, &gw[i * K]);
    }
  });
}

at::Tensor sum_batch(const at::Tensor& parts) {
  // per-batch partials summed in batch order, independent of the thread count
  auto out = parts.select(0, 0).clone();
  for (int64_t i = 1; i < parts.size(0); ++i) out.add_(parts.select(0, i));
  return out;
}

}  // namespace

// Returns y (batch, 2, L, dim) and, when save is set, the pre-activation of the same shape for the backward.
std::vector<at::Tensor> conv_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, bool save) {
  check_channels_contiguous(x, "x");
  TORCH_CHECK(bias.is_contiguous(), "bias must be contiguous");
  auto y = at::empty({x.size(0), 2, x.size(2), x.size(1)}, x.options());
  at::Tensor pre;
  if (save) pre = at::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vim_cpu_conv_fwd", [&] { conv_fwd_impl<scalar_t>(x, weight, bias, y, pre); });
  if (!save) return {y};
  return {y, pre};
}

// Returns gx (batch, L, dim), gweight (2, dim, width), gbias (2, dim).
std::vector<at::Tensor> conv_bwd(const at::Tensor& gout, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& pre) {
  check_channels_contiguous(x, "x");
  check_channels_contiguous(gout, "gout");
  TORCH_CHECK(pre.is_contiguous(), "saved tensors must be contiguous");
  const int64_t batch = x.size(0), dim = x.size(1), L = x.size(2), W = weight.size(2);
  auto gx = at::empty({batch, L, dim}, x.options());
  auto gw_part = at::empty({batch, 2, W, dim}, x.options()), gb_part = at::empty({batch, 2, dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vim_cpu_conv_bwd", [&] {
    conv_bwd_impl<scalar_t>(gout, x, weight, pre, gx, gw_part, gb_part);
  });
  return {gx, sum_batch(gw_part).transpose(1, 2).contiguous(), sum_batch(gb_part)};
}

// Throughput probe for the benchmarks' exp-bound floor: `reps` passes of the scan's fp32 decay exp (fast_exp2) over
// x (small enough to stay in cache), split over the threads as the kernels are. Returns a sum so nothing is elided.
double exp2_probe(const at::Tensor& x, int64_t reps) {
  using Vec = at::vec::Vectorized<float>;
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && x.numel() % (4 * Vec::size()) == 0,
              "x: contiguous float32 with a multiple of 4 vectors");
  const float* p = x.const_data_ptr<float>();
  const int64_t groups = x.numel() / (4 * Vec::size());
  std::mutex mutex;
  double total = 0;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    Vec acc[4] = {Vec(0), Vec(0), Vec(0), Vec(0)};
    for (int64_t r = 0; r < reps; ++r) {
      for (int64_t i = begin; i < end; ++i) {
        for (int j = 0; j < 4; ++j) acc[j] = acc[j] + fast_exp2(Vec::loadu(p + (4 * i + j) * Vec::size()));
      }
    }
    Vec sum = acc[0] + acc[1] + acc[2] + acc[3];
    const float part = horizontal_sum(&sum, 1);
    std::lock_guard<std::mutex> lock(mutex);
    total += part;
  });
  return total;
}

std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const at::Tensor& D, const at::Tensor& z,
                                 const at::Tensor& bias, bool softplus, int64_t chunk, bool save);
at::Tensor scan_fwd_lowrank(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& dproj, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& C, const at::Tensor& D, const at::Tensor& z,
                            const at::Tensor& bias, bool softplus);
std::vector<at::Tensor> scan_bwd(const at::Tensor& gout, const at::Tensor& u, const at::Tensor& delta,
                                 const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                                 const at::Tensor& z, const at::Tensor& bias, const at::Tensor& ysum,
                                 const at::Tensor& states, bool softplus, int64_t chunk);

}  // namespace vim_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan_fwd", &vim_cpu::scan_fwd, "bidirectional selective scan, forward");
  m.def("scan_fwd_lowrank", &vim_cpu::scan_fwd_lowrank, "bidirectional selective scan, forward, dt_proj fused in");
  m.def("scan_bwd", &vim_cpu::scan_bwd, "bidirectional selective scan, backward");
  m.def("conv_fwd", &vim_cpu::conv_fwd, "two-branch causal depthwise conv + silu, forward");
  m.def("conv_bwd", &vim_cpu::conv_bwd, "two-branch causal depthwise conv + silu, backward");
  m.def("exp2_probe", &vim_cpu::exp2_probe, "exp throughput probe (benchmarks)");
  m.def("capability", [] { return std::string(vim_cpu::kCapability); }, "SIMD implementation compiled in");
}
