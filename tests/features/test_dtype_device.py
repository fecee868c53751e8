"""Autocast dtypes and the GPU path (pinned batches from DataLoader workers, peak GPU memory in the summary)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vim.features import Extractor, FeatureStore
from vim.features.layout import FeatureError

from .common import make_many


def _embeddings(out, paths):
    store = FeatureStore(out)
    return np.stack([store.load(p)['embedding'] for p in paths])


def test_bf16_autocast_on_cpu_is_close_to_fp32(tmp_path):
    paths = make_many(tmp_path / 'imgs', 4)
    outs = {}
    for dtype in ('fp32', 'bf16'):
        Extractor('test_vim', pretrained=False, img_size=24, device='cpu', dtype=dtype, batch_size=4,
                  progress=False).run([tmp_path / 'imgs'], tmp_path / dtype)
        outs[dtype] = _embeddings(tmp_path / dtype, paths)
    scale = np.abs(outs['fp32']).max()
    # bf16 keeps 8 significant bits (relative step 2**-8); a few roundings per block over 4 blocks
    np.testing.assert_allclose(outs['bf16'], outs['fp32'], rtol=0, atol=16 * 2**-8 * scale)
    assert not np.array_equal(outs['bf16'], outs['fp32'])  # autocast did take effect


@pytest.mark.gpu
def test_cuda_with_workers_matches_cpu_and_reports_gpu_memory(tmp_path):
    paths = make_many(tmp_path / 'imgs', 40, size=40)
    cpu = Extractor('test_vim', pretrained=False, img_size=32, device='cpu', batch_size=8, progress=False)
    cpu.run([tmp_path / 'imgs'], tmp_path / 'cpu')
    gpu = Extractor('test_vim', pretrained=False, img_size=32, device='cuda', batch_size=8, num_workers=2,
                    window=2, progress=False)
    s = gpu.run([tmp_path / 'imgs'], tmp_path / 'gpu')
    assert s['done'] == 40 and s['peak_memory_what'] == 'torch.cuda.max_memory_allocated'
    assert 0 < s['peak_memory_mib'] < torch.cuda.get_device_properties(0).total_memory / 2**20
    assert s['steady_img_per_s'] > 0
    # TF32 may be on for the GPU's matmuls: 10 significant bits
    np.testing.assert_allclose(_embeddings(tmp_path / 'gpu', paths), _embeddings(tmp_path / 'cpu', paths),
                               rtol=0, atol=8 * 2**-10 * np.abs(_embeddings(tmp_path / 'cpu', paths)).max())


def test_torchcompile_matches_eager_also_at_native_sizes(tmp_path):
    """torchcompile='inductor' (the CLI's --torchcompile): the same embeddings and maps as eager, at native sizes
    (two batches of another size each, so the second compile has dynamic shapes); a mode without a backend is
    refused before any work."""
    from torch._dynamo.utils import counters

    from .common import make_images
    paths = list(make_images(tmp_path / 'imgs').values())
    outs = {}
    for name, backend in (('eager', None), ('compiled', 'inductor')):
        torch.compiler.reset()
        counters.clear()
        Extractor('test_vim', pretrained=False, native=True, max_size=48, layers=[1], device='cpu', batch_size=2,
                  progress=False, torchcompile=backend).run([tmp_path / 'imgs'], tmp_path / name)
        assert (counters['stats']['unique_graphs'] > 0) == (backend is not None)
        store = FeatureStore(tmp_path / name)
        outs[name] = [store.load(p) for p in paths]
    compared = set()
    for eager, compiled in zip(outs['eager'], outs['compiled'], strict=True):
        assert eager.keys() == compiled.keys()
        for k in eager:
            if isinstance(eager[k], np.ndarray) and eager[k].dtype.kind == 'f':
                compared.add(k)
                # fp32 rounding (2^-24 a step) over the fused reductions of 4 blocks
                np.testing.assert_allclose(compiled[k], eager[k], rtol=0, atol=2**-16 * np.abs(eager[k]).max(),
                                           err_msg=k)
    assert compared == {'embedding', 'layer_1'}
    with pytest.raises(FeatureError, match='needs --torchcompile'):
        Extractor('test_vim', pretrained=False, device='cpu', progress=False, torchcompile_mode='max-autotune')


def test_the_scan_backend_is_ready_before_the_timed_loop(tmp_path, monkeypatch):
    """The first use of the CPU kernels builds them (~30 s): that happens when the extractor is made, so the speed
    the summary reports is the extraction's."""
    from vim.kernels.cpu import build
    real = build._build
    builds = []
    monkeypatch.setattr(build, '_result', None)  # as in a fresh process
    monkeypatch.setattr(build, '_build', lambda: builds.append(1) or real())
    paths = make_many(tmp_path / 'imgs', 2)
    extractor = Extractor('test_vim', pretrained=False, img_size=24, device='cpu', progress=False)
    assert builds == [1]
    summary = extractor.run([tmp_path / 'imgs'], tmp_path / 'out')
    assert builds == [1] and summary['done'] == len(paths)


def test_other_timm_models_do_not_wait_for_the_scan_kernels(tmp_path, monkeypatch):
    import vim.features.extractor as extractor_module
    calls = []
    monkeypatch.setattr(extractor_module, 'warmup', lambda *a: calls.append(a))
    Extractor('test_vit', pretrained=False, img_size=32, device='cpu', progress=False)
    assert calls == []
    Extractor('test_vim', pretrained=False, img_size=24, device='cpu', progress=False)
    assert calls == [(torch.device('cpu'), torch.float32)]
