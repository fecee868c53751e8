"""The Triton two-branch causal conv + silu against ``bidirectional_conv_silu_ref`` (float64): output and the
gradients of x, weight and bias. Under the Triton interpreter without CUDA (tests/conftest.py), compiled on a GPU."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip('triton')

from vim.kernels import bidirectional_conv_silu_ref  # noqa: E402
from vim.kernels.triton import CONFIGS, bidirectional_conv_silu_triton, conv  # noqa: E402

from tests.kernels.test_triton_interpreter import DEVICE, TOL, _assert_close, _NaNEmptyTorch  # noqa: E402


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    monkeypatch.setattr(conv, 'torch', _NaNEmptyTorch())


def make_conv_inputs(batch: int, dim: int, seqlen: int, width: int, dtype: torch.dtype, layout: str = 'contiguous',
                     seed: int = 0, device: str = DEVICE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x in ``dtype`` (layout 'contiguous'; 'mixer': a transposed slice of a (batch, seqlen, 2 * dim) tensor, as
    in_proj's output; 'strided': every second token), weight and bias in fp32 as the mixer's parameters."""
    g = torch.Generator().manual_seed(seed)
    if layout == 'contiguous':
        x = torch.randn(batch, dim, seqlen, generator=g)
    elif layout == 'mixer':
        x = torch.randn(batch, seqlen, 2 * dim, generator=g).transpose(1, 2)[:, dim:]
    elif layout == 'strided':
        x = torch.randn(batch, dim, 2 * seqlen, generator=g)[..., ::2]
    else:
        raise ValueError(layout)
    x = x.to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(2, dim, width, generator=g) / width ** 0.5).to(device).requires_grad_()
    bias = torch.randn(2, dim, generator=g).to(device).requires_grad_()
    return x, weight, bias


def check_conv_against_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, seed: int = 0) -> None:
    dtype = x.dtype
    y = bidirectional_conv_silu_triton(x, weight, bias)
    refs = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y_ref = bidirectional_conv_silu_ref(*refs)
    assert y.dtype == dtype and y.shape == y_ref.shape
    # direction-major (2, batch, seqlen, dim) memory: the scan reads a token's channels as one run, x_proj each
    # branch as one matrix
    assert y.permute(1, 0, 3, 2).is_contiguous(), y.stride()
    _assert_close(y, y_ref, TOL[dtype], 'output')
    gout = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(y.device, dtype)
    grads = torch.autograd.grad(y, (x, weight, bias), gout)
    grads_ref = torch.autograd.grad(y_ref, refs, gout.double())
    for name, a, gr, gr_ref in zip(('x', 'weight', 'bias'), (x, weight, bias), grads, grads_ref):
        assert gr.dtype == a.dtype and gr.shape == a.shape, name
        _assert_close(gr, gr_ref, TOL[dtype], f'grad of {name}')


CASES = [  # (batch, dim, seqlen, width, dtype, layout)
    (1, 4, 1, 4, torch.float32, 'contiguous'),    # one token: every tap but the last reads padding
    (1, 8, 3, 4, torch.float32, 'contiguous'),    # shorter than the kernel
    (2, 8, 11, 4, torch.float32, 'contiguous'),
    (1, 40, 9, 4, torch.float32, 'contiguous'),   # two channel blocks, the second partial
    (1, 6, 70, 4, torch.float32, 'mixer'),        # two token blocks: taps and gradients across the block edge
    (2, 8, 9, 2, torch.float32, 'contiguous'),
    (1, 8, 9, 1, torch.float32, 'contiguous'),    # pointwise
    (1, 8, 13, 4, torch.float32, 'strided'),
    (2, 8, 10, 4, torch.bfloat16, 'mixer'),
    (1, 8, 9, 4, torch.float16, 'contiguous'),
]


@pytest.mark.parametrize('case', CASES, ids=lambda c: f'b{c[0]}d{c[1]}L{c[2]}w{c[3]}-{str(c[4])[6:]}-{c[5]}')
def test_matches_reference(case):
    batch, dim, seqlen, width, dtype, layout = case
    check_conv_against_reference(*make_conv_inputs(batch, dim, seqlen, width, dtype, layout, seed=seqlen),
                                 seed=seqlen)


CONV_CONFIGS = [(k, i) for k in (conv._bidirectional_conv_fwd_kernel, conv._bidirectional_conv_bwd_kernel)
                for i in range(len(CONFIGS[k.fn.__name__]))]


@pytest.mark.parametrize('kernel, config', CONV_CONFIGS, ids=[f'{k.fn.__name__}-{i}' for k, i in CONV_CONFIGS])
def test_every_autotune_config(kernel, config, monkeypatch):
    """Each config on its own (the autotuner runs a lone config without benchmarking): partial channel blocks
    (dim 36) and two token blocks."""
    monkeypatch.setattr(kernel, 'configs', [CONFIGS[kernel.fn.__name__][config]])
    check_conv_against_reference(*make_conv_inputs(1, 36, 70, 4, torch.float32, 'mixer', seed=config), seed=config)


@pytest.mark.parametrize('block_l', [1, 3, 16, 64])
@pytest.mark.parametrize('width', [4, 3])
def test_token_blocks_of_any_length(block_l, width, monkeypatch):
    """Each program walks a block of tokens with a window that reaches 3 tokens past both of its edges (6 in the
    backward's x): blocks shorter than the window, a last block cut short, a block as long as the sequence."""
    monkeypatch.setattr(conv, 'conv_block_tokens', lambda *args: block_l)
    check_conv_against_reference(*make_conv_inputs(2, 6, 37, width, torch.float32, 'mixer', seed=block_l),
                                 seed=block_l)


def test_input_gradient_is_channel_contiguous():
    """x's gradient is written as the forward's output is, a warp's store of one token one contiguous run."""
    x, weight, bias = (t.detach() for t in make_conv_inputs(2, 8, 9, 4, torch.float32, 'mixer'))
    gx, gw, gb = conv.conv_bwd(torch.randn(2, 2, 8, 9).to(x.device), x, weight, bias)
    assert gx.shape == x.shape and gx.transpose(1, 2).is_contiguous(), gx.stride()
    assert gw.shape == weight.shape and gb.shape == bias.shape


def test_block_length_fills_the_gpu():
    """The longest block that still gives each of an H100's 528 schedulers 8 warps of 32 channels (Vim-Ti: 384
    channels), the shortest (16) where none does."""
    assert conv.conv_block_tokens(64, 384, 197) == 32    # 768 warps of channels x 7 blocks
    assert conv.conv_block_tokens(8, 384, 6085) == 128   # 96 x 48
    assert conv.conv_block_tokens(1, 384, 6085) == 16    # 12 x 381
    assert conv.conv_block_tokens(1, 384, 197) == 16     # nothing fills it
    assert conv.conv_block_tokens(512, 768, 197) == 256  # the longest offered
    for args in [(64, 384, 197), (8, 384, 6085), (1, 384, 6085), (512, 768, 197)]:
        batch, dim, seqlen = args
        assert batch * dim // 32 * -(-seqlen // conv.conv_block_tokens(*args)) >= 8 * 4 * 132, args


def test_widths_above_four_go_to_the_reference(monkeypatch):
    """The window holds 4 taps a branch: asked for by name a wider conv raises one clear error before any launch;
    'auto' runs the reference for it."""
    from vim.kernels import bidirectional_conv_silu, interface
    x, weight4, bias = (t.detach() for t in make_conv_inputs(1, 4, 9, 4, torch.float32))
    weight = torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match='widths up to 4.*got 5'):
        bidirectional_conv_silu_triton(x, weight, bias)
    with pytest.raises(ValueError, match='widths up to 4.*got 5'):
        conv.conv_fwd(x, weight, bias)
    monkeypatch.delenv('VIM_SCAN_BACKEND', raising=False)
    # as on a CUDA device, where 'auto' resolves to the self-checked Triton kernels
    monkeypatch.setattr(interface, '_auto_backend', lambda t, op='scan': 'triton')
    assert interface._conv_backend(None, x, weight) == interface.FALLBACK
    assert interface._conv_backend(None, x, weight4) == 'triton'
    assert interface._conv_backend('triton', x, weight) == 'triton'  # and the op raises, as above
    torch.testing.assert_close(bidirectional_conv_silu(x, weight, bias), bidirectional_conv_silu_ref(x, weight, bias),
                               rtol=0, atol=0)


def test_inference_needs_no_autograd():
    x, weight, bias = make_conv_inputs(1, 8, 5, 4, torch.float32)
    with torch.no_grad():
        y = bidirectional_conv_silu_triton(x, weight, bias)
    assert not y.requires_grad
    torch.testing.assert_close(y, bidirectional_conv_silu_triton(x, weight, bias).detach(), rtol=0, atol=0)


def test_rejects_bad_inputs():
    x, weight, bias = (t.detach() for t in make_conv_inputs(1, 4, 5, 4, torch.float32))
    with pytest.raises(ValueError, match='weight'):
        bidirectional_conv_silu_triton(x, weight[:, :3], bias)
    with pytest.raises(TypeError, match='fp32, bf16 or fp16'):
        bidirectional_conv_silu_triton(x.double(), weight, bias)
