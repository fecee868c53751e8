"""The model the extractor runs: weights from a file, the hub (with an offline fallback) or seeded random init."""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import timm
import torch

import vim  # noqa: F401  (registers the Vim models with timm)

__all__ = ['create_model', 'peak_memory', 'pretrained_source']


def create_model(name: str, pretrained: bool = True, checkpoint: str | Path | None = None
                 ) -> tuple[torch.nn.Module, str, str]:
    """The model in eval mode, a description of its weights, and a note when pretrained ones were unavailable.

    ``checkpoint``: official training pickle, state dict or .safetensors. Without weights the model is initialised
    from seed 0, so that a resumed run computes the same (meaningless) features; a warning says so.
    """
    kwargs = dict(dynamic_img_size=True)
    if checkpoint is not None:  # Vim's own loader reads official training pickles safely; others: timm's
        is_vim = timm.models.model_entrypoint(name).__module__.startswith('vim.')
        overlay = dict(file=str(checkpoint), **(dict(custom_load=True) if is_vim else {}))
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        return model.eval(), f'file:{Path(checkpoint).resolve()}', ''
    note = 'pretrained weights not requested'
    if pretrained:
        source, note = pretrained_source(name)
        if source is not None:
            try:
                model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=source, **kwargs)
                return model.eval(), f'pretrained:{name}', ''
            except Exception as e:  # e.g. the hub answered but the download failed
                note = f'loading the pretrained weights failed ({type(e).__name__}: {e})'
        print(f'WARNING: {note}. Continuing with RANDOM weights: the features will be meaningless.', file=sys.stderr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
    return model, 'random-init (seed 0)', note


def pretrained_source(name: str) -> tuple[dict | None, str]:
    """(pretrained_cfg overlay to load from, '') if the weights can be had now, else (None, why not).

    Checks the local Hugging Face cache first and the hub with a 3 s timeout, so that an offline machine falls
    back at once instead of waiting through timm's retries.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id, filename = (cfg.hf_hub_id, cfg.hf_hub_filename) if cfg else ('', '')
    if not hub_id:
        if cfg and (cfg.url or cfg.file):
            return {}, ''
        return None, f'{name} has no pretrained weights'
    import huggingface_hub
    filename = filename or 'model.safetensors'
    cached = huggingface_hub.try_to_load_from_cache(hub_id, filename)
    if isinstance(cached, str):
        return dict(file=cached), ''
    if os.environ.get('HF_HUB_OFFLINE', '0').lower() in ('1', 'true', 'yes', 'on'):
        return None, f'pretrained weights {hub_id}/{filename} are not cached and HF_HUB_OFFLINE is set'
    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(hub_id, filename), timeout=3)
    except Exception as e:
        return None, f'cannot download pretrained weights {hub_id}/{filename} ({type(e).__name__}: {e})'
    return {}, ''


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, what was measured): the GPU's peak allocation on CUDA, the process's max RSS elsewhere."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20, 'torch.cuda.max_memory_allocated'
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == 'darwin' else 2**10)
    return rss, 'max RSS of the process'
