"""tools/benchmark_scan.py (vim.benchmark.scan): the scan alone against its bytes/exp floor, with the copy bandwidth
of the same run."""
import json

import pytest
import torch

import vim.benchmark.scan as benchmark_scan


def test_scan_benchmark_report(tmp_path, monkeypatch):
    # the allocator setting recorded instead of applied (it would last for the whole test process)
    malloc_calls = []
    monkeypatch.setattr(benchmark_scan, 'retain_freed_memory', lambda: malloc_calls.append(1) or True)
    out = tmp_path / 'scan.json'
    assert benchmark_scan.main(['--device', 'cpu', '--shapes', '2x33', '--dim', '16', '--dstate', '4',
                                '--min-time', '0.01', '--exp-rate', '1e9', '--out', str(out)]) == 0
    report = json.loads(out.read_text())
    assert report['complete'] is True
    assert report['copy_gbps'] > 0 and report['exp_rate'] == 1e9 and report['exp_rate_source'] == '--exp-rate'
    assert malloc_calls == [1] and report['malloc'].startswith('freed memory kept')  # as tools/benchmark.py
    assert benchmark_scan.main(['--device', 'cpu', '--shapes', '1x5', '--dim', '8', '--dstate', '2', '--min-time',
                                '0.01', '--exp-rate', '1e9', '--glibc-malloc-defaults', '--out', str(out)]) == 0
    assert malloc_calls == [1] and json.loads(out.read_text())['malloc'] == 'glibc defaults'
    # provenance: every figure names its device, date, versions and command
    assert report['command'].startswith('python tools/benchmark_scan.py --device cpu --shapes 2x33')
    assert report['device'] and report['date'].startswith('20') and report['torch'] == torch.__version__
    backends = benchmark_scan.default_backends(torch.device('cpu'))
    assert 'reference' in backends and 'triton' not in backends  # the fused 'cpu' kernels too, where they build
    assert [row['backend'] for row in report['scan']] == [row['backend'] for row in report['conv']] == backends
    for row in report['scan']:
        assert (row['batch'], row['seqlen']) == (2, 33)
        # u, delta (2 directions), B, C (2 directions), z, the output, and A, D, delta_bias (fp32)
        activations = 2 * 2 * 16 * 33 * 2 + 2 * 2 * 4 * 33 * 2 + 2 * 16 * 33 + 2 * 16 * 33
        assert row['fwd_bytes'] == 4 * (activations + 2 * 16 * 4 + 2 * 16 + 2 * 16)
        assert row['fwd_exps'] == 2 * 2 * 16 * 33 * 4
        for phase in ('fwd', 'bwd'):
            floor = max(row[f'{phase}_bytes'] / (report['copy_gbps'] * 1e9), row[f'{phase}_exps'] / 1e9) * 1e3
            assert abs(row[f'{phase}_floor_ms'] - floor) <= 1e-9 * floor
            assert abs(row[f'{phase}_x_floor'] - row[f'{phase}_ms'] / floor) <= 1e-6 * row[f'{phase}_x_floor']
    for conv in report['conv']:
        assert conv['width'] == 4
        assert conv['fwd_bytes'] == 3 * 2 * 16 * 33 * 4 + (2 * 16 * 4 + 2 * 16) * 4
        assert conv['fwd_x_floor'] > 0 and conv['bwd_x_floor'] > 0


@pytest.mark.parametrize('kernels_build', [True, False])
def test_cpu_exp_floor_from_the_probe(tmp_path, monkeypatch, kernels_build):
    """Without --exp-rate on CPU the floor's exp rate is the fused kernels' measured rate (the probe), and bytes only
    where those kernels cannot build; the report names the source."""
    monkeypatch.setattr(benchmark_scan, 'cpu_backend_status', lambda: (kernels_build, 'test'))
    monkeypatch.setattr(benchmark_scan, 'cpu_exp_rate', lambda min_time: 2.5e9)
    report = benchmark_scan.run(torch.device('cpu'), ['fp32'], [(1, 9)], 8, 4, ['reference'], 0.01, None, 1.98,
                                1 << 20)
    row = report['scan'][0]
    byte_floor = row['fwd_bytes'] / (report['copy_gbps'] * 1e9) * 1e3
    if kernels_build:
        assert report['exp_rate'] == 2.5e9 and report['exp_rate_source'].startswith('measured: ')
        assert row['fwd_floor_ms'] == pytest.approx(max(byte_floor, row['fwd_exps'] / 2.5e9 * 1e3), rel=1e-9)
    else:
        assert report['exp_rate'] is None and report['exp_rate_source'] is None
        assert row['fwd_floor_ms'] == pytest.approx(byte_floor, rel=1e-9)


def test_cut_off_run_keeps_the_shapes_it_measured(tmp_path, monkeypatch):
    """A run stopped by a time limit (SIGINT from `timeout -s INT`) during its second shape leaves a JSON report with
    the first shape's rows, marked incomplete."""
    monkeypatch.setattr(benchmark_scan, 'retain_freed_memory', lambda: True)
    measure_conv = benchmark_scan.measure_conv

    def interrupted_on_second_shape(backend, batch, *args):
        if batch == 2:
            raise KeyboardInterrupt
        return measure_conv(backend, batch, *args)

    monkeypatch.setattr(benchmark_scan, 'measure_conv', interrupted_on_second_shape)
    out = tmp_path / 'scan.json'
    with pytest.raises(KeyboardInterrupt):
        benchmark_scan.main(['--device', 'cpu', '--shapes', '1x9', '2x9', '--dim', '8', '--dstate', '2',
                             '--backends', 'reference', '--min-time', '0.01', '--exp-rate', '1e9', '--out', str(out)])
    report = json.loads(out.read_text())
    assert report['complete'] is False and report['command'].startswith('python tools/benchmark_scan.py')
    assert [(r['batch'], r['seqlen']) for r in report['scan']] == [(1, 9)]
    assert [(r['batch'], r['seqlen']) for r in report['conv']] == [(1, 9)]
    assert not list(tmp_path.glob('.*partial*'))


def test_cuda_profile_range_holds_one_steady_call(monkeypatch):
    """--cuda-profile: the profiler range opens after the warm-up (the autotuner's trials) and holds one call."""
    events = []
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: None)
    monkeypatch.setattr(torch.cuda.profiler, 'start', lambda: events.append('start'))
    monkeypatch.setattr(torch.cuda.profiler, 'stop', lambda: events.append('stop'))
    benchmark_scan._time(lambda: events.append('call'), torch.device('cuda'), 0.0, profile=True)
    assert events[:5] == ['call', 'start', 'call', 'stop', 'call'] and events.count('start') == 1
    events.clear()
    benchmark_scan._time(lambda: events.append('call'), torch.device('cuda'), 0.0)
    assert 'start' not in events


def test_triton_chunk_option(monkeypatch):
    """--triton-chunk runs the Triton scan with that chunk size (the spacing of the states its forward saves), and
    the rows say so; other backends ignore it."""
    pytest.importorskip('triton')
    import vim.kernels.triton as triton_kernels
    from vim.kernels.triton import bidirectional_scan_triton
    seen = []

    def spy(*args, chunk_size=8, **kwargs):
        seen.append(chunk_size)
        return bidirectional_scan_triton(*args, chunk_size=chunk_size, **kwargs)
    monkeypatch.setattr(triton_kernels, 'bidirectional_scan_triton', spy)
    report = benchmark_scan.run(torch.device('cpu'), ['fp32'], [(1, 9)], 8, 4, ['triton', 'reference'], 0.001, 1e9,
                                1.98, 1 << 16, triton_chunk=4)
    assert seen and set(seen) == {4}
    assert [row.get('chunk') for row in report['scan']] == [4, None]


def test_host_profile_names_where_a_call_spends_the_host_time(tmp_path, monkeypatch):
    """--host-profile N: cProfile over N calls of each op; the rows carry the top functions by their own time per
    call, which include the op's own Python (here the reference scan's token loop)."""
    monkeypatch.setattr(benchmark_scan, 'retain_freed_memory', lambda: True)
    out = tmp_path / 'scan.json'
    assert benchmark_scan.main(['--device', 'cpu', '--shapes', '1x9', '--dim', '8', '--dstate', '2', '--backends',
                                'reference', '--min-time', '0.01', '--exp-rate', '1e9', '--host-profile', '3',
                                '--out', str(out)]) == 0
    report = json.loads(out.read_text())
    for row in report['scan'] + report['conv']:
        for key in ('fwd_host_profile', 'fwd_bwd_host_profile'):
            prof = row[key]
            assert 0 < len(prof) <= 12 and all(f['own_us'] >= 0 and f['cumulative_us'] >= f['own_us'] for f in prof)
            assert [f['own_us'] for f in prof] == sorted((f['own_us'] for f in prof), reverse=True)
    scan_functions = {f['function'] for f in report['scan'][0]['fwd_host_profile']}
    assert any(f.startswith('reference.py:') for f in scan_functions), scan_functions
    # without the option the rows carry no profile
    assert benchmark_scan.main(['--device', 'cpu', '--shapes', '1x9', '--dim', '8', '--dstate', '2', '--backends',
                                'reference', '--min-time', '0.01', '--exp-rate', '1e9', '--out', str(out)]) == 0
    assert 'fwd_host_profile' not in json.loads(out.read_text())['scan'][0]
