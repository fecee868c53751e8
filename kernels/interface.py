"""Public ops of Vim's mixer with backend dispatch. Models call only these.

Backends: ``reference`` (plain PyTorch, any device; the specification), ``triton`` (:mod:`vim.kernels.triton`:
CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; ``bidirectional_scan`` and ``bidirectional_conv_silu``),
``cpu`` (:mod:`vim.kernels.cpu`: fused C++ kernels for CPU tensors, compiled on first use) and, when installed,
``mamba_ssm`` (:mod:`vim.kernels.mamba_ssm`: the official CUDA kernels, CUDA tensors).

``auto`` (the default) picks, for tensor ``x``: on CUDA in fp32/bf16/fp16 with triton installed, ``triton`` once the
Triton kernels passed their self-check (:mod:`vim.kernels.selfcheck`) for x's device and dtype, run once per process
on the first call; if the check fails, ``reference`` with one warning (:class:`ScanBackendWarning`) for the op
whose kernels failed, while the other op (scan or conv), checked alone, keeps ``triton`` if it passes. A first call
inside torch.compile tracing or CUDA-graph capture cannot run the check: it uses ``reference`` with one warning,
until :func:`vim.kernels.warmup` (or an eager call) has run it. On CPU tensors ``auto`` is ``cpu`` when its kernels
build on this machine (else ``reference``, with one warning; under torch.export always ``reference``, the op
:func:`vim.kernels.export_decompositions` rewrites). Everywhere else ``auto`` is ``reference``.
``mamba_ssm`` is never picked by ``auto``; ask for it. ``VIM_SCAN_BACKEND`` overrides ``auto`` process-wide and an
explicit ``backend=`` argument overrides both; an explicit backend skips the self-check and raises on errors.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

from .cpu import bidirectional_conv_silu_cpu, bidirectional_scan_cpu, cpu_backend_status
from .cpu.build import load_extension, warn_fallback_once
from .mamba_ssm import (
    INSTALL_HINT,
    bidirectional_conv_silu_mamba,
    bidirectional_scan_mamba,
    mamba_ssm_installed,
    selective_scan_mamba,
)
from .notice import announce_if_slow
from .reference import bidirectional_conv_silu_ref, bidirectional_scan_ref, delta_from_low_rank, selective_scan_ref
from .selfcheck import OPS

__all__ = ['selective_scan', 'bidirectional_scan', 'bidirectional_conv_silu', 'available_backends',
           'resolve_backend', 'run_self_check', 'ScanBackendWarning']

ENV_VAR = 'VIM_SCAN_BACKEND'
# Looked up once: module-level constants keep resolve_backend traceable by torch.compile.
TRITON_INSTALLED = importlib.util.find_spec('triton') is not None
MAMBA_SSM_INSTALLED = mamba_ssm_installed()
# Device types on which 'auto' runs the self-checked Triton kernels (tests add 'cpu' under the Triton interpreter).
GUARDED_DEVICE_TYPES: tuple[str, ...] = ('cuda',)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# What 'auto' runs where the Triton kernels failed or could not be checked: exact everywhere, needs nothing.
FALLBACK = 'reference'
# The first self-check on a machine compiles every config of every kernel (minutes on an H100 host, then cached on
# disk): a check still running after this many seconds says so on stderr, and says how long it took when it ends.
SLOW_CHECK_NOTICE_S = 10.0

_Key = tuple[str, int | None, torch.dtype]
# 'auto''s choice per (device type, device index, dtype, op), filled by the self-check: 'triton' or FALLBACK. Read
# by dynamo as a guarded global, so a graph traced before the check is retraced once it ran.
_AUTO_CHOICE: dict[tuple[str, int | None, torch.dtype, str], str] = {}
_WARNED: set[tuple[_Key, str]] = set()


class ScanBackendWarning(UserWarning):
    """'auto' runs a slower scan backend than it would normally choose (the Triton self-check failed or has not run)."""


def _bidirectional_scan_triton(*args, **kwargs) -> torch.Tensor:
    # imported on first use: triton is an optional dependency, and importing it costs time on CPU-only machines
    from .triton import bidirectional_scan_triton

    return bidirectional_scan_triton(*args, **kwargs)


def _bidirectional_conv_silu_triton(*args, **kwargs) -> torch.Tensor:
    from .triton import bidirectional_conv_silu_triton

    return bidirectional_conv_silu_triton(*args, **kwargs)


_SELECTIVE: dict[str, Callable] = {'reference': selective_scan_ref, 'mamba_ssm': selective_scan_mamba}
_BIDIRECTIONAL: dict[str, Callable] = {'reference': bidirectional_scan_ref, 'triton': _bidirectional_scan_triton,
                                       'mamba_ssm': bidirectional_scan_mamba}
_CONV: dict[str, Callable] = {'reference': bidirectional_conv_silu_ref, 'triton': _bidirectional_conv_silu_triton,
                              'mamba_ssm': bidirectional_conv_silu_mamba}


def _registered() -> set[str]:
    return set(_SELECTIVE) | set(_BIDIRECTIONAL) | set(_CONV)

# ---- backend 'cpu' (kernels/cpu: fused C++ kernels, compiled on first use) ----
_BIDIRECTIONAL['cpu'] = bidirectional_scan_cpu
_SELECTIVE['cpu'] = selective_scan_ref  # not fused: Vim's mixer runs only the bidirectional scan
_CONV['cpu'] = bidirectional_conv_silu_cpu


# evaluated once while tracing (assume_constant_result): no graph break, and no build inside a graph
@torch.compiler.assume_constant_result
def _cpu_kernels_built() -> bool:
    """Whether the CPU kernels run here, building them on the first call."""
    return cpu_backend_status()[0]


@torch.compiler.assume_constant_result
def _cpu_kernels_available() -> bool:
    """As _cpu_kernels_built, with one warning per process when auto cannot use them."""
    available = _cpu_kernels_built()
    if not available:
        warn_fallback_once()
    return available


def _auto_on_cpu() -> str:
    # an exported graph keeps the reference op, the one export_decompositions knows how to rewrite
    return 'cpu' if not torch.compiler.is_exporting() and _cpu_kernels_available() else 'reference'
# ---- end of backend 'cpu' ----


def available_backends() -> list[str]:
    """Names accepted by ``backend=`` besides ``auto``: every registered backend, ``mamba_ssm`` only where installed."""
    return sorted(name for name in _registered() if name != 'mamba_ssm' or MAMBA_SSM_INSTALLED)


def _check_triton(x: torch.Tensor) -> None:
    """Raise a clear error unless the triton backend can run on ``x``'s device."""
    if not TRITON_INSTALLED:
        raise RuntimeError("scan backend 'triton' needs the triton package: pip install 'vim-backbones[triton]'")
    from .triton import check_device

    check_device(x.device)


def _check_mamba_ssm(x: torch.Tensor) -> None:
    """Raise a clear error unless the mamba_ssm backend can run on ``x``'s device."""
    if not MAMBA_SSM_INSTALLED:
        raise RuntimeError(f"scan backend 'mamba_ssm' needs the mamba_ssm package: {INSTALL_HINT}")
    if not x.is_cuda:
        raise RuntimeError(f"scan backend 'mamba_ssm' runs the official CUDA kernels: it needs CUDA tensors, got "
                           f"{x.device}")


def _warn_once(key: _Key, reason: str, message: str) -> None:
    if (key, reason) not in _WARNED:
        _WARNED.add((key, reason))
        warnings.warn(message, ScanBackendWarning, stacklevel=2)


def _describe(device_type: str, index: int | None, dtype: torch.dtype) -> str:
    return f"{device_type}{'' if index is None else f':{index}'} in {str(dtype).removeprefix('torch.')}"


@torch.compiler.assume_constant_result  # called for real while dynamo traces: its warning is not a graph break
def _unchecked_choice(device_type: str, index: int | None, dtype: torch.dtype, where: str) -> str:
    """'auto''s choice when it must decide before the self-check ran, inside tracing or capture: the fallback."""
    _warn_once((device_type, index, dtype), 'unchecked', (
        f"vim.kernels: the scan backend for {_describe(device_type, index, dtype)} was chosen during {where}, before "
        f"the Triton kernels' self-check ran there, so 'auto' runs '{FALLBACK}' (exact, slow) in it. Call "
        f"vim.kernels.warmup(device, dtype) (or run the model once eagerly) before compiling or capturing, or pass "
        f"backend='triton' explicitly."))
    return FALLBACK


def _checked(device: torch.device, dtype: torch.dtype, **kwargs):
    """``run_triton_self_check``, with a check that cannot run reported as a failed one (no op blamed). A check
    slower than SLOW_CHECK_NOTICE_S (a first run on the machine, compiling) is announced while it runs, and timed."""
    from .selfcheck import SelfCheckResult, run_triton_self_check
    what = (f'compiling and checking the Triton kernels for {_describe(device.type, device.index, dtype)} (the '
            f'first use on this machine takes minutes; Triton caches the compiled kernels on disk for later processes)')
    try:
        with announce_if_slow(what, SLOW_CHECK_NOTICE_S):
            return run_triton_self_check(device, dtype, **kwargs)
    except Exception as e:  # noqa: BLE001  (a check that cannot run is a failed check)
        return SelfCheckResult(False, f'the check itself failed: {type(e).__name__}: {e}')


def run_self_check(device: torch.device | str, dtype: torch.dtype) -> str:
    """Run the Triton self-check for (device, dtype) now, record 'auto''s choice there for the scan and the conv,
    and return the scan's (the conv's: ``resolve_backend(None, x, op='conv')``).

    Both are 'triton' when every config of every kernel matched the reference. When one op's kernels failed, that
    op gets the fallback and the other op is checked alone: it keeps 'triton' if it passes (a broken conv need not
    cost the scan its kernels). One :class:`ScanBackendWarning` names the failure. Runs again even if it ran before.
    """
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    key = (device.type, device.index, dtype)
    choice = dict.fromkeys(OPS, 'triton')
    result = _checked(device, dtype)
    reason = result.reason
    if not result.ok:
        choice = dict.fromkeys(OPS, FALLBACK)
        if result.failed_op in OPS:
            (other,) = [op for op in OPS if op != result.failed_op]
            alone = _checked(device, dtype, ops=(other,))
            if alone.ok:
                choice[other] = 'triton'
            else:
                reason += f'; checked alone, the {other} failed too: {alone.reason}'
    for op, name in choice.items():
        _AUTO_CHOICE[(*key, op)] = name
    if not result.ok:
        alternative = (" mamba_ssm is installed: VIM_SCAN_BACKEND=mamba_ssm runs the official CUDA kernels instead."
                       if MAMBA_SSM_INSTALLED else '')
        kept = [op for op in OPS if choice[op] == 'triton']
        scope = (f"for the {result.failed_op} there for the rest of this process (exact but slow), and keeps the "
                 f"Triton {kept[0]}, which passed its own check" if kept else
                 "there for the rest of this process: exact but slow")
        _warn_once(key, 'failed', (
            f"vim.kernels: the Triton kernels failed their self-check on {_describe(*key)} ({reason}). 'auto' "
            f"runs '{FALLBACK}' {scope}.{alternative} backend='triton' or VIM_SCAN_BACKEND=triton forces the "
            f"kernels. Please report this message in an issue."))
    return choice['scan']


def _capturing(x: torch.Tensor) -> bool:
    """Whether ``x``'s device is recording a CUDA graph on the current stream."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _auto_backend(x: torch.Tensor, op: str = 'scan') -> str:
    """The backend ``auto`` runs for tensor ``x`` in ``op`` ('scan' or 'conv')."""
    if x.device.type in GUARDED_DEVICE_TYPES and TRITON_INSTALLED and x.dtype in TRITON_DTYPES:
        choice = _AUTO_CHOICE.get((x.device.type, x.device.index, x.dtype, op))
        if choice is not None:
            return choice
        if torch.compiler.is_compiling():
            return _unchecked_choice(x.device.type, x.device.index, x.dtype, 'torch.compile tracing')
        if _capturing(x):
            return _unchecked_choice(x.device.type, x.device.index, x.dtype, 'CUDA-graph capture')
        run_self_check(x.device, x.dtype)  # a tensor's CUDA device has its index: the key the check records
        return _AUTO_CHOICE[(x.device.type, x.device.index, x.dtype, op)]
    if x.device.type == 'cpu':
        return _auto_on_cpu()
    return 'reference'


def _requested(backend: str | None) -> str:
    """The backend name asked for: the argument, else $VIM_SCAN_BACKEND, else 'auto'."""
    return backend or os.environ.get(ENV_VAR) or 'auto'


def resolve_backend(backend: str | None, x: torch.Tensor, op: str = 'scan') -> str:
    """The backend that will run ``op`` ('scan' or 'conv') for tensor ``x``: explicit argument, else
    $VIM_SCAN_BACKEND, else auto (whose self-check may keep one op on Triton and send the other to the reference).

    Raises ValueError for an unknown name and RuntimeError when the backend cannot run on ``x`` (``triton``:
    package missing, or CPU tensors without TRITON_INTERPRET=1; ``mamba_ssm``: package missing or CPU tensors).
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    name = _requested(backend)
    if name == 'auto':
        return _auto_backend(x, op)
    if name not in _registered():
        source = 'backend argument' if backend else f'${ENV_VAR}'
        choices = ', '.join(['auto', *available_backends()])
        raise ValueError(f'Unknown scan backend {name!r} ({source}); available: {choices}')
    if name == 'triton':
        _check_triton(x)
    elif name == 'mamba_ssm':
        _check_mamba_ssm(x)
    elif name == 'cpu':
        if x.device.type != 'cpu':
            raise RuntimeError(f"scan backend 'cpu' runs on CPU tensors, got {x.device}")
        if not _cpu_kernels_built():
            load_extension()  # raises with the reason
    return name


def _scan_backend(backend: str | None, u: torch.Tensor, A: torch.Tensor) -> str:
    """``resolve_backend`` for a scan: 'auto' does not pick the Triton scan for a d_state it does not take (it
    raises when asked for by name)."""
    name = resolve_backend(backend, u)
    if name == 'triton' and _requested(backend) == 'auto':
        from .triton.fwd import MAX_DSTATE
        if A.shape[-1] > MAX_DSTATE:
            return FALLBACK
    return name


def _conv_backend(backend: str | None, x: torch.Tensor, weight: torch.Tensor) -> str:
    """``resolve_backend`` for the conv: 'auto' does not pick the Triton conv for a width it does not take (it
    raises when asked for by name)."""
    name = resolve_backend(backend, x, op='conv')
    if name == 'triton' and _requested(backend) == 'auto' and weight.dim() == 3:
        from .triton.conv import MAX_WIDTH
        if weight.shape[-1] > MAX_WIDTH:
            return FALLBACK
    return name


def _implementation(registry: dict[str, Callable], name: str, op: str) -> Callable:
    if name not in registry:
        raise ValueError(f'scan backend {name!r} has no {op}; use one of {sorted(registry)}')
    return registry[name]


# selective_scan backends that can return the last hidden state
_SELECTIVE_LAST_STATE = {'reference', 'cpu', 'mamba_ssm'}  # 'cpu' runs the reference here


def selective_scan(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor | None = None, z: torch.Tensor | None = None,
        delta_bias: torch.Tensor | None = None, delta_softplus: bool = False, return_last_state: bool = False, *,
        backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan, first token to last; with ``return_last_state``, ``(out, last_state (batch, dim, dstate))``.

    Shapes and semantics: :func:`vim.kernels.selective_scan_ref` (mamba_ssm's ``selective_scan_fn``, real A).
    """
    name = _scan_backend(backend, u, A)
    fn = _implementation(_SELECTIVE, name, 'selective_scan')
    if return_last_state:
        if name not in _SELECTIVE_LAST_STATE:
            raise NotImplementedError(f'scan backend {name!r} cannot return the last state; use one of '
                                      f'{sorted(_SELECTIVE_LAST_STATE)}')
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def bidirectional_scan(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool = True, *,
        backend: str | None = None, delta_proj_weight: torch.Tensor | None = None, recompute_states: bool = False,
) -> torch.Tensor:
    """Vim's fused bidirectional scan. Shapes and semantics: :func:`vim.kernels.bidirectional_scan_ref`.

    With ``delta_proj_weight`` (2, dim, R), ``delta`` is the low-rank step (batch, 2, R, seqlen) and the scan runs on
    :func:`vim.kernels.reference.delta_from_low_rank` of the two (Vim's dt_proj). The ``cpu`` backend computes it
    inside its kernel when no gradient is needed; every other backend gets the full delta computed here.
    ``recompute_states`` trades a forward scan in the backward for the chunk states' memory on the ``triton``
    backend (:func:`vim.kernels.triton.bidirectional_scan_triton`); the other backends save what they always save.
    """
    name = _scan_backend(backend, u, A)
    fn = _implementation(_BIDIRECTIONAL, name, 'bidirectional_scan')
    if delta_proj_weight is not None:
        if name == 'cpu':
            return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, delta_proj_weight=delta_proj_weight)
        delta = delta_from_low_rank(delta, delta_proj_weight)
    if recompute_states and name == 'triton':
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, recompute_states=True)
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def bidirectional_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                            backend: str | None = None) -> torch.Tensor:
    """Causal depthwise conv + silu of Vim's two branches. Shapes: :func:`vim.kernels.bidirectional_conv_silu_ref`."""
    fn = _implementation(_CONV, _conv_backend(backend, x, weight), 'bidirectional_conv_silu')
    return fn(x, weight, bias)
