#!/usr/bin/env python
"""Install the OpenMMLab stack (mmengine, mmcv with compiled ops, mmdet, mmseg) into the running interpreter's env.

Usage (the Makefile's `install-mm` target does this with the project venv)::

    .venv/bin/python tools/install_mm.py           # idempotent: a no-op when the pinned stack already imports
    .venv/bin/python tools/install_mm.py --force   # reinstall (the cached mmcv wheel is reused)
    .venv/bin/python tools/install_mm.py --rebuild # rebuild the mmcv wheel even if one is cached

Why a script: mmcv 2.1.0 (the newest release mmdet 3.3.0 and mmseg 1.2.2 accept) ships as a source distribution
only, and building it against a recent torch needs fixes that pip cannot express:

* its setup.py imports ``pkg_resources``, which setuptools >= 81 no longer ships, and it must be built without
  build isolation (it imports torch), so an old setuptools is put on PYTHONPATH for the build only;
* it forces ``-std=c++14/17`` while torch >= 2.10's headers require C++20 (detected from torch's own headers);
* ninja is added so the ~120 op files compile in parallel (MAX_JOBS = number of CPUs), without debug info (-g0);
* its requirement on opencv is made deterministic (opencv-python, which mmengine requires anyway).

The built wheel is cached under ``~/.cache/vim-backbones/wheels/<key>/`` (``$VIM_MM_CACHE`` overrides the root)
keyed by mmcv, python and torch versions and the op flavour, so only the first run on a machine pays for the build
(CPU ops: ~22 CPU-minutes, i.e. 12-25 min on 2 cores depending on what else runs).

Op flavour: CUDA ops are built when torch has CUDA, a GPU is visible and nvcc is found (mmcv's own rule); otherwise
CPU ops. ``VIM_MMCV_CUDA=1`` forces CUDA ops (e.g. a GPU-less build box with the toolkit), ``VIM_MMCV_CUDA=0`` forces
CPU ops. A toolkit alone does not select CUDA ops: without a GPU, nvcc would compile mmcv's ~60 .cu files for every
architecture torch targets, many times the CPU build, for ops nothing here could run.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

MMCV = "2.1.0"
# Everything the stack needs that is not already a dependency of vim-backbones, pinned where a newer release breaks
# it: mmdet 3.3.0 / mmseg 1.2.2 accept only mmcv < 2.2.0; mmengine 0.10.x is the line they were released against.
PINS = [
    "mmengine==0.10.7",
    "mmdet==3.3.0",
    "mmsegmentation==1.2.2",
    "opencv-python>=4.8,<5",  # mmengine requires opencv-python (not -headless); 5.x is newer than this stack
    "pycocotools>=2.0.7",
    "ftfy",
    "regex",
    "setuptools>=69,<81",  # mmengine resolves `mmdet::`/`mmseg::` config scopes with pkg_resources
]
BUILD_TOOLS = ["setuptools>=69,<81", "ninja"]  # setuptools 81 dropped pkg_resources, which mmcv's setup.py imports
CACHE_ROOT = Path(os.environ.get("VIM_MM_CACHE", Path.home() / ".cache" / "vim-backbones"))


def log(msg: str) -> None:
    print(f"[install_mm] {msg}", flush=True)


def pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log(" ".join(cmd))
    subprocess.run(cmd, check=True, env=env)


def stack_ok(cuda: bool) -> bool:
    """True when the pinned stack is installed and mmcv's compiled ops (with CUDA if ``cuda``) load."""
    pinned = {"mmcv": MMCV}
    for spec in PINS:
        name, sep, version = spec.partition("==")
        if sep:
            pinned[name] = version
    try:
        if any(md.version(name) != version for name, version in pinned.items()):
            return False
    except md.PackageNotFoundError:
        return False
    probe = ("import mmdet.models, mmseg.models; from mmcv.ops import nms, roi_align, get_compiling_cuda_version; "
             "print(get_compiling_cuda_version())")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return False
    has_cuda = result.stdout.strip().splitlines()[-1] != "not available"
    return has_cuda or not cuda


def want_cuda_ops() -> bool:
    forced = os.environ.get("VIM_MMCV_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        log("WARNING: a GPU is visible but no CUDA toolkit (nvcc) was found: building CPU ops only")
        return False
    return True


def wheel_key(cuda: bool) -> str:
    import torch

    flavour = f"cu{torch.version.cuda.replace('.', '')}" if cuda else "cpu"
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    torch_ver = re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)
    return f"mmcv-{MMCV}_{py}_{platform.machine()}_torch-{torch_ver}_{flavour}"


def torch_needs_cxx20() -> bool:
    import torch

    header = Path(torch.__file__).parent / "include" / "torch" / "csrc" / "api" / "include" / "torch" / "all.h"
    return header.is_file() and "C++20" in header.read_text(errors="ignore")


def build_mmcv_wheel(dest: Path, cuda: bool) -> Path:
    """Download mmcv's sdist, patch its setup.py and build a wheel into `dest`. Returns the wheel path."""
    work = Path(tempfile.mkdtemp(prefix="mmcv-build-"))
    try:
        tools = work / "buildtools"
        pip("install", "--quiet", "--target", str(tools), *BUILD_TOOLS)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(tools), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PATH"] = os.pathsep.join([str(tools / "bin"), env.get("PATH", "")])
        # `pip download` prepares metadata by running setup.py, which imports torch: no isolation, old setuptools.
        pip("download", f"mmcv=={MMCV}", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
            "-d", str(work), env=env)
        sdist = work / f"mmcv-{MMCV}.tar.gz"
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = work / f"mmcv-{MMCV}"
        setup_py = src / "setup.py"
        text = setup_py.read_text()
        # mmcv picks opencv-python-headless as its requirement when that happens to be installed at build time;
        # mmengine needs opencv-python anyway, so make the wheel's metadata not depend on the build machine.
        text = text.replace("('opencv-python-headless>=3',", "('opencv-python>=3',")
        if torch_needs_cxx20():
            text = re.sub(r"([-/])std[=:]c\+\+1[47]", r"\1std=c++20", text)
        setup_py.write_text(text)

        env["MMCV_WITH_OPS"] = "1"
        # Python's own CFLAGS carry -g: debug info more than doubles the compile time of mmcv's template-heavy ops.
        env["CFLAGS"] = (env.get("CFLAGS", "") + " -g0").strip()
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
        if cuda:
            env["FORCE_CUDA"] = "1"
        else:
            env.pop("FORCE_CUDA", None)
            env["CUDA_VISIBLE_DEVICES"] = ""  # a visible GPU would otherwise switch setup.py to CUDA ops
        t0 = time.time()
        log(f"building mmcv {MMCV} with {'CUDA' if cuda else 'CPU'} ops, MAX_JOBS={env['MAX_JOBS']} (slow)")
        out = work / "wheel"
        pip("wheel", "--no-build-isolation", "--no-deps", "-w", str(out), str(src), env=env)
        wheel = next(out.glob("mmcv-*.whl"))
        log(f"built {wheel.name} in {(time.time() - t0) / 60:.1f} min")
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / (wheel.name + ".partial")
        shutil.copy2(wheel, tmp)
        final = dest / wheel.name
        os.replace(tmp, final)  # atomic: an interrupted copy never looks like a cached wheel
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="reinstall even if the stack already imports")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the mmcv wheel even if one is cached")
    args = parser.parse_args()

    t0 = time.time()
    cuda = want_cuda_ops()
    if not (args.force or args.rebuild) and stack_ok(cuda):
        log(f"mm stack already installed (mmcv {'CUDA' if cuda else 'CPU'} ops load); nothing to do")
        return 0

    cache = CACHE_ROOT / "wheels" / wheel_key(cuda)
    wheels = sorted(cache.glob("mmcv-*.whl")) if cache.is_dir() else []
    if wheels and not args.rebuild:
        wheel = wheels[-1]
        log(f"using cached wheel {wheel}")
    else:
        wheel = build_mmcv_wheel(cache, cuda)
    pip("install", "--quiet", "--force-reinstall", "--no-deps", str(wheel))
    pip("install", "--quiet", str(wheel), *PINS)
    if not stack_ok(cuda):
        log("ERROR: the stack is installed but `import mmcv.ops, mmdet.models, mmseg.models` fails")
        return 1
    log(f"done in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
