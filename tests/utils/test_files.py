import os

import pytest

from vim.utils import PARTIAL, atomic_write


def test_atomic_write_bytes_and_writer(tmp_path):
    target = tmp_path / 'out.bin'
    atomic_write(target, b'first')
    atomic_write(target, lambda tmp: tmp.write_text('second'))
    assert target.read_text() == 'second'
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert list(tmp_path.iterdir()) == [target]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / 'out.bin'
    atomic_write(target, b'old')

    def broken(tmp):
        tmp.write_bytes(b'half')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken)
    assert target.read_bytes() == b'old'
    assert not list(tmp_path.glob(f'.*{PARTIAL}*'))
