// The CPU scan forward's state loop alone (kernels/cpu/csrc/scan.cpp, one block of 8 AVX2 vectors x 16 states, in
// L1), with variants of its exp2, to compare instruction mixes on a noisy VM: 400 alternating runs of 1000 tokens
// each, min / p10 / p50 per variant. Not part of the package or the tests; quoted in benchmarks/README.md.
//   g++ -O3 -mavx2 -mfma -o /tmp/state_loop benchmarks/cpu-microbench/state_loop.cpp && /tmp/state_loop
// horner5: the kernel's exp2 before 70517dc (clamp, magic-number rounding, degree-5 polynomial, exponent add);
// nomax: without the lower clamp; table3: 8-entry table (vpermps) + degree-3 polynomial; pair+*: two channel
// vectors a pass sharing the B / C broadcasts (70517dc: pair+nomax); polyonly / no-exp: lower bounds.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
// state loop microbenchmark: K vectors x N states tile, T tokens
constexpr int K = 8, N = 16;
constexpr float P5[5] = {1.3264719e-3f, 9.6715139e-3f, 5.5507340e-2f, 2.4022242e-1f, 6.9314700e-1f};
static inline __m256 horner5(__m256 v) {  // 2**v on [-0.5, 0.5]
  __m256 p = _mm256_set1_ps(P5[0]);
  for (int i = 1; i < 5; ++i) p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(P5[i]));
  return _mm256_fmadd_ps(p, v, _mm256_set1_ps(1.f));
}
template <bool kClampLow>
static inline __m256 exp2_h5(__m256 x) {
  __m256 v = kClampLow ? _mm256_max_ps(x, _mm256_set1_ps(-125.f)) : x;
  __m256 t = _mm256_add_ps(v, _mm256_set1_ps(12582912.f));
  __m256 p = horner5(_mm256_sub_ps(v, _mm256_sub_ps(t, _mm256_set1_ps(12582912.f))));
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_castps_si256(t), 23)));
}
static inline __m256 exp2_old(__m256 x) { return exp2_h5<true>(x); }
static inline __m256 exp2_nomax(__m256 x) { return exp2_h5<false>(x); }
constexpr float TB[8] = {1.0f, 1.0905077f, 1.1892071f, 1.2968396f, 1.4142135f, 1.5422108f, 1.6817929f, 1.8340081f};
static inline __m256 exp2_tab(__m256 x) {
  __m256 v = _mm256_max_ps(x, _mm256_set1_ps(-125.f));
  __m256 t = _mm256_add_ps(v, _mm256_set1_ps(1572864.f));
  v = _mm256_sub_ps(v, _mm256_sub_ps(t, _mm256_set1_ps(1572864.f)));
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(5.5496223e-2f), v, _mm256_set1_ps(2.4025764e-1f));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(6.9314724e-1f));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(1.f));
  __m256i ti = _mm256_castps_si256(t);
  __m256 T = _mm256_permutevar8x32_ps(_mm256_loadu_ps(TB), ti);
  __m256i e = _mm256_slli_epi32(_mm256_srli_epi32(ti, 3), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(T), e)));
}
static inline __m256 exp2_polyonly(__m256 v) { return horner5(v); }
static inline __m256 exp2_none(__m256 x) { return x; }  // no exp: the rest of the loop alone
template <__m256 (*E)(__m256)>
double run(int T, float* hbuf, const float* Abuf, const float* Bs, const float* Cs, const float* dts, const float* dus, float* ys) {
  __m256* h = (__m256*)hbuf; const __m256* A = (const __m256*)Abuf;
  auto s = std::chrono::steady_clock::now();
  for (int t = 0; t < T; ++t) {
    const float* Bt = Bs + (t & 63) * N; const float* Ct = Cs + (t & 63) * N;
    for (int k = 0; k < K; ++k) {
      __m256 dt = _mm256_loadu_ps(dts + ((t & 63) * K + k) * 8), du = _mm256_loadu_ps(dus + ((t & 63) * K + k) * 8);
      __m256* hk = h + k * N; const __m256* Ak = A + k * N;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
      for (int n = 0; n < N; n += 2) {
        __m256 h0 = _mm256_fmadd_ps(E(_mm256_mul_ps(dt, Ak[n])), hk[n], _mm256_mul_ps(du, _mm256_broadcast_ss(Bt + n)));
        __m256 h1 = _mm256_fmadd_ps(E(_mm256_mul_ps(dt, Ak[n + 1])), hk[n + 1], _mm256_mul_ps(du, _mm256_broadcast_ss(Bt + n + 1)));
        hk[n] = h0; hk[n + 1] = h1;
        acc0 = _mm256_fmadd_ps(h0, _mm256_broadcast_ss(Ct + n), acc0);
        acc1 = _mm256_fmadd_ps(h1, _mm256_broadcast_ss(Ct + n + 1), acc1);
      }
      _mm256_storeu_ps(ys + ((t & 63) * K + k) * 8, _mm256_add_ps(acc0, acc1));
    }
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count();
}

// two vectors per pass sharing B/C broadcasts, one accumulator each
template <__m256 (*E)(__m256)>
double run_pair(int T, float* hbuf, const float* Abuf, const float* Bs, const float* Cs, const float* dts, const float* dus, float* ys) {
  __m256* h = (__m256*)hbuf; const __m256* A = (const __m256*)Abuf;
  auto s = std::chrono::steady_clock::now();
  for (int t = 0; t < T; ++t) {
    const float* Bt = Bs + (t & 63) * N; const float* Ct = Cs + (t & 63) * N;
    for (int k = 0; k < K; k += 2) {
      __m256 dt0 = _mm256_loadu_ps(dts + ((t & 63) * K + k) * 8), du0 = _mm256_loadu_ps(dus + ((t & 63) * K + k) * 8);
      __m256 dt1 = _mm256_loadu_ps(dts + ((t & 63) * K + k + 1) * 8), du1 = _mm256_loadu_ps(dus + ((t & 63) * K + k + 1) * 8);
      __m256* h0 = h + k * N; __m256* h1 = h + (k + 1) * N; const __m256* A0 = A + k * N; const __m256* A1 = A + (k + 1) * N;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
      for (int n = 0; n < N; ++n) {
        __m256 Bn = _mm256_broadcast_ss(Bt + n), Cn = _mm256_broadcast_ss(Ct + n);
        __m256 s0 = _mm256_fmadd_ps(E(_mm256_mul_ps(dt0, A0[n])), h0[n], _mm256_mul_ps(du0, Bn));
        __m256 s1 = _mm256_fmadd_ps(E(_mm256_mul_ps(dt1, A1[n])), h1[n], _mm256_mul_ps(du1, Bn));
        h0[n] = s0; h1[n] = s1;
        acc0 = _mm256_fmadd_ps(s0, Cn, acc0); acc1 = _mm256_fmadd_ps(s1, Cn, acc1);
      }
      _mm256_storeu_ps(ys + ((t & 63) * K + k) * 8, acc0);
      _mm256_storeu_ps(ys + ((t & 63) * K + k + 1) * 8, acc1);
    }
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count();
}
int main() {
  float* hp = (float*)aligned_alloc(64, K * N * 32); float* Ap = (float*)aligned_alloc(64, K * N * 32);
  for (int i = 0; i < K * N * 8; ++i) { hp[i] = 0; Ap[i] = -(1.f + rand() / (float)RAND_MAX) * 1.44f; }
  std::vector<float> B(64 * N), C(64 * N), dt(64 * K * 8), du(64 * K * 8), y(64 * K * 8);
  for (auto& b : B) b = rand() / (float)RAND_MAX - 0.5f;
  for (auto& c : C) c = rand() / (float)RAND_MAX - 0.5f;
  for (auto& d : dt) d = 0.05f + 0.1f * rand() / (float)RAND_MAX;
  for (auto& d : du) d = 0.1f * (rand() / (float)RAND_MAX - 0.5f);
  const int T = 1000; double el = (double)T * K * N;
  const char* names[] = {"horner5", "nomax", "table3", "pair+horner5", "pair+nomax", "polyonly", "no-exp"};
  double best[7]; for (double& b : best) b = 1e9;
  std::vector<double> all[7];
  for (int r = 0; r < 400; ++r) {
    double t[7];
    t[0] = run<exp2_old>(T, hp, Ap, B.data(), C.data(), dt.data(), du.data(), y.data());
    t[1] = run<exp2_nomax>(T, hp, Ap, B.data(), C.data(), dt.data(), du.data(), y.data());
    t[2] = run<exp2_tab>(T, hp, Ap, B.data(), C.data(), dt.data(), du.data(), y.data());
    t[3] = run_pair<exp2_old>(T, hp, Ap, B.data(), C.data(), dt.data(), du.data(), y.data());
    t[4] = run_pair<exp2_nomax>(T, hp, Ap, B.data(), C.data(), dt.data(), du.data(), y.data());
    t[5] = run<exp2_polyonly>(T, hp, Ap, B.data(), C.data(), dt.data(), du.data(), y.data());
    t[6] = run<exp2_none>(T, hp, Ap, B.data(), C.data(), dt.data(), du.data(), y.data());
    for (int i = 0; i < 7; ++i) { best[i] = std::min(best[i], t[i]); all[i].push_back(t[i]); }
  }
  for (int i = 0; i < 7; ++i) {
    std::sort(all[i].begin(), all[i].end());
    printf("%-14s min %.3f  p10 %.3f  p50 %.3f ns/vector-state\n", names[i], best[i] / el * 1e9, all[i][40] / el * 1e9, all[i][200] / el * 1e9);
  }
  printf("(y %g)\n", y[5]);
}
