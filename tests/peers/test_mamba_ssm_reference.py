"""mamba_ssm's own ``selective_scan_ref`` (from its released sdist) as a second oracle for ``vim.kernels``.

The function is taken from ``mamba_ssm/ops/selective_scan_interface.py`` by parsing the file and compiling that one
function with the names it uses (torch, F, einops' rearrange / repeat): nothing of mamba_ssm is imported or built,
so its CUDA extension is never needed. Its code runs unchanged for fp32; for an fp64 truth the same code is compiled
with its ``.float()`` casts turned into ``.double()`` (the one change, made on the syntax tree).

The grid is that of mamba_ssm's ``tests/ops/test_selective_scan.py`` (which its sdist does not ship), real weights,
B and C varying in time with 1 or 2 groups, every combination of D, z, delta_bias and softplus, last state
returned, plus short and odd lengths. Half precision is checked against the fp64 truth: mamba's reference computes
``silu(z)`` in the input dtype and is the less accurate of the two there.
"""
from __future__ import annotations

import ast
import builtins
import itertools
import tarfile
from collections.abc import Callable
from pathlib import Path

import einops
import pytest
import torch
import torch.nn.functional as F
from vim.kernels import selective_scan

pytestmark = pytest.mark.slow

MODULE = 'mamba_ssm/ops/selective_scan_interface.py'


class _FloatToDouble(ast.NodeTransformer):
    def visit_Attribute(self, node: ast.Attribute) -> ast.Attribute:
        self.generic_visit(node)
        if node.attr == 'float':
            node.attr = 'double'
        return node


def load_reference(sdist: Path, fp64: bool = False) -> Callable:
    """mamba_ssm's ``selective_scan_ref`` compiled from the sdist's source (fp64: with .float() -> .double())."""
    with tarfile.open(sdist) as tar:
        root = tar.getnames()[0].split('/')[0]
        source = tar.extractfile(f'{root}/{MODULE}').read().decode()
    tree = ast.parse(source)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == 'selective_scan_ref')
    if fp64:
        fn = ast.fix_missing_locations(_FloatToDouble().visit(fn))
    namespace = {'torch': torch, 'F': F, 'rearrange': einops.rearrange, 'repeat': einops.repeat}
    missing = _global_names(fn) - set(namespace) - set(dir(builtins))
    assert not missing, f'mamba_ssm selective_scan_ref now uses {sorted(missing)}: provide them'
    exec(compile(ast.Module(body=[fn], type_ignores=[]), f'{sdist.name}/{MODULE}', 'exec'), namespace)
    return namespace['selective_scan_ref']


def _global_names(fn: ast.FunctionDef) -> set[str]:
    """Names the function reads that it does not bind itself (its globals)."""
    bound = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
    loaded = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Name):
            (bound.add if isinstance(node.ctx, ast.Store) else loaded.add)(node.id)
    return loaded - bound


@pytest.fixture(scope='module')
def mamba_ref(mamba_ssm_sdist: Path) -> Callable:
    return load_reference(mamba_ssm_sdist)


@pytest.fixture(scope='module')
def mamba_ref_fp64(mamba_ssm_sdist: Path) -> Callable:
    return load_reference(mamba_ssm_sdist, fp64=True)


def _inputs(seqlen: int, groups: int, has_D: bool, has_z: bool, has_delta_bias: bool, itype: torch.dtype,
            seed: int) -> dict[str, torch.Tensor | None]:
    """mamba_ssm's test inputs: batch 2, dim 4, dstate 8; weights fp32 (fp64 for an fp64 run)."""
    g = torch.Generator().manual_seed(seed)
    wtype = torch.float64 if itype == torch.float64 else torch.float32
    batch, dim, dstate = 2, 4, 8
    bc_shape = (batch, dstate, seqlen) if groups == 1 else (batch, groups, dstate, seqlen)
    return dict(
        u=torch.randn(batch, dim, seqlen, generator=g).to(itype),
        delta=(0.5 * torch.rand(batch, dim, seqlen, generator=g)).to(itype),
        A=(-0.5 * torch.rand(dim, dstate, generator=g)).to(wtype),
        B=torch.randn(*bc_shape, generator=g).to(itype),
        C=torch.randn(*bc_shape, generator=g).to(itype),
        D=torch.randn(dim, generator=g).to(wtype) if has_D else None,
        z=torch.randn(batch, dim, seqlen, generator=g).to(itype) if has_z else None,
        delta_bias=(0.5 * torch.rand(dim, generator=g)).to(wtype) if has_delta_bias else None,
    )


FLAGS = list(itertools.product([False, True], repeat=4))  # has_D, has_z, has_delta_bias, delta_softplus
SEQLENS = [1, 17, 128]  # mamba_ssm's grid: 128 ... 4096 (its Python-loop reference takes ~35 s at 1024 here)


@pytest.mark.parametrize('itype', [torch.float32, torch.float64], ids=['fp32', 'fp64'])
@pytest.mark.parametrize('seqlen', SEQLENS)
@pytest.mark.parametrize('groups', [1, 2])
def test_matches_mamba_ssm_reference(mamba_ref, mamba_ref_fp64, itype, seqlen, groups):
    """Outputs, last states and every gradient, for every flag combination, against mamba_ssm's reference."""
    ref = mamba_ref if itype == torch.float32 else mamba_ref_fp64
    # sums of n = batch x seqlen terms in another order (gradients of A, D, delta_bias, ...): a few n x eps
    n = 2 * max(seqlen, 16)
    tol = dict(rtol=4 * n * torch.finfo(itype).eps, atol=4 * n * torch.finfo(itype).eps)
    for i, (has_D, has_z, has_delta_bias, softplus) in enumerate(FLAGS):
        x = _inputs(seqlen, groups, has_D, has_z, has_delta_bias, itype, seed=seqlen * 100 + groups * 20 + i)
        ours_in = {k: v.clone().requires_grad_() for k, v in x.items() if v is not None}
        ref_in = {k: v.clone().requires_grad_() for k, v in x.items() if v is not None}
        out, state = selective_scan(**ours_in, delta_softplus=softplus, return_last_state=True)
        out_ref, state_ref = ref(**ref_in, delta_softplus=softplus, return_last_state=True)
        case = f'D={has_D} z={has_z} delta_bias={has_delta_bias} softplus={softplus}'
        torch.testing.assert_close(out, out_ref, **tol, msg=lambda m, c=case: f'out, {c}: {m}')
        torch.testing.assert_close(state, state_ref.to(state.dtype), **tol, msg=lambda m, c=case: f'state, {c}: {m}')
        g = torch.Generator().manual_seed(i)
        g_out = torch.randn(out.shape, generator=g).to(out.dtype)
        g_state = torch.randn(state.shape, generator=g).to(state.dtype)
        ((out * g_out).sum() + (state * g_state).sum()).backward()
        ((out_ref * g_out).sum() + (state_ref * g_state.to(state_ref.dtype)).sum()).backward()
        for name in ours_in:
            torch.testing.assert_close(ours_in[name].grad, ref_in[name].grad, **tol,
                                       msg=lambda m, n=name, c=case: f'grad {n}, {c}: {m}')


@pytest.mark.parametrize('itype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
@pytest.mark.parametrize('groups', [1, 2])
def test_low_precision_against_fp64_truth(mamba_ref, mamba_ref_fp64, itype, groups):
    """Half-precision inputs: ours within one rounding of the output dtype of the fp64 truth on the same inputs."""
    eps = torch.finfo(itype).eps
    for i, (has_D, has_z, has_delta_bias, softplus) in enumerate(FLAGS):
        x = _inputs(256, groups, has_D, has_z, has_delta_bias, itype, seed=groups * 20 + i)
        truth = mamba_ref_fp64(**{k: v.double() for k, v in x.items() if v is not None}, delta_softplus=softplus)
        ours = selective_scan(**{k: v for k, v in x.items() if v is not None}, delta_softplus=softplus)
        assert ours.dtype == itype
        theirs = mamba_ref(**{k: v for k, v in x.items() if v is not None}, delta_softplus=softplus)
        err, err_mamba = ((y.double() - truth).abs().max().item() for y in (ours, theirs))
        case = f'D={has_D} z={has_z} delta_bias={has_delta_bias} softplus={softplus}'
        # one rounding to the output dtype (eps / 2 relative) plus fp32 noise near zero
        torch.testing.assert_close(ours.double(), truth, rtol=eps, atol=1e-5,
                                   msg=lambda m, c=case, e=err_mamba: f'{c} (mamba_ssm ref. max error {e:.3g}): {m}')
        assert err <= err_mamba + 1e-5, f'{case}: ours {err:.3g} is less accurate than mamba_ssm reference'


def test_mamba_reference_loaded_honestly(mamba_ref):
    """The loaded function is mamba's: its signature and a complex-A call path exist (complex is theirs, not ours)."""
    import inspect

    params = list(inspect.signature(mamba_ref).parameters)
    assert params == ['u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias', 'delta_softplus', 'return_last_state']
    # mamba's reference accepts complex A, which vim refuses with a clear error (tests/kernels/test_scan_api.py)
    dim, dstate, L = 4, 8, 5
    A = -torch.rand(dim, dstate, dtype=torch.complex64)
    out = mamba_ref(torch.randn(1, dim, L), torch.rand(1, dim, L), A, torch.randn(1, dstate, 2 * L),
                    torch.randn(1, dstate, 2 * L))
    assert out.shape == (1, dim, L)
