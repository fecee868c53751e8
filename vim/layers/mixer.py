"""The bidirectional Mamba mixer of Vim: one in_proj, a forward and a backward selective-scan branch, one out_proj."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch.utils.checkpoint import checkpoint

from vim.kernels import bidirectional_conv_silu, bidirectional_scan
from vim.kernels.eager import plain_eager
from vim.kernels.reference import per_direction_matmul

__all__ = ['BidirectionalMamba', 'ssm_projections', 'uses_scan', 'widened_dtype']

# The ops choose their backend from the tensors' device in Python: torch.fx keeps them as calls (timm's and
# torchvision's FX feature extractors trace through the mixer otherwise).
register_notrace_function(bidirectional_conv_silu)
register_notrace_function(bidirectional_scan)


@register_notrace_function  # a dtype is no tensor: torch.fx keeps this a call evaluated per input
def widened_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision x, x's dtype for fp32 / fp64: the dtype of Vim's residual stream and SSM parameters."""
    return torch.promote_types(x.dtype, torch.float32)


@register_notrace_function  # a branch on u's strides: torch.fx keeps the call
def ssm_projections(u: torch.Tensor, x_proj_weight: torch.Tensor, dt_rank: int,
                    d_state: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_proj of both branches: u (batch, 2, d_inner, seqlen) -> the low-rank step dt (batch, 2, dt_rank, seqlen) and
    B, C (batch, 2, d_state, seqlen), views of one product computed in the layout u arrives in
    (:func:`vim.kernels.reference.per_direction_matmul`).

    A token-major u (channel stride 1: the CPU and Triton convs' output) gives views with the projection axis
    contiguous: dt_proj then yields a token-major delta, the layout both fast scans read, or runs inside the CPU
    kernel. The Triton conv's direction-major u is read in place, one GEMM a branch.
    """
    r, n = dt_rank, d_state
    w = x_proj_weight
    if u.is_cpu and u.stride(-2) == 1 and w.shape[1] % 8 and plain_eager(u):
        # MKL's sgemm runs this skinny product ~20% faster with its width a multiple of 8 (Vim-Ti: 44 -> 48
        # zero rows; benchmarks/README.md). Plain eager mode only, as the CPU ops' direct calls: not while
        # compiling nor under dispatch modes such as FlopCounterMode (exact FLOPs).
        w = F.pad(w, (0, 0, 0, -w.shape[1] % 8))
    dt, B, C, *_ = per_direction_matmul(u, w, split=[r, n, n, w.shape[1] - r - 2 * n])  # the last: MKL's padding
    return dt, B, C


class BidirectionalMamba(nn.Module):
    """Vim's mixer ("bimamba v2" with the two branches averaged).

    ``x, z = in_proj(h)``; each direction runs causal depthwise conv -> silu -> x_proj -> (dt, B, C) -> dt_proj
    -> selective scan, the backward one from the last token to the first; both are gated by silu(z), averaged,
    and projected by ``out_proj``. The per-direction parameters are stacked on a leading axis of size 2
    (0: forward, 1: backward), so that both branches run as one batched computation.

    Args:
        dim: model width. d_state: SSM state size N. d_conv: conv kernel size. expand: d_inner = expand * dim.
        dt_rank: rank of the dt projection, ``ceil(dim / 16)`` by default.
        dt_min, dt_max, dt_init_floor: range of the initial step sizes (Mamba's initialisation).
        scan_recompute: under autograd, keep only in_proj's output for the backward and run the conv, x_proj,
            dt_proj and the scan's forward again there (``torch.utils.checkpoint``, non-reentrant): the conv's
            output u, the step sizes and the scan's chunk states are not held between forward and backward. Any
            backend; the same gradients bit for bit.
        device, dtype: factory arguments of the parameters.
    """

    def __init__(
            self,
            dim: int,
            *,
            d_state: int = 16,
            d_conv: int = 4,
            expand: int = 2,
            dt_rank: int | None = None,
            dt_min: float = 0.001,
            dt_max: float = 0.1,
            dt_init_floor: float = 1e-4,
            scan_recompute: bool = False,
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = d_inner = expand * dim
        self.dt_rank = dt_rank = dt_rank or math.ceil(dim / 16)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.scan_recompute = scan_recompute

        dd = dict(device=device, dtype=dtype)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False, **dd)
        self.conv_weight = nn.Parameter(torch.empty(2, d_inner, d_conv, **dd))
        self.conv_bias = nn.Parameter(torch.empty(2, d_inner, **dd))
        self.x_proj_weight = nn.Parameter(torch.empty(2, dt_rank + 2 * d_state, d_inner, **dd))
        self.dt_proj_weight = nn.Parameter(torch.empty(2, d_inner, dt_rank, **dd))
        self.dt_proj_bias = nn.Parameter(torch.empty(2, d_inner, **dd))
        self.A_log = nn.Parameter(torch.empty(2, d_inner, d_state, **dd))
        self.D = nn.Parameter(torch.empty(2, d_inner, **dd))
        self.out_proj = nn.Linear(d_inner, dim, bias=False, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation, per direction (as nn.Conv1d / nn.Linear defaults where Mamba uses those)."""
        conv_bound = 1 / math.sqrt(self.d_conv)  # fan_in of a depthwise conv is its kernel size
        nn.init.uniform_(self.conv_weight, -conv_bound, conv_bound)
        nn.init.uniform_(self.conv_bias, -conv_bound, conv_bound)
        x_bound = 1 / math.sqrt(self.d_inner)
        nn.init.uniform_(self.x_proj_weight, -x_bound, x_bound)
        dt_std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj_weight, -dt_std, dt_std)
        # dt_proj bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max]
        # drawn in fp32 on the CPU whatever the parameters' device and dtype: the same values everywhere
        dt = torch.exp(
            torch.rand(2, self.d_inner, device='cpu') * (math.log(self.dt_max) - math.log(self.dt_min))
            + math.log(self.dt_min)
        ).clamp(min=self.dt_init_floor)
        self.dt_proj_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device='cpu')
        self.A_log.copy_(torch.log(A).expand(2, self.d_inner, -1))
        self.D.fill_(1.0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (batch, seqlen, dim) -> (batch, seqlen, dim)."""
        # one split, whose backward concatenates both halves' gradients into in_proj's (batch, seqlen, 2 d_inner)
        # layout; two slices would each zero-fill a whole-size gradient, copy into it and add the two. Indexed, not
        # unpacked: torch.fx cannot unpack the tuple a split returns.
        xz = self.in_proj(hidden).split(self.d_inner, dim=-1)
        x, z = xz[0].transpose(1, 2), xz[1].transpose(1, 2)  # (batch, d_inner, seqlen) each
        if self.scan_recompute and torch.is_grad_enabled():
            y = checkpoint(self._ssm, x, z, use_reentrant=False)
        else:
            y = self._ssm(x, z)
        return self.out_proj(y.transpose(1, 2))

    def _ssm(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x, z (batch, d_inner, seqlen) -> y (batch, d_inner, seqlen): both branches' conv, projections and scan,
        gated by silu(z) and averaged."""
        # both branches' causal conv + silu, in natural token order: (batch, 2, d_inner, seqlen)
        u = bidirectional_conv_silu(x, self.conv_weight, self.conv_bias)
        dt, B, C = ssm_projections(u, self.x_proj_weight.to(u.dtype), self.dt_rank, self.d_state)
        ssm_dtype = widened_dtype(u)  # A, D and dt bias stay fp32 (or wider)
        # dt_proj (delta = dt_proj_weight @ dt) is the scan's: the CPU kernel computes it per token at inference
        return bidirectional_scan(
            u, dt, -torch.exp(self.A_log.to(ssm_dtype)), B, C, self.D.to(ssm_dtype), z,
            self.dt_proj_bias.to(ssm_dtype), delta_softplus=True, delta_proj_weight=self.dt_proj_weight.to(u.dtype))


def uses_scan(module: nn.Module) -> bool:
    """Whether ``module`` holds a Vim mixer, i.e. runs the scan ops (and so waits for their backend on first use:
    the CPU kernels' build, CUDA's self-check). Other timm models do not."""
    return any(isinstance(m, BidirectionalMamba) for m in module.modules())
