"""tools/validate.py (vim.eval.cli) against an accuracy and loss computed here by hand, on a generated 3-class
ImageFolder."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import vim.eval.cli as validate
from vim.models import vim_to_official

CLASSES = {'ant': 5, 'bee': 4, 'cat': 3}  # unequal, so that a constant prediction cannot hit a round number


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    """root/val/<class>/<i>.png, 64x64 (the test models' input size at crop 1.0: no resize or crop happens)."""
    root = tmp_path_factory.mktemp('imagefolder')
    rng = np.random.default_rng(0)
    for c, (name, count) in enumerate(CLASSES.items()):
        (root / 'val' / name).mkdir(parents=True)
        for i in range(count):
            arr = rng.integers(0, 90, (64, 64, 3))
            arr[..., c] += rng.integers(40, 160)
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(root / 'val' / name / f'{i}.png')
    return root


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(3)
    kwargs = dict(img_size=64) if name == 'test_vit' else {}
    model = timm.create_model(name, num_classes=3, **kwargs).eval()
    with torch.no_grad():  # a random head is nearly uniform; sharpen it so that predictions differ per image
        model.get_classifier().weight.mul_(40)
    return model


@torch.no_grad()
def _by_hand(model: torch.nn.Module, root: Path) -> dict:
    """Read every image with PIL, normalise with the model's declared statistics, run the model, count."""
    mean, std = np.array(model.pretrained_cfg['mean']), np.array(model.pretrained_cfg['std'])
    images, labels = [], []
    for label, folder in enumerate(sorted(p for p in (root / 'val').iterdir() if p.is_dir())):
        for path in sorted(folder.iterdir()):
            x = (np.asarray(Image.open(path).convert('RGB'), dtype=np.float64) / 255 - mean) / std
            images.append(torch.from_numpy(x.transpose(2, 0, 1)).float())
            labels.append(label)
    logits = model(torch.stack(images))
    labels = torch.tensor(labels)
    predictions = logits.argmax(-1)
    return {'top1': 100.0 * (predictions == labels).sum().item() / len(labels),
            'loss': F.cross_entropy(logits, labels).item(), 'predictions': predictions}


def _write(model: torch.nn.Module, path: Path, fmt: str) -> Path:
    state_dict = model.state_dict()
    if fmt == 'safetensors':
        save_file(state_dict, str(path))
    elif fmt == 'train-state':  # the layout tools/train.py writes: the weights under 'model' among other things
        torch.save({'format': 'vim-train-state/1', 'model': state_dict,
                    'model_ema': {k: torch.zeros_like(v) for k, v in state_dict.items()},
                    'optimizer': {'state': {}, 'param_groups': []}, 'progress': {'epoch': 1}}, path)
    elif fmt == 'official':  # an official hustvl/Vim training pickle
        official = vim_to_official(state_dict)
        torch.save({'model': official, 'model_ema': {k: torch.zeros_like(v) for k, v in official.items()},
                    'epoch': 299, 'args': argparse.Namespace(model='vim')}, path)
    return path


@pytest.mark.parametrize('name, fmt', [('test_vim', 'safetensors'), ('test_vim', 'train-state'),
                                       ('test_vim', 'official'), ('test_vit', 'safetensors')])
def test_matches_hand_computation(data, tmp_path, name, fmt):
    model = _model(name)
    expected = _by_hand(model, data)
    assert len(set(expected['predictions'].tolist())) > 1  # the comparison would be weak otherwise
    checkpoint = _write(model, tmp_path / f'weights.{"safetensors" if fmt == "safetensors" else "pth"}', fmt)
    out_json = tmp_path / 'results.json'
    extra = ['--img-size', '64', '--crop-pct', '1.0'] if name == 'test_vit' else []
    results = validate.main([str(data), '--model', name, '--checkpoint', str(checkpoint), '--device', 'cpu',
                             '--workers', '0', '--batch-size', '5', '--log-interval', '1', '--json', str(out_json),
                             *extra])  # batches of 5, 5, 2: the counts must be summed, not the batch means averaged
    assert 0 <= results['top1'] <= 100
    assert results['num_images'] == sum(CLASSES.values()) and results['num_classes'] == 3  # read from the file
    assert results['top1'] == pytest.approx(expected['top1'], abs=1e-9)
    assert results['loss'] == pytest.approx(expected['loss'], rel=1e-5)
    assert results['top5'] == 100.0  # top-min(5, 3)
    assert results['input_size'] == [3, 64, 64] and results['crop_pct'] == 1.0
    assert results['img_per_sec'] > 0 and results['model_img_per_sec'] >= results['img_per_sec']
    assert json.loads(out_json.read_text()) == results


def test_other_resolution_and_crop(data, tmp_path):
    """--img-size builds the Vim at 48x48 (position embedding resampled from the 64x64 checkpoint)."""
    checkpoint = _write(_model('test_vim'), tmp_path / 'w.safetensors', 'safetensors')
    results = validate.main([str(data / 'val'), '--model', 'test_vim', '--checkpoint', str(checkpoint),
                             '--img-size', '48', '--crop-pct', '0.75', '--interpolation', 'bilinear',
                             '--device', 'cpu', '--workers', '0', '--log-interval', '0'])
    assert results['input_size'] == [3, 48, 48] and results['crop_pct'] == 0.75
    assert results['interpolation'] == 'bilinear'
    assert 0 <= results['top1'] <= 100 and results['num_images'] == sum(CLASSES.values())


def test_too_few_classes_is_an_error(data, tmp_path):
    checkpoint = _write(_model('test_vim'), tmp_path / 'w.safetensors', 'safetensors')
    with pytest.raises(ValueError, match='3 classes'):
        validate.main([str(data), '--model', 'test_vim', '--checkpoint', str(checkpoint), '--num-classes', '2',
                       '--device', 'cpu', '--workers', '0'])


def test_torchcompile_matches_hand_computation(data, tmp_path):
    """--torchcompile (inductor, timm's flag): the same counts and loss; batches of 5, 5, 2 make it compile twice
    (the second time with a dynamic batch)."""
    from torch._dynamo.utils import counters
    model = _model('test_vim')
    expected = _by_hand(model, data)
    checkpoint = _write(model, tmp_path / 'w.safetensors', 'safetensors')
    torch.compiler.reset()
    counters.clear()
    results = validate.main([str(data), '--model', 'test_vim', '--checkpoint', str(checkpoint), '--device', 'cpu',
                             '--workers', '0', '--batch-size', '5', '--log-interval', '0', '--torchcompile'])
    assert counters['stats']['unique_graphs'] >= 1  # it did compile
    assert results['torchcompile'] == 'inductor'
    assert results['top1'] == pytest.approx(expected['top1'], abs=1e-9)
    assert results['loss'] == pytest.approx(expected['loss'], rel=1e-5)
    with pytest.raises(ValueError, match='needs --torchcompile'):
        validate.main([str(data), '--model', 'test_vim', '--device', 'cpu', '--torchcompile-mode', 'max-autotune'])
