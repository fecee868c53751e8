"""The evaluation loop: a deterministic ImageFolder loader and top-1 / top-5 / loss / throughput over it, optionally
summed over the processes of a distributed run."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import create_dataset, create_transform
from timm.utils import accuracy

_logger = logging.getLogger('vim.validate')


def create_eval_loader(
        root: str | Path,
        split: str,
        data_config: dict,
        batch_size: int,
        workers: int,
        class_map: str = '',
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A deterministic loader over ``root/split`` with timm's eval transform; with ``world_size`` > 1 each rank
    gets a contiguous, unpadded share so that summed counts are exact."""
    dataset = create_dataset('', root=str(root), split=split, class_map=class_map or None, is_training=False)
    dataset.transform = create_transform(**data_config, is_training=False)
    if world_size > 1:
        per_rank = -(-len(dataset) // world_size)
        dataset = torch.utils.data.Subset(
            dataset, range(rank * per_rank, min(len(dataset), (rank + 1) * per_rank)))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory,
        drop_last=False, generator=torch.Generator(), persistent_workers=False)


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
        model: torch.nn.Module,
        loader: torch.utils.data.DataLoader,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        distributed: bool = False,
        channels_last: bool = False,
        log_interval: int = 0,
        logger: logging.Logger = _logger,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%), mean cross-entropy and throughput of ``model`` over ``loader``.

    Counts are summed over ranks when ``distributed`` (each rank evaluating its own share of the data).
    """
    was_training = model.training
    model.eval()
    num_classes = getattr(model, 'num_classes', None)
    totals = torch.zeros(4, dtype=torch.float64)  # images, top-1 correct, top-k correct, summed loss
    model_time = 0.0
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    start = time.perf_counter()
    for i, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        _synchronize(device)
        t0 = time.perf_counter()
        with amp:
            logits = model(images)
        _synchronize(device)
        model_time += time.perf_counter() - t0
        logits = logits.float()
        if num_classes is None:
            num_classes = logits.shape[-1]
        top1, topk = accuracy(logits, targets, topk=(1, min(5, logits.shape[-1])))
        n = images.shape[0]
        # timm's accuracy returns percentages of this batch; turn them back into exact counts
        totals += torch.tensor([n, round(top1.item() * n / 100), round(topk.item() * n / 100),
                                F.cross_entropy(logits, targets, reduction='sum').item()], dtype=torch.float64)
        if log_interval and (i + 1) % log_interval == 0:
            logger.info(f'eval [{i + 1}/{len(loader)}] top1 {100 * totals[1] / totals[0]:.3f} '
                        f'img/s {totals[0] / (time.perf_counter() - start):.1f}')
    elapsed = time.perf_counter() - start
    if distributed:
        reduced = totals.to(device)
        dist.all_reduce(reduced)
        totals = reduced.cpu()
        times = torch.tensor([elapsed, model_time], dtype=torch.float64, device=device)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        elapsed, model_time = times.tolist()
    model.train(was_training)
    count = int(totals[0])
    if count == 0:
        raise ValueError('the evaluation set is empty')
    return {
        'top1': 100.0 * totals[1].item() / count,
        'top5': 100.0 * totals[2].item() / count,
        'loss': totals[3].item() / count,
        'num_images': count,
        'num_classes': int(num_classes),
        'img_per_sec': count / max(elapsed, 1e-9),
        'model_img_per_sec': count / max(model_time, 1e-9),
    }
