"""The Triton bidirectional scan against ``bidirectional_scan_ref`` (float64) on tiny shapes: output and every gradient.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and the kernels run through the Triton interpreter on CPU
tensors, where every ``tl`` op costs tens of microseconds and each associative-scan element about a tenth of a
millisecond: shapes stay tiny (dim <= 16, dstate <= 8, seqlen <= 20) and ``chunk_size`` shrinks to 4-8 tokens so
that several chunks are covered. On a CUDA machine the same tests run the compiled kernels.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip('triton')

import vim.kernels.triton.op as triton_op  # noqa: E402
from vim.kernels import bidirectional_scan_ref  # noqa: E402
from vim.kernels.triton import CONFIGS, bidirectional_scan_triton, bwd, fwd, pack  # noqa: E402
from vim.kernels.triton.common import INTERPRET  # noqa: E402

DEVICE = 'cpu' if INTERPRET else 'cuda'
NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
# Errors are measured against each tensor's largest entry: outputs and gradients are sums over many terms, whose
# small entries come from cancellation. fp32: accumulation error; bf16/fp16: one rounding of the result.
TOL = {torch.float32: 2e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


class _NaNEmptyTorch:
    """``torch`` with ``empty`` filling floats with NaN: a kernel that leaves part of an output unwritten fails."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*size, **kwargs):
        t = torch.empty(*size, **kwargs)
        return t.fill_(float('nan')) if t.is_floating_point() else t


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    for module in (fwd, bwd, pack):
        monkeypatch.setattr(module, 'torch', _NaNEmptyTorch())


@pytest.fixture
def split(monkeypatch):
    """Segments of one chunk each, whatever the planners' cost models would pick: tiny test sequences then run the
    three-pass split forward and backward over as many segments as they have chunks."""
    one_chunk = lambda batch, dim, seqlen, chunk, sms=None: (chunk, -(-seqlen // chunk))  # noqa: E731
    monkeypatch.setattr(fwd, 'plan_segments', one_chunk)
    monkeypatch.setattr(bwd, 'plan_backward_segments', one_chunk)


def make_inputs(batch: int, dim: int, seqlen: int, dstate: int, dtype: torch.dtype, *, layout: str = 'contiguous',
                seed: int = 0, decay: float = 1.0, positive_delta: bool = False,
                device: str = DEVICE) -> dict[str, torch.Tensor]:
    """Inputs of ``bidirectional_scan``: activations (u, delta, B, C, z) in ``dtype``, A/D/delta_bias in fp32 as the
    mixer passes them. Each is a leaf with requires_grad, or a view of one. ``positive_delta`` draws delta and
    delta_bias from [0, 0.25) for scans without softplus, whose decays would otherwise grow past fp32's range.

    layout: 'contiguous'; 'mixer', the views the mixer produces on a GPU (B and C slices of x_dbl, z a slice of a
    transposed in_proj output whose token stride is 2 * dim, direction-major u, delta and x_dbl, transposed A and
    D); 'strided', every tensor a step-2 slice along the sequence.
    """
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0, shift=0.0, dt=dtype, rand=False):
        x = torch.rand(*shape, generator=g) if rand else torch.randn(*shape, generator=g)
        return (x * scale + shift).to(device=device, dtype=dt).requires_grad_()

    f32 = torch.float32
    dkw = dict(rand=True, scale=0.25) if positive_delta else dict(scale=0.5)
    if layout == 'contiguous':
        x = dict(u=leaf(batch, 2, dim, seqlen), delta=leaf(batch, 2, dim, seqlen, **dkw),
                 A=leaf(2, dim, dstate, scale=-4 * decay, shift=-0.1, dt=f32, rand=True),
                 B=leaf(batch, 2, dstate, seqlen), C=leaf(batch, 2, dstate, seqlen), D=leaf(2, dim, dt=f32),
                 z=leaf(batch, dim, seqlen), delta_bias=leaf(2, dim, dt=f32, **dkw))
    elif layout == 'mixer':
        x_dbl = leaf(2, batch, seqlen, 3 + 2 * dstate).permute(1, 0, 3, 2)
        xz = leaf(batch, seqlen, 2 * dim)
        x = dict(u=leaf(2, batch, seqlen, dim).permute(1, 0, 3, 2),
                 delta=leaf(2, batch, seqlen, dim, **dkw).permute(1, 0, 3, 2),
                 A=leaf(2, dstate, dim, scale=-4 * decay, shift=-0.1, dt=f32, rand=True).transpose(1, 2),
                 B=x_dbl[:, :, 3:3 + dstate], C=x_dbl[:, :, 3 + dstate:], D=leaf(dim, 2, dt=f32).t(),
                 z=xz.transpose(1, 2)[:, dim:], delta_bias=leaf(2, dim, dt=f32, **dkw))
    elif layout == 'strided':
        x = make_inputs(batch, dim, 2 * seqlen, dstate, dtype, seed=seed, decay=decay, positive_delta=positive_delta,
                        device=device)
        x = {k: v[..., ::2] if v.shape[-1] == 2 * seqlen else v for k, v in x.items()}
    else:
        raise ValueError(layout)
    return x


def check_against_reference(x: dict[str, torch.Tensor], *, chunk_size: int | None = None,
                            delta_softplus: bool = True, seed: int = 0) -> None:
    """Output and the gradients of all eight inputs, against the reference run in float64 on the same values."""
    dtype = x['u'].dtype
    kw = {} if chunk_size is None else dict(chunk_size=chunk_size)
    args = [x[n] for n in NAMES]
    y = bidirectional_scan_triton(*args, delta_softplus=delta_softplus, **kw)
    ref_args = [a.detach().double().requires_grad_() for a in args]
    y_ref = bidirectional_scan_ref(*ref_args, delta_softplus=delta_softplus)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert y.transpose(1, 2).is_contiguous(), y.stride()  # channel-contiguous, as out_proj reads it
    tol = TOL[dtype]
    _assert_close(y, y_ref, tol, 'output')
    g = torch.Generator().manual_seed(seed + 1)
    gout = torch.randn(y.shape, generator=g).to(y.device)
    grads = torch.autograd.grad(y, args, gout.to(dtype))
    grads_ref = torch.autograd.grad(y_ref, ref_args, gout.to(dtype).double())
    for name, a, gr, gr_ref in zip(NAMES, args, grads, grads_ref):
        assert gr.dtype == a.dtype and gr.shape == a.shape, name
        _assert_close(gr, gr_ref, tol, f'grad of {name}')


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert torch.isfinite(actual).all(), f'{what}: not finite'
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * max(scale, 1e-6),
                               msg=lambda m: f'{what}: {m}')


CASES = [  # (batch, dim, seqlen, dstate, chunk_size, dtype, layout)
    (1, 4, 1, 3, 4, torch.float32, 'contiguous'),   # one token
    (2, 8, 11, 4, 4, torch.float32, 'contiguous'),  # odd length, three chunks, the last one partial
    (1, 8, 8, 4, 4, torch.float32, 'contiguous'),   # length a multiple of the chunk
    (1, 12, 9, 3, 8, torch.float32, 'contiguous'),  # dim not a multiple of BLOCK_D, dstate not a power of two
    (1, 16, 20, 8, 8, torch.float32, 'contiguous'),
    (1, 8, 13, 16, 4, torch.float32, 'contiguous'),  # Vim's 16 states: four 16-byte groups a token
    (1, 8, 9, 5, 4, torch.float32, 'mixer'),        # 5 states padded to 8
    (1, 8, 9, 1, 4, torch.float32, 'contiguous'),   # one state: a one-state tile (STATE_J 1)
    (1, 8, 9, 2, 4, torch.float32, 'mixer'),        # two states: STATE_J 2
    (2, 8, 9, 4, 4, torch.float32, 'mixer'),        # the strided views the model passes
    (1, 8, 7, 4, 4, torch.float32, 'strided'),      # token stride 2
    (1, 8, 13, 4, None, torch.float32, 'contiguous'),  # the default chunk (8): the second chunk partial
    (2, 8, 10, 4, 4, torch.bfloat16, 'contiguous'),
    (1, 8, 9, 4, 4, torch.bfloat16, 'mixer'),
    (1, 8, 9, 4, 4, torch.float16, 'contiguous'),
]


def _id(case):
    batch, dim, seqlen, dstate, chunk, dtype, layout = case
    return f'b{batch}d{dim}L{seqlen}N{dstate}c{chunk}-{str(dtype)[6:]}-{layout}'


@pytest.mark.parametrize('case', CASES, ids=[_id(c) for c in CASES])
def test_matches_reference(case, split):
    batch, dim, seqlen, dstate, chunk, dtype, layout = case
    x = make_inputs(batch, dim, seqlen, dstate, dtype, layout=layout, seed=seqlen)
    if chunk is not None:
        assert seqlen <= chunk or fwd.plan_segments(batch, dim, seqlen, chunk)[1] > 1  # the split runs
    check_against_reference(x, chunk_size=chunk, seed=seqlen)


@pytest.mark.parametrize('case', [CASES[1], CASES[5]], ids=[_id(CASES[1]), _id(CASES[5])])
def test_matches_reference_without_split(case):
    batch, dim, seqlen, dstate, chunk, dtype, layout = case
    assert fwd.plan_segments(batch, dim, seqlen, chunk)[1] == 1
    assert bwd.plan_backward_segments(batch, dim, seqlen, chunk)[1] == 1
    x = make_inputs(batch, dim, seqlen, dstate, dtype, layout=layout, seed=seqlen)
    check_against_reference(x, chunk_size=chunk, seed=seqlen)


SCAN_KERNELS = (fwd._segment_state_kernel, fwd._segment_boundary_kernel, fwd._scan_output_kernel,
                bwd._segment_carry_kernel, bwd._bidirectional_scan_bwd_kernel)
SCAN_CONFIGS = [(k, i) for k in SCAN_KERNELS for i in range(len(CONFIGS[k.fn.__name__]))]


@pytest.mark.parametrize('kernel, config', SCAN_CONFIGS, ids=[f'{k.fn.__name__}-{i}' for k, i in SCAN_CONFIGS])
def test_every_autotune_config(kernel, config, split, monkeypatch):
    """Each config of each scan kernel on its own (the autotuner runs a lone config without benchmarking), on a
    case with partial chunks, a partial channel block of every config, the split forward and both directions."""
    monkeypatch.setattr(kernel, 'configs', [CONFIGS[kernel.fn.__name__][config]])
    dstate = 4 if kernel is bwd._bidirectional_scan_bwd_kernel else 16  # its position loops are slow to interpret
    x = make_inputs(1, 36, 9, dstate, torch.float32, seed=config)
    check_against_reference(x, chunk_size=4, seed=config)


BOUNDARY_CONFIGS = range(len(CONFIGS[fwd._segment_boundary_kernel.fn.__name__]))


@pytest.mark.parametrize('reverse', [0, 1])
@pytest.mark.parametrize('config', BOUNDARY_CONFIGS)
def test_segment_boundary_walk(config, reverse, monkeypatch):
    """The boundary walk alone, each config, against the sequential recurrence in float64: more entries than one
    iteration loads (the last block partial), a partial channel block, padded states, both scan orders."""
    kernel = fwd._segment_boundary_kernel
    monkeypatch.setattr(kernel, 'configs', [CONFIGS[kernel.fn.__name__][config]])
    batch, dim, dstate = 2, 38, 5
    n_e = 2 * CONFIGS[kernel.fn.__name__][config].kwargs['BLOCK_S'] + 3
    g = torch.Generator().manual_seed(config)
    A = -torch.rand(2, dim, dstate, generator=g) * 2 - 0.1
    dtsum = torch.rand(batch, 2, n_e, dim, generator=g)
    hseg = torch.randn(batch, 2, n_e, dim, dstate, generator=g)
    expected = torch.empty_like(hseg, dtype=torch.float64)
    for k in range(2):
        h = torch.zeros(batch, dim, dstate, dtype=torch.float64)
        for e in (range(n_e) if k ^ reverse == 0 else reversed(range(n_e))):
            h = torch.exp(dtsum[:, k, e, :, None].double() * A[k].double()) * h + hseg[:, k, e].double()
            expected[:, k, e] = h
    out = hseg.to(DEVICE)
    kernel[lambda meta: (-(-dim // meta['BLOCK_D']) * batch * 2,)](
        A.to(DEVICE), out, dtsum.to(DEVICE), batch, dim, dstate, n_e + 1, 1, dstate, *A.stride(), REVERSE=reverse,
        BLOCK_N=8, STATE_J=4)
    _assert_close(out.cpu(), expected, TOL[torch.float32], 'states')


def test_without_softplus():
    x = make_inputs(1, 8, 11, 4, torch.float32, seed=5, positive_delta=True)
    check_against_reference(x, chunk_size=4, delta_softplus=False)


def test_strong_decay_and_large_delta():
    """Decays that underflow within a chunk and softplus inputs past its threshold of 20."""
    x = make_inputs(1, 8, 9, 4, torch.float32, seed=7, decay=25.0)
    with torch.no_grad():
        x['delta_bias'][0, :4] += 30.0
    check_against_reference(x, chunk_size=4)


def test_inference_stores_no_states_and_matches_training_output(monkeypatch):
    stored = []

    def scan_fwd(*args, store_states):
        stored.append(store_states)
        return fwd.scan_fwd(*args, store_states=store_states)

    monkeypatch.setattr(triton_op, '_scan_fwd', scan_fwd)  # the launcher every path calls (op.py)
    x = make_inputs(1, 8, 9, 4, torch.float32, seed=3)
    args = [x[n] for n in NAMES]
    y = bidirectional_scan_triton(*args, chunk_size=4)
    with torch.no_grad():  # the inputs still require grad, as a model's parameters do in evaluation
        y_inference = bidirectional_scan_triton(*args, chunk_size=4)
    assert stored == [True, False] and not y_inference.requires_grad
    torch.testing.assert_close(y_inference, y.detach(), rtol=0, atol=0)


def test_rejects_bad_inputs():
    x = make_inputs(1, 4, 5, 3, torch.float32)
    args = [x[n].detach() for n in NAMES]
    with pytest.raises(ValueError, match='shape'):
        bidirectional_scan_triton(args[0], *args[1:6], args[6][..., :4], args[7])
    with pytest.raises(TypeError, match='fp32, bf16 or fp16'):
        bidirectional_scan_triton(*[a.double() for a in args])
    for chunk in (6, 1, 16):  # not a power of two; below 2; past the backward's register tile (op.MAX_CHUNK)
        with pytest.raises(ValueError, match='power of two from 2 to 8'):
            bidirectional_scan_triton(*args, chunk_size=chunk)


def test_fake_impls_match_the_kernels():
    """torch.compile traces the ops through their fake implementations: shapes, dtypes and strides must match."""
    x = make_inputs(1, 8, 9, 4, torch.float32, seed=2)
    args = [x[n].detach() for n in NAMES]
    torch.library.opcheck(torch.ops.vim.triton_bidirectional_scan, (*args, True, 4, True),
                          test_utils=('test_faketensor',))
    _, states, ysum = torch.ops.vim.triton_bidirectional_scan(*args, True, 4, True)
    gout = torch.randn(1, 8, 9)
    torch.library.opcheck(torch.ops.vim.triton_bidirectional_scan_bwd, (gout, *args, states, ysum, True, 4),
                          test_utils=('test_faketensor',))
