"""Writing shards of many images with a commit per batch that costs O(batch), safe against kill -9 at any moment.

The index is one small record per *open* shard, and a parquet file per sealed shard (``layout`` names the files):

- per batch (``ShardWriter.add``): the batch's rows are appended to the shard's open ``.npy`` files, then one JSON
  line (the batch's keys and sizes, and each array file's byte length after it) to the shard's record
  ``metadata/.metadata_N.jsonl``; data first, record line last, each flushed and fsynced. The cost is the batch's
  size whatever the output's, and the line is the commit: bytes past the last whole line are not committed.
- per shard (``seal_shard``, when ``max_images`` or ``max_bytes`` is reached, at the end of a run, on Ctrl-C):
  the row counts are written into the fixed-size ``.npy`` headers in place, the arrays renamed to their final names,
  the parquet written atomically (the shard's commit point) and the record deleted: O(shard) once per shard.
- ``recover`` (at the start of a run, before any rank writes) completes every shard a killed run left open from
  its record: arrays truncated to the record's last line, sealed as above. A shard with no committed batch is
  discarded; its images are not in any parquet, so they are redone. Nothing is lost, nothing counted twice.
- resuming (``done_keys``) reads the ``key`` column of the parquet files: one small column per ~1,000 images.

Why not the alternatives: a JSON index rewritten after every batch made each commit O(output) (the run became
quadratic); one append-only log of every image would be read whole at every resume and rewritten to drop torn
tails; SQLite would funnel all ranks of a multi-node run through one file lock on a shared file system, where
such locks are unreliable. Records per shard need no locks: each rank writes only its own shards.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset
import pyarrow.parquet as pq

from vim.utils import PARTIAL, atomic_write

from .layout import (
    EMBEDDING,
    NPY_HEADER_BYTES,
    array_path,
    npy_header,
    open_path,
    parquet_path,
    read_npy_header,
    record_path,
    shard_number,
)

__all__ = ['SCHEMA', 'ShardWriter', 'append_failures', 'done_keys', 'next_shard', 'recover', 'seal_shard']

SCHEMA = pa.schema([('key', pa.string()), ('shard', pa.int32()), ('row', pa.int32()), ('input_h', pa.int32()),
                    ('input_w', pa.int32()), ('grid_h', pa.int32()), ('grid_w', pa.int32()),
                    ('token_offset', pa.int64()), ('vis', pa.string())])
ROW_FIELDS = ('key', 'input_h', 'input_w', 'grid_h', 'grid_w', 'vis')  # what a record line holds per image


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def seal_shard(out: Path, shard: int, rows: list[list], ends: dict[str, int]) -> None:
    """Make ``shard`` complete: arrays cut to ``ends`` (bytes), headers with their row counts, final names, parquet.

    ``rows``: [key, input_h, input_w, grid_h, grid_w, vis] per image, in row order. Idempotent: a seal interrupted
    at any step is redone from the same record.
    """
    tokens = np.cumsum([0] + [r[3] * r[4] for r in rows])
    for name, end in ends.items():
        path = open_path(out, name, shard)
        if not path.exists():  # renamed already by an interrupted seal
            path = array_path(out, name, shard)
        with open(path, 'r+b') as f:
            channels = read_npy_header(f.read(NPY_HEADER_BYTES))[1]
            n = len(rows) if name == EMBEDDING else int(tokens[-1])
            if end != NPY_HEADER_BYTES + 4 * n * channels:
                raise RuntimeError(f'{path}: {end} bytes recorded for {n} rows of {channels} float32')
            f.truncate(end)
            f.seek(0)
            f.write(npy_header((n, channels)))
            _fsync(f)
        os.replace(path, array_path(out, name, shard))
    columns = list(zip(*rows)) if rows else [[]] * len(ROW_FIELDS)
    data = dict(zip(ROW_FIELDS, columns))
    data.update(shard=[shard] * len(rows), row=list(range(len(rows))), token_offset=tokens[:-1].tolist())
    table = pa.table({f.name: data[f.name] for f in SCHEMA}, schema=SCHEMA)
    atomic_write(parquet_path(out, shard), lambda tmp: pq.write_table(table, tmp))
    record_path(out, shard).unlink(missing_ok=True)


def read_record(path: Path) -> tuple[list[list], dict[str, int]]:
    """The rows and array lengths committed in a record; a torn last line (killed mid-write) is not committed."""
    rows, ends = [], {}
    for line in path.read_bytes().split(b'\n'):
        try:
            entry = json.loads(line)
        except ValueError:
            break
        rows += entry['rows']
        ends = entry['end']
    return rows, ends


def recover(out: Path) -> list[int]:
    """Seal every shard left open by a killed run; remove its leftovers. Returns the shards sealed. Rank 0 only."""
    for stale in [*out.glob(f'.*{PARTIAL}*'), *out.glob(f'*/.*{PARTIAL}*')]:  # atomic writes never completed
        stale.unlink()
    sealed = []
    for rec in sorted(out.glob('metadata/.metadata_*.jsonl')):
        shard = shard_number(rec)
        if parquet_path(out, shard).exists():  # killed after the seal's commit point
            rec.unlink()
            continue
        rows, ends = read_record(rec)
        if rows:
            seal_shard(out, shard, rows, ends)
            sealed.append(shard)
        else:
            rec.unlink()
    for orphan in out.glob('*/.*.npy.open'):  # opened, but killed before its first commit
        if not record_path(out, shard_number(orphan)).exists():
            orphan.unlink()
    return sealed


def next_shard(out: Path) -> int:
    """The first shard number no file of ``out`` uses."""
    used = [shard_number(p) for p in out.glob('metadata/metadata_*.parquet')]
    used += [shard_number(p) for p in out.glob('*/*_[0-9][0-9][0-9][0-9][0-9][0-9].npy')]
    return max(used, default=-1) + 1


def done_keys(out: Path) -> set[str]:
    """Keys of every image in a sealed shard: the ``key`` column of the parquet files, read in parallel."""
    files = sorted(str(p) for p in out.glob('metadata/metadata_*.parquet'))
    if not files:
        return set()
    return set(pa.dataset.dataset(files, format='parquet').to_table(columns=['key']).column('key').to_pylist())


def append_failures(out: Path, rank: int, failures: dict[str, str]) -> None:
    """Append ``{key: reason}`` to this rank's failure log (a line per image; a torn line is skipped on reading)."""
    if not failures:
        return
    path = out / 'failures' / f'rank_{rank:05d}.jsonl'
    path.parent.mkdir(exist_ok=True)
    with open(path, 'ab') as f:
        if f.tell() and path.read_bytes()[-1:] != b'\n':
            f.write(b'\n')  # after a torn line
        f.write(b''.join(json.dumps(dict(key=k, reason=r)).encode() + b'\n' for k, r in failures.items()))


class ShardWriter:
    """One rank's writer: fills shards of up to ``max_images`` images or ``max_bytes`` bytes across batches.

    Shard numbers come from ``numbers`` (ranks draw from disjoint sequences). ``add`` commits a batch; ``close``
    seals the open shard.
    """

    def __init__(self, out: Path, numbers: Iterator[int], max_images: int = 1000, max_bytes: int = 2**30,
                 durable: bool = True) -> None:
        if max_images < 1 or max_bytes < 1:
            raise ValueError('shards need room for at least one image')
        self.out, self.numbers, self.max_images, self.max_bytes = out, numbers, max_images, max_bytes
        self.durable = durable  # fsync every commit: a power cut, not only a killed process, keeps what is committed
        self.shard: int | None = None
        self.sealed: list[int] = []

    def add(self, rows: list[list], arrays: dict[str, np.ndarray]) -> None:
        """Commit a batch. ``rows``: [key, input_h, input_w, grid_h, grid_w, vis] per image; ``arrays``:
        'embedding' (B, C) and any 'layer_i' (B, C, grid_h, grid_w), one grid for the whole batch."""
        flat = {k: np.ascontiguousarray(v if v.ndim == 2 else v.transpose(0, 2, 3, 1), dtype=np.float32)
                for k, v in arrays.items()}  # maps token-major: (B, h, w, C), i.e. h * w rows of C per image
        row_bytes = sum(v[0].nbytes for v in flat.values())
        start = 0
        while start < len(rows):
            if self.shard is None:
                self._open(flat)
            fit = min(self.max_images - len(self.rows), max(1, -(-(self.max_bytes - self.bytes) // row_bytes)))
            stop = min(len(rows), start + fit)
            self._commit(rows[start:stop], {k: v[start:stop] for k, v in flat.items()})
            start = stop
            if len(self.rows) >= self.max_images or self.bytes >= self.max_bytes:
                self.close()

    def close(self) -> None:
        """Seal the open shard, if any."""
        if self.shard is None:
            return
        for f in self.files.values():
            f.close()
        self.record.close()
        if self.rows:
            seal_shard(self.out, self.shard, self.rows, self.ends)
            self.sealed.append(self.shard)
        else:  # interrupted before its first commit
            for name in self.files:
                open_path(self.out, name, self.shard).unlink()
            record_path(self.out, self.shard).unlink()
        self.shard = None

    def _open(self, flat: dict[str, np.ndarray]) -> None:
        self.shard, self.rows, self.bytes = next(self.numbers), [], 0
        self.files = {}
        for name, v in flat.items():
            path = open_path(self.out, name, self.shard)
            path.parent.mkdir(exist_ok=True)
            self.files[name] = open(path, 'wb')
            self.files[name].write(npy_header((0, v.shape[-1])))
        self.ends = {name: NPY_HEADER_BYTES for name in flat}
        record_path(self.out, self.shard).parent.mkdir(exist_ok=True)
        self.record = open(record_path(self.out, self.shard), 'wb')

    def _commit(self, rows: list[list], flat: dict[str, np.ndarray]) -> None:
        ends = dict(self.ends)
        for name, v in flat.items():
            f = self.files[name]
            f.write(v.tobytes())
            ends[name] += v.nbytes
            _fsync(f) if self.durable else f.flush()
        self.record.write(json.dumps(dict(rows=rows, end=ends)).encode() + b'\n')
        _fsync(self.record) if self.durable else self.record.flush()
        # only now, so that a seal after an exception above (Ctrl-C) keeps the previous commit: the files are cut
        # back to it and this batch's images are redone by the next run
        self.ends, self.rows = ends, self.rows + rows
        self.bytes = sum(ends.values()) - NPY_HEADER_BYTES * len(ends)
