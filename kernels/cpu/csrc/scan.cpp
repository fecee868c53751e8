// Vim's bidirectional selective scan on CPU, forward and backward, fused: one pass over the tokens per
// (batch, block of kBlockChannels = 64 channels), both directions in turn, the state tile (dstate x 64 channels) in
// L1, SIMD across channels. Semantics: vim.kernels.bidirectional_scan_ref. Python side: kernels/cpu/op.py.
//
// Layouts (checked or produced by op.py): u, delta (batch, 2, dim, L), z and gout (batch, dim, L), each with
// channel stride 1 and any other strides; B, C (batch, 2, N, L) and A (2, dim, N) any strides; D and delta_bias
// (2, dim) contiguous. Outputs are token-major (batch, L, dim) or (batch, 2, L, dim) buffers, viewed back by op.py.
// Every task owns its output rows; parameter gradients are written as per-task partials and summed afterwards in a
// fixed order, so results do not depend on the number of threads.
#include "common.h"

namespace vim_cpu {
namespace {

struct ScanInputs {
  at::Tensor u, delta, A, B, C, D, z, bias;
  int64_t batch, dim, L, N;
  bool softplus;
  // low-rank delta (forward only): delta is then (batch, 2, R, L) with any strides and the full step is
  // dproj @ delta per direction, dproj (2, dim, R) any strides (Vim's dt_proj, computed per token in the kernel)
  at::Tensor dproj;
  int64_t R = 0;
};

// Row pointers of a (batch, 2, dim, L) or (batch, dim, L) tensor with channel stride 1: the data pointer and strides
// read once, outside the token loops (Tensor::const_data_ptr is an out-of-line call with checks; inside a loop it
// also forces every live vector register to be spilled around it).
template <typename scalar_t>
struct Rows {
  const scalar_t* p;
  int64_t sb, sg, st;
  explicit Rows(const at::Tensor& x)
      : p(x.const_data_ptr<scalar_t>()), sb(x.stride(0)), sg(x.dim() == 4 ? x.stride(1) : 0), st(x.stride(-1)) {}
  // element (b, g, t, channel 0); g is ignored for 3-d tensors
  const scalar_t* at(int64_t b, int64_t g, int64_t t) const { return p + b * sb + g * sg + t * st; }
};

// (batch, 2, N, L) with any strides, read a token's N values at a time
template <typename scalar_t>
struct StateRows {
  const scalar_t* p;
  int64_t sb, sg, sn, st;
  explicit StateRows(const at::Tensor& x)
      : p(x.const_data_ptr<scalar_t>()), sb(x.stride(0)), sg(x.stride(1)), sn(x.stride(2)), st(x.stride(3)) {}
  void gather(int64_t b, int64_t g, int64_t t, int64_t N, scalar_t* out) const {
    const scalar_t* q = p + b * sb + g * sg + t * st;
    for (int64_t n = 0; n < N; ++n) out[n] = q[n * sn];
  }
  // the token's N values: in place when they are contiguous, else gathered into buf
  const scalar_t* row(int64_t b, int64_t g, int64_t t, int64_t N, scalar_t* buf) const {
    if (sn == 1) return p + b * sb + g * sg + t * st;
    gather(b, g, t, N, buf);
    return buf;
  }
};

// out[k] = sum_r W[r * K + k] v[r] for k < K, summed in order of r. The sums stay in registers: accumulated in out
// itself, every step would also store them, since a vector store may alias the scalar loads of v.
template <int64_t K, typename Vec, typename scalar_t>
inline void low_rank_product(const Vec* W, const scalar_t* v, int64_t R, Vec* out) {
  Vec acc[K];
#pragma GCC unroll 16
  for (int64_t k = 0; k < K; ++k) acc[k] = W[k] * Vec(v[0]);
  for (int64_t r = 1; r < R; ++r) {
    const Vec vr(v[r]);
#pragma GCC unroll 16
    for (int64_t k = 0; k < K; ++k) acc[k] = at::vec::fmadd(W[r * K + k], vr, acc[k]);
  }
#pragma GCC unroll 16
  for (int64_t k = 0; k < K; ++k) out[k] = acc[k];
}

template <typename scalar_t>
void scan_fwd_impl(const ScanInputs& in, int64_t chunk, at::Tensor& out, at::Tensor& ysum, at::Tensor& states) {
  using Blk = Block<scalar_t>;
  using Vec = typename Blk::Vec;
  const Rows<scalar_t> Ur(in.u), Dr(in.delta), Zr(in.z);
  const StateRows<scalar_t> Br(in.B), Cr(in.C), DTr(in.delta);  // DTr: the low-rank delta's (batch, 2, R, L) view
  const int64_t R = in.R;
  constexpr int64_t K = Blk::K;
  const int64_t batch = in.batch, dim = in.dim, L = in.L, N = in.N;
  const int64_t nblocks = (dim + Blk::C - 1) / Blk::C;
  const int64_t nstates = states.defined() ? states.size(2) : 0;
  scalar_t* outp = out.data_ptr<scalar_t>();
  scalar_t* ysp = ysum.defined() ? ysum.data_ptr<scalar_t>() : nullptr;
  scalar_t* stp = states.defined() ? states.data_ptr<scalar_t>() : nullptr;

  at::parallel_for(0, batch * nblocks, 1, [&](int64_t begin, int64_t end) {
    // state tile and scaled A, channel-vector-major: h[k * N + n] holds states n of the block's vector k, so that the
    // inner loop over the states walks contiguous memory with one vector's dt, delta * u and accumulators in registers
    std::vector<Vec> h(N * K), A(N * K), A_rows(N * K), Wp(R * K);
    std::vector<scalar_t> Bbuf(N), Cbuf(N), dtl(R);
    const scalar_t* Bt = nullptr;
    const scalar_t* Ct = nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblocks, c0 = (task % nblocks) * Blk::C;
      const Blk blk(c0, dim);
      for (int64_t g = 0; g < 2; ++g) {
        load_strided_rows(blk, in.A.const_data_ptr<scalar_t>() + g * in.A.stride(0), N, in.A.stride(2),
                          in.A.stride(1), c0, dim, A_rows.data());
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t k = 0; k < K; ++k) A[k * N + n] = A_rows[n * K + k] * Vec(kLog2e);  // exp(x) = 2**(x log2 e)
        }
        Vec Dv[K], bias[K];
        blk.load(in.D.const_data_ptr<scalar_t>() + g * dim + c0, Dv);
        blk.load(in.bias.const_data_ptr<scalar_t>() + g * dim + c0, bias);
        if (R > 0) {
          load_strided_rows(blk, in.dproj.const_data_ptr<scalar_t>() + g * in.dproj.stride(0), R,
                            in.dproj.stride(2), in.dproj.stride(1), c0, dim, Wp.data());
        }
        // delta >= 0 (softplus) and A <= 0 in this block: every decay exponent is <= 0 (or NaN), so exp2 can skip its
        // upper clamp; and for a token whose deltas are all <= dt_max = 124 / max_n |A log2 e| (per channel) its
        // lower one too
        bool decays_below_one = in.softplus;
        Vec dt_max[K];
        for (int64_t k = 0; k < K; ++k) {
          Vec amax(0);
          for (int64_t n = 0; n < N; ++n) amax = at::vec::maximum(amax, A[k * N + n].abs());
          dt_max[k] = Vec(124) / amax;  // inf for A = 0
        }
        for (int64_t n = 0; n < N && decays_below_one; ++n) {
          for (int64_t k = 0; k < K; ++k) {
            __at_align__ scalar_t lanes[Blk::V];
            A_rows[n * K + k].store(lanes);
            for (int64_t i = 0; i < Blk::V; ++i) decays_below_one = decays_below_one && lanes[i] <= 0;
          }
        }
        // y[k] += C . h for each channel vector k, after h = exp(delta A) h + delta u B (u holds delta * u); two
        // channel vectors at a time, which share the broadcasts of B[n] and C[n]
        static_assert(K % 2 == 0);
        auto state_loop = [&](auto clamp_high, auto clamp_low, const Vec* dt, const Vec* u, Vec* y) {
          constexpr bool kHigh = decltype(clamp_high)::value, kLow = decltype(clamp_low)::value;
          for (int64_t k = 0; k < K; k += 2) {
            const Vec dt0 = dt[k], du0 = u[k], dt1 = dt[k + 1], du1 = u[k + 1];
            Vec* h0 = &h[k * N];
            Vec* h1 = &h[(k + 1) * N];
            const Vec* A0 = &A[k * N];
            const Vec* A1 = &A[(k + 1) * N];
            Vec acc0 = y[k], acc1 = y[k + 1];
            for (int64_t n = 0; n < N; ++n) {
              const Vec Bn(Bt[n]), Cn(Ct[n]);
              const Vec s0 = at::vec::fmadd(fast_exp2<kHigh, kLow>(dt0 * A0[n]), h0[n], du0 * Bn);
              const Vec s1 = at::vec::fmadd(fast_exp2<kHigh, kLow>(dt1 * A1[n]), h1[n], du1 * Bn);
              h0[n] = s0;
              h1[n] = s1;
              acc0 = at::vec::fmadd(s0, Cn, acc0);
              acc1 = at::vec::fmadd(s1, Cn, acc1);
            }
            y[k] = acc0;
            y[k + 1] = acc1;
          }
        };
        std::fill(h.begin(), h.end(), Vec(0));
        for (int64_t s = 0; s < L; ++s) {
          const int64_t t = g == 0 ? s : L - 1 - s;
          if (stp && s % chunk == 0 && s > 0) {
            scalar_t* dst = stp + ((b * 2 + g) * nstates + s / chunk - 1) * N * dim + c0;
            for (int64_t k = 0; k < K; ++k) {
              if (blk.count[k] == 0) continue;
              for (int64_t n = 0; n < N; ++n) {
                if (blk.count[k] == Blk::V) h[k * N + n].store(dst + n * dim + k * Blk::V);
                else h[k * N + n].store(dst + n * dim + k * Blk::V, blk.count[k]);
              }
            }
          }
          if (s + kPrefetchTokens < L) {
            const int64_t ta = g == 0 ? s + kPrefetchTokens : L - 1 - s - kPrefetchTokens;
            if (R == 0) prefetch_row<Blk>(Dr.at(b, g, ta) + c0);
            prefetch_row<Blk>(Ur.at(b, g, ta) + c0);
            if (g == 1) {
              prefetch_row<Blk>(Zr.at(b, 0, ta) + c0);
              prefetch_row<Blk>(outp + (b * L + ta) * dim + c0);
            }
          }
          UninitVecs<Vec, K> dt_, u_, y_;
          Vec* dt = dt_.data();
          Vec* u = u_.data();
          Vec* y = y_.data();
          if (R == 0) {
            blk.load(Dr.at(b, g, t) + c0, dt);
          } else {  // delta = dproj @ dt_low for this token, summed over the rank in order
            low_rank_product<K>(Wp.data(), DTr.row(b, g, t, R, dtl.data()), R, dt);
          }
          blk.load(Ur.at(b, g, t) + c0, u);
          for (int64_t k = 0; k < K; ++k) dt[k] = dt[k] + bias[k];
          if (in.softplus) softplus_n<K>(dt);
          for (int64_t k = 0; k < K; ++k) {
            y[k] = Dv[k] * u[k];
            u[k] = dt[k] * u[k];  // delta * u from here on
          }
          Bt = Br.row(b, g, t, N, Bbuf.data());
          Ct = Cr.row(b, g, t, N, Cbuf.data());
          if (!decays_below_one) {
            state_loop(std::true_type{}, std::true_type{}, dt, u, y);
          } else {
            bool small = true;  // every delta of this token <= dt_max (false for NaN)
            for (int64_t k = 0; k < K; ++k) small = small && (dt[k] <= dt_max[k]).zero_mask() == 0;
            if (small) state_loop(std::false_type{}, std::false_type{}, dt, u, y);
            else state_loop(std::false_type{}, std::true_type{}, dt, u, y);
          }
          scalar_t* o = outp + (b * L + t) * dim + c0;
          if (g == 0) {
            blk.store(o, y);  // direction 0's y, until direction 1 reaches this token
            continue;
          }
          UninitVecs<Vec, K> prev_, zv_, sz_;
          Vec* prev = prev_.data();
          Vec* zv = zv_.data();
          Vec* sz = sz_.data();
          blk.load(o, prev);
          blk.load(Zr.at(b, 0, t) + c0, zv);
          sigmoid_n<K>(zv, sz);
          for (int64_t k = 0; k < K; ++k) {
            y[k] = (prev[k] + y[k]) * Vec(0.5);
            prev[k] = y[k] * zv[k] * sz[k];
          }
          if (ysp) blk.store(ysp + (b * L + t) * dim + c0, y);
          blk.store(o, prev);
        }
      }
    }
  });
}

template <typename scalar_t>
void scan_bwd_impl(const ScanInputs& in, int64_t chunk, const at::Tensor& gout, const at::Tensor& ysum,
                   const at::Tensor& states, at::Tensor& gu, at::Tensor& gdelta, at::Tensor& gz,
                   at::Tensor& gA_part, at::Tensor& gD_part, at::Tensor& gbias_part, at::Tensor& gB_part,
                   at::Tensor& gC_part) {
  using Blk = Block<scalar_t>;
  using Vec = typename Blk::Vec;
  const Rows<scalar_t> Ur(in.u), Dr(in.delta), Zr(in.z), Gr(gout);
  const StateRows<scalar_t> Br(in.B), Cr(in.C);
  constexpr int64_t K = Blk::K;
  const int64_t batch = in.batch, dim = in.dim, L = in.L, N = in.N;
  const int64_t nblocks = (dim + Blk::C - 1) / Blk::C;
  const int64_t nchunks = (L + chunk - 1) / chunk;
  const scalar_t* ysp = ysum.const_data_ptr<scalar_t>();
  const scalar_t* stp = states.const_data_ptr<scalar_t>();
  scalar_t *gup = gu.data_ptr<scalar_t>(), *gdp = gdelta.data_ptr<scalar_t>(), *gzp = gz.data_ptr<scalar_t>();
  scalar_t *gAp = gA_part.data_ptr<scalar_t>(), *gDp = gD_part.data_ptr<scalar_t>();
  scalar_t *gbp = gbias_part.data_ptr<scalar_t>();
  scalar_t *gBp = gB_part.data_ptr<scalar_t>(), *gCp = gC_part.data_ptr<scalar_t>();

  at::parallel_for(0, batch * nblocks, 1, [&](int64_t begin, int64_t end) {
    // one chunk's recomputed states and decays, token-major: (chunk, N, K) vectors each
    std::vector<Vec> H(chunk * N * K), DA(chunk * N * K), DT(chunk * K);
    std::vector<Vec> h0(N * K), gh(N * K), A(N * K), gA(N * K);
    std::vector<scalar_t> Bbuf(N), Cbuf(N);  // a token's B, C when not contiguous over states (else read in place)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblocks, blk_i = task % nblocks, c0 = blk_i * Blk::C;
      const Blk blk(c0, dim);
      // gate: out = silu(z) * ysum, with ysum the average of both directions' y
      for (int64_t t = 0; t < L; ++t) {
        Vec go[K], ys[K], zv[K];
        blk.load(Gr.at(b, 0, t) + c0, go);
        blk.load(ysp + (b * L + t) * dim + c0, ys);
        blk.load(Zr.at(b, 0, t) + c0, zv);
        Vec sg[K];
        sigmoid_n<K>(zv, sg);
        for (int64_t k = 0; k < K; ++k) go[k] = go[k] * ys[k] * sg[k] * (Vec(1) + zv[k] * (Vec(1) - sg[k]));
        blk.store(gzp + (b * L + t) * dim + c0, go);
      }
      for (int64_t g = 0; g < 2; ++g) {
        load_strided_rows(blk, in.A.const_data_ptr<scalar_t>() + g * in.A.stride(0), N, in.A.stride(2),
                          in.A.stride(1), c0, dim, A.data());
        for (auto& a : A) a = a * Vec(kLog2e);  // exp(x) = 2**(x log2 e)
        Vec Dv[K], bias[K], gD[K], gbias[K];
        blk.load(in.D.const_data_ptr<scalar_t>() + g * dim + c0, Dv);
        blk.load(in.bias.const_data_ptr<scalar_t>() + g * dim + c0, bias);
        for (int64_t k = 0; k < K; ++k) gD[k] = gbias[k] = Vec(0);
        std::fill(gh.begin(), gh.end(), Vec(0));
        std::fill(gA.begin(), gA.end(), Vec(0));
        // partial sums over this block's channels, per (token, state): (nblocks, batch, 2, N, L)
        scalar_t* gB_row = gBp + ((blk_i * batch + b) * 2 + g) * N * L;
        scalar_t* gC_row = gCp + ((blk_i * batch + b) * 2 + g) * N * L;
        for (int64_t ci = nchunks - 1; ci >= 0; --ci) {
          const int64_t s0 = ci * chunk, s1 = std::min(L, s0 + chunk);
          if (ci == 0) {
            std::fill(h0.begin(), h0.end(), Vec(0));
          } else {
            const scalar_t* src = stp + ((b * 2 + g) * (nchunks - 1) + ci - 1) * N * dim + c0;
            for (int64_t n = 0; n < N; ++n) blk.load(src + n * dim, &h0[n * K]);
          }
          // recompute the chunk's states and decays
          const Vec* hprev = h0.data();
          for (int64_t s = s0; s < s1; ++s) {
            const int64_t t = g == 0 ? s : L - 1 - s, i = s - s0;
            if (s + kPrefetchTokens < s1) {
              const int64_t ta = g == 0 ? s + kPrefetchTokens : L - 1 - s - kPrefetchTokens;
              prefetch_row<Blk>(Dr.at(b, g, ta) + c0);
              prefetch_row<Blk>(Ur.at(b, g, ta) + c0);
            }
            Vec dt[K], u[K];
            blk.load(Dr.at(b, g, t) + c0, dt);
            blk.load(Ur.at(b, g, t) + c0, u);
            for (int64_t k = 0; k < K; ++k) dt[k] = dt[k] + bias[k];
            if (in.softplus) softplus_n<K>(dt);
            for (int64_t k = 0; k < K; ++k) {
              DT[i * K + k] = dt[k];
              u[k] = dt[k] * u[k];
            }
            const scalar_t* Bt = Br.row(b, g, t, N, Bbuf.data());
            Vec* hcur = &H[i * N * K];
            Vec* da = &DA[i * N * K];
            for (int64_t n = 0; n < N; ++n) {
              const Vec Bn(Bt[n]);
              for (int64_t k = 0; k < K; ++k) {
                da[n * K + k] = fast_exp2(DT[i * K + k] * A[n * K + k]);
                hcur[n * K + k] = at::vec::fmadd(da[n * K + k], hprev[n * K + k], u[k] * Bn);
              }
            }
            hprev = hcur;
          }
          // walk the chunk backwards; gh holds d loss / d h_t, carried through the decays
          for (int64_t s = s1 - 1; s >= s0; --s) {
            const int64_t t = g == 0 ? s : L - 1 - s, i = s - s0;
            if (s - kPrefetchTokens >= s0) {  // the next chunk's rows were fetched by its recompute above
              const int64_t ta = g == 0 ? s - kPrefetchTokens : L - 1 - s + kPrefetchTokens;
              prefetch_row<Blk>(Gr.at(b, 0, ta) + c0);
              prefetch_row<Blk>(Zr.at(b, 0, ta) + c0);
            }
            Vec go[K], zv[K], u[K], gy[K], S[K], gdt[K], raw[K];
            blk.load(Gr.at(b, 0, t) + c0, go);
            blk.load(Zr.at(b, 0, t) + c0, zv);
            blk.load(Ur.at(b, g, t) + c0, u);
            const Vec* dt = &DT[i * K];
            Vec du[K], sz[K];
            sigmoid_n<K>(zv, sz);
            for (int64_t k = 0; k < K; ++k) {
              gy[k] = go[k] * zv[k] * sz[k] * Vec(0.5);
              du[k] = dt[k] * u[k];
              S[k] = gdt[k] = Vec(0);
            }
            const scalar_t* Bt = Br.row(b, g, t, N, Bbuf.data());
            const scalar_t* Ct = Cr.row(b, g, t, N, Cbuf.data());
            const Vec* hcur = &H[i * N * K];
            const Vec* hp = i > 0 ? &H[(i - 1) * N * K] : h0.data();
            const Vec* da = &DA[i * N * K];
            for (int64_t n = 0; n < N; ++n) {
              const Vec Bn(Bt[n]), Cn(Ct[n]);
              Vec tmp[K];
              for (int64_t k = 0; k < K; ++k) tmp[k] = gy[k] * hcur[n * K + k];
              gC_row[n * L + t] = horizontal_sum(tmp, K);
              for (int64_t k = 0; k < K; ++k) {
                Vec& g_h = gh[n * K + k];
                g_h = at::vec::fmadd(gy[k], Cn, g_h);
                tmp[k] = g_h * du[k];
                S[k] = at::vec::fmadd(g_h, Bn, S[k]);
                const Vec x = g_h * da[n * K + k] * hp[n * K + k];  // d loss / d (delta_t * A)
                gA[n * K + k] = at::vec::fmadd(x, dt[k], gA[n * K + k]);
                gdt[k] = at::vec::fmadd(x, A[n * K + k], gdt[k]);  // times log2(e), undone below
                g_h = g_h * da[n * K + k];
              }
              gB_row[n * L + t] = horizontal_sum(tmp, K);
            }
            blk.load(Dr.at(b, g, t) + c0, raw);
            Vec gu_v[K];
            for (int64_t k = 0; k < K; ++k) {
              gu_v[k] = at::vec::fmadd(gy[k], Dv[k], dt[k] * S[k]);
              gdt[k] = at::vec::fmadd(u[k], S[k], gdt[k] * Vec(1 / kLog2e));
            }
            if (in.softplus) {  // d softplus(x) / dx = sigmoid(x)
              Vec sx[K];
              for (int64_t k = 0; k < K; ++k) raw[k] = raw[k] + bias[k];
              sigmoid_n<K>(raw, sx);
              for (int64_t k = 0; k < K; ++k) gdt[k] = gdt[k] * sx[k];
            }
            for (int64_t k = 0; k < K; ++k) {
              gD[k] = at::vec::fmadd(gy[k], u[k], gD[k]);
              gbias[k] = gbias[k] + gdt[k];
            }
            blk.store(gup + ((b * 2 + g) * L + t) * dim + c0, gu_v);
            blk.store(gdp + ((b * 2 + g) * L + t) * dim + c0, gdt);
          }
        }
        // per-batch partials of the parameter gradients: gA (batch, 2, N, dim), gD and gbias (batch, 2, dim)
        for (int64_t n = 0; n < N; ++n) blk.store(gAp + ((b * 2 + g) * N + n) * dim + c0, &gA[n * K]);
        blk.store(gDp + (b * 2 + g) * dim + c0, gD);
        blk.store(gbp + (b * 2 + g) * dim + c0, gbias);
      }
    }
  });
}

// Sum of a (parts, rest) buffer over its first axis, part 0 first: the same order for any number of threads.
at::Tensor sum_parts(const at::Tensor& parts) {
  auto flat = parts.reshape({parts.size(0), -1});
  auto out = at::empty({flat.size(1)}, parts.options());
  AT_DISPATCH_FLOATING_TYPES(parts.scalar_type(), "vim_cpu_sum_parts", [&] {
    const scalar_t* p = flat.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t P = flat.size(0), M = flat.size(1);
    at::parallel_for(0, M, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        scalar_t acc = 0;
        for (int64_t i = 0; i < P; ++i) acc += p[i * M + j];
        o[j] = acc;
      }
    });
  });
  return out.view(parts.sizes().slice(1));
}

ScanInputs make_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& C, const at::Tensor& D, const at::Tensor& z, const at::Tensor& bias,
                       bool softplus) {
  for (auto* t : {&u, &delta, &z}) check_channels_contiguous(*t, "u, delta and z");
  TORCH_CHECK(D.is_contiguous() && bias.is_contiguous(), "D and delta_bias must be contiguous");
  const auto dtype = u.scalar_type();
  for (auto* t : {&delta, &A, &B, &C, &D, &z, &bias}) TORCH_CHECK(t->scalar_type() == dtype, "dtypes must match");
  return ScanInputs{u, delta, A, B, C, D, z, bias, u.size(0), u.size(2), u.size(3), A.size(2), softplus};
}

}  // namespace

// Returns out (batch, L, dim) and, when save is set, ysum (batch, L, dim) and the chunk-start states
// (batch, 2, ceil(L / chunk) - 1, N, dim), the state entering scan-order chunk c + 1.
std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const at::Tensor& D, const at::Tensor& z,
                                 const at::Tensor& bias, bool softplus, int64_t chunk, bool save) {
  const ScanInputs in = make_inputs(u, delta, A, B, C, D, z, bias, softplus);
  TORCH_CHECK(chunk >= 1, "chunk must be >= 1");
  auto out = at::empty({in.batch, in.L, in.dim}, u.options());
  at::Tensor ysum, states;
  if (save) {
    ysum = at::empty({in.batch, in.L, in.dim}, u.options());
    states = at::empty({in.batch, 2, (in.L + chunk - 1) / chunk - 1, in.N, in.dim}, u.options());
  }
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "vim_cpu_scan_fwd", [&] {
    scan_fwd_impl<scalar_t>(in, chunk, out, ysum, states);
  });
  if (!save) return {out};
  return {out, ysum, states};
}

// Inference with Vim's dt_proj fused in: dt (batch, 2, R, L) any strides, dproj (2, dim, R) any strides; the step is
// delta = dproj[g] @ dt[b, g] per token, computed in the kernel (no (batch, 2, dim, L) delta tensor). Returns out.
at::Tensor scan_fwd_lowrank(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& dproj, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& C, const at::Tensor& D, const at::Tensor& z,
                            const at::Tensor& bias, bool softplus) {
  check_channels_contiguous(u, "u");
  check_channels_contiguous(z, "z");
  TORCH_CHECK(D.is_contiguous() && bias.is_contiguous(), "D and delta_bias must be contiguous");
  TORCH_CHECK(dt.dim() == 4 && dproj.dim() == 3 && dt.size(2) == dproj.size(2) && dproj.size(1) == u.size(2) &&
                  dt.size(3) == u.size(3) && dt.size(2) >= 1,
              "dt must be (batch, 2, R, L) and dproj (2, dim, R)");
  const auto dtype = u.scalar_type();
  for (auto* t : {&dt, &dproj, &A, &B, &C, &D, &z, &bias}) TORCH_CHECK(t->scalar_type() == dtype, "dtypes must match");
  ScanInputs in{u, dt, A, B, C, D, z, bias, u.size(0), u.size(2), u.size(3), A.size(2), softplus, dproj, dt.size(2)};
  auto out = at::empty({in.batch, in.L, in.dim}, u.options());
  at::Tensor ysum, states;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "vim_cpu_scan_fwd_lowrank", [&] {
    scan_fwd_impl<scalar_t>(in, 1, out, ysum, states);
  });
  return out;
}

// Returns gu, gdelta (batch, 2, L, dim), gz (batch, L, dim), gA (2, dim, N), gD, gbias (2, dim), gB, gC
// (batch, 2, N, L).
std::vector<at::Tensor> scan_bwd(const at::Tensor& gout, const at::Tensor& u, const at::Tensor& delta,
                                 const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                                 const at::Tensor& z, const at::Tensor& bias, const at::Tensor& ysum,
                                 const at::Tensor& states, bool softplus, int64_t chunk) {
  const ScanInputs in = make_inputs(u, delta, A, B, C, D, z, bias, softplus);
  check_channels_contiguous(gout, "gout");
  TORCH_CHECK(ysum.is_contiguous() && states.is_contiguous(), "saved tensors must be contiguous");
  const auto opts = u.options();
  const int64_t batch = in.batch, dim = in.dim, L = in.L, N = in.N;
  const int64_t nblocks = (dim + kBlockChannels - 1) / kBlockChannels;
  auto gu = at::empty({batch, 2, L, dim}, opts), gdelta = at::empty({batch, 2, L, dim}, opts);
  auto gz = at::empty({batch, L, dim}, opts);
  auto gA_part = at::empty({batch, 2, N, dim}, opts), gD_part = at::empty({batch, 2, dim}, opts);
  auto gbias_part = at::empty({batch, 2, dim}, opts);
  auto gB_part = at::empty({nblocks, batch, 2, N, L}, opts), gC_part = at::empty({nblocks, batch, 2, N, L}, opts);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "vim_cpu_scan_bwd", [&] {
    TORCH_CHECK(Block<scalar_t>::C == kBlockChannels, "channel block mismatch");
    scan_bwd_impl<scalar_t>(in, chunk, gout, ysum, states, gu, gdelta, gz, gA_part, gD_part, gbias_part, gB_part,
                            gC_part);
  });
  return {gu, gdelta, gz, sum_parts(gA_part).transpose(1, 2).contiguous(), sum_parts(gD_part), sum_parts(gbias_part), sum_parts(gB_part),
          sum_parts(gC_part)};
}

}  // namespace vim_cpu
