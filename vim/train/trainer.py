"""One training run of vim-train (tools/train.py): built from the arguments, optionally resumed from a training
state, then trained epoch by epoch with validation, best/last weights and exact-resume saves."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from timm.data import create_dataset, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from vim.eval.loop import evaluate
from vim.layers import uses_scan
from vim.train.data import create_train_loader, create_val_loader
from vim.train.model import create_criterion, create_model
from vim.train.state import (
    STATE_FILE,
    STATE_FORMAT,
    Progress,
    capture_rng,
    load_training_state,
    restore_rng,
    save_weights,
    seed_everything,
    to_builtins,
)
from vim.utils import atomic_write, maybe_compile

_logger = logging.getLogger('vim.train')
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Trainer:
    """One training run: built from the arguments, optionally resumed, then ``fit()``."""

    def __init__(self, args: argparse.Namespace, device: torch.device, initial_weights: bool = True) -> None:
        self.args, self.device = args, device
        self.primary = args.rank == 0
        self.out = Path(args.output)
        amp = args.amp_dtype if args.amp_dtype != 'auto' else ('bf16' if device.type == 'cuda' else 'fp32')
        self.amp_name, self.amp_dtype = amp, AMP_DTYPES[amp]
        if device.type == 'cuda':
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # data
        train_set = create_dataset('', root=args.data_dir, split=args.train_split, is_training=True,
                                   class_map=args.class_map or None)
        classes = getattr(train_set.reader, 'class_to_idx', None) or {}
        self.num_classes = args.num_classes or len(classes)
        if classes and len(classes) > self.num_classes:
            raise ValueError(f'{len(classes)} class folders but --num-classes {self.num_classes}')

        # model (same seed on every process: the EMA copy is taken before DDP broadcasts rank 0's weights)
        seed_everything(args.seed)
        self.model = create_model(args, self.num_classes, initial_weights).to(device)
        if args.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if args.scan_recompute:
            if not hasattr(self.model, 'set_scan_recompute'):
                raise ValueError(f'--scan-recompute needs a Vim model, got {args.model}')
            self.model.set_scan_recompute(True)
        data_config = resolve_data_config(vars(args), model=self.model)
        self.ema = None
        if args.model_ema:
            self.ema = ModelEmaV3(self.model, decay=args.model_ema_decay,
                                  device=torch.device('cpu') if args.model_ema_force_cpu else None)
        seed_everything(args.seed + args.rank)  # different augmentations and drop paths per process
        self.ddp = (DistributedDataParallel(self.model, device_ids=[device.index] if device.type == 'cuda' else None)
                    if args.distributed else self.model)
        # compiled after DDP wrapping, as timm's train.py does; saves and evaluation use self.model
        self.ddp = maybe_compile(self.ddp, args.torchcompile, args.torchcompile_mode,
                                 device=device if uses_scan(self.model) else None, dtype=self.amp_dtype)

        pin = args.pin_mem if args.pin_mem is not None else device.type == 'cuda'
        self.train_loader = create_train_loader(args, train_set, data_config, pin)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f'{len(train_set)} training images per process are fewer than one batch '
                             f'({args.batch_size})')
        self.val_loader = create_val_loader(args, data_config, pin, classes) if args.eval_interval else None

        self.mixup, self.criterion = create_criterion(args, self.num_classes)

        global_batch = args.batch_size * args.world_size
        if args.lr is None:
            args.lr = args.lr_base * global_batch / args.lr_base_size
        opt_kwargs = dict(eps=args.opt_eps)
        if args.opt_betas:
            opt_kwargs['betas'] = tuple(args.opt_betas)
        self.optimizer = create_optimizer_v2(self.model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                             momentum=args.momentum, layer_decay=args.layer_decay, **opt_kwargs)
        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs,
            step_on_epochs=not args.sched_on_updates, updates_per_epoch=self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_name == 'fp16' else None
        self.progress = Progress()
        self.stop_requested = False

        n_params = sum(p.numel() for p in self.model.parameters())
        _logger.info(f'{args.model}: {n_params:,} parameters, {self.num_classes} classes, '
                     f'{len(train_set)} training images, {self.steps_per_epoch} steps/epoch x {self.num_epochs} '
                     f'epochs, global batch {global_batch} ({args.world_size} x {args.batch_size}), lr {args.lr:.3g}, '
                     f'{"autocast " + amp if self.amp_dtype else "fp32"} on {device}'
                     + (f', torch.compile {args.torchcompile}' if args.torchcompile else ''))
        _logger.info(f'data config {data_config}')
        if args.aug_repeats and not args.distributed:
            _logger.info('--aug-repeats applies to multi-process runs only; not used')

    # ---- state ----
    def state_dict(self) -> dict:
        rng = capture_rng()
        if self.args.distributed:
            gathered = [None] * self.args.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        return {
            'format': STATE_FORMAT,
            'model': self.model.state_dict(),
            'model_ema': self.ema.module.state_dict() if self.ema is not None else None,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict() if self.scheduler is not None else None,
            'scaler': self.scaler.state_dict() if self.scaler is not None else None,
            'progress': dataclasses.asdict(self.progress),
            'rng': rng,
            'world_size': self.args.world_size,
            'batch_size': self.args.batch_size,
            'steps_per_epoch': self.steps_per_epoch,
            'args': to_builtins(vars(self.args)),
        }

    def save(self, reason: str) -> None:
        """Weights (safetensors) then the training state; every process takes part (RNG states)."""
        state = self.state_dict()
        if not self.primary:
            return
        p = self.progress
        meta = dict(model=self.args.model, num_classes=self.num_classes, epoch=p.epoch, step=p.global_step)
        save_weights(self.out / 'last.safetensors', state['model'], meta)
        if state['model_ema'] is not None:
            save_weights(self.out / 'last_ema.safetensors', state['model_ema'], dict(meta, ema=True))
        atomic_write(self.out / STATE_FILE, lambda tmp: torch.save(state, tmp))
        _logger.info(f'saved {self.out / STATE_FILE} ({reason}: epoch {p.epoch}, step {p.step_in_epoch}/'
                     f'{self.steps_per_epoch}, global step {p.global_step})')

    def load(self, path: Path) -> None:
        state = load_training_state(path)
        saved = state['args']
        if saved.get('model') != self.args.model:
            raise ValueError(f"{path} was trained as {saved.get('model')}, not {self.args.model}")
        progress = Progress(**state['progress'])
        same_layout = (state['world_size'], state['batch_size']) == (self.args.world_size, self.args.batch_size)
        if progress.step_in_epoch and not same_layout:
            raise ValueError(
                f'{path} stopped inside epoch {progress.epoch} with {state["world_size"]} x {state["batch_size"]} '
                f'images per step; resume it with the same number of processes and --batch-size')
        self.model.load_state_dict(state['model'])
        if self.ema is not None:
            if state['model_ema'] is not None:
                self.ema.module.load_state_dict(state['model_ema'])
            else:
                _logger.warning(f'{path} has no EMA; the EMA restarts from the current weights')
                self.ema.module.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        if self.scheduler is not None and state['scheduler'] is not None:
            self.scheduler.load_state_dict(state['scheduler'])
        if self.scaler is not None and state['scaler'] is not None:
            self.scaler.load_state_dict(state['scaler'])
        self.progress = progress
        if len(state['rng']) == self.args.world_size:
            restore_rng(state['rng'][self.args.rank])
        else:
            _logger.warning(f'{path} holds RNG states of {len(state["rng"])} processes; reseeding')
            seed_everything(self.args.seed + self.args.rank + progress.global_step)
        if state['steps_per_epoch'] != self.steps_per_epoch:
            _logger.warning(f'steps per epoch changed ({state["steps_per_epoch"]} -> {self.steps_per_epoch})')
        _logger.info(f'resumed from {path}: epoch {progress.epoch}, step {progress.step_in_epoch}/'
                     f'{self.steps_per_epoch}, global step {progress.global_step}')

    # ---- loop ----
    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, bool, bool]:
        """One update on images (B, 3, H, W) and labels (B,); returns (loss, grad norm, finite, stop requested
        anywhere), all agreed over processes."""
        args, p = self.args, self.progress
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        if self.scheduler is not None:
            self.scheduler.step_update(p.global_step)
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            loss = self.criterion(self.ddp(images), targets)
        if p.global_step + 1 in args.debug_nan_steps:
            loss = loss * float('nan')
        params = [q for q in self.model.parameters() if q.requires_grad]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grads = [q.grad for q in params if q.grad is not None]
        if args.clip_grad is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        else:
            grad_norm = torch.nn.utils.get_total_norm(grads)
        # one small all-reduce: every process must take the same skip / stop decision
        flags = torch.stack([loss.detach().float(), grad_norm.float().to(loss.device),
                             torch.tensor(float(self.stop_requested), device=loss.device)])
        if args.distributed:
            dist.all_reduce(flags)
        loss_sum, grad_norm, stop = flags.tolist()
        loss_value = loss_sum / args.world_size
        # with fp16 the scaler itself skips steps whose gradients overflowed; only the loss is ours to check
        finite = math.isfinite(loss_value) and (self.scaler is not None or math.isfinite(grad_norm))
        if finite:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model, step=p.global_step + 1)
        elif self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, finite, stop > 0

    def train_epoch(self, epoch: int) -> dict:
        args, p = self.args, self.progress
        self.ddp.train()
        sampler = self.train_loader.sampler
        sampler.set_epoch(epoch)
        sampler.skip = p.step_in_epoch * args.batch_size
        if self.scheduler is not None:
            self.scheduler.step(epoch)
        global_batch = args.batch_size * args.world_size
        losses, epoch_start_step = [], p.step_in_epoch
        start = last_log = time.perf_counter()
        last_log_step = p.step_in_epoch
        for images, targets in self.train_loader:
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loss, grad_norm, finite, stop = self._step(images, targets)
            p.global_step += 1
            p.step_in_epoch += 1
            if finite:
                p.nonfinite_streak = 0
                losses.append(loss)
                p.epoch_loss_sum += loss
                p.epoch_loss_steps += 1
            else:
                p.nonfinite_streak += 1
                p.nonfinite_total += 1
                p.nonfinite_steps = (p.nonfinite_steps + [p.global_step])[-1000:]
                _logger.warning(f'non-finite loss {loss:.4g} / grad norm {grad_norm:.4g} at global step '
                                f'{p.global_step} (epoch {epoch}, step {p.step_in_epoch}/{self.steps_per_epoch}): '
                                f'update skipped [{p.nonfinite_streak} in a row, {p.nonfinite_total} in all]')
                if p.nonfinite_streak >= args.max_nonfinite:
                    raise NonFiniteLossError(
                        f'{p.nonfinite_streak} consecutive non-finite steps (global steps '
                        f'{p.global_step - p.nonfinite_streak + 1}-{p.global_step}); stopping. The last saved state is '
                        f'{self.out / STATE_FILE}; try a lower --lr, --clip-grad or --amp-dtype fp32.')
            done = p.step_in_epoch == self.steps_per_epoch
            if args.log_interval and (p.step_in_epoch % args.log_interval == 0 or done):
                now = time.perf_counter()
                rate = (p.step_in_epoch - last_log_step) * global_batch / max(now - last_log, 1e-9)
                last_log, last_log_step = now, p.step_in_epoch
                mem = (f' mem {torch.cuda.max_memory_allocated(self.device) / 2 ** 30:.2f}GiB'
                       if self.device.type == 'cuda' else '')
                avg = sum(losses[-args.log_interval:]) / max(len(losses[-args.log_interval:]), 1)
                _logger.info(f'epoch {epoch} [{p.step_in_epoch}/{self.steps_per_epoch}] global step '
                             f'{p.global_step} loss {loss:.4f} (avg {avg:.4f}) '
                             f'lr {self.optimizer.param_groups[0]["lr"]:.3e} grad-norm {grad_norm:.3f} '
                             f'{rate:.1f} img/s ({rate / args.world_size:.1f} per process) '
                             f'non-finite {p.nonfinite_total}{mem}')
            if stop:
                self.save('stop requested')
                return {'stopped': 'signal'}
            if args.max_steps is not None and p.global_step >= args.max_steps:
                self.save('--max-steps')
                return {'stopped': 'max_steps'}
            if args.save_every_steps and p.global_step % args.save_every_steps == 0 and not done:
                self.save(f'every {args.save_every_steps} steps')
        elapsed = time.perf_counter() - start
        steps = p.step_in_epoch - epoch_start_step
        return {'train_loss': p.epoch_loss_sum / p.epoch_loss_steps if p.epoch_loss_steps else float('nan'),
                'lr': self.optimizer.param_groups[0]['lr'],
                'train_img_per_sec': steps * global_batch / max(elapsed, 1e-9), 'train_time_s': elapsed}

    def validate(self, epoch: int) -> dict:
        metrics = {}
        models = [('', self.model)]
        if self.ema is not None and not self.args.model_ema_force_cpu:
            models.append(('ema_', self.ema.module))
        for prefix, model in models:
            result = evaluate(model, self.val_loader, self.device, amp_dtype=self.amp_dtype,
                              distributed=self.args.distributed)
            metrics.update({f'{prefix}{k}': result[k] for k in ('top1', 'top5', 'loss', 'img_per_sec')})
        _logger.info(f'epoch {epoch} validation: top1 {metrics["top1"]:.3f} top5 {metrics["top5"]:.3f} '
                     f'loss {metrics["loss"]:.4f}' + (f' | EMA top1 {metrics["ema_top1"]:.3f} top5 '
                                                      f'{metrics["ema_top5"]:.3f}' if 'ema_top1' in metrics else ''))
        return metrics

    def _save_best(self, metrics: dict) -> None:
        p = self.progress
        meta = dict(model=self.args.model, num_classes=self.num_classes, epoch=p.epoch, step=p.global_step)
        if metrics['top1'] > p.best_top1:
            p.best_top1 = metrics['top1']
            if self.primary:
                save_weights(self.out / 'best.safetensors', self.model.state_dict(), dict(meta, top1=p.best_top1))
        if 'ema_top1' in metrics and metrics['ema_top1'] > p.best_ema_top1:
            p.best_ema_top1 = metrics['ema_top1']
            if self.primary:
                save_weights(self.out / 'best_ema.safetensors', self.ema.module.state_dict(),
                             dict(meta, top1=p.best_ema_top1, ema=True))

    def fit(self) -> dict:
        args, p = self.args, self.progress
        result = {'stopped': None}
        while p.epoch < self.num_epochs:
            if args.max_steps is not None and p.global_step >= args.max_steps:
                self.save('--max-steps')
                result['stopped'] = 'max_steps'
                break
            epoch = p.epoch
            epoch_start = p.global_step - p.step_in_epoch
            stats = self.train_epoch(epoch)
            if stats.get('stopped'):
                result['stopped'] = stats['stopped']
                break
            last = epoch + 1 == self.num_epochs
            metrics = {}
            if self.val_loader is not None and ((epoch + 1) % args.eval_interval == 0 or last):
                metrics = self.validate(epoch)
                self._save_best(metrics)
            nonfinite = [s for s in p.nonfinite_steps if s > epoch_start]
            p.epoch, p.step_in_epoch, p.epoch_loss_sum, p.epoch_loss_steps = epoch + 1, 0, 0.0, 0
            self.save('end of epoch')
            if self.primary:
                record = dict(epoch=epoch, global_step=p.global_step, **stats, **metrics,
                              nonfinite_steps=nonfinite, nonfinite_total=p.nonfinite_total)
                with open(self.out / 'metrics.jsonl', 'a') as f:
                    f.write(json.dumps(record) + '\n')
            _logger.info(f'epoch {epoch} done: train loss {stats["train_loss"]:.4f}, '
                         f'{stats["train_img_per_sec"]:.1f} img/s, non-finite steps skipped: {len(nonfinite)}'
                         + (f' (global steps {nonfinite})' if nonfinite else ''))
        result.update(dataclasses.asdict(p), output=str(self.out), state=str(self.out / STATE_FILE))
        return result
