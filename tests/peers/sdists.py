"""Released source distributions of the peers whose own tests and reference the tests in tests/peers run.

* timm, the installed version: its sdist ships ``tests/test_models.py``, timm's model test suite;
* mamba_ssm, pinned: ``mamba_ssm/ops/selective_scan_interface.py`` holds ``selective_scan_ref``, the reference our
  scan claims to match.

Each sdist is downloaded once per machine, WITHOUT building or installing anything, into
``~/.cache/vim-backbones/sdists/`` (``$VIM_MM_CACHE`` overrides the root, as for the mmcv wheel): its URL and
sha256 come from the package index's JSON simple API (PEP 691; ``$PIP_INDEX_URL`` is honoured), the download is
verified against that sha256 and moved into place atomically, and the digest is kept beside it so later runs verify
the cached file offline. ``make test`` runs ``python -m tests.peers.sdists`` first: a failed download with nothing
cached ends the run with an error instead of letting the peer tests skip.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

from packaging.utils import canonicalize_name, parse_sdist_filename
from packaging.version import Version

MAMBA_SSM_VERSION = '2.3.2.post1'
CACHE_DIR = Path(os.environ.get('VIM_MM_CACHE', Path.home() / '.cache' / 'vim-backbones')) / 'sdists'
INDEX_URL = os.environ.get('PIP_INDEX_URL', 'https://pypi.org/simple').rstrip('/')
# Set by `make test`: a missing sdist fails the peer tests instead of skipping them.
REQUIRE_ENV = 'VIM_REQUIRE_PEER_SDISTS'

__all__ = ['peer_versions', 'cached_sdist', 'fetch_sdist', 'CACHE_DIR', 'REQUIRE_ENV']


class SdistError(RuntimeError):
    pass


def peer_versions() -> dict[str, str]:
    """The sdists the peer tests need: {distribution name: version}."""
    return {'timm': md.version('timm'), 'mamba_ssm': MAMBA_SSM_VERSION}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _paths(name: str, version: str) -> tuple[Path, Path]:
    path = CACHE_DIR / f'{canonicalize_name(name)}-{version}.tar.gz'
    return path, path.with_name(path.name + '.sha256')


def cached_sdist(name: str, version: str) -> Path | None:
    """The cached sdist if present and intact (its bytes match the digest recorded at download), else None."""
    path, digest_path = _paths(name, version)
    if not (path.is_file() and digest_path.is_file()):
        return None
    if _sha256(path) != digest_path.read_text().strip():
        raise SdistError(f'{path} does not match its recorded sha256: delete it (and {digest_path.name}) to refetch.')
    return path


def _index_sdist(name: str, version: str) -> tuple[str, str]:
    """(url, sha256) of the sdist of ``name==version`` listed by the index's JSON simple API."""
    url = f'{INDEX_URL}/{canonicalize_name(name)}/'
    request = urllib.request.Request(url, headers={'Accept': 'application/vnd.pypi.simple.v1+json'})
    with urllib.request.urlopen(request, timeout=60) as response:
        if 'json' not in response.headers.get('Content-Type', ''):
            raise SdistError(f'{url} did not answer with the JSON simple API (PEP 691)')
        files = json.load(response)['files']
    for file in files:
        if not file['filename'].endswith('.tar.gz'):
            continue
        try:
            file_name, file_version = parse_sdist_filename(file['filename'])
        except ValueError:
            continue
        if file_name == canonicalize_name(name) and file_version == Version(version):
            if 'sha256' not in file.get('hashes', {}):
                raise SdistError(f'{url} lists {file["filename"]} without a sha256')
            return urllib.request.urljoin(url, file['url']), file['hashes']['sha256']
    raise SdistError(f'no sdist of {name}=={version} at {url}')


def fetch_sdist(name: str, version: str) -> Path:
    """The sdist of ``name==version`` from the cache, downloading and verifying it first if needed."""
    cached = cached_sdist(name, version)
    if cached is not None:
        return cached
    path, digest_path = _paths(name, version)
    try:
        url, sha256 = _index_sdist(name, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix='.part', delete=False) as tmp:
            with urllib.request.urlopen(url, timeout=120) as response:
                while block := response.read(1 << 20):
                    tmp.write(block)
    except OSError as e:  # URLError, timeouts, disk errors
        raise SdistError(f'could not download the sdist of {name}=={version}: {e}') from e
    tmp_path = Path(tmp.name)
    actual = _sha256(tmp_path)
    if actual != sha256:
        tmp_path.unlink()
        raise SdistError(f'{url}: sha256 {actual} does not match the index ({sha256})')
    digest_path.write_text(sha256 + '\n')
    os.replace(tmp_path, path)  # atomic: an interrupted download never looks like a cached sdist
    return path


def main() -> int:
    for name, version in peer_versions().items():
        try:
            path = fetch_sdist(name, version)
        except SdistError as e:
            print(f'[peer-sdists] ERROR: {e}', file=sys.stderr)
            return 1
        print(f'[peer-sdists] {name}=={version}: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
