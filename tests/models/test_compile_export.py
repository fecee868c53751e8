"""The reference scan is one opaque custom op: torch.compile sees no graph break, torch.export keeps it as a node,
and torch.utils.flop_counter counts it."""
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import vim  # noqa: F401


@pytest.fixture
def model_and_input():
    return timm.create_model('test_vim', num_classes=5), torch.randn(2, 3, 64, 64)


def test_torch_compile_has_no_graph_break_and_matches_eager(model_and_input):
    model, x = model_and_input
    explanation = torch._dynamo.explain(model.eval())(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, backend='aot_eager')  # traces forward and backward through the custom ops
    model.train()
    compiled(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)


def test_torch_export_keeps_the_scan_op(model_and_input):
    model, x = model_and_input
    model.eval()
    exported = torch.export.export(model, (x,))
    scan_nodes = [n for n in exported.graph.nodes if n.target == torch.ops.vim.selective_scan_fwd.default]
    assert len(scan_nodes) == len(model.layers)  # both directions of a layer run as one scan
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=0)


def test_flop_counter_sees_the_scan(model_and_input):
    model, x = model_and_input
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    counts = counter.get_flop_counts()['Global']
    mixer = model.layers[0].mixer
    tokens = model.patch_embed.num_patches + 1
    # 9 per (token, channel, state) for each of the two directions of every layer, batch 2
    expected = 9 * 2 * tokens * 2 * mixer.d_inner * mixer.d_state * len(model.layers)
    assert counts[torch.ops.vim.selective_scan_fwd] == expected
