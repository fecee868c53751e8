"""timm's own model test suite (``tests/test_models.py`` of the installed timm's sdist) on every Vim model.

The file is run as released, with only the filter-list additions a pull request adding Vim to timm would make
(``TIMM_FILTER_ADDITIONS``), in a separate pytest process whose conftest imports ``vim`` (registering the models)
and keeps the parametrised cases of the Vim models. Any failure fails this test, with timm's report attached.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

from .conftest import extract_member

pytestmark = pytest.mark.slow

# What an upstream PR would add to timm's filter lists, inserted at the head of each list literal.
TIMM_FILTER_ADDITIONS = {
    # forward_intermediates() and the FeatureGetterNet features_only wrapper (by module name)
    'FEAT_INTER_FILTERS': ["'vision_mamba',"],
    # plain ViT-like: no 2-D pooled feature map (pool_size), class-token head, as 'vit_*' / 'test_vit*'
    'NON_STD_FILTERS': ["'vim_*', 'test_vim*',"],
    # TorchScript: excluded, with the reason in the comment timm's list would carry
    'EXCLUDE_JIT_FILTERS': [
        "# vim: the mixer's scan ops pick their backend (reference custom op, Triton) in Python at every call,",
        "# which TorchScript cannot compile; torch.export and ONNX are the supported graph exports.",
        "'vim_*', 'test_vim*',",
    ],
}
# Tests timm's own CI does not run, with its reasons: {test: the models it still runs on here}.
DESELECTED = {
    # run only off GitHub Actions: downloads every pretrained checkpoint (hundreds of MB for these models)
    'test_model_load_pretrained': (),
    # "no marker, slow (prunes every model at every feature index), excluded from CI for now": the tiny model only
    'test_prune_intermediate_layers_contract': ('test_vim',),
}
# Timeouts for 2 cores. timm's own (pytest-timeout marks) stay: 120 s where hard-coded (features, FX; the slowest,
# FX backward of vim_small_patch16_stride8_224, took ~20 s of CPU), 600 s through its $TIMEOUT where it reads it
# (forward, backward, cfg). The whole run is bounded as well.
TIMM_TIMEOUT_S = 600
RUN_TIMEOUT_S = 1800

CONFTEST = f'''
import timm

import vim  # noqa: F401  registers the Vim models with timm

VIM_MODELS = set(timm.list_models(['vim_*', 'test_vim*']))
DESELECTED = {DESELECTED!r}


def _vim_only(list_fn):
    """timm's own listing (its filters applied as written), narrowed to the Vim models: test_models.py then
    parametrises a hundred cases instead of collecting and deselecting ~18,000 (minutes on 2 cores)."""
    def listing(*args, **kwargs):
        return [name for name in list_fn(*args, **kwargs) if name.split('.')[0] in VIM_MODELS]
    return listing


# before test_models.py is imported (`from timm import list_models, list_pretrained`)
timm.list_models = _vim_only(timm.list_models)
timm.list_pretrained = _vim_only(timm.list_pretrained)


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, 'callspec', None)
        model = callspec.params.get('model_name') if callspec else None
        ours = isinstance(model, str) and model.split('.')[0] in VIM_MODELS  # cfg tests list 'name.tag'
        ours = ours and model.split('.')[0] in DESELECTED.get(item.originalname, VIM_MODELS)
        (keep if ours else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
'''


def patch_filters(source: str, additions: dict[str, list[str]]) -> str:
    """Insert ``additions[name]`` lines at the head of each ``name = [`` list literal; fail if one is not found."""
    for name, entries in additions.items():
        anchor = f'\n{name} = [\n'
        if source.count(anchor) != 1:
            raise AssertionError(f"timm's test_models.py has no single '{name} = [' list: update TIMM_FILTER_ADDITIONS")
        source = source.replace(anchor, anchor + ''.join(f'    {e}\n' for e in entries))
    return source


def _tally(junit: Path) -> tuple[Counter, dict[str, set[str]], list[str]]:
    """(outcome counts, passed test functions per model, failure/error/skip descriptions) from a JUnit XML file."""
    counts, passed, problems = Counter(), {}, []
    for case in ET.parse(junit).getroot().iter('testcase'):
        name = case.get('name')
        outcome = next((child.tag for child in case if child.tag in ('failure', 'error', 'skipped')), 'passed')
        counts[outcome] += 1
        function, _, params = name.partition('[')
        if outcome == 'passed':
            model = params.rstrip(']').split('-')[-1].split('.')[0]  # '[2-vim_x]', '[1-vim_x.in1k]', '[vim_x]'
            passed.setdefault(model, set()).add(function)
        else:
            detail = next(child for child in case if child.tag == outcome)
            problems.append(f'{outcome}: {name}: {(detail.get("message") or "")[:300]}')
    return counts, passed, problems


def test_timm_model_suite(timm_sdist: Path, tmp_path: Path) -> None:
    import timm

    import vim  # noqa: F401

    models = timm.list_models(['vim_*', 'test_vim*'])
    assert 'test_vim' in models and len(models) >= 6

    test_file = extract_member(timm_sdist, 'tests/test_models.py', tmp_path)
    test_file.write_text(patch_filters(test_file.read_text(), TIMM_FILTER_ADDITIONS))
    (tmp_path / 'conftest.py').write_text(CONFTEST)
    (tmp_path / 'pytest.ini').write_text('[pytest]\n')  # rootdir here: none of our pytest settings apply
    junit = tmp_path / 'report.xml'
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(tmp_path), os.environ.get('PYTHONPATH')]))}
    env.pop('GITHUB_ACTIONS', None)  # timm's local configuration: its full filter lists, FX + TorchScript included
    env.setdefault('TIMEOUT', str(TIMM_TIMEOUT_S))
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, '-m', 'pytest', test_file.name, '-q', '-p', 'no:cacheprovider', f'--junitxml={junit}',
         '-W', 'ignore::pytest.PytestUnknownMarkWarning', '-o', 'junit_family=xunit1'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert junit.is_file(), f'timm suite did not run (exit {proc.returncode}):\n{proc.stdout[-4000:]}{proc.stderr}'
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    counts, passed, problems = _tally(junit)
    summary = (f'timm {timm.__version__} test_models.py on {len(models)} Vim models: {dict(counts)} '
               f'in {wall:.0f} s ({cpu:.0f} CPU-s)')
    print(summary)
    assert not problems and proc.returncode == 0, summary + '\n' + '\n'.join(problems) + '\n' + proc.stdout[-3000:]
    # every model went through the core of the suite (a change of timm's lists must not silently drop one)
    core = {'test_model_forward', 'test_model_backward', 'test_model_default_cfgs_non_std',
            'test_model_forward_intermediates',
            'test_model_forward_intermediates_features', 'test_model_forward_fx', 'test_model_backward_fx'}
    for model in models:
        missing = core - passed.get(model, set())
        assert not missing, f'{model} did not pass {sorted(missing)}; {summary}'
