#!/usr/bin/env python3
"""Feature extraction at dataset scale: is the cost per image constant, how long does resuming take, and does a
kill -9 lose or duplicate anything? Writes benchmarks/extract-scale-<device>-<date>.json.

    python benchmarks/extract_features_scale.py IMAGES --work /tmp/scale        # IMAGES: e.g. 100,000 tiny PNGs

1. one uninterrupted run (test_vim, random weights): the rate over the first and the last ``--window-images``
   images, in wall-clock time and in CPU time of the process (steadier on a shared machine), and the seconds
   spent per batch committing features (ShardWriter.add), first vs last window;
2. the finished command run again (a subprocess, as a user would): its wall time and the seconds it spends
   finding the images and the done set;
3. the command killed with SIGKILL at a random moment, then rerun to the end: every image exactly once.
"""
# ruff: noqa: E402  (the OpenMP setting below must precede the imports that load torch)
from __future__ import annotations

import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import argparse
import json
import platform
import random
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from vim.features import Extractor, extractor

TOOL = Path(__file__).resolve().parents[1] / 'tools' / 'extract_features.py'


def window_rates(progress: list[tuple[int, float]], window: int) -> tuple[float, float]:
    """img/s over the first and the last ``window`` images of a run's [(images done, seconds)] points."""
    n, t = np.array([p[0] for p in progress]), np.array([p[1] for p in progress])
    first = int(np.searchsorted(n, window))
    last = int(np.searchsorted(n, n[-1] - window, side='right')) - 1
    return n[first] / t[first], (n[-1] - n[last]) / (t[-1] - t[last])


def check_once(out: Path, expected: int) -> dict:
    keys = [k for p in sorted(out.glob('metadata/metadata_*.parquet')) for k in pq.read_table(p)['key'].to_pylist()]
    rows = sum(np.load(p, mmap_mode='r').shape[0] for p in out.glob('img_emb/*.npy'))
    return dict(keys=len(keys), unique=len(set(keys)), embedding_rows=rows, expected=expected,
                every_image_once=len(keys) == len(set(keys)) == rows == expected)


def resume(cli: list[str], out: Path, done: int) -> dict:
    """Run the finished command again in a subprocess: its wall time, and the part spent finding what to do."""
    t0 = time.perf_counter()
    res = subprocess.run(cli + ['--output', str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    found = re.search(r'([\d.]+) s of it finding', res.stdout)
    return dict(returncode=res.returncode, wall_seconds=wall, images_skipped=done,
                finding_images_and_done_set_seconds=float(found[1]) if found else None,
                summary=res.stdout.strip().splitlines()[-5:])


def kill_and_rerun(cli: list[str], out: Path, earliest: float, latest: float, expected: int) -> dict:
    """SIGKILL the command at a random moment between ``earliest`` and ``latest`` seconds after its model is
    built, then rerun it to the end and count."""
    seed = random.randrange(2**32)
    delay = random.Random(seed).uniform(earliest, latest)
    proc = subprocess.Popen(cli + ['--output', str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (out / 'meta.json').exists():
        time.sleep(0.05)
    time.sleep(delay)
    running = proc.poll() is None
    sealed = len(list(out.glob('metadata/metadata_*.parquet')))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    open_records = [p.name for p in out.glob('metadata/.*.jsonl')]
    res = subprocess.run(cli + ['--output', str(out)], capture_output=True, text=True)
    done = re.search(r'images: (\d+) done, (\d+) skipped', res.stdout)
    return dict(seed=seed, seconds_after_start=delay, was_running_when_killed=running, sealed_shards_at_kill=sealed,
                open_records_after_kill=open_records, rerun_returncode=res.returncode,
                rerun_done=int(done[1]) if done else None, rerun_skipped=int(done[2]) if done else None,
                check=check_once(out, expected))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('images')
    p.add_argument('--work', type=Path, required=True, help='folder for the outputs (emptied first)')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--window-images', type=int, default=10000)
    p.add_argument('--note', default='', help='e.g. who else used the machine')
    p.add_argument('--json', type=Path, help='default: benchmarks/extract-scale-cpu-<date>.json')
    p.add_argument('--resume-only', action='store_true', help='only step 2, on WORK/a left by an earlier run')
    p.add_argument('--kill-only', type=float, nargs=2, metavar=('EARLIEST', 'LATEST'),
                   help='only step 3 (into WORK/b), killed between these seconds after the start')
    args = p.parse_args()
    if args.kill_only:
        args.json = args.json or Path(__file__).parent / f'extract-scale-kill-cpu-{datetime.now():%Y-%m-%d}.json'
        subprocess.run(['rm', '-rf', str(args.work / 'b')], check=True)
    if args.resume_only:
        args.json = args.json or Path(__file__).parent / f'extract-scale-resume-cpu-{datetime.now():%Y-%m-%d}.json'
    elif args.work.exists() and not args.kill_only:
        subprocess.run(['rm', '-rf', str(args.work)], check=True)
    args.work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, str(TOOL), args.images, '--model', 'test_vim', '--no-pretrained', '--img-size',
           str(args.img_size), '--batch-size', str(args.batch_size), '--device', 'cpu', '--quiet']
    result = dict(date=datetime.now(timezone.utc).isoformat(timespec='seconds'), command=' '.join(sys.argv),
                  extraction_command=' '.join(cli[1:]) + ' --output OUT', note=args.note,
                  machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                               load_average_at_start=os.getloadavg()))

    if args.kill_only:
        n = sum(1 for _ in Path(args.images).rglob('*.png'))
        result['kill'] = kill_and_rerun(cli, args.work / 'b', *args.kill_only, n)
        args.json.write_text(json.dumps(result, indent=1) + '\n')
        print(json.dumps(result['kill'], indent=1))
        return
    if args.resume_only:
        n = sum(pq.read_metadata(f).num_rows for f in (args.work / 'a').glob('metadata/metadata_*.parquet'))
        result['resume'] = resume(cli, args.work / 'a', n)
        args.json.write_text(json.dumps(result, indent=1) + '\n')
        print(json.dumps(result['resume'], indent=1))
        return

    # 1. one uninterrupted run, in-process, with the writer's time per batch
    add_seconds: list[float] = []
    cpu_at_add: list[tuple[int, float]] = [(0, time.process_time())]  # (images, CPU seconds of this process)
    real_add = extractor.ShardWriter.add

    def timed_add(self, rows, arrays):
        t0 = time.perf_counter()
        real_add(self, rows, arrays)
        add_seconds.append(time.perf_counter() - t0)
        cpu_at_add.append((cpu_at_add[-1][0] + len(rows), time.process_time()))

    extractor.ShardWriter.add = timed_add
    ex = Extractor('test_vim', pretrained=False, img_size=args.img_size, device='cpu', batch_size=args.batch_size,
                   progress=False)
    s = ex.run([args.images], args.work / 'a')
    extractor.ShardWriter.add = real_add
    first, last = window_rates(s['progress'], args.window_images)
    cpu_first, cpu_last = window_rates([(n, t - cpu_at_add[0][1]) for n, t in cpu_at_add], args.window_images)
    k = -(-args.window_images // args.batch_size)  # batches per window
    result['run'] = dict(images=s['done'], seconds=s['seconds'], img_per_s=s['img_per_s'], shards=len(s['shards']),
                         first_window_img_per_s=first, last_window_img_per_s=last, last_over_first=last / first,
                         first_window_img_per_cpu_s=cpu_first, last_window_img_per_cpu_s=cpu_last,
                         last_over_first_cpu=cpu_last / cpu_first,
                         window_images=args.window_images,
                         commit_ms_per_batch_first_window=1e3 * float(np.mean(add_seconds[:k])),
                         commit_ms_per_batch_last_window=1e3 * float(np.mean(add_seconds[-k:])),
                         output_bytes=sum(f.stat().st_size for f in (args.work / 'a').rglob('*') if f.is_file()))
    result['run']['check'] = check_once(args.work / 'a', s['done'])
    print(json.dumps(result['run'], indent=1), flush=True)

    # 2. the finished command again
    result['resume'] = resume(cli, args.work / 'a', s['done'])
    print(json.dumps(result['resume'], indent=1), flush=True)

    # 3. kill -9 at a random moment of a second run, then rerun to the end
    result['kill'] = kill_and_rerun(cli, args.work / 'b', 0.2 * s['seconds'], 0.6 * s['seconds'], s['done'])
    print(json.dumps(result['kill'], indent=1), flush=True)
    result['machine']['load_average_at_end'] = os.getloadavg()
    path = args.json or Path(__file__).parent / f'extract-scale-cpu-{datetime.now():%Y-%m-%d}.json'
    path.write_text(json.dumps(result, indent=1) + '\n')
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
