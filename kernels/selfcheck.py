"""Self-check of the Triton kernels on one device and dtype: what the ``auto`` backend runs before trusting them.

The check runs the Triton scan and conv, forward and backward, on small cases that cover what a wrong kernel most
likely gets wrong: a partial last chunk, partial channel blocks, both directions, the strided views the mixer
passes and a state size that is not a power of two. It runs them (or one of them: ``ops``) once per autotune config
of every kernel in ``vim.kernels.triton.AUTOTUNED_KERNELS`` (the ops' own): a first round pins every kernel to its
first config, then each further config is pinned in turn (``kernel.configs = [config]``, the other kernels on their
first), so the autotuner neither benchmarks nor hides a wrong config. A last round lets every kernel autotune over
all its configs from an empty cache, as a first call at a new shape does: the benchmark runs each config on the
call's own buffers, which corrupts a kernel that works in place unless its autotuner restores that buffer. Every
output and gradient is compared with the reference run in float64 on CPU on the same dtype-rounded values, within
:func:`tolerance` of the dtype. A config that does not fit the device (Triton's ``OutOfResources``) is skipped, as
the autotuner would skip it; any other exception is a failure. A failure names the op whose output or exception
caused it (``failed_op``), so that ``auto`` can keep the other op's kernels after checking that op alone.

Cost: one compilation per (kernel, config, case) on the first run on a machine (Triton caches them on disk), then a
few milliseconds of GPU work per config.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .reference import bidirectional_conv_silu_ref, bidirectional_scan_ref

__all__ = ['CheckCase', 'CHECK_CASES', 'SelfCheckResult', 'run_triton_self_check', 'tolerance']

SCAN_NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
CONV_NAMES = ('x', 'weight', 'bias')


class CheckCase(NamedTuple):
    """One self-check case. layout: 'mixer' (the strided views the mixer passes) or 'contiguous'."""
    batch: int
    dim: int
    dstate: int
    seqlen: int
    width: int = 4
    layout: str = 'contiguous'


# 197 tokens (Vim at 224^2) end in a partial chunk for every power-of-two chunk length up to 128. dim 48 in the
# mixer's layout runs the code the models run (sizes and strides divisible by 16); dim 18 leaves a partial channel
# block for every block width from 4 to 128, and dstate 5 masked state lanes.
CHECK_CASES: tuple[CheckCase, ...] = (
    CheckCase(batch=2, dim=48, dstate=16, seqlen=197, layout='mixer'),
    CheckCase(batch=1, dim=18, dstate=5, seqlen=70),
)


def tolerance(dtype: torch.dtype) -> float:
    """Allowed error relative to each tensor's largest entry: two roundings to ``dtype`` plus fp32 accumulation over
    a few hundred tokens (the budget the interpreter and GPU tests use: 2e-4 fp32, 1.6e-2 bf16, 2.2e-3 fp16)."""
    return 2 * torch.finfo(dtype).eps + 2e-4


@dataclass
class SelfCheckResult:
    """Outcome of :func:`run_triton_self_check`. ``reason`` says what failed (empty when ``ok``); ``failed_op``
    which op's output or exception failed it ('scan' or 'conv'; None when ok or when no op can be blamed)."""
    ok: bool
    reason: str = ''
    configs_checked: int = 0  # (kernel, config) pairs that ran and matched
    configs_skipped: list[str] = field(default_factory=list)
    failed_op: str | None = None


OPS = ('scan', 'conv')


class _OpError(Exception):
    """An exception raised by one op of the check: ``op`` is 'scan' or 'conv', ``error`` the exception."""

    def __init__(self, op: str, error: Exception):
        super().__init__(op, error)
        self.op, self.error = op, error


def case_inputs(case: CheckCase, dtype: torch.dtype, device: torch.device, seed: int
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Scan inputs (SCAN_NAMES) and conv inputs (CONV_NAMES) on ``device``, each a leaf requiring grad or a view of
    one; activations in ``dtype``, A, D, delta_bias and the conv parameters in fp32, as the mixer passes them."""
    g = torch.Generator().manual_seed(seed)
    b, d, n, L, w = case.batch, case.dim, case.dstate, case.seqlen, case.width
    f32 = torch.float32

    def leaf(*shape, scale=1.0, shift=0.0, dt=dtype, uniform=False):
        x = torch.rand(*shape, generator=g) if uniform else torch.randn(*shape, generator=g)
        return (x * scale + shift).to(device=device, dtype=dt).requires_grad_()

    A = leaf(2, d, n, scale=-4.0, shift=-0.1, dt=f32, uniform=True)
    D, delta_bias = leaf(2, d, dt=f32), leaf(2, d, scale=0.5, dt=f32)
    weight, bias = leaf(2, d, w, scale=0.5, dt=f32), leaf(2, d, scale=0.5, dt=f32)
    if case.layout == 'mixer':
        xz = leaf(b, L, 2 * d).transpose(1, 2)  # in_proj's output, read transposed
        x_dbl = leaf(b, 2, 3 + 2 * n, L)  # x_proj's output: dt rank 3, then B and C
        u, delta = leaf(b, 2, d, L), leaf(b, 2, L, d, scale=0.5).transpose(2, 3)
        x, z, B, C = xz[:, :d], xz[:, d:], x_dbl[:, :, 3:3 + n], x_dbl[:, :, 3 + n:]
    elif case.layout == 'contiguous':
        u, delta, B, C = leaf(b, 2, d, L), leaf(b, 2, d, L, scale=0.5), leaf(b, 2, n, L), leaf(b, 2, n, L)
        x, z = leaf(b, d, L), leaf(b, d, L)
    else:
        raise ValueError(f"layout must be 'mixer' or 'contiguous', got {case.layout!r}")
    return [u, delta, A, B, C, D, z, delta_bias], [x, weight, bias]


def _outputs(scan_fn, conv_fn, scan_args, conv_args, gout_scan, gout_conv, ops: Sequence[str] = OPS
             ) -> dict[str, torch.Tensor]:
    """The outputs of ``ops`` (scan, conv) with the gradients of every input, keyed by name ('scan output', 'conv
    grad x', ...). An exception comes out as :class:`_OpError` naming the op that raised it."""
    out = {}
    for op, fn, args, gout, names in (('scan', scan_fn, scan_args, gout_scan, SCAN_NAMES),
                                      ('conv', conv_fn, conv_args, gout_conv, CONV_NAMES)):
        if op not in ops:
            continue
        try:
            y = fn(*args)
            grads = torch.autograd.grad(y, args, gout.to(y.dtype))
        except Exception as e:  # noqa: BLE001  (re-raised with the op's name)
            raise _OpError(op, e) from e
        out.update({f'{op} output': y, **{f'{op} grad {n}': gr for n, gr in zip(names, grads)}})
    return out


def _mismatch(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float) -> str:
    """The first output that is not finite or outside ``tol`` of its reference; empty if none."""
    for name, e in expected.items():
        a = actual[name].detach().to('cpu', torch.float64)
        if a.shape != e.shape:
            return f'{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}'
        if not torch.isfinite(a).all():
            return f'{name}: not finite'
        scale = e.abs().max().item() if e.numel() else 0.0
        err = (a - e).abs()
        excess = err - tol * (e.abs() + max(scale, 1e-6))
        if excess.numel() and excess.max() > 0:
            return f'{name}: max error {err.max().item():.3g} against largest entry {scale:.3g} (tolerance {tol:.1e})'
    return ''


AUTOTUNED = (-1, -1)  # the last round: every kernel autotuned over all its configs from an empty cache


def _pin_rounds(kernels: Sequence) -> list[tuple[int, int]]:
    """(kernel index, config index) of each round: first every kernel on its first config, then each further config
    of each kernel with the others on their first; last, if any kernel has several configs, ``AUTOTUNED``."""
    pinned = [(0, 0)] + [(k, c) for k, kernel in enumerate(kernels) for c in range(1, len(kernel.configs))]
    return pinned + [AUTOTUNED] if len(pinned) > 1 else pinned


def run_triton_self_check(device: torch.device | str, dtype: torch.dtype, *,
                          cases: Sequence[CheckCase] | None = None, kernels: Sequence | None = None,
                          seed: int = 0, ops: Sequence[str] = OPS) -> SelfCheckResult:
    """Check the Triton ``ops`` (default both, the scan and the conv) on ``device`` in ``dtype`` against the float64
    reference, every autotune config of every kernel in ``kernels`` (default: the ops' kernels,
    ``vim.kernels.triton.SCAN_KERNELS`` and ``CONV_KERNELS``) pinned in turn.

    Never raises for a kernel's failure: exceptions and mismatches come back as ``ok=False`` with the reason and
    the op that failed. Restores each kernel's config list afterwards.
    """
    from triton.runtime.errors import OutOfResources

    from . import triton as triton_kernels

    device = torch.device(device)
    cases = CHECK_CASES if cases is None else tuple(cases)
    if not ops or set(ops) - set(OPS):
        raise ValueError(f'ops must be a non-empty subset of {OPS}, got {tuple(ops)}')
    if kernels is None:
        kernels = ((triton_kernels.SCAN_KERNELS if 'scan' in ops else ())
                   + (triton_kernels.CONV_KERNELS if 'conv' in ops else ()))
    kernels = tuple(kernels)
    tol = tolerance(dtype)
    saved = [kernel.configs for kernel in kernels]  # restored as the same objects
    originals = [list(configs) for configs in saved]
    result = SelfCheckResult(ok=True)
    # The check needs autograd whatever the caller's mode, and must not run under the caller's autocast (the
    # reference runs on CPU).
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False), \
            torch.autocast('cpu', enabled=False):
        prepared = []
        for i, case in enumerate(cases):
            scan_args, conv_args = case_inputs(case, dtype, device, seed + i)
            gout_scan = torch.randn(case.batch, case.dim, case.seqlen, generator=torch.Generator().manual_seed(i))
            gout_conv = torch.randn(case.batch, 2, case.dim, case.seqlen, generator=torch.Generator().manual_seed(i))
            # the reference sees exactly the values the kernels see: rounded to dtype, then widened
            ref = _outputs(bidirectional_scan_ref, bidirectional_conv_silu_ref,
                           [a.detach().to('cpu', torch.float64).requires_grad_() for a in scan_args],
                           [a.detach().to('cpu', torch.float64).requires_grad_() for a in conv_args],
                           gout_scan.to(dtype).double(), gout_conv.to(dtype).double(), ops)
            prepared.append((case, scan_args, conv_args, gout_scan.to(device), gout_conv.to(device),
                             {name: t.detach() for name, t in ref.items()}))
        saved_caches = [getattr(kernel, 'cache', None) for kernel in kernels]
        try:
            for round_index, (k, c) in enumerate(_pin_rounds(kernels)):
                if (k, c) == AUTOTUNED:
                    # what a first call at a new shape does: the autotuner runs every config on the call's own
                    # buffers to time it, then the winner (a kernel in place on a buffer needs restore_value)
                    for kernel, configs in zip(kernels, originals):
                        kernel.configs = list(configs)
                        if hasattr(kernel, 'cache'):
                            kernel.cache = {}
                    where = 'every kernel autotuned over all its configs'
                else:
                    for kernel, configs in zip(kernels, originals):
                        kernel.configs = [configs[0]]
                    kernels[k].configs = [originals[k][c]]
                    where = ('the first config of every kernel' if round_index == 0 else
                             f'{getattr(kernels[k], "fn", kernels[k]).__name__} config {originals[k][c]}')
                try:
                    for case, scan_args, conv_args, gout_scan, gout_conv, ref in prepared:
                        out = _outputs(triton_kernels.bidirectional_scan_triton,
                                       triton_kernels.bidirectional_conv_silu_triton,
                                       scan_args, conv_args, gout_scan, gout_conv, ops)
                        problem = _mismatch(out, ref, tol)
                        if problem:  # 'scan output: ...', 'conv grad x: ...'
                            return SelfCheckResult(False, f'{where}, case {tuple(case)}: {problem}',
                                                   result.configs_checked, result.configs_skipped,
                                                   problem.split()[0])
                except _OpError as e:
                    if isinstance(e.error, OutOfResources):  # does not fit this GPU: the autotuner skips it too
                        result.configs_skipped.append(f'{where}: {e.error}')
                        continue
                    # any other failure of the kernels is the check's finding
                    first_line = (str(e.error).strip().splitlines() or [''])[0][:300]
                    return SelfCheckResult(False, f'{where}: {type(e.error).__name__}: {first_line}',
                                           result.configs_checked, result.configs_skipped, e.op)
                if (k, c) != AUTOTUNED:
                    result.configs_checked += len(kernels) if round_index == 0 else 1
        finally:
            for kernel, configs, cache in zip(kernels, saved, saved_caches):
                kernel.configs = configs
                if cache is not None:
                    kernel.cache = cache
    if result.configs_checked == 0:
        return SelfCheckResult(False, 'no config could run: ' + '; '.join(result.configs_skipped), 0,
                               result.configs_skipped)
    return result
