"""The timm contract of every registered Vim model, and parity with the official forward pass."""
import importlib.util

import pytest
import timm
import torch

import vim  # noqa: F401  (registers the models)
from tests.models.official_forward import official_forward
from vim.models import VisionMamba, vim_to_official

VIM_MODELS = timm.list_models('vim_*')
# parameter counts of the released models (shared/ANCHORS.md)
OFFICIAL_PARAMS = {'vim_tiny_patch16_224': 7_148_008, 'vim_small_patch16_224': 25_796_584,
                   'vim_base_patch16_224': 97_598_440}


def test_registry_lists_all_variants():
    assert set(VIM_MODELS) == {
        'vim_tiny_patch16_224', 'vim_small_patch16_224', 'vim_base_patch16_224',
        'vim_tiny_patch16_stride8_224', 'vim_small_patch16_stride8_224'}
    assert 'test_vim' in timm.list_models('test_vim')
    assert set(timm.list_pretrained('vim_*')) == {f'{m}.in1k' for m in VIM_MODELS}


@pytest.mark.parametrize('name', sorted(OFFICIAL_PARAMS))
def test_parameter_count_matches_official(name):
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize('name', VIM_MODELS)
def test_every_model_builds_and_runs(name):
    """Full width, depth cut to 2 so that the 224 (and stride-8 730-token) forward stays fast on CPU."""
    model = timm.create_model(name, depth=2, num_classes=7).eval()
    cfg = model.pretrained_cfg
    assert cfg['hf_hub_id'].startswith('hustvl/Vim-') and cfg['hf_hub_filename'].endswith('.pth')
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = model.forward_features(x)
        logits = model.forward_head(tokens)
    grid = model.patch_embed.grid_size
    assert tokens.shape == (1, grid[0] * grid[1] + 1, model.num_features)
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()
    assert grid == ((14, 14) if model.patch_embed.stride[0] == 16 else (27, 27))

    # official layout round trip (timm re-initialises a classifier of another class count, so compare features),
    # intermediates and features_only for every variant
    other = timm.create_model(name, depth=2, num_classes=7, pretrained=True,
                              pretrained_cfg_overlay=dict(state_dict=vim_to_official(model.state_dict()))).eval()
    with torch.no_grad():
        torch.testing.assert_close(other.forward_features(x), tokens, rtol=0, atol=0)
        maps = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert [m.shape for m in maps] == [(1, model.num_features, *grid)] * 2
    features = timm.create_model(name, depth=2, features_only=True, out_indices=(1,)).eval()
    with torch.no_grad():
        assert features(x)[0].shape == (1, model.num_features, *grid)


def test_forward_at_other_resolutions_and_non_square():
    model = timm.create_model('test_vim', dynamic_img_size=True).eval()
    with torch.no_grad():
        for size in [(64, 64), (96, 96), (48, 80), (8, 8)]:
            out = model.forward_features(torch.randn(2, 3, *size))
            assert out.shape == (2, (size[0] // 8) * (size[1] // 8) + 1, 32)
    big = timm.create_model('vim_tiny_patch16_224', depth=1, dynamic_img_size=True).eval()
    with torch.no_grad():
        out = big.forward_intermediates(torch.randn(1, 3, 1248, 832), intermediates_only=True)
    assert out[0].shape == (1, 192, 78, 52)


def test_forward_intermediates_and_features_only():
    model = timm.create_model('test_vim').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[0, 2])
        ref = model.forward_features(x)
        inter_nlc = model.forward_intermediates(x, indices=2, output_fmt='NLC', intermediates_only=True)
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
        with_cls = model.forward_intermediates(x, indices=[3], return_prefix_tokens=True, intermediates_only=True)
    torch.testing.assert_close(final, ref)
    assert [t.shape for t in inter] == [(2, 32, 8, 8)] * 2
    assert [t.shape for t in inter_nlc] == [(2, 64, 32)] * 2
    # the last layer's normalised map is forward_features without its middle class token
    mid = 32
    expected = torch.cat([ref[:, :mid], ref[:, mid + 1:]], dim=1).transpose(1, 2).reshape(2, 32, 8, 8)
    torch.testing.assert_close(normed[0], expected)
    assert with_cls[0][1].shape == (2, 1, 32)

    feats = timm.create_model('test_vim', features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        maps = feats(x)
    assert [m.shape for m in maps] == [(2, 32, 8, 8)] * 2
    assert feats.feature_info.channels() == [32, 32] and feats.feature_info.reduction() == [8, 8]
    assert len(feats.model.layers) == 4  # pruned after the last requested layer (index 3 keeps all)
    pruned = timm.create_model('test_vim', features_only=True, out_indices=(1,))
    assert len(pruned.model.layers) == 2


def test_global_pool_and_head():
    model = timm.create_model('test_vim', global_pool='avg', num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
    torch.testing.assert_close(pooled, torch.cat([tokens[:, :32], tokens[:, 33:]], 1).mean(1))
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, 32)
    model.reset_classifier(3, 'token')
    with torch.no_grad():
        assert model(x).shape == (2, 3)
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(3, 'max')


def test_state_dict_round_trip_through_official_layout():
    model = timm.create_model('test_vim').eval()
    official = vim_to_official(model.state_dict())
    assert 'layers.0.mixer.A_b_log' in official and 'norm_f.weight' in official
    assert official['layers.0.mixer.conv1d_b.weight'].shape == (64, 1, 4)
    other = timm.create_model('test_vim', pretrained=True, pretrained_cfg_overlay=dict(state_dict=official)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize('stride', [8, 4])
def test_numerical_parity_with_official_forward(stride):
    """Our model on converted weights == an independent float64 transcription of the official forward."""
    model = VisionMamba(img_size=32, patch_size=8, stride=stride, embed_dim=16, depth=3, d_state=4, num_classes=6)
    model = model.double().eval()
    with torch.no_grad():  # move the class token away from zero so that a misplaced row would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    official = vim_to_official(model.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
    ref = official_forward(official, x, depth=3, stride=stride, d_state=4)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_set_input_size_resamples_pos_embed():
    model = timm.create_model('test_vim').eval()
    cls_row = model.pos_embed[0, 32].clone()
    model.set_input_size((96, 64))
    assert model.patch_embed.grid_size == (12, 8) and model.pos_embed.shape == (1, 97, 32)
    torch.testing.assert_close(model.pos_embed[0, 48], cls_row)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 64)).shape == (1, 1000)


def test_no_weight_decay_and_group_matcher():
    from timm.models import group_parameters
    from timm.optim import create_optimizer_v2

    model = timm.create_model('test_vim')
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g['weight_decay'] == 0.0 for p in g['params']}
    named = dict(model.named_parameters())
    for name in ('pos_embed', 'cls_token', 'layers.1.mixer.D', 'layers.1.mixer.conv_bias',
                 'layers.1.mixer.dt_proj_bias', 'layers.1.norm.weight', 'head.bias'):
        assert id(named[name]) in no_decay, name
    for name in ('layers.1.mixer.in_proj.weight', 'layers.1.mixer.A_log', 'head.weight'):
        assert id(named[name]) not in no_decay, name
    groups = group_parameters(model, model.group_matcher())
    assert len(groups) == 1 + 4 + 1  # stem, four blocks, final norm


def test_gradient_checkpointing_gives_same_gradients():
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = timm.create_model('test_vim', num_classes=3)
        model.set_grad_checkpointing(ckpt)
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


def test_bad_input_errors():
    model = timm.create_model('test_vim').eval()
    with pytest.raises(ValueError, match='dynamic_img_size=True'):
        model(torch.randn(1, 3, 72, 64))
    with pytest.raises(ValueError, match=r'\(batch, 3, H, W\)'):
        model(torch.randn(1, 1, 64, 64))
    dyn = timm.create_model('test_vim', dynamic_img_size=True).eval()
    with pytest.raises(ValueError, match='does not tile'):
        dyn(torch.randn(1, 3, 70, 64))
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('vim_tiny_patch16_225')


def test_bf16_autocast_and_bf16_model_agree_with_fp32():
    model = timm.create_model('test_vim').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            amp = model(x)
        cast = timm.create_model('test_vim').eval()
        cast.load_state_dict(model.state_dict())
        cast = cast.bfloat16()
        low = cast(x.bfloat16())
        maps = cast.forward_intermediates(x.bfloat16(), indices=[1], norm=True, intermediates_only=True)
    tol = 8 * torch.finfo(torch.bfloat16).eps * ref.abs().max().item()  # a few bf16 roundings per layer
    for out in (amp, low):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=tol)
    assert maps[0].dtype == torch.bfloat16 and torch.isfinite(maps[0].float()).all()


@pytest.mark.parametrize('batch, seqlen', [(1, 7), (2, 5), (1, 1)])
def test_ssm_projections_token_major_and_channel_major_agree(batch, seqlen):
    """The mixer's x_proj (and the dt_proj after it) runs token-major for a token-major u, one GEMM a branch for a
    direction-major one (the Triton conv's output), batched over (batch, branch) for the CPU conv's, and
    channel-major otherwise (the reference conv's): the same dt, B, C and delta every way, in float64."""
    from vim.kernels.reference import delta_from_low_rank

    from vim.layers.mixer import ssm_projections

    g = torch.Generator().manual_seed(0)
    d, r, n = 24, 3, 4
    u_tok = torch.randn(batch, 2, seqlen, d, generator=g, dtype=torch.float64).transpose(2, 3)
    x_w = torch.randn(2, r + 2 * n, d, generator=g, dtype=torch.float64)
    dt_w = torch.randn(2, d, r, generator=g, dtype=torch.float64)
    u_dir = u_tok.permute(1, 0, 3, 2).contiguous().permute(1, 0, 3, 2)  # (2, batch, seqlen, d) memory
    chan = ssm_projections(u_tok.contiguous(), x_w, r, n)
    chan = (*chan, delta_from_low_rank(chan[0], dt_w))
    expected = torch.einsum('gkd,bgdl->bgkl', x_w, u_tok)
    torch.testing.assert_close(chan[3], torch.einsum('gdr,bgrl->bgdl', dt_w, expected[:, :, :r]))
    for u in (u_tok, u_dir):
        tok = ssm_projections(u, x_w, r, n)
        tok = (*tok, delta_from_low_rank(tok[0], dt_w))
        if seqlen > 1:
            assert tok[0].stride(-2) == 1 and tok[3].stride(-2) == 1  # token-major: no copy in the CPU scan
            if u is u_dir:  # one GEMM a branch: direction-major results
                assert tok[3].permute(1, 0, 3, 2).is_contiguous() and tok[1].stride(1) == batch * tok[1].stride(0)
        for a, b in zip(tok, chan):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_mixer_backward_hands_in_proj_one_contiguous_gradient(monkeypatch):
    """x and z come from one split of in_proj's output, whose backward concatenates their gradients in in_proj's
    (batch, seqlen, 2 d_inner) layout: one pass, and a gradient the matmul reads as it is. Two slices of the
    transposed output each zero-filled a whole-size gradient, copied into it and added the two, and left a
    transposed gradient that in_proj's backward copies again."""
    from vim.layers import BidirectionalMamba
    monkeypatch.setenv('VIM_SCAN_BACKEND', 'reference')
    mixer = BidirectionalMamba(8)
    seen = []

    def keep_grad(module, args, output):
        output.register_hook(lambda g: seen.append(g))
    mixer.in_proj.register_forward_hook(keep_grad)
    out = mixer(torch.randn(2, 5, 8))
    out.backward(torch.randn_like(out))
    assert len(seen) == 1 and seen[0].shape == (2, 5, 2 * mixer.d_inner) and seen[0].is_contiguous()


@pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='triton not installed')
def test_mixer_on_triton_copies_no_activation(monkeypatch):
    """On the Triton ops every per-branch activation is direction-major (2, batch, seqlen, channels): the conv's u,
    x_proj's output, delta, and the gradients the backward writes, so that x_proj and dt_proj run one GEMM a branch
    on their inputs in place and the gradients come back in the layouts their views need. A matmul batched over
    (batch, branch) copied u whole (and the weights expanded to the batch) in every forward; a gradient in another
    layout than its view's costs a copy in the backward. No copy here may scale with batch x tokens."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vim.layers import BidirectionalMamba

    copies = (torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten._to_copy, torch.ops.aten.contiguous)

    class LargeCopies(TorchDispatchMode):
        def __init__(self, limit):
            super().__init__()
            self.limit, self.seen = limit, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in copies:
                n = max(a.numel() for a in args if isinstance(a, torch.Tensor))
                if n >= self.limit:
                    self.seen.append((str(func), n))
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv('VIM_SCAN_BACKEND', 'triton')
    device = 'cuda' if torch.cuda.is_available() else 'cpu'  # the Triton interpreter on CPU (tests/conftest.py)
    mixer = BidirectionalMamba(4, d_state=2).to(device)
    batch, seqlen = 8, 11  # batch x tokens above every weight's size: only activations reach the limit
    assert batch * seqlen > max(p.numel() for p in mixer.parameters())
    hidden = torch.randn(batch, seqlen, 4, device=device, requires_grad=True)
    with LargeCopies(batch * seqlen) as forward:
        out = mixer(hidden)
    with LargeCopies(batch * seqlen) as backward:
        out.backward(torch.randn_like(out))
    assert forward.seen == [] and backward.seen == []
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
