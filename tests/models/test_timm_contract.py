"""What timm's own model tests rely on, checked directly and fast (the full suite runs in tests/peers)."""
import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import vim  # noqa: F401


def test_pretrained_cfgs_tell_the_input_size():
    """fixed_input_size is True exactly when the model refuses other sizes (the default, as timm's ViTs)."""
    for name in timm.list_models(['vim_*', 'test_vim']):
        cfg = timm.get_pretrained_cfg(name)
        assert cfg.fixed_input_size
        model = timm.create_model(name, pretrained=False, device='meta')
        size = cfg.input_size[-1]
        assert model.patch_embed.img_size == (size, size)
        with pytest.raises(ValueError, match='does not match the model'):
            model(torch.empty(1, 3, size + model.patch_embed.stride[0], size, device='meta'))


def test_meta_device_then_materialised_equals_normal_build():
    """Built on the meta device with a dtype, moved to memory with to_empty, initialised with init_weights: the
    same parameters as a model built normally and initialised from the same seed, and no parameter left unset."""
    normal = timm.create_model('test_vim', dtype=torch.float64)
    meta = timm.create_model('test_vim', device='meta', dtype=torch.float64)
    assert {(p.device.type, p.dtype) for p in meta.parameters()} == {('meta', torch.float64)}
    meta = meta.to_empty(device='cpu')
    with torch.no_grad():
        for p in meta.parameters():
            p.fill_(float('nan'))  # a parameter init_weights forgot would stay NaN
    torch.manual_seed(1)
    meta.init_weights()
    torch.manual_seed(1)
    normal.init_weights()
    normal_state, meta_state = normal.state_dict(), meta.state_dict()
    assert normal_state.keys() == meta_state.keys()
    for name, value in normal_state.items():
        assert value.dtype == torch.float64, name
        torch.testing.assert_close(meta_state[name], value, rtol=0, atol=0, msg=name)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(meta.eval()(x), normal.eval()(x), rtol=0, atol=0)


def test_factory_kwargs_reach_every_module():
    model = timm.create_model('test_vim', device='meta', dtype=torch.bfloat16)
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.device.type == 'meta' and t.dtype == torch.bfloat16 for t in tensors)
    model.eval().reset_classifier(5)
    assert model.head.weight.device.type == 'meta' and model.head.weight.dtype == torch.bfloat16
    assert not model.head.training


def test_fx_feature_extraction_follows_the_input_size():
    """torchvision's FX feature extractor with timm's notrace registry: the traced graph keeps the shape-dependent
    code (token grid, middle class token, position-embedding resampling) as calls, so it is right at any size."""
    model = timm.create_model('test_vim', dynamic_img_size=True).eval()
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    assert 'layers.1.mixer.out_proj' in eval_nodes and 'insert_cls_token_and_pos_embed' in eval_nodes
    extractor = create_feature_extractor(
        model, return_nodes={'norm': 'tokens', 'head': 'logits'}, tracer_kwargs=tracer_kwargs).eval()
    with torch.no_grad():
        for size in [(64, 64), (48, 80)]:  # the default grid and one that resamples the position embedding
            x = torch.randn(2, 3, *size)
            out = extractor(x)
            torch.testing.assert_close(out['logits'], model(x), rtol=0, atol=0)
            torch.testing.assert_close(out['tokens'], model.forward_features(x), rtol=0, atol=0)


def test_timm_fx_feature_extractor():
    """timm's own wrapper (which applies its notrace registry itself) traces the model too."""
    model = timm.create_model('test_vim', dynamic_img_size=True).eval()
    extractor = timm.models.create_feature_extractor(model, return_nodes={'layers.2.mixer.out_proj': 'mixed'})
    x = torch.randn(1, 3, 48, 56)
    captured = {}
    model.layers[2].mixer.out_proj.register_forward_hook(lambda m, i, o: captured.setdefault('mixed', o))
    with torch.no_grad():
        model(x)
        torch.testing.assert_close(extractor(x)['mixed'], captured['mixed'], rtol=0, atol=0)


def test_fx_trace_still_checks_inputs():
    model = timm.create_model('test_vim').eval()
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    extractor = create_feature_extractor(model, return_nodes=['head'], tracer_kwargs=tracer_kwargs)
    with pytest.raises(ValueError, match='does not match the model'):
        extractor(torch.randn(1, 3, 72, 64))
