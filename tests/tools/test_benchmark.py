"""tools/benchmark.py (vim.benchmark.model) measures Vim and DeiT in one run and writes a JSON report with their
ratio."""
import json

import pytest
from vim.kernels.cpu import cpu_backend_status

import vim.benchmark.model as benchmark


def _record_malloc_calls(monkeypatch) -> list:
    """The benchmark's allocator setting, recorded instead of applied (it would last for the whole test process)."""
    calls = []
    monkeypatch.setattr(benchmark.scan_benchmark, 'retain_freed_memory', lambda: calls.append(1) or True)
    return calls


def test_benchmark_writes_side_by_side_report(tmp_path, monkeypatch):
    malloc_calls = _record_malloc_calls(monkeypatch)
    out = tmp_path / 'bench.json'
    assert benchmark.main(['--device', 'cpu', '--img-sizes', '32', '--rounds', '1', '--min-time', '0.01', '--flops',
                           '--scan', '--train', '--train-batch-size', '2', '--train-img-size', '32',
                           '--out', str(out)]) == 0
    report = json.loads(out.read_text())
    assert report['device'] and report['date'] and report['command'].startswith('python tools/benchmark.py')
    rows = {(r['mode'], r['model']): r for r in report['results']}
    assert set(rows) == {(m, n) for m in ('inference', 'train')
                         for n in ('vim_tiny_patch16_224', 'deit_tiny_patch16_224')}
    for mode in ('inference', 'train'):
        vim, deit = rows[(mode, 'vim_tiny_patch16_224')], rows[(mode, 'deit_tiny_patch16_224')]
        assert vim['img_per_s'] > 0 and deit['img_per_s'] > 0
        assert abs(vim['ratio_to_deit'] - vim['img_per_s'] / deit['img_per_s']) < 1e-9
    vim, deit = rows[('inference', 'vim_tiny_patch16_224')], rows[('inference', 'deit_tiny_patch16_224')]
    assert vim['gflops_per_img'] > 0 and deit['gflops_per_img'] > 0
    assert report['scan']['copy_gbps'] > 0 and report['scan']['scan'][0]['fwd_x_floor'] > 0
    assert report['complete'] and report['scan_backend'] == ('cpu' if cpu_backend_status()[0] else 'reference')
    assert malloc_calls == [1] and report['malloc'].startswith('freed memory kept for reuse')


def test_scan_recompute_reaches_vim_in_training(tmp_path, monkeypatch):
    from vim.models import VisionMamba
    calls = []
    monkeypatch.setattr(VisionMamba, 'set_scan_recompute', lambda self, enable=True: calls.append(enable))
    _record_malloc_calls(monkeypatch)
    out = tmp_path / 'bench.json'
    assert benchmark.main(['--device', 'cpu', '--img-sizes', '32', '--rounds', '1', '--min-time', '0.01', '--train',
                           '--train-batch-size', '2', '--train-img-size', '32', '--scan-recompute',
                           '--out', str(out)]) == 0
    assert calls == [True]  # the training case's Vim; not the inference case's, not DeiT
    assert json.loads(out.read_text())['scan_recompute'] is True


def test_torchcompile_adds_compiled_rows_for_both_models(tmp_path, monkeypatch, capsys):
    compiled = []
    real = benchmark.maybe_compile
    monkeypatch.setattr(benchmark, 'maybe_compile', lambda module, backend, mode=None, **kw: compiled.append(
        (type(module).__name__, module.training, backend, mode)) or real(module, backend, mode, **kw))
    _record_malloc_calls(monkeypatch)
    out = tmp_path / 'bench.json'
    assert benchmark.main(['--device', 'cpu', '--img-sizes', '32', '--rounds', '1', '--min-time', '0.01', '--train',
                           '--train-batch-size', '2', '--train-img-size', '32', '--torchcompile', 'aot_eager',
                           '--out', str(out)]) == 0
    models = ('VisionMamba', 'VisionTransformer')
    # the eager rows' models stay eager, the compiled rows' are compiled: both models, inference and training
    assert sorted(compiled, key=str) == sorted(((cls, training, backend, None) for cls in models
                                                for training in (False, True) for backend in (None, 'aot_eager')),
                                               key=str)
    report = json.loads(out.read_text())
    assert (report['torchcompile'], report['torchcompile_mode']) == ('aot_eager', None)
    rows = {(r['mode'], r['model']): r for r in report['results']}
    assert set(rows) == {(m, n) for m in ('inference', 'inference-compiled', 'train', 'train-compiled')
                         for n in ('vim_tiny_patch16_224', 'deit_tiny_patch16_224')}
    assert all(r['img_per_s'] > 0 for r in rows.values())
    assert rows[('train-compiled', 'vim_tiny_patch16_224')]['ratio_to_deit'] > 0
    with pytest.raises(SystemExit):
        benchmark.main(['--device', 'cpu', '--torchcompile-mode', 'max-autotune'])
    assert '--torchcompile-mode needs --torchcompile' in capsys.readouterr().err


def test_out_of_memory_is_recorded_and_vim_only_sizes(tmp_path, monkeypatch):
    make = benchmark.inference_case

    def inference_case(name, size, batch, dtype, device, **kwargs):
        if name.startswith('deit_') and size == 48:
            raise benchmark.torch.OutOfMemoryError('CUDA out of memory (simulated)')
        return make(name, size, batch, dtype, device, **kwargs)

    monkeypatch.setattr(benchmark, 'inference_case', inference_case)
    malloc_calls = _record_malloc_calls(monkeypatch)
    out = tmp_path / 'bench.json'
    assert benchmark.main(['--device', 'cpu', '--img-sizes', '32', '48', '--vim-only-sizes', '64', '--rounds', '1',
                           '--min-time', '0.01', '--glibc-malloc-defaults', '--out', str(out)]) == 0
    report = json.loads(out.read_text())
    assert malloc_calls == [] and report['malloc'] == 'glibc defaults'
    rows = {(r['model'], r['img_size']): r for r in report['results']}
    assert rows[('deit_tiny_patch16_224', 48)] == dict(
        mode='inference', model='deit_tiny_patch16_224', img_size=48, batch=1, dtype='fp32', oom=True, img_per_s=None)
    vim_48 = rows[('vim_tiny_patch16_224', 48)]
    assert vim_48['img_per_s'] > 0 and 'ratio_to_deit' not in vim_48
    assert rows[('vim_tiny_patch16_224', 32)]['ratio_to_deit'] > 0
    assert rows[('vim_tiny_patch16_224', 64)]['batch'] == 1 and ('deit_tiny_patch16_224', 64) not in rows


def test_cuda_graph_needs_cuda(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(['--device', 'cpu', '--cuda-graph'])
    assert '--cuda-graph needs a CUDA device' in capsys.readouterr().err
    with pytest.raises(ValueError, match='CUDA graph needs a CUDA device'):
        benchmark.graph_inference_case('vim_tiny_patch16_224', 32, 1, benchmark.torch.float32,
                                       benchmark.torch.device('cpu'))


def test_a_failed_capture_is_recorded_per_case(monkeypatch):
    def capture_fails(name, size, batch, dtype, device):
        raise RuntimeError('operation not permitted when stream is capturing\nmore detail')

    res = benchmark._guarded_pair(['vim_tiny_patch16_224', 'deit_tiny_patch16_224'], capture_fails, 32, 1,
                                  benchmark.torch.float32, benchmark.torch.device('cpu'), 1, 0.01)
    assert res == {n: dict(error='RuntimeError: operation not permitted when stream is capturing', img_per_s=None)
                   for n in ('vim_tiny_patch16_224', 'deit_tiny_patch16_224')}
    assert benchmark._speed(res['vim_tiny_patch16_224']).startswith('failed (RuntimeError')
    # a capture that works is measured like an eager case
    res = benchmark._guarded_pair(['vim_tiny_patch16_224'], benchmark.inference_case, 32, 1, benchmark.torch.float32,
                                  benchmark.torch.device('cpu'), 1, 0.01)
    assert res['vim_tiny_patch16_224']['img_per_s'] > 0


def _gpu_graph_matches_eager(name, dtype):
    import torch
    device = torch.device('cuda')
    torch.manual_seed(0)
    replay = benchmark.graph_inference_case(name, 64, 2, dtype, device)
    first = replay().float().clone()
    torch.manual_seed(0)
    eager = benchmark.inference_case(name, 64, 2, dtype, device)().float()
    # the same seed gives the same weights and input; bf16 autocast: the eager run may cast in another order
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(first, eager, rtol=tol, atol=tol * eager.abs().max().item())
    assert torch.equal(replay().float(), first)  # replaying is deterministic
    # its memory is its own: a GiB held elsewhere (another case of the pair) does not count
    held = torch.empty(2 ** 28, device=device)
    other = benchmark.graph_inference_case(name, 64, 2, dtype, device)
    assert 0 < benchmark._peak_gib(device, other) < 0.5, benchmark._peak_gib(device, other)
    del held


@pytest.mark.gpu
@pytest.mark.parametrize('dtype_name', ['fp32', 'bf16'])
@pytest.mark.parametrize('name', ['vim_tiny_patch16_224', 'deit_tiny_patch16_224'])
def test_cuda_graph_replay_matches_eager(name, dtype_name):
    _gpu_graph_matches_eager(name, benchmark.DTYPES[dtype_name])
