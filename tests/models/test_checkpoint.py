"""Loading checkpoints as users have them: official training pickles, state dicts, safetensors, other sizes."""
import argparse
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vim  # noqa: F401
from vim.models import CheckpointError, load_checkpoint_file, resample_pos_embed, vim_to_official

REPO = Path(__file__).resolve().parents[2]


def _official_training_pickle(path, model, ema_model):
    """A file shaped like the released ones: model, model_ema, optimizer, epoch and an argparse.Namespace."""
    torch.save({
        'model': vim_to_official(model.state_dict()),
        'model_ema': vim_to_official(ema_model.state_dict()),
        'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-3, 'params': [0, 1]}]},
        'epoch': 299,
        'args': argparse.Namespace(model='vim_tiny', lr=5e-4, batch_size=128, no_amp=True),
    }, path)


def _load(path, **kwargs):
    return timm.create_model('test_vim', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


def test_official_training_pickle_takes_model_not_ema(tmp_path):
    model, ema = timm.create_model('test_vim').eval(), timm.create_model('test_vim').eval()
    path = tmp_path / 'vim_t_midclstok_76p1acc.pth'
    _official_training_pickle(path, model, ema)
    with pytest.raises(pickle.UnpicklingError):  # plain torch.load refuses the Namespace: why the allow-list
        torch.load(path, weights_only=True)
    loaded = _load(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        assert not torch.allclose(loaded(x), ema(x))


def test_arbitrary_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    path = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'payload': Evil()}, path)
    with pytest.raises(CheckpointError, match='allow-list'):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_plain_state_dict_and_safetensors(tmp_path):
    model = timm.create_model('test_vim').eval()
    torch.save(vim_to_official(model.state_dict()), tmp_path / 'official_sd.pth')
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / 'ours.safetensors'))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        for name in ('official_sd.pth', 'ours.safetensors'):
            torch.testing.assert_close(_load(tmp_path / name)(x), ref, rtol=0, atol=0, msg=name)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = vim_to_official(timm.create_model('test_vim').state_dict())
    del sd['layers.2.mixer.A_b_log']
    sd['layers.2.mixer.extra_thing'] = torch.zeros(3)
    torch.save(sd, tmp_path / 'broken.pth')
    with pytest.raises(CheckpointError) as err:
        _load(tmp_path / 'broken.pth')
    msg = str(err.value)
    assert 'unexpected' in msg and 'layers.2.mixer.extra_thing' in msg
    assert 'missing' in msg and 'layers.2.mixer.A_log' in msg


def test_wrong_variant_names_the_shapes(tmp_path):
    wide = timm.create_model('test_vim', embed_dim=48)
    torch.save({'model': vim_to_official(wide.state_dict())}, tmp_path / 'wide.pth')
    with pytest.raises(CheckpointError) as err:
        _load(tmp_path / 'wide.pth')
    assert 'shape mismatch' in str(err.value)
    assert 'layers.0.mixer.in_proj.weight: checkpoint (192, 48) vs model (128, 32)' in str(err.value)


def _hand_resample(pos, old_grid, new_grid, antialias=False):
    """Patch rows (class row at index M // 2 removed) resized as an image with plain ``F.interpolate`` (bicubic,
    align_corners=False: the official DeiT/Vim fine-tuning code; ``antialias=True``: timm's default); class row
    re-inserted at the new M' // 2."""
    m = old_grid[0] * old_grid[1]
    cls = pos[:, m // 2]
    patches = torch.cat([pos[:, :m // 2], pos[:, m // 2 + 1:]], 1)
    img = patches.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=new_grid, mode='bicubic', antialias=antialias, align_corners=False)
    patches = img.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1)
    n = new_grid[0] * new_grid[1]
    return torch.cat([patches[:, :n // 2], cls[:, None], patches[:, n // 2:]], 1)


def _sincos_pos_embed(grid, dim):
    """A smooth (1, M + 1, dim) table like a trained one (2-D sin-cos), class row M // 2 set apart."""
    ys, xs = torch.meshgrid(torch.arange(grid[0], dtype=torch.float32), torch.arange(grid[1], dtype=torch.float32),
                            indexing='ij')
    freqs = 1.0 / 100.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    table = torch.cat([f(c.reshape(-1, 1) * freqs) for c in (ys, xs) for f in (torch.sin, torch.cos)], dim=1)
    m = grid[0] * grid[1]
    return torch.cat([table[:m // 2], torch.full((1, dim), 7.0), table[m // 2:]])[None]


@pytest.mark.parametrize('old_grid, new_grid', [
    ((14, 14), (24, 24)),  # ImageNet fine-tuning at 384²
    ((14, 14), (27, 27)),  # stride 16 -> 8 at 224² (the "finer granularity" fine-tune)
    ((14, 14), (64, 64)),  # detection at 1024²
    ((14, 14), (32, 20)),  # non-square
    ((27, 27), (12, 12)),  # down
])
def test_resample_is_the_official_plain_bicubic(old_grid, new_grid):
    """The resampling used for checkpoints at another size is plain bicubic (no antialias), not timm's default."""
    pos = _sincos_pos_embed(old_grid, 64)
    out = resample_pos_embed(pos, new_grid, old_grid)
    torch.testing.assert_close(out, _hand_resample(pos, old_grid, new_grid))
    assert out[0, new_grid[0] * new_grid[1] // 2].eq(7.0).all()  # the class row, carried over exactly
    # the two conventions really differ on this table (else the test above could not tell them apart)
    assert (out - _hand_resample(pos, old_grid, new_grid, antialias=True)).abs().max() > 1e-3


def test_resample_runs_on_timm_without_align_corners(monkeypatch):
    """timm before 1.0.31 (pyproject allows 1.0.21 on) has no ``align_corners`` in resample_abs_pos_embed: on the GPU
    machine's timm 1.0.29 passing it raised TypeError in feature extraction. The call passes only what 1.0.21 takes
    (the same arguments as 1.0.15's)."""
    from vim.models import checkpoint
    timm_1_0_31 = checkpoint.resample_abs_pos_embed

    def timm_1_0_21(posemb, new_size, old_size=None, num_prefix_tokens=1, interpolation='bicubic', antialias=True,
                    verbose=False):
        return timm_1_0_31(posemb, new_size, old_size, num_prefix_tokens, interpolation, antialias, verbose)
    monkeypatch.setattr(checkpoint, 'resample_abs_pos_embed', timm_1_0_21)
    pos = _sincos_pos_embed((14, 14), 64)
    torch.testing.assert_close(resample_pos_embed(pos, (24, 24), (14, 14)), _hand_resample(pos, (14, 14), (24, 24)))


@pytest.mark.parametrize('kwargs, grid', [
    (dict(img_size=96), (12, 12)),
    (dict(img_size=(96, 48)), (12, 6)),
    (dict(stride=4), (15, 15)),  # the stride-8 "finer granularity" fine-tune starts from a stride-16 checkpoint
])
def test_load_into_other_resolution_or_stride(tmp_path, kwargs, grid):
    src = timm.create_model('test_vim')
    _official_training_pickle(tmp_path / 'ckpt.pth', src, src)
    model = _load(tmp_path / 'ckpt.pth', **kwargs)
    assert model.patch_embed.grid_size == grid
    expected = _hand_resample(src.pos_embed.detach(), (8, 8), grid)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    torch.testing.assert_close(model.pos_embed[0, (grid[0] * grid[1]) // 2], src.pos_embed[0, 32].detach(),
                               rtol=0, atol=0)
    torch.testing.assert_close(resample_pos_embed(src.pos_embed.detach(), grid), expected)


def test_fine_tune_at_384_loads_the_official_resampling(tmp_path):
    """``create_model(..., img_size=384, pretrained=True)``: the 224² release resampled 14x14 -> 24x24, plainly."""
    src = timm.create_model('vim_tiny_patch16_224', depth=1)
    with torch.no_grad():
        src.pos_embed.copy_(_sincos_pos_embed((14, 14), 192))
    _official_training_pickle(tmp_path / 'ckpt.pth', src, src)
    model = timm.create_model('vim_tiny_patch16_224', depth=1, img_size=384, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'ckpt.pth')))
    torch.testing.assert_close(model.pos_embed.detach(), _hand_resample(src.pos_embed.detach(), (14, 14), (24, 24)))


def test_set_input_size_official_but_dynamic_forward_timm():
    """set_input_size (a new fixed size) resamples like a checkpoint load; a dynamic_img_size forward at another size
    resamples per input as timm's ViTs do (resample_abs_pos_embed's default, antialiased)."""
    model = timm.create_model('test_vim', dynamic_img_size=True).eval()
    with torch.no_grad():
        model.pos_embed.copy_(_sincos_pos_embed((8, 8), 32))
        model.cls_token.zero_()
    pos = model.pos_embed.detach().clone()
    with torch.no_grad():  # zero tokens: _pos_embed returns the position embedding it adds
        per_forward = model._pos_embed(torch.zeros(1, 12 * 6, 32), (12, 6))
    torch.testing.assert_close(per_forward, _hand_resample(pos, (8, 8), (12, 6), antialias=True))
    model.set_input_size((96, 48))
    torch.testing.assert_close(model.pos_embed.detach(), _hand_resample(pos, (8, 8), (12, 6)))


def test_other_num_classes_keeps_new_head(tmp_path):
    src = timm.create_model('test_vim')
    _official_training_pickle(tmp_path / 'ckpt.pth', src, src)
    model = _load(tmp_path / 'ckpt.pth', num_classes=10)
    assert model.head.weight.shape == (10, 32)
    torch.testing.assert_close(model.layers[1].mixer.A_log, src.layers[1].mixer.A_log)
    features = _load(tmp_path / 'ckpt.pth', features_only=True, out_indices=(3,))
    assert features(torch.randn(1, 3, 64, 64))[0].shape == (1, 32, 8, 8)


def test_convert_checkpoint_tool(tmp_path):
    src = timm.create_model('test_vim').eval()
    _official_training_pickle(tmp_path / 'official.pth', src, src)
    out = tmp_path / 'converted.safetensors'
    run = subprocess.run([sys.executable, str(REPO / 'tools' / 'convert_checkpoint.py'), str(tmp_path / 'official.pth'),
                          str(out), '--model', 'test_vim'], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(_load(out)(x), src(x), rtol=0, atol=0)
    bad = subprocess.run([sys.executable, str(REPO / 'tools' / 'convert_checkpoint.py'), str(tmp_path / 'nope.pth'),
                          str(tmp_path / 'x.safetensors'), '--model', 'test_vim'], capture_output=True, text=True)
    assert bad.returncode == 1 and 'not found' in bad.stderr
    assert not (tmp_path / 'x.safetensors').exists()


HUB_SCRIPT = '''
import timm, torch, vim
model = timm.create_model('{name}', pretrained=True, depth=2)
ref = torch.load('{ref}', weights_only=True)
print('MATCH' if torch.equal(model.layers[1].mixer.A_log, ref) else 'DIFFERENT')
'''


def test_pretrained_true_resolves_the_official_hub_file(tmp_path):
    """`pretrained=True` downloads hustvl's file with huggingface_hub and loads it with our safe loader.

    The download is served from a local hub cache laid out as huggingface_hub writes it (no network here)."""
    name = 'vim_tiny_patch16_224'
    cfg = timm.models.get_pretrained_cfg(name)
    src = timm.create_model(name, depth=2)
    snapshot = tmp_path / 'hub' / f'models--{cfg.hf_hub_id.replace("/", "--")}' / 'snapshots' / ('0' * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / 'refs').mkdir()
    (snapshot.parents[1] / 'refs' / 'main').write_text('0' * 40)
    _official_training_pickle(snapshot / cfg.hf_hub_filename, src, src)
    torch.save(src.layers[1].mixer.A_log.detach(), tmp_path / 'ref.pt')
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / 'hub'), HF_HUB_OFFLINE='1')
    run = subprocess.run([sys.executable, '-c', HUB_SCRIPT.format(name=name, ref=tmp_path / 'ref.pt')],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith('MATCH')
