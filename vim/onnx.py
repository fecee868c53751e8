"""Export a Vim classifier (or its features) to ONNX, and check the file against PyTorch with onnxruntime.

    python tools/export_onnx.py --model vim_tiny_patch16_224 --pretrained --out vim_tiny.onnx
    python tools/export_onnx.py --model vim_small_patch16_224 --checkpoint vim_s_midclstok_80p5acc.pth \\
        --img-size 448 --out vim_small_448.onnx
    python tools/export_onnx.py --model vim_tiny_patch16_224 --features --out vim_tiny_features.onnx

The model is traced with torch.export on CPU with the reference scan; each layer's scan op is then rewritten as a
token loop (vim.kernels.export_decompositions) that the ONNX exporter turns into an ONNX ``Scan``. The batch size is
dynamic; the image size is fixed at export (``--img-size``, default the model's). ``--features``: the graph returns
``forward_features`` (batch, tokens, dim) instead of logits. The file is written atomically, and (when onnxruntime is
installed) run on a random batch of 2 and compared with the PyTorch model in fp32: the maximum difference relative
to the output's scale is printed and must stay below ``--tolerance``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vim.eval.model import create_model
from vim.kernels import export_decompositions
from vim.kernels.interface import ENV_VAR
from vim.utils import atomic_write, environ_set


class _Features(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='vim_tiny_patch16_224', help='timm model name[.tag] (default: %(default)s)')
    weights = p.add_mutually_exclusive_group()
    weights.add_argument('--pretrained', action='store_true', help="the model tag's pretrained weights")
    weights.add_argument('--checkpoint', default='', help='weights file (official .pth, state dict, safetensors)')
    p.add_argument('--num-classes', type=int, default=None, help="classifier size (default: the checkpoint's)")
    p.add_argument('--img-size', type=int, nargs='+', default=None, metavar='PX',
                   help='input size: one value (square) or H W (default: the model config)')
    p.add_argument('--features', action='store_true', help='export forward_features instead of the classifier')
    p.add_argument('--out', type=Path, required=True, help='output .onnx path')
    p.add_argument('--no-check', action='store_true', help='skip the onnxruntime comparison')
    p.add_argument('--tolerance', type=float, default=1e-4, help='max |onnx - torch| / max |torch| (fp32)')
    args = p.parse_args(argv)
    if args.img_size is not None and len(args.img_size) not in (1, 2):
        p.error('--img-size takes one value or two (H W)')
    return args


def export(model: torch.nn.Module, example: torch.Tensor) -> torch.onnx.ONNXProgram:
    """ONNX program of ``model`` (eval, CPU) for inputs shaped like ``example`` with any batch size."""
    # Dynamo caches what it traced of the scan's loop body in this process; a body traced before with a static batch
    # would pin the batch size of this export (seen with torch 2.14): start from a clean cache.
    torch._dynamo.reset()
    batch = torch.export.Dim('batch', min=1)
    exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    exported = exported.run_decompositions(export_decompositions())
    return torch.onnx.export(exported, (example,), dynamo=True, input_names=['images'],
                             output_names=['features' if isinstance(model, _Features) else 'logits'])


def check(path: Path, model: torch.nn.Module, example: torch.Tensor) -> float:
    """Max |onnxruntime - torch| relative to max |torch| on ``example``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (actual,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    with torch.no_grad():
        expected = model(example)
    return float((torch.from_numpy(actual) - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def reference_backend():
    """The reference ops while tracing: those the decompositions rewrite (the Triton ops are CUDA-only)."""
    return environ_set(ENV_VAR, 'reference')


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = None if args.img_size is None else (args.img_size * 2)[:2]
    model = create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                         num_classes=args.num_classes, img_size=size).eval().requires_grad_(False)
    height, width = model.patch_embed.img_size
    if args.features:
        model = _Features(model).eval()
    example = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    with reference_backend():
        program = export(model, example)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: program.save(str(tmp)))
    print(f'wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB): images (batch, 3, {height}, {width})')
    if args.no_check:
        return 0
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print('onnxruntime is not installed: the file was not checked (pip install onnxruntime)')
        return 0
    with reference_backend():
        error = check(args.out, model, example)
    print(f'onnxruntime vs PyTorch: max relative difference {error:.2e} (tolerance {args.tolerance:g})')
    if not error <= args.tolerance:
        print(f'error: the ONNX model differs from PyTorch by {error:.2e}', file=sys.stderr)
        return 1
    return 0
