"""Where init_cfg checkpoints come from (file, timm tag, hf-hub name, URL) and our own safetensors layout."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

pytest.importorskip('mmengine', reason='the mm stack is installed by `make install-mm`')

from vim.mm import VimBackbone, resolve_checkpoint  # noqa: E402
from vim.mm import pretrained as pretrained_mod  # noqa: E402


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    calls = []

    def download(repo_id, filename):
        calls.append((repo_id, filename))
        return tmp_path / filename

    monkeypatch.setattr(pretrained_mod, '_hub_download', download)
    return calls


@pytest.mark.parametrize('name, expected', [
    ('vim_tiny_patch16_224.in1k', ('hustvl/Vim-tiny-midclstok', 'vim_t_midclstok_76p1acc.pth')),
    ('timm:vim_small_patch16_stride8_224.in1k', ('hustvl/Vim-small-midclstok', 'vim_s_midclstok_ft_81p6acc.pth')),
    ('hf-hub:hustvl/Vim-base-midclstok/vim_b_midclstok_81p9acc.pth',
     ('hustvl/Vim-base-midclstok', 'vim_b_midclstok_81p9acc.pth')),
])
def test_hub_names_resolve_to_the_released_files(fake_hub, name, expected):
    path = resolve_checkpoint(name)
    assert fake_hub == [expected] and path.name == expected[1]


def test_local_files_and_errors(tmp_path, fake_hub):
    f = tmp_path / 'w.pth'
    f.write_bytes(b'')
    assert resolve_checkpoint(str(f)) == f
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(str(tmp_path / 'missing.pth'))
    with pytest.raises(ValueError):
        resolve_checkpoint('hf-hub:no-filename')
    assert fake_hub == []


def test_own_safetensors_export_into_a_backbone(tmp_path):
    """Our layout, as saved from a timm model at 224²: loads into a 128² backbone, pos_embed resampled."""
    from safetensors.torch import save_file

    arch = dict(embed_dim=32, depth=2, d_state=4)
    src = timm.create_model('vim_tiny_patch16_224', num_classes=10, **arch)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / 'own.safetensors'))
    backbone = VimBackbone(arch=arch, img_size=128, out_indices=(1,), final_norm=True,
                           init_cfg=dict(type='Pretrained', checkpoint=str(Path(tmp_path / 'own.safetensors'))))
    backbone.init_weights()
    assert backbone.pos_embed.shape == (1, 65, 32)
    torch.testing.assert_close(backbone.pos_embed[:, 32], src.pos_embed[:, 98].detach(), rtol=0, atol=0)
    torch.testing.assert_close(backbone.layers[1].mixer.D, src.layers[1].mixer.D, rtol=0, atol=0)
    torch.testing.assert_close(backbone.norm.weight, src.norm.weight, rtol=0, atol=0)
