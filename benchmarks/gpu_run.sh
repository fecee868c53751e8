#!/bin/bash
# One GPU session's measurements, in the order that matters, each step time-limited so that a 10-minute device
# call keeps what finished. Usage (repository root, CUDA machine):
#   bash benchmarks/gpu_run.sh [STEP ...]     steps: tests profile model scan bench (default: these five), chunk, warm, host, recompute, compile
# Results go to $OUT (the device tool's folder) or ./gpu-run. Each step's limit: TESTS_S, RANDOM_S, PROFILE_S,
# MODEL_S, SCAN_S, BENCH_S (200, 150, 150, 120, 240, 300 s). A fresh machine compiles every kernel on first use:
# the backward's main kernel 18-32 s per direction and dtype (the -f- report JSONs), the forward's autotuning
# ~35-40 s (all its configs); on 2026-11-26 (third run; before the split by direction the backward took 98-112 s
# on triton 3.6) the first call of the scan step did not finish in 60 s and the test step passed 5 tests in 215 s.
# With 10-minute calls and 15 minutes in all: first `tests` (RANDOM_S=30), since a kernel that is wrong on the GPU
# makes every timing moot (the fourth run, 2026-11-27, found the conv backward wrong only there), then
# `warm scan bench` (they share compiles), then `profile model` if time is left. The sixth run (2026-11-27) found a
# bench on a fresh machine printing nothing in 210 s after 80 s of warm, and the same bench in 37 s once the cache
# was filled: on a fresh machine give `bench` 300 s, or run `tests` first (their compiles fill the cache too). The fifth run (2026-11-27) ran
# `warm tests scan bench` in 417 s of one call: warm used its 100 s, tests 170 s (14 passed, 6 unfinished), scan
# ~60 s, and bench printed its first row 26 s in; on a fresh machine a bench run without the scan step before it
# printed nothing in 130 s (the self-check's and the autotuner's compiles).
#   tests    pytest -m gpu, one line per test as it ends (gpu-tests.log) and each failure's traceback as soon as
#            it happens (gpu-test-failures.log, tests/conftest.py), so a cut-off run still says what failed and why.
#            The targeted tests first (every autotune config, whole models, determinism, offsets past 2^31, compile
#            and graph capture), then the 300 random cases, which autotune at every new shape and fill the time left:
#            on 2026-11-26 one 340 s run reached 248 of 331 tests in file order, none of the every-config ones.
#   profile  Nsight Compute on the scan's kernels, forward and backward, at Vim-Ti 1248^2 batch 8: one steady-state
#            call each after the warm-up (benchmark_scan --cuda-profile), not the autotuner's trial launches
#   model    tools/profile_model.py: each kernel's time inside Vim-Ti (1248^2 b8 inference, 224^2 b128 training step)
#            and DeiT-Ti (1248^2 b8), steady state, all in profile-model.txt
#   scan     tools/benchmark_scan.py: the scan and conv alone against their floor
#   bench    tools/benchmark.py: Vim against DeiT (SDPA) in one run, the matrix of model_zoo.md, eager and replayed
#            from a CUDA graph (--cuda-graph: the GPU time without the host's launches; the fourth run's scan lost
#            0.3-1.3 ms a call to host work)
#   warm     benchmarks/precompile.py: every config of every kernel compiled side by side (one process a config
#            index and dtype, bf16 and fp32, chunk 8) into triton's on-disk cache, so that the steps after it
#            load them instead of compiling them one after another; WARM_S (120 s)
#   host     the scan and conv at 128 x 197 and 8 x 6,085 (bf16) with --host-profile: where the host time of a call
#            goes (cProfile's top functions). The fifth run measured the scan's forward at 0.63 ms wall against
#            0.28 ms of kernels at 128 x 197, and Vim-Ti's eager forward at 224^2 b64 at 30 ms, most of it host work;
#            our own Python is ~37 us a call (stubbed launches, CPU), so the rest is in the launches
#   recompute  the training step of Vim-Ti and Vim-S at 224² b128 with --scan-recompute (each mixer's conv,
#            projections and scan run again in the backward; the seventh run measured an earlier form that
#            recomputed the chunk states alone: 8.44 -> 4.59 GiB): compare time and peak with the bench step's rows
#   compile  Vim against DeiT with --torchcompile (inductor): eager and compiled rows of both models in one run,
#            inference and training; the seventh run (2026-11-27) found the eager training step bound by the host
#            (Vim-S's step shorter than Vim-Ti's). Inductor compiles each case for a minute or more on first use
#   chunk    the scan with chunk size 4 instead of 8 (bf16, 8x6085 and 128x197; compiles its own backward): the
#            static report predicted the backward 16-19% faster at 140 registers instead of 244-255, for twice the
#            saved states' memory; the fourth run measured it 1.43x slower at 8x6085 and 9% faster at 128x197
#            (benchmarks/README.md); compare with the scan step's rows
set -u
OUT=${OUT:-gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=${*:-tests profile model scan bench}
python3 -c 'import vim.kernels' 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . \
    || { echo 'install failed: make install first'; exit 1; }
python3 -c 'import torch, triton, timm; print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, "timm", timm.__version__)' | tee "$OUT/env.txt"
T0=$(date +%s)
for step in $steps; do
  echo "== $(( $(date +%s) - T0 ))s $step"
  case $step in
    tests)
      for part in "not random_ ${TESTS_S:-200}" "random_ ${RANDOM_S:-150}"; do
        VIM_FAILURE_LOG="$OUT/gpu-test-failures.log" timeout -s INT "${part##* }" python3 -m pytest -m gpu tests \
            -k "${part% *}" -n "${WORKERS:-14}" -v --tb=no -p no:cacheprovider >> "$OUT/gpu-tests.log" 2>&1
      done
      grep -cE ' PASSED' "$OUT/gpu-tests.log"; grep -E ' (FAILED|ERROR) ' "$OUT/gpu-tests.log" | head -40 ;;
    warm)
      timeout "${WARM_S:-120}" python3 benchmarks/precompile.py --dtypes bf16 fp32 ;;
    profile)
      timeout "${PROFILE_S:-150}" ncu --profile-from-start off --kernel-name regex:'_segment_|_scan_|_bidirectional_' \
          --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
          --section MemoryWorkloadAnalysis --print-details all \
          python3 tools/benchmark_scan.py --device cuda --dtypes bf16 --backends triton --shapes 8x6085 \
          --min-time 0.01 --cuda-profile > "$OUT/ncu-scan.txt" 2>&1
      grep -E '^  [_a-z]+kernel|Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|L1/TEX Cache Th|Stall' \
          "$OUT/ncu-scan.txt" | head -60 ;;
    model)
      for case in 'vim_tiny_patch16_224 --img-size 1248 --batch-size 8' 'deit_tiny_patch16_224 --img-size 1248 --batch-size 8' \
                  'vim_tiny_patch16_224 --img-size 224 --batch-size 128 --train'; do
        timeout -s INT "${MODEL_S:-120}" python3 tools/profile_model.py --device cuda --dtype bf16 --steps 3 --top 30 \
            --model $case >> "$OUT/profile-model.txt" 2>&1
      done
      grep -A8 ' a step$' "$OUT/profile-model.txt" ;;
    scan)
      timeout -s INT "${SCAN_S:-240}" python3 tools/benchmark_scan.py --device cuda --dtypes bf16 fp32 \
          --backends triton --min-time 0.2 --out "$OUT/gpu-scan.json" ;;
    host)
      timeout -s INT "${SCAN_S:-240}" python3 tools/benchmark_scan.py --device cuda --dtypes bf16 --backends triton \
          --shapes 128x197 8x6085 --min-time 0.1 --host-profile 100 --out "$OUT/gpu-scan-host.json" ;;
    chunk)
      timeout -s INT "${SCAN_S:-240}" python3 tools/benchmark_scan.py --device cuda --dtypes bf16 --backends triton \
          --shapes 8x6085 128x197 --triton-chunk 4 --min-time 0.2 --out "$OUT/gpu-scan-chunk4.json" ;;
    recompute)
      timeout -s INT "${BENCH_S:-300}" python3 tools/benchmark.py --device cuda --pairs tiny small --img-sizes 224 \
          --dtypes bf16 --train --scan-recompute --rounds 2 --min-time 0.2 --out "$OUT/gpu-bench-recompute.json" \
          2>&1 | grep -v Warning ;;
    compile)
      timeout -s INT "${BENCH_S:-300}" python3 tools/benchmark.py --device cuda --pairs tiny small --img-sizes 224 1248 \
          --dtypes bf16 --train --torchcompile --rounds 2 --min-time 0.2 --out "$OUT/gpu-bench-compile.json" \
          2>&1 | grep -v Warning ;;
    bench)
      timeout -s INT "${BENCH_S:-300}" python3 tools/benchmark.py --device cuda ${BENCH_ARGS:---pairs tiny small base \
          --img-sizes 224 512 1024 1248 2048 --vim-only-sizes 4096 --dtypes bf16 fp32 --train --cuda-graph \
          --rounds 3 --min-time 0.3} --out "$OUT/gpu-bench.json" 2>&1 | grep -v Warning ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
echo "== $(( $(date +%s) - T0 ))s done"
