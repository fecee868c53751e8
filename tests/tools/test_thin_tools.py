"""Every tools/*.py is a command line over the installed package: it imports no other tool, does not touch
sys.path, and runs as a script (``--help``)."""
from __future__ import annotations

import ast
import importlib.util
import runpy
import sys
from pathlib import Path

import pytest

TOOLS = sorted((Path(__file__).resolve().parents[2] / 'tools').glob('*.py'))


def _imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or '').split('.')[0] if node.level == 0 else '.')
    return names


@pytest.mark.parametrize('tool', TOOLS, ids=lambda p: p.name)
def test_imports_no_other_tool_and_leaves_sys_path(tool):
    tree = ast.parse(tool.read_text())
    assert not _imported_modules(tree) & ({p.stem for p in TOOLS} | {'.'}), 'imports another tool'
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == 'path':
            assert not (isinstance(node.value, ast.Name) and node.value.id == 'sys'), f'sys.path, line {node.lineno}'


@pytest.mark.parametrize('tool', TOOLS, ids=lambda p: p.name)
def test_runs_as_a_script(tool, monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', [tool.name, '--help'])
    try:
        runpy.run_path(str(tool), run_name='__main__')
    except SystemExit as e:
        assert e.code in (0, None)
    except ModuleNotFoundError as e:
        if importlib.util.find_spec(e.name.split('.')[0]) is not None:
            raise
        pytest.skip(f'{tool.name} needs {e.name}, not installed')
    assert capsys.readouterr().out.startswith('usage: ')
