"""tools/train_mm.py and tools/test_mm.py through their main(), and the install script's pins."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.downstream.conftest import DET_CONFIGS, REPO, SEG_CONFIGS, shrink_seg_config


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_script_pins_match_the_mm_extra():
    tomllib = pytest.importorskip('tomllib')
    extra = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['optional-dependencies']['mm']
    install_mm = _load_tool('install_mm')
    assert sorted(install_mm.PINS) == sorted(extra)
    assert install_mm.MMCV == '2.1.0'
    key = install_mm.wheel_key(cuda=False)
    assert key.startswith('mmcv-2.1.0_cp') and key.endswith('_cpu')
    import torch

    assert torch.__version__.replace('+', '_') in key


def test_train_resume_and_test_tools(ade_root, tmp_path, monkeypatch):
    pytest.importorskip('mmseg', reason='the mm stack is installed by `make install-mm`')
    from mmengine.config import Config

    cfg = shrink_seg_config(Config.fromfile(SEG_CONFIGS / 'upernet_vim-tiny_4xb4-160k_ade20k-512x512.py'),
                            ade_root, tmp_path / 'unused')
    cfg.train_cfg.val_interval = 100  # no validation during these runs
    config = tmp_path / 'tiny_seg.py'
    cfg.dump(config)
    work_dir = tmp_path / 'work'
    train_mm, test_mm = _load_tool('train_mm'), _load_tool('test_mm')
    monkeypatch.setattr(sys, 'argv', ['train_mm.py'])

    train_mm.main([str(config), '--work-dir', str(work_dir)])
    first = (work_dir / 'iter_1.pth').stat().st_mtime_ns

    # resume the latest checkpoint of the work dir (an mmengine pickle: needs the pre-torch-2.6 load) and train one
    # more iteration; a run from scratch would have rewritten iter_1.pth
    runner = train_mm.main([str(config), '--work-dir', str(work_dir), '--resume',
                            '--cfg-options', 'train_cfg.max_iters=2'])
    assert runner.iter == 2 and (work_dir / 'iter_2.pth').is_file()
    assert (work_dir / 'iter_1.pth').stat().st_mtime_ns == first

    test_mm.main([str(config), str(work_dir / 'iter_2.pth'), '--work-dir', str(tmp_path / 'test'),
                  '--out', str(tmp_path / 'preds.pkl')])
    assert (tmp_path / 'preds.pkl').is_file()


def test_amp_flag_selects_bf16():
    pytest.importorskip('mmseg', reason='the mm stack is installed by `make install-mm`')
    train_mm = _load_tool('train_mm')
    args = train_mm.parse_args([str(SEG_CONFIGS / 'upernet_vim-tiny_4xb4-160k_ade20k-512x512.py'), '--amp',
                                '--launcher', 'pytorch', '--resume', 'ckpt.pth'])
    cfg = train_mm.build_config(args)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper' and cfg.optim_wrapper.dtype == 'bfloat16'
    assert cfg.launcher == 'pytorch' and cfg.resume is True and cfg.load_from == 'ckpt.pth'
    # detection: bf16 in the backbone only (see test_mmdet.test_bf16_backbone_train_step_and_predict)
    cfg = train_mm.build_config(train_mm.parse_args([str(DET_CONFIGS / 'mask-rcnn_vim-tiny_sfp_lsj-1024_coco.py'),
                                                     '--amp']))
    assert cfg.model.backbone.autocast_dtype == 'bfloat16' and cfg.optim_wrapper.type == 'OptimWrapper'
    assert cfg.resume is False
