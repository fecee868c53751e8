"""tools/benchmark_scan.py (vim.benchmark.scan): the scan alone against its bytes/exp floor, with the copy bandwidth
of the same run."""
import json

import torch

import vim.benchmark.scan as benchmark_scan


def test_scan_benchmark_report(tmp_path):
    out = tmp_path / 'scan.json'
    assert benchmark_scan.main(['--device', 'cpu', '--shapes', '2x33', '--dim', '16', '--dstate', '4',
                                '--min-time', '0.01', '--exp-rate', '1e9', '--out', str(out)]) == 0
    report = json.loads(out.read_text())
    assert report['copy_gbps'] > 0 and report['exp_rate'] == 1e9
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
