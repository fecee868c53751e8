"""Fixtures of the peer tests: the cached sdists of timm and mamba_ssm (see tests/peers/sdists.py)."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from .sdists import REQUIRE_ENV, cached_sdist, peer_versions


def _sdist(name: str) -> Path:
    version = peer_versions()[name]
    path = cached_sdist(name, version)
    if path is None:
        message = f'the sdist of {name}=={version} is not cached: run `make peer-sdists`'
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(message)
        pytest.skip(message)
    return path


def extract_member(sdist: Path, member: str, dest: Path) -> Path:
    """Extract ``<sdist root>/<member>`` (e.g. 'tests/test_models.py') to ``dest`` / its basename."""
    with tarfile.open(sdist) as tar:
        root = tar.getnames()[0].split('/')[0]
        data = tar.extractfile(f'{root}/{member}')
        if data is None:
            raise FileNotFoundError(f'{member} is not a file in {sdist}')
        out = dest / Path(member).name
        out.write_bytes(data.read())
    return out


@pytest.fixture(scope='session')
def timm_sdist() -> Path:
    return _sdist('timm')


@pytest.fixture(scope='session')
def mamba_ssm_sdist() -> Path:
    return _sdist('mamba_ssm')
