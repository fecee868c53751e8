"""tools/export_onnx.py (vim.onnx): a Vim exported to ONNX runs in onnxruntime, at any batch size, and matches
PyTorch."""
from pathlib import Path

import pytest
import timm
import torch

import vim.onnx as export_onnx

onnxruntime = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')


def _run(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    assert [i.name for i in session.get_inputs()] == ['images']
    return torch.from_numpy(session.run(None, {'images': x.numpy()})[0])


def test_exported_classifier_matches_pytorch_at_another_batch_size(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('test_vim', num_classes=7).eval()
    checkpoint = tmp_path / 'weights.pth'
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / 'model.onnx'
    assert export_onnx.main(['--model', 'test_vim', '--checkpoint', str(checkpoint), '--img-size', '48', '64',
                             '--out', str(out)]) == 0
    x = torch.randn(3, 3, 48, 64)  # exported with a batch of 2
    model = timm.create_model('test_vim', pretrained=True, img_size=(48, 64), num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(checkpoint))).eval()
    with torch.no_grad():
        expected = model(x)
    actual = _run(out, x)
    assert actual.shape == (3, 7)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert not list(tmp_path.glob('.*partial*'))


def test_features_export_and_bad_size(tmp_path, capsys):
    out = tmp_path / 'features.onnx'
    assert export_onnx.main(['--model', 'test_vim', '--features', '--out', str(out)]) == 0
    assert 'max relative difference' in capsys.readouterr().out
    features = _run(out, torch.randn(1, 3, 64, 64))
    assert features.shape == (1, 65, 32)  # 8x8 patches and the class token, width 32
    with pytest.raises(SystemExit):
        export_onnx.main(['--model', 'test_vim', '--img-size', '1', '2', '3', '--out', str(out)])
