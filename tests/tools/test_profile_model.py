"""tools/profile_model.py (vim.benchmark.profile): per-kernel / per-op self time of a model's steady steps."""
import json

import torch

import vim.benchmark.profile as profile
import vim.benchmark.scan as benchmark_scan


def test_profile_report_per_step(tmp_path, monkeypatch):
    # the allocator setting recorded instead of applied (it would last for the whole test process)
    malloc_calls = []
    monkeypatch.setattr(benchmark_scan, 'retain_freed_memory', lambda: malloc_calls.append(1) or True)
    out = tmp_path / 'profile.json'
    assert profile.main(['--device', 'cpu', '--img-size', '32', '--steps', '2', '--dtype', 'fp32', '--top', '3',
                         '--out', str(out)]) == 0
    report = json.loads(out.read_text())
    assert report['command'].startswith('python tools/profile_model.py --device cpu')
    assert report['torch'] == torch.__version__ and report['steps'] == 2 and report['mode'] == 'inference'
    assert malloc_calls == [1] and report['malloc'].startswith('freed memory kept')  # as tools/benchmark.py
    rows = report['rows']
    assert [r['ms'] for r in rows] == sorted((r['ms'] for r in rows), reverse=True) and rows[-1]['ms'] > 0
    assert abs(report['total_ms'] - sum(r['ms'] for r in rows)) <= 1e-9 * report['total_ms']
    # per step, not per profiled window: Vim-Ti's 24 mixers call the scan and the conv once each per forward
    by_name = {r['name']: r for r in rows}
    scans = [n for n in by_name if n.endswith('bidirectional_scan')]
    assert scans and all(by_name[n]['calls'] == 24 for n in scans)


def test_profile_steps_skips_the_warm_up_call():
    calls = []

    def run():
        calls.append(1)
        torch.ones(8).exp_()
    rows = profile.profile_steps(run, torch.device('cpu'), steps=3)
    assert len(calls) == 4  # one warm-up outside the profiled window
    assert {r['name']: r['calls'] for r in rows}['aten::exp_'] == 1.0


def test_cuda_rows_are_kernels_only(monkeypatch):
    """On CUDA torch.profiler gives each op the device time of the kernels it launched: counting ops and kernels
    doubled the total (the sixth GPU run printed 41.5 ms a step for a 20.6 ms forward) and halved every share."""
    from types import SimpleNamespace
    DeviceType = torch.autograd.DeviceType
    events = [SimpleNamespace(key='vim::triton_bidirectional_scan', count=6, self_device_time_total=3000.0,
                              self_cpu_time_total=90.0, device_type=DeviceType.CPU),
              SimpleNamespace(key='_scan_output_kernel', count=6, self_device_time_total=2000.0,
                              self_cpu_time_total=0.0, device_type=DeviceType.CUDA),
              SimpleNamespace(key='_segment_state_kernel', count=6, self_device_time_total=1000.0,
                              self_cpu_time_total=0.0, device_type=DeviceType.CUDA)]

    class FakeProfile:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return events
    monkeypatch.setattr(torch.profiler, 'profile', FakeProfile)
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: None)
    rows = profile.profile_steps(lambda: None, torch.device('cuda'), steps=3)
    assert rows == [dict(name='_scan_output_kernel', calls=2.0, ms=2000 / 1e3 / 3),
                    dict(name='_segment_state_kernel', calls=2.0, ms=1000 / 1e3 / 3)]
