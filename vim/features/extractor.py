"""The feature extractor as a library: pooled embeddings and patch-feature maps of many images, at any resolution,
on one device or many (torch.distributed), written as shards that resume after any interruption.

    from vim.features import extract, load_features
    summary = extract(['photos/', 'shards/*.tar'], 'out', model='vim_small_patch16_224', img_size=512, layers=[11])
    load_features('out', 'photos/cat.jpg')          # {'embedding': (384,), 'layer_11': (384, 32, 32)}

Under ``torchrun --nproc_per_node N`` (any number of nodes, shared output folder) each rank takes a contiguous
slice of the sorted images still to do and writes its own shards (numbers ``first + k * N + rank``); rank 0
first checks the settings and seals the shards a killed run left open, so a rerun with any world size resumes
from what is on disk. Layout and crash safety: ``layout`` and ``writer``.
"""
from __future__ import annotations

import difflib
import functools
import itertools
import os
import time
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.data import resolve_model_data_config
from tqdm import tqdm

from vim.kernels import warmup
from vim.layers import uses_scan
from vim.utils import atomic_write, maybe_compile

from .layout import EMBEDDING, FeatureError, check_meta
from .model import create_model, peak_memory
from .sources import IMG_EXTENSIONS, ImageStream, collect_images, plan_units, tile
from .vis import vis_name, vis_png
from .writer import ShardWriter, append_failures, done_keys, next_shard, recover

__all__ = ['DTYPES', 'Extractor', 'extract']

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def _fixed_size(h: int, w: int, size: tuple[int, int]) -> tuple[int, int]:
    return size


def _native_size(h: int, w: int, patch: int, stride: int, max_size: int) -> tuple[int, int]:
    scale = min(1.0, max_size / max(h, w))
    return tile(h * scale, patch, stride, max_size), tile(w * scale, patch, stride, max_size)


def _lock(out: Path):
    """An exclusive lock on ``out/.lock`` held by rank 0 for the run (released by the OS if the process dies), so
    that a second run cannot seal the shards the first is filling. Without fcntl (Windows): no lock."""
    try:
        import fcntl
    except ImportError:
        return None
    f = open(out / '.lock', 'w')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise FeatureError(f'another extraction is writing to {out}; wait for it to end or choose another '
                           'output folder') from None
    return f


class Extractor:
    """A model ready to extract features; ``run(inputs, output)`` does the work and returns a summary.

    Args:
        model: timm model name. pretrained / checkpoint: weights (see ``model.create_model``).
        img_size: N or (H, W): every image is resized to it (no crop), rounded to what the patch stride tiles.
            Default 1248 on CUDA, 512 on CPU. native: each image at its own size instead (capped by max_size);
            batches hold images of one size.
        layers: blocks whose patch-feature maps (C, h, w) are saved besides the embedding (negative: from the end).
        device: default cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu. dtype: 'fp32', 'bf16' or
            'fp16' autocast. batch_size: default 8 on CUDA, 1 on CPU. num_workers: decoding processes (default
            min(8, CPUs) on CUDA, 0 on CPU); batches are pinned for the copy to the GPU.
        vis: also write vis/<image>.png, the input beside a PCA picture of the last requested layer.
        shard_images / shard_bytes: a shard is sealed at this many images or bytes of features.
        window: the steady-state rate is measured over the last ``window`` batches.
        torchcompile, torchcompile_mode: torch.compile the forward with this backend and mode (the CLI's
            ``--torchcompile [BACKEND]``); native sizes make its shapes dynamic after the second size.
        durable: fsync every batch commit (survives a power cut; without it, still survives a killed process).
        progress: show a progress bar and notes (rank 0 only).
    """

    def __init__(self, model: str = 'vim_tiny_patch16_224', *, pretrained: bool = True,
                 checkpoint: str | Path | None = None, img_size: int | Sequence[int] | None = None,
                 native: bool = False, max_size: int = 1248, layers: Sequence[int] = (), device: str | None = None,
                 dtype: str = 'fp32', batch_size: int | None = None, num_workers: int | None = None,
                 vis: bool = False, shard_images: int = 1000, shard_bytes: int = 2**30, window: int = 20,
                 durable: bool = True, progress: bool = True, torchcompile: str | None = None,
                 torchcompile_mode: str | None = None) -> None:
        if not timm.is_model(model):
            close = difflib.get_close_matches(model, timm.list_models(), n=6, cutoff=0.5)
            close += [m for m in timm.list_models(f'*{model}*') if m not in close][:6]
            raise FeatureError(f'unknown model {model!r}.' + (f' Close matches: {", ".join(close)}' if close else ''))
        if dtype not in DTYPES:
            raise FeatureError(f'dtype must be one of {", ".join(DTYPES)}, not {dtype!r}')
        if native and img_size is not None:
            raise FeatureError('img_size and native exclude each other')
        if batch_size is not None and batch_size < 1:
            raise FeatureError('batch size must be at least 1')
        if shard_images < 1 or shard_bytes < 1 or window < 1:
            raise FeatureError('shard_images, shard_bytes and window must be at least 1')
        if device is None:
            device = 'cuda' if torch.cuda.is_available() else 'cpu'
        self.device = torch.device(device)
        if self.device.type == 'cuda' and self.device.index is None and 'LOCAL_RANK' in os.environ:
            self.device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        self.model, self.weights, self.weights_note = create_model(model, pretrained, checkpoint)
        self.model.to(self.device)
        self.patch = self.model.patch_embed.proj.kernel_size[0]
        self.stride = self.model.patch_embed.proj.stride[0]
        depth = len(self.model.feature_info)
        if any(not -depth <= i < depth for i in layers):
            raise FeatureError(f'layers {list(layers)}: {model} has blocks 0..{depth - 1}')
        self.layers = sorted({i % depth for i in layers})
        self.vis_layer = (self.layers[-1] if self.layers else depth - 1) if vis else None
        self.take = sorted(set(self.layers) | ({self.vis_layer} if vis else set()))
        self.notes: list[str] = []
        if native:
            self.size_of = functools.partial(_native_size, patch=self.patch, stride=self.stride, max_size=max_size)
            size_desc: str | list[int] = f'native, max {max_size}'
        else:
            req = list(img_size) if isinstance(img_size, Sequence) else [img_size or
                                                                        (1248 if self.device.type == 'cuda' else 512)]
            if len(req) not in (1, 2):
                raise FeatureError('img_size takes one (square) or two (H, W) numbers')
            fixed = tuple(tile(s, self.patch, self.stride) for s in (req * 2)[:2])
            if list(fixed) != (req * 2)[:2]:
                self.notes.append(f'img_size {req} rounded to {fixed[0]} {fixed[1]} '
                                  f'(patch {self.patch} + k * stride {self.stride})')
            self.size_of = functools.partial(_fixed_size, size=fixed)
            size_desc = list(fixed)
        self.meta = dict(model=model, weights=self.weights, weights_note=self.weights_note, layers=self.layers,
                         img_size=size_desc, dtype=dtype, layout='img_emb+metadata/1')
        self.model_name, self.dtype = model, dtype
        self.batch_size = batch_size or (8 if self.device.type == 'cuda' else 1)
        self.num_workers = num_workers if num_workers is not None else (
            min(8, os.cpu_count() or 1) if self.device.type == 'cuda' else 0)
        self.shard_images, self.shard_bytes, self.window = shard_images, shard_bytes, window
        self.durable, self.progress = durable, progress
        self.data_cfg = resolve_model_data_config(self.model)
        try:
            # a Vim's scan backend settled now, not inside the timed loop (and before any compiling traces it): on
            # CPU the first use builds the C++ kernels (~30 s), on CUDA 'auto' runs its self-check (minutes on a
            # fresh machine); other timm models need neither
            if uses_scan(self.model):
                warmup(self.device, DTYPES[dtype])
            self._forward = maybe_compile(self._features, torchcompile, torchcompile_mode)
        except (ValueError, RuntimeError) as e:  # a backend that cannot run here, a compile mode without a backend
            raise FeatureError(str(e)) from None

    # ---- distributed -------------------------------------------------------------------------------------------
    def _init_distributed(self) -> tuple[int, int, bool]:
        """(rank, world size, whether this call created the process group)."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), False
        if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
            return 0, 1, False
        if self.device.type == 'cuda':
            torch.cuda.set_device(self.device)
        dist.init_process_group('nccl' if self.device.type == 'cuda' else 'gloo')
        return dist.get_rank(), dist.get_world_size(), True

    @staticmethod
    def _broadcast(obj, world: int):
        if world == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ---- the run -----------------------------------------------------------------------------------------------
    def run(self, inputs: Sequence[str | Path], output: str | Path | None = None) -> dict:
        """Extract the features of ``inputs`` (files, folders, globs, .txt lists, .tar shards) into ``output``
        (default outputs/features/<model>), skipping images already there. Returns the summary (see ``_summary``).
        Raises FeatureError for bad input; a Ctrl-C / SIGTERM ends the run with its last shard sealed."""
        t_start = time.perf_counter()
        if isinstance(inputs, (str, Path)):
            inputs = [inputs]
        rank, world, created = self._init_distributed()
        self._lock = None
        try:
            return self._run(list(inputs), Path(output or Path('outputs') / 'features' / self.model_name),
                             rank, world, t_start)
        finally:
            if self._lock is not None:
                self._lock.close()
            if created:
                import torch.distributed as dist
                dist.destroy_process_group()

    def _run(self, inputs: list, out: Path, rank: int, world: int, t_start: float) -> dict:
        where, list_failures = collect_images(inputs)
        if not where:
            raise FeatureError(f'no images found in {[str(i) for i in inputs]} '
                               f'(extensions: {" ".join(IMG_EXTENSIONS)}, and .tar)')
        out.mkdir(parents=True, exist_ok=True)
        first = None
        if rank == 0:
            try:
                self._lock = _lock(out)
                check_meta(out, self.meta)
                recover(out)
                first = next_shard(out)
                append_failures(out, 0, list_failures)
            except Exception as e:  # every rank raises it, instead of waiting for rank 0 forever
                first = e
        first = self._broadcast(first, world)
        if isinstance(first, Exception):
            raise first
        done = done_keys(out)
        todo = [k for k in where if k not in done]
        scan_seconds = time.perf_counter() - t_start
        mine = todo[len(todo) * rank // world:len(todo) * (rank + 1) // world]
        writer = ShardWriter(out, itertools.count(first + rank, world), self.shard_images, self.shard_bytes,
                             self.durable)
        loader = torch.utils.data.DataLoader(
            ImageStream(plan_units(mine, where), self.size_of, self.data_cfg, self.batch_size), batch_size=None,
            num_workers=self.num_workers, pin_memory=self.device.type == 'cuda')
        show = self.progress and rank == 0
        if show:
            for note in self.notes:
                print(note)
            size = self.meta['img_size']
            size = size if isinstance(size, str) else f'{size[0]}x{size[1]}'
            print(f'{len(where)} images: {len(where) - len(todo)} already in {out}, {len(todo)} to do'
                  f'{f" over {world} ranks" if world > 1 else ""}, on {self.device} '
                  f'({self.model_name}, {self.weights}, {size}, {self.dtype}; found in {scan_seconds:.1f} s)')
        if self.vis_layer is not None:
            (out / 'vis').mkdir(exist_ok=True)
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
        failed = dict(list_failures) if rank == 0 else {}
        progress, interrupted, t0 = [(0, 0.0)], False, time.perf_counter()
        try:
            with tqdm(total=len(mine), unit='img', dynamic_ncols=True, disable=not show,
                      bar_format='{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]') as bar:
                for batch in loader:
                    new_failures = dict(batch['failed'])
                    n = 0
                    if batch['x'] is not None:
                        n = len(batch['keys']) - len(self._process(batch, writer, out, new_failures))
                    append_failures(out, rank, new_failures)
                    failed.update(new_failures)
                    progress.append((progress[-1][0] + n, time.perf_counter() - t0))
                    bar.update(len(batch['keys']) + len(batch['failed']))
            writer.close()
        except KeyboardInterrupt:
            interrupted = True
            writer.close()
        except Exception:
            writer.close()  # what was committed stays; the error is reported as it is
            raise
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        mem, mem_what = peak_memory(self.device)
        summary = dict(done=progress[-1][0], skipped=len(where) - len(todo), failed=failed, interrupted=interrupted,
                       seconds=seconds, scan_seconds=scan_seconds, wall=time.perf_counter() - t_start,
                       peak_memory_mib=mem, peak_memory_what=mem_what, shards=writer.sealed, progress=progress,
                       output=str(out))
        return self._summary(summary, rank, world)

    def _process(self, batch: dict, writer: ShardWriter, out: Path, failures: dict[str, str]) -> list[str]:
        """Run the model on one batch and commit its features; returns the keys that failed (non-finite)."""
        autocast = torch.autocast(self.device.type, dtype=DTYPES[self.dtype], enabled=self.dtype != 'fp32')
        with torch.inference_mode(), autocast:
            x = batch['x'].to(self.device, non_blocking=True)
            arrays, maps = self._forward(x)
        arrays = {k: v.float().cpu() for k, v in arrays.items()}
        finite = torch.stack([v.flatten(1).isfinite().all(1) for v in arrays.values()]).all(0).tolist()
        bad = [k for k, ok in zip(batch['keys'], finite, strict=True) if not ok]
        failures.update({k: f'non-finite features (with dtype {self.dtype}; try fp32)' for k in bad})
        keep = [i for i, ok in enumerate(finite) if ok]
        if not keep:
            return bad
        h, w = x.shape[-2:]
        gh, gw = (h - self.patch) // self.stride + 1, (w - self.patch) // self.stride + 1
        rows = []
        for i in keep:
            key, vis = batch['keys'][i], None
            if self.vis_layer is not None:
                vis = f'vis/{vis_name(key)}'
                atomic_write(out / vis, vis_png(x[i], maps[self.vis_layer][i], self.data_cfg['mean'],
                                                self.data_cfg['std']))
            rows.append([key, h, w, gh, gw, vis])
        writer.add(rows, {k: v[keep].numpy() for k, v in arrays.items()})
        return bad

    def _features(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
        """x (B, 3, H, W) -> ({'img_emb': (B, C), 'layer_I': (B, C, h, w) ...}, {block: its map} for every block
        taken, the vis layer's included)."""
        if self.take:  # one pass: the final tokens (for the embedding) and the requested blocks' maps
            final, maps = self.model.forward_intermediates(x, indices=self.take, output_fmt='NCHW')
        else:
            final, maps = self.model.forward_features(x), []
        maps = dict(zip(self.take, maps, strict=True))
        arrays = {EMBEDDING: self.model.forward_head(final, pre_logits=True)}
        arrays.update({f'layer_{i}': maps[i] for i in self.layers})
        return arrays, maps

    def _summary(self, s: dict, rank: int, world: int) -> dict:
        """Per-run figures, summed over ranks: done, skipped, failed {key: reason}, interrupted, seconds (of the
        loop), img_per_s (average), steady_img_per_s (over the last ``window`` batches), scan_seconds (finding
        the images and the done set), peak_memory_mib, shards sealed, progress [(images, seconds)] of rank 0."""
        p = s['progress']
        k = max(0, len(p) - 1 - self.window)
        span = p[-1][1] - p[k][1]
        s['steady_img_per_s'] = (p[-1][0] - p[k][0]) / span if span > 0 else 0.0
        s['img_per_s'] = s['done'] / s['seconds'] if s['seconds'] > 0 else 0.0
        if world > 1 and not s['interrupted']:
            import torch.distributed as dist
            parts = [None] * world
            dist.all_gather_object(parts, s)
            s = dict(parts[0], done=sum(q['done'] for q in parts), seconds=max(q['seconds'] for q in parts),
                     failed={k: v for q in parts for k, v in q['failed'].items()},
                     steady_img_per_s=sum(q['steady_img_per_s'] for q in parts),
                     peak_memory_mib=max(q['peak_memory_mib'] for q in parts),
                     shards=sorted(n for q in parts for n in q['shards']))
            s['img_per_s'] = s['done'] / s['seconds'] if s['seconds'] > 0 else 0.0
        return dict(s, weights=self.weights, weights_note=self.weights_note, world_size=world, window=self.window,
                    device=str(self.device))


def extract(inputs: Sequence[str | Path], output: str | Path | None = None, **kwargs) -> dict:
    """``Extractor(**kwargs).run(inputs, output)``: see ``Extractor`` for the options."""
    return Extractor(**kwargs).run(inputs, output)
