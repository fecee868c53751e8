#!/usr/bin/env python3
"""Extract Vim features from images at any resolution: pooled embeddings and, on request, patch-feature maps.

    python tools/extract_features.py                            # assets/images, Vim-Ti, 512² on CPU / 1248² on CUDA
    python tools/extract_features.py photos/ --img-size 1248 832 --layers 5 11 17 23 --vis
    python tools/extract_features.py list.txt --native --max-size 1024 --checkpoint vim_t_midclstok_76p1acc.pth

Output folder (``--output``, default ``outputs/features/<model>``):
    index.json   {"meta": settings and weights, "images": {absolute image path: {"shard", "row", "shapes",
                 "input_size", ["vis"]}}, "failed": {path: reason}, "next_shard": n}
    <shard>.safetensors   one tensor per feature ("embedding" (B, C), "layer_5" (B, C, h, w), ...) over the images
                 of one batch; an image's features are ``tensor[row]`` (``--format npy``: ``<shard>.<feature>.npy``)
    vis/*.png    (``--vis``) the input beside a PCA-to-RGB picture of the last requested layer
Every file is written to a temporary name and renamed, and the index only after its shard, so an interrupted run
leaves complete files only; rerunning the same command skips the images already in the index.
``load_features(output, image)`` reads one image's features back.
"""
# ruff: noqa: E402  (the OpenMP setting below must precede the imports that load torch)
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a busy CPU, spinning threads of the many small ops of the
# reference scan steal the cores from each other (Vim-Ti 512², 2 cores under load: 13-19 s per image with the
# default policy, 1.8 s with this one). An OMP_WAIT_POLICY set by the user wins.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import argparse
import difflib
import glob
import hashlib
import io
import json
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image, ImageOps
from timm.data import create_transform, resolve_model_data_config
from timm.data.readers.img_extensions import get_img_extensions
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import vim  # noqa: F401  (registers the Vim models with timm)
from vim.utils import PARTIAL, atomic_write  # PARTIAL marks temporary files, removed at start if stale

IMG_EXTENSIONS = tuple(sorted(set(get_img_extensions()) | {'.bmp', '.webp', '.tif', '.tiff'}))
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('inputs', nargs='*', help='image files, folders (searched recursively), globs, or .txt files\n'
                   'listing one image path per line (relative to the list). Default: assets/images')
    p.add_argument('--model', default='vim_tiny_patch16_224', help='timm model name (default: %(default)s)')
    size = p.add_mutually_exclusive_group()
    size.add_argument('--img-size', type=int, nargs='+', metavar='N', help='input size N (square) or H W, rounded '
                      'to what the patch stride tiles;\nthe whole image is resized to it (no crop). '
                      'Default: 1248 on CUDA, 512 on CPU')
    size.add_argument('--native', action='store_true', help='each image at its own size, rounded to the stride')
    p.add_argument('--max-size', type=int, default=1248, help='--native: cap on the longer side (default: 1248)')
    p.add_argument('--batch-size', type=int, help='images per batch; only same-size images share one.\n'
                   'Default: 8 on CUDA, 1 on CPU (where batching does not pay with the reference scan)')
    p.add_argument('--layers', type=int, nargs='+', default=[], metavar='I',
                   help='also save patch-feature maps (C, h, w) of these blocks (negative: from the end)')
    p.add_argument('--format', choices=('safetensors', 'npy'), default='safetensors', help='shard file format')
    p.add_argument('--output', type=Path, help='output folder (default: outputs/features/<model>)')
    p.add_argument('--vis', action='store_true', help='write vis/<image>.png: input | PCA of the last layer asked')
    p.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=True,
                   help='load pretrained weights; falls back to random init if they cannot be had (default: on)')
    p.add_argument('--checkpoint', type=Path, help='local weights: official .pth, state dict or .safetensors')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='default: %(default)s')
    p.add_argument('--dtype', choices=tuple(DTYPES), default='fp32', help='autocast dtype (default: fp32)')
    p.add_argument('--num-workers', type=int, help='image-loading processes (default: 4 on CUDA, 0 on CPU)')
    args = p.parse_args(argv)
    args.error = p.error
    if args.img_size is not None and len(args.img_size) not in (1, 2):
        p.error('--img-size takes one (square) or two (H W) numbers')
    if args.batch_size is not None and args.batch_size < 1:
        p.error('--batch-size must be at least 1')
    if args.checkpoint is not None and not args.checkpoint.is_file():
        p.error(f'--checkpoint {args.checkpoint} is not a file')
    if not timm.is_model(args.model):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=6, cutoff=0.5)
        close += [m for m in timm.list_models(f'*{args.model}*') if m not in close][:6]
        p.error(f'unknown model {args.model!r}.' + (f' Close matches: {", ".join(close)}' if close else ''))
    return args


# ---- inputs --------------------------------------------------------------------------------------------------
def collect_images(inputs: list[str], error) -> list[Path]:
    """Absolute paths of the images named by files, folders (recursive), globs and .txt lists; sorted, unique."""
    found: list[Path] = []
    for item in inputs or [str(REPO / 'assets' / 'images')]:
        path = Path(item).expanduser()
        if path.is_dir():
            found += [f for f in sorted(path.rglob('*')) if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS]
        elif path.is_file() and path.suffix.lower() in ('.txt', '.lst'):
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            found += [path.parent / ln for ln in lines if ln and not ln.startswith('#')]
        elif path.is_file():
            found.append(path)
        elif any(c in item for c in '*?['):
            found += [Path(f) for f in sorted(glob.glob(item, recursive=True)) if Path(f).is_file()]
        else:
            error(f'input {item!r} does not exist')
    return list(dict.fromkeys(f.resolve() for f in found))


def tile(size: float, patch: int, stride: int, cap: int | None = None) -> int:
    """The nearest size of the form patch + k * stride (k >= 0), no larger than ``cap``."""
    out = patch + max(0, round((size - patch) / stride)) * stride
    while cap is not None and out > cap and out > patch:
        out -= stride
    return out


def native_size(path: Path, patch: int, stride: int, max_size: int) -> tuple[int, int]:
    """(H, W) to run ``path`` at: its own size (after EXIF rotation), scaled to fit max_size, tiled."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation that swaps the axes
            w, h = h, w
    scale = min(1.0, max_size / max(h, w))
    return tile(h * scale, patch, stride, max_size), tile(w * scale, patch, stride, max_size)


class Images(torch.utils.data.Dataset):
    """Item i: (i, normalised image (3, H, W) or None, error message or None); H, W from ``sizes[i]``."""

    def __init__(self, paths: list[Path], sizes: list[tuple[int, int]], data_cfg: dict) -> None:
        self.paths, self.sizes, self.data_cfg, self.transforms = paths, sizes, data_cfg, {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        size = self.sizes[i]
        if size not in self.transforms:  # resize the whole image to exactly `size` (no crop), the model's mean/std
            self.transforms[size] = create_transform(
                **dict(self.data_cfg, input_size=(3, *size), crop_pct=1.0, crop_mode='squash'))
        try:
            with Image.open(self.paths[i]) as im:
                im = ImageOps.exif_transpose(im)
                x = self.transforms[size](im.convert('RGB'))
        except Exception as e:  # corrupt, truncated, not an image, a mode with no RGB conversion, ...
            return i, None, f'{type(e).__name__}: {e}'
        if x.shape[0] != 3:
            return i, None, f'{x.shape[0]} channels after preprocessing, expected 3'
        if not torch.isfinite(x).all():
            return i, None, 'non-finite values after preprocessing'
        return i, x, None


def collate(items):
    ok = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, err) for i, x, err in items if x is None]
    return [i for i, _ in ok], (torch.stack([x for _, x in ok]) if ok else None), failed


# ---- model and weights -----------------------------------------------------------------------------------------
def create_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str, str]:
    """The model in eval mode, a description of its weights, and a note when pretrained ones were unavailable."""
    kwargs = dict(dynamic_img_size=True)
    if args.checkpoint is not None:  # Vim's own loader reads official training pickles safely; others: timm's
        is_vim = timm.models.model_entrypoint(args.model).__module__.startswith('vim.')
        overlay = dict(file=str(args.checkpoint), **(dict(custom_load=True) if is_vim else {}))
        model = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        return model.eval(), f'file:{args.checkpoint.resolve()}', ''
    if args.pretrained:
        source, note = pretrained_source(args.model)
        if source is not None:
            try:
                model = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=source, **kwargs)
                return model.eval(), f'pretrained:{args.model}', ''
            except Exception as e:  # e.g. the hub answered but the download failed
                note = f'loading the pretrained weights failed ({type(e).__name__}: {e})'
        print(f'WARNING: {note}. Continuing with RANDOM weights: the features will be meaningless.', file=sys.stderr)
    with torch.random.fork_rng(devices=[]):  # the same random weights in every run: a resumed run matches
        torch.manual_seed(0)
        model = timm.create_model(args.model, pretrained=False, **kwargs).eval()
    return model, 'random-init (seed 0)', note if args.pretrained else 'pretrained weights not requested'


def pretrained_source(name: str) -> tuple[dict | None, str]:
    """(pretrained_cfg overlay to load from, '') if the weights can be had now, else (None, why not).

    Checks the local Hugging Face cache first and the hub with a 3 s timeout, so that an offline machine falls
    back at once instead of waiting through timm's retries.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id, filename = (cfg.hf_hub_id, cfg.hf_hub_filename) if cfg else ('', '')
    if not hub_id:
        if cfg and (cfg.url or cfg.file):
            return {}, ''
        return None, f'{name} has no pretrained weights'
    import huggingface_hub
    filename = filename or 'model.safetensors'
    cached = huggingface_hub.try_to_load_from_cache(hub_id, filename)
    if isinstance(cached, str):
        return dict(file=cached), ''
    if os.environ.get('HF_HUB_OFFLINE', '0').lower() in ('1', 'true', 'yes', 'on'):
        return None, f'pretrained weights {hub_id}/{filename} are not cached and HF_HUB_OFFLINE is set'
    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(hub_id, filename), timeout=3)
    except Exception as e:
        return None, f'cannot download pretrained weights {hub_id}/{filename} ({type(e).__name__}: {e})'
    return {}, ''


# ---- outputs ---------------------------------------------------------------------------------------------------
def shard_files(out: Path, shard: str, names, fmt: str) -> list[Path]:
    return [out / f'{shard}.safetensors'] if fmt == 'safetensors' else [out / f'{shard}.{n}.npy' for n in names]


def write_shard(out: Path, shard: str, arrays: dict[str, np.ndarray], fmt: str) -> None:
    if fmt == 'safetensors':
        from safetensors.numpy import save
        atomic_write(out / f'{shard}.safetensors', save(arrays))
        return
    for name, path in zip(arrays, shard_files(out, shard, arrays, fmt), strict=True):
        buf = io.BytesIO()
        np.save(buf, arrays[name])
        atomic_write(path, buf.getvalue())


def load_features(output: str | Path, image: str | Path) -> dict[str, np.ndarray]:
    """One image's features from an output folder: {"embedding": (C,), "layer_i": (C, h, w), ...}."""
    output = Path(output)
    index = json.loads((output / 'index.json').read_text())
    entry = index['images'][str(Path(image).resolve())]
    fmt, row, names = index['meta']['format'], entry['row'], list(entry['shapes'])
    if fmt == 'safetensors':
        from safetensors import safe_open
        with safe_open(str(output / f'{entry["shard"]}.safetensors'), framework='np') as f:
            return {n: f.get_slice(n)[row] for n in names}
    files = shard_files(output, entry['shard'], names, fmt)
    return {n: np.load(p, mmap_mode='r')[row].copy() for n, p in zip(names, files, strict=True)}


def pca_rgb(fmap: torch.Tensor) -> np.ndarray:
    """(C, h, w) features -> (h, w, 3) uint8: the top three principal components, each stretched to 0..255."""
    c, h, w = fmap.shape
    x = fmap.float().reshape(c, h * w).T
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    y = x @ v[:3].T  # (h * w, k), k = min(3, C, h * w)
    y = torch.cat([y, y.new_zeros(h * w, 3 - y.shape[1])], 1)
    lo, hi = torch.quantile(y, 0.01, dim=0), torch.quantile(y, 0.99, dim=0)
    y = ((y - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return (y.reshape(h, w, 3) * 255).round().byte().numpy()


def vis_png(x: torch.Tensor, fmap: torch.Tensor, mean, std) -> bytes:
    """PNG bytes: the normalised input x (3, H, W) shown as the model saw it, beside the PCA picture of fmap."""
    img = (x.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
    left = Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy())
    right = Image.fromarray(pca_rgb(fmap.cpu())).resize(left.size, Image.NEAREST)
    canvas = Image.new('RGB', (left.width * 2 + 8, left.height), 'white')
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 8, 0))
    buf = io.BytesIO()
    canvas.save(buf, format='PNG')
    return buf.getvalue()


def vis_name(path: str) -> str:
    return f'{Path(path).stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}.png'


def peak_memory(device: torch.device) -> str:
    if device.type == 'cuda':
        return f'{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (torch.cuda.max_memory_allocated)'
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == 'darwin' else 2**10)
    return f'{rss:.0f} MiB (max RSS of the process)'


# ---- main ------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    """Extract features as ``args`` says; returns the counts and timings that the summary prints."""
    t_start = time.perf_counter()
    device = torch.device(args.device)
    paths = collect_images(args.inputs, args.error)
    if not paths:
        args.error(f'no images found in {args.inputs or ["assets/images"]} (extensions: {" ".join(IMG_EXTENSIONS)})')
    out = args.output or Path('outputs') / 'features' / args.model
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob(f'.*{PARTIAL}*'), *out.glob(f'vis/.*{PARTIAL}*')]:
        stale.unlink()

    model, weights, weights_note = create_model(args)
    model.to(device)
    patch, stride = model.patch_embed.proj.kernel_size[0], model.patch_embed.proj.stride[0]
    depth = len(model.feature_info)
    if any(not -depth <= i < depth for i in args.layers):
        args.error(f'--layers {args.layers}: {args.model} has blocks 0..{depth - 1}')
    layers = sorted({i % depth for i in args.layers})
    vis_layer = (layers[-1] if layers else depth - 1) if args.vis else None
    take = sorted(set(layers) | ({vis_layer} if args.vis else set()))
    fixed = None
    if not args.native:
        req = args.img_size or [1248 if device.type == 'cuda' else 512]
        fixed = tuple(tile(s, patch, stride) for s in (req * 2)[:2])
        if list(fixed) != (req * 2)[:2]:
            print(f'--img-size {req} rounded to {fixed[0]} {fixed[1]} (patch {patch} + k * stride {stride})')
    meta = dict(model=args.model, weights=weights, weights_note=weights_note, format=args.format, layers=layers,
                img_size=list(fixed) if fixed else f'native, max {args.max_size}', dtype=args.dtype)
    index_path = out / 'index.json'
    index = json.loads(index_path.read_text()) if index_path.exists() else dict(meta=meta, images={}, next_shard=0)
    differ = {k: (index['meta'].get(k), v) for k, v in meta.items() if k != 'weights_note'
              and index['meta'].get(k) != v}
    if differ:
        args.error(f'{out} holds features made with other settings '
                   f'({"; ".join(f"{k}: {a} there, {b} now" for k, (a, b) in differ.items())}); '
                   'choose another --output or delete that folder')
    index['meta'] = meta
    index.setdefault('failed', {})

    def done(p: str) -> bool:
        e = index['images'].get(p)
        return e is not None and all(f.exists() for f in shard_files(out, e['shard'], e['shapes'], args.format)) \
            and (not args.vis or (out / 'vis' / vis_name(p)).exists())

    todo, failed = [p for p in paths if not done(str(p))], {}
    skipped = len(paths) - len(todo)
    sizes = []
    for p in list(todo):
        try:
            sizes.append(fixed or native_size(p, patch, stride, args.max_size))
        except Exception as e:
            failed[str(p)] = f'{type(e).__name__}: {e}'
            todo.remove(p)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(s, []).append(i)
    bs = args.batch_size or (8 if device.type == 'cuda' else 1)
    batches = [g[k:k + bs] for g in groups.values() for k in range(0, len(g), bs)]
    data_cfg = resolve_model_data_config(model)
    workers = args.num_workers if args.num_workers is not None else (4 if device.type == 'cuda' else 0)
    loader = torch.utils.data.DataLoader(Images(todo, sizes, data_cfg), batch_sampler=batches, num_workers=workers,
                                         collate_fn=collate, pin_memory=device.type == 'cuda')
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != 'fp32')
    if args.vis:
        (out / 'vis').mkdir(exist_ok=True)
    print(f'{len(paths)} images: {skipped} already in {index_path}, {len(todo)} to do, on {device} '
          f'({args.model}, {weights}, {"native size" if args.native else f"{fixed[0]}x{fixed[1]}"}, {args.dtype})')
    n_done, interrupted, t0 = 0, False, time.perf_counter()
    try:
        with tqdm(total=len(todo), unit='img', dynamic_ncols=True,
                  bar_format='{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]') as bar:
            for idx, x, load_failures in loader:
                for i, err in load_failures:
                    failed[str(todo[i])] = err
                bar.update(len(load_failures))
                if x is None:
                    continue
                with torch.inference_mode(), autocast:
                    x = x.to(device, non_blocking=True)
                    if take:  # one pass: the final tokens (for the embedding) and the requested blocks' maps
                        final, maps = model.forward_intermediates(x, indices=take, output_fmt='NCHW')
                    else:
                        final, maps = model.forward_features(x), []
                    maps = dict(zip(take, maps, strict=True))
                    arrays = {'embedding': model.forward_head(final, pre_logits=True)}
                    arrays.update({f'layer_{i}': maps[i] for i in layers})
                arrays = {k: v.float().cpu() for k, v in arrays.items()}
                finite = torch.stack([v.flatten(1).isfinite().all(1) for v in arrays.values()]).all(0)
                for i in (j for j, ok in zip(idx, finite.tolist(), strict=True) if not ok):
                    failed[str(todo[i])] = f'non-finite features (with --dtype {args.dtype}; try fp32)'
                keep = finite.nonzero()[:, 0]
                if len(keep):
                    shard = f'shard-{index["next_shard"]:05d}'
                    write_shard(out, shard, {k: v[keep].numpy() for k, v in arrays.items()}, args.format)
                    for row, b in enumerate(keep.tolist()):
                        p = str(todo[idx[b]])
                        entry = dict(shard=shard, row=row, shapes={k: list(v.shape[1:]) for k, v in arrays.items()},
                                     input_size=list(x.shape[-2:]))
                        if args.vis:
                            atomic_write(out / 'vis' / vis_name(p), vis_png(
                                x[b], maps[vis_layer][b], data_cfg['mean'], data_cfg['std']))
                            entry['vis'] = f'vis/{vis_name(p)}'
                        index['images'][p] = entry
                        index['failed'].pop(p, None)
                    index['next_shard'] += 1
                    index['failed'].update(failed)
                    atomic_write(index_path, json.dumps(index, indent=1).encode())  # commits this batch
                n_done += len(keep)
                bar.update(len(idx))
    except KeyboardInterrupt:
        interrupted = True
    if failed:
        index['failed'].update(failed)
        atomic_write(index_path, json.dumps(index, indent=1).encode())
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return dict(done=n_done, skipped=skipped, failed=failed, interrupted=interrupted, seconds=seconds,
                img_per_s=n_done / seconds if seconds > 0 else 0.0, wall=time.perf_counter() - t_start,
                peak_memory=peak_memory(device), weights=weights, weights_note=weights_note, output=str(out))


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; 0: all images done, 1: some failed, 130: interrupted (rerun to resume)."""
    args = parse_args(argv)
    previous = None
    try:  # a plain `kill` (SIGTERM) ends like Ctrl-C: the file being written is dropped, the index stays whole
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread
        pass
    try:
        s = run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    weights = s['weights'] + (f': {s["weights_note"]}' if s['weights_note'] else '')
    print(f'\nweights: {weights}')
    print(f'images: {s["done"]} done, {s["skipped"]} skipped (already done), {len(s["failed"])} failed')
    for path, why in s['failed'].items():
        print(f'  failed: {path}: {why}')
    print(f'speed: {s["img_per_s"]:.2f} img/s ({s["done"]} images in {s["seconds"]:.1f} s, '
          f'{s["wall"]:.1f} s with model set-up); peak memory {s["peak_memory"]}')
    print(f'output: {s["output"]}/index.json')
    if s['interrupted']:
        print('INTERRUPTED: the images listed in the index are complete; rerun the same command to resume.')
        return 130
    return 1 if s['failed'] else 0


if __name__ == '__main__':
    sys.exit(main())
