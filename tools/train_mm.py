#!/usr/bin/env python
"""Train a detector or segmentor from an mmdet / mmseg config (configs/mmdet, configs/mmseg) with mmengine's Runner.

One GPU::

    python tools/train_mm.py configs/mmseg/upernet_vim-tiny_4xb4-160k_ade20k-512x512.py --amp --data-root DIR

Several GPUs or nodes, through torchrun (per-GPU batch from the config; the name's "4xb4" is 4 GPUs x 4)::

    torchrun --nproc-per-node 4 tools/train_mm.py CONFIG --launcher pytorch
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 tools/train_mm.py CONFIG --launcher pytorch

Resume the latest checkpoint of the work dir with ``--resume`` (or a given one with ``--resume PATH``); a quick run
at another resolution with ``--img-size 256``. The same command is installed as ``vim-train-mm``
(:func:`vim.mm.cli.train_main`).
"""
from vim.mm.cli import train_main

if __name__ == '__main__':
    train_main()
