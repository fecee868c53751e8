"""vim-train-mm / vim-test-mm (vim.mm.cli, and tools/train_mm.py, tools/test_mm.py over it), and the install
script's pins."""
from __future__ import annotations

import ast
import importlib.util
import runpy
import sys
from pathlib import Path

import pytest

from tests.downstream.conftest import DET_CONFIGS, REPO, SEG_CONFIGS, tiny_det_config, tiny_seg_config
from vim.mm import cli


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


def _dump(cfg, path: Path) -> str:
    cfg.dump(path)
    return str(path)


def test_train_resume_and_test_commands(ade_root, tmp_path, monkeypatch):
    """vim-train-mm / vim-test-mm on a config shrunk only in its model: the tiny ADE set and 128² through
    --data-root and --img-size, as a user would run a quick check."""
    pytest.importorskip('mmseg', reason='the mm stack is installed by `make install-mm`')
    from mmengine.config import Config

    cfg = tiny_seg_config(Config.fromfile(SEG_CONFIGS / 'upernet_vim-tiny_4xb4-160k_ade20k-512x512.py'),
                          tmp_path / 'unused')
    cfg.train_cfg.val_interval = 100  # no validation during these runs
    config = _dump(cfg, tmp_path / 'tiny_seg.py')
    work_dir = tmp_path / 'work'
    options = ['--data-root', str(ade_root), '--img-size', '128']
    monkeypatch.setattr(sys, 'argv', ['vim-train-mm'])

    assert cli.train_main([config, '--work-dir', str(work_dir), *options]) is None  # a console script's exit code
    first = (work_dir / 'iter_1.pth').stat().st_mtime_ns

    # resume the latest checkpoint of the work dir (an mmengine pickle: needs the pre-torch-2.6 load) and train one
    # more iteration; a run from scratch would have rewritten iter_1.pth
    args = cli.train_parser().parse_args([config, '--work-dir', str(work_dir), '--resume', *options,
                                          '--cfg-options', 'train_cfg.max_iters=2'])
    runner = cli.run(cli.build_train_config(args), 'train')
    assert runner.iter == 2 and (work_dir / 'iter_2.pth').is_file()
    assert runner.model.backbone.patch_embed.grid_size == (8, 8)
    assert runner.train_dataloader.dataset.data_root == str(ade_root)
    assert (work_dir / 'iter_1.pth').stat().st_mtime_ns == first

    cli.test_main([config, str(work_dir / 'iter_2.pth'), '--work-dir', str(tmp_path / 'test'),
                   '--out', str(tmp_path / 'preds.pkl'), *options])
    assert (tmp_path / 'preds.pkl').is_file()


def test_detection_train_and_test_with_data_root_and_img_size(coco_root, tmp_path):
    """Detection through the commands: --data-root reaches the RepeatDataset-wrapped train set, the val/test sets
    and CocoMetric's annotation file; --img-size 128 the LSJ pipeline, the fixed-size pad and the backbone."""
    pytest.importorskip('mmdet', reason='the mm stack is installed by `make install-mm`')
    from mmengine.config import Config

    cfg = tiny_det_config(Config.fromfile(DET_CONFIGS / 'cascade-mask-rcnn_vim-tiny_sfp_lsj-1024_coco.py'),
                          tmp_path / 'unused')
    config = _dump(cfg, tmp_path / 'tiny_det.py')
    options = ['--data-root', str(coco_root), '--img-size', '128']
    args = cli.train_parser().parse_args([config, '--work-dir', str(tmp_path / 'work'), *options])
    runner = cli.run(cli.build_train_config(args), 'train')  # one iteration, then validation with CocoMetric
    assert type(runner.model).__name__ == 'CascadeRCNN'
    assert runner.model.backbone.patch_embed.grid_size == (8, 8)
    assert runner.train_dataloader.dataset.dataset.data_root == str(coco_root)
    assert len(runner.train_dataloader.dataset) == 3 and len(runner.val_dataloader.dataset) == 3
    batch = runner.model.data_preprocessor(next(iter(runner.train_dataloader)), True)
    assert batch['inputs'].shape[-2:] == (128, 128)
    assert 0.0 <= runner.message_hub.get_scalar('val/coco/bbox_mAP').current() <= 1.0  # CocoMetric found its file


def test_help_and_a_clear_error_without_the_mm_stack(monkeypatch, capsys):
    """--help needs only the standard library; running without mmengine names what to install."""
    monkeypatch.setitem(sys.modules, 'mmengine', None)  # `import mmengine` now raises ImportError
    monkeypatch.setattr(sys, 'argv', ['vim-train-mm'])
    for main, description in ((cli.train_main, cli.TRAIN_DESCRIPTION), (cli.test_main, cli.TEST_DESCRIPTION)):
        with pytest.raises(SystemExit) as exit_:
            main(['--help'])
        assert exit_.value.code == 0
        out = ' '.join(capsys.readouterr().out.split())
        assert ' '.join(description.split()) in out and '--data-root' in out and '--img-size' in out
    with pytest.raises(SystemExit, match='make install-mm'):
        cli.train_main(['some_config.py'])


def test_tools_are_thin_commands_over_the_package(monkeypatch, capsys):
    """tools/*_mm.py import only vim.mm.cli and print its --help as scripts; pyproject installs the same functions."""
    tomllib = pytest.importorskip('tomllib')
    scripts = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['scripts']
    assert scripts['vim-train-mm'] == 'vim.mm.cli:train_main' and scripts['vim-test-mm'] == 'vim.mm.cli:test_main'
    for tool, main in (('train_mm', 'train_main'), ('test_mm', 'test_main')):
        tree = ast.parse((REPO / 'tools' / f'{tool}.py').read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert [(n.module, [a.name for a in n.names]) for n in imports] == [('vim.mm.cli', [main])]
        monkeypatch.setattr(sys, 'argv', [f'{tool}.py', '--help'])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(REPO / 'tools' / f'{tool}.py'), run_name='__main__')
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and out.startswith(f'usage: {tool}.py') and '--data-root' in out


def test_amp_flag_selects_bf16():
    pytest.importorskip('mmseg', reason='the mm stack is installed by `make install-mm`')
    args = cli.train_parser().parse_args([str(SEG_CONFIGS / 'upernet_vim-tiny_4xb4-160k_ade20k-512x512.py'),
                                          '--amp', '--launcher', 'pytorch', '--resume', 'ckpt.pth'])
    cfg = cli.build_train_config(args)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper' and cfg.optim_wrapper.dtype == 'bfloat16'
    assert cfg.launcher == 'pytorch' and cfg.resume is True and cfg.load_from == 'ckpt.pth'
    # detection: bf16 in the backbone only (see test_mmdet.test_bf16_backbone_train_step_and_predict)
    cfg = cli.build_train_config(cli.train_parser().parse_args(
        [str(DET_CONFIGS / 'mask-rcnn_vim-tiny_sfp_lsj-1024_coco.py'), '--amp']))
    assert cfg.model.backbone.autocast_dtype == 'bfloat16' and cfg.optim_wrapper.type == 'OptimWrapper'
    assert cfg.resume is False
