"""What ``pip install vim-backbones`` gives: the wheel built from a copy of the source files, installed into a fresh
virtual environment that cannot see this checkout, has every package, runs every console script of pyproject.toml
(``--help``) and finds the training presets by name.
A sub-package is found without being listed (setup.py); a data file needs a package-data line in pyproject.toml.

The fresh environment gets the dependencies (torch, timm, ...) of the running one through a .pth file that lists the
running interpreter's site-packages folders. Folders listed in a .pth file are put on sys.path without their own .pth
files being run, so the editable install's import hook (a .pth file) is not installed there.
"""
from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

tomllib = pytest.importorskip('tomllib', reason='Python >= 3.11')

REPO = Path(__file__).resolve().parents[1]
SOURCES = ('pyproject.toml', 'setup.py', 'README.md', 'vim', 'kernels', 'configs')  # what the build may read
PROBE = '''
import json, sys
import vim, vim.kernels
from vim.kernels import bidirectional_scan
from vim.train.cli import CONFIG_DIR, parse_args
print(json.dumps(dict(vim=vim.__file__, kernels=vim.kernels.__file__, config_dir=str(CONFIG_DIR),
                      preset_model=parse_args(['data', '--config', 'vim_tiny_patch16_224']).model)))
'''


def console_scripts() -> dict[str, str]:
    """[project.scripts] of pyproject.toml: command name -> 'module:function'."""
    return tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['scripts']


def _files(root: Path, pattern: str = '*') -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob(pattern)
            if p.is_file() and '__pycache__' not in p.relative_to(root).parts}


def source_files() -> set[str]:
    """Every file the wheel must install, by its path under site-packages: the vim/ tree, kernels/ as vim/kernels
    (modules and data such as C++ sources alike) and the training presets."""
    return ({f'vim/{f}' for f in _files(REPO / 'vim')} | {f'vim/kernels/{f}' for f in _files(REPO / 'kernels')}
            | {f'vim/configs/imagenet/{f}' for f in _files(REPO / 'configs' / 'imagenet', '*.yaml')})


def dependency_paths() -> list[str]:
    """The site-packages folders of the running interpreter (its own and those its .pth files add)."""
    return [p for p in dict.fromkeys(sys.path) if Path(p).name in ('site-packages', 'dist-packages')]


def _run(cmd: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME', 'VIRTUAL_ENV')}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _missing_optional_module(output: str) -> str | None:
    """The module a command failed to import, if the running environment lacks it too (an extra not installed)."""
    match = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", output)
    if match and importlib.util.find_spec(match.group(1).split('.')[0]) is None:
        return match.group(1)
    return None


@pytest.mark.slow
def test_wheel_in_a_fresh_environment(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns('__pycache__'))
        else:
            shutil.copy2(REPO / name, src / name)
    # no build isolation: the build uses the running environment's setuptools instead of downloading one
    build = _run([sys.executable, '-m', 'pip', 'wheel', '.', '--no-deps', '--no-build-isolation', '-q',
                  '-w', tmp_path / 'dist'], cwd=src)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = (tmp_path / 'dist').glob('vim_backbones-*.whl')

    venv = tmp_path / 'venv'
    assert _run([sys.executable, '-m', 'venv', '--without-pip', venv], cwd=tmp_path).returncode == 0
    python = venv / 'bin' / 'python'
    install = _run([sys.executable, '-m', 'pip', '--python', python, 'install', '--no-deps', '--no-index', '-q', wheel],
                   cwd=tmp_path)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    site = Path(_run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                     cwd=tmp_path).stdout.strip())
    (site / 'dependencies.pth').write_text('\n'.join(dependency_paths()) + '\n')

    # every package and data file of the source tree is installed (a forgotten one would only fail for pip users)
    assert {f'vim/{f}' for f in _files(site / 'vim')} == source_files()

    probe = _run([python, '-c', PROBE], cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(found['vim']).is_relative_to(site) and Path(found['kernels']).is_relative_to(site / 'vim' / 'kernels')
    assert Path(found['config_dir']) == site / 'vim' / 'configs' / 'imagenet'  # package data, not the checkout's
    assert found['preset_model'] == 'vim_tiny_patch16_224'

    scripts = console_scripts()
    assert {'vim-train', 'vim-validate', 'vim-benchmark', 'vim-benchmark-scan', 'vim-convert-checkpoint',
            'vim-export-onnx'} <= set(scripts)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(zip(scripts, pool.map(lambda name: _run([venv / 'bin' / name, '--help'], cwd=tmp_path), scripts)))
    failed, skipped = {}, {}
    for name, run in runs.items():
        output = run.stdout + run.stderr
        if run.returncode == 0 and run.stdout.startswith('usage: '):
            continue
        missing = _missing_optional_module(output)
        (skipped if missing else failed)[name] = missing or output[-2000:]
    assert not failed, failed
    if skipped:
        warnings.warn(f'--help not checked, the running environment lacks their optional modules: {skipped}',
                      stacklevel=1)
