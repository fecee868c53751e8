"""The guarded default: 'auto' runs the Triton kernels only after their self-check passed for the device and dtype.

Without CUDA the logic runs on CPU tensors: the 'cpu' device type is added to the guarded ones, and the check runs
either the real kernels through the Triton interpreter (one small case) or fakes that pass, fail, raise or run out
of resources, so that every branch is exercised in milliseconds.
"""
from __future__ import annotations

import types
import warnings

import pytest
import torch

pytest.importorskip('triton')

import vim.kernels.interface as interface  # noqa: E402
import vim.kernels.selfcheck as selfcheck  # noqa: E402
import vim.kernels.triton as triton_kernels  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402
from vim.kernels import (  # noqa: E402
    ScanBackendWarning,
    ScanShape,
    bidirectional_conv_silu,
    bidirectional_conv_silu_ref,
    bidirectional_scan,
    bidirectional_scan_ref,
    resolve_backend,
    warmup,
)
from vim.kernels.selfcheck import CheckCase, SelfCheckResult, case_inputs, run_triton_self_check  # noqa: E402
from vim.kernels.triton.common import INTERPRET  # noqa: E402

TINY = CheckCase(batch=1, dim=6, dstate=3, seqlen=9, width=4, layout='mixer')


@pytest.fixture
def guarded_cpu(monkeypatch):
    """Fresh dispatch state, with CPU tensors treated as CUDA ones are: 'auto' runs the self-check for them."""
    monkeypatch.setattr(interface, '_AUTO_CHOICE', {})
    monkeypatch.setattr(interface, '_WARNED', set())
    monkeypatch.setattr(interface, 'GUARDED_DEVICE_TYPES', ('cuda', 'cpu'))
    monkeypatch.setattr(selfcheck, 'CHECK_CASES', (TINY,))
    monkeypatch.delenv('VIM_SCAN_BACKEND', raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def fake_check(monkeypatch):
    """Replace the self-check by one that returns ``fake_check.result`` (or raises it; a callable: its result for
    the ops checked) and counts its calls; ``fake_check.ops`` records the ops each call checked."""
    state = types.SimpleNamespace(result=SelfCheckResult(True), calls=[], ops=[])

    def check(device, dtype, ops=selfcheck.OPS):
        state.calls.append((torch.device(device), dtype))
        state.ops.append(tuple(ops))
        result = state.result(tuple(ops)) if callable(state.result) else state.result
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(selfcheck, 'run_triton_self_check', check)
    return state


def _scan_args(dtype=torch.float32):
    return [a.detach() for a in case_inputs(TINY, dtype, torch.device('cpu'), seed=3)[0]]


def _scan_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ScanBackendWarning)]


@pytest.mark.skipif(not INTERPRET, reason='the CPU path of the check needs the Triton interpreter')
def test_real_check_passes_under_the_interpreter_and_runs_once(guarded_cpu, monkeypatch):
    calls = []
    real = selfcheck.run_triton_self_check

    def counted(device, dtype):
        result = real(device, dtype)
        calls.append(result)
        return result

    monkeypatch.setattr(selfcheck, 'run_triton_self_check', counted)
    originals = [k.configs for k in triton_kernels.AUTOTUNED_KERNELS]
    u = torch.zeros(1, 2, 4, 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        # the model's first call may come under inference mode and autocast: the check runs regardless
        with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
            assert resolve_backend(None, u) == 'triton'
        assert resolve_backend('auto', u) == 'triton'
    assert _scan_warnings(record) == []
    assert len(calls) == 1 and calls[0].ok, calls
    assert calls[0].configs_checked == sum(len(k) for k in originals)
    assert [k.configs for k in triton_kernels.AUTOTUNED_KERNELS] == originals  # restored, same objects
    assert all(a is b for a, b in zip((k.configs for k in triton_kernels.AUTOTUNED_KERNELS), originals))


class _FakeKernel:
    def __init__(self, name: str, configs: list[str]):
        self.fn = types.SimpleNamespace(__name__=name)
        self.configs = configs


def _fake_ops(monkeypatch, kernels, scan_hook=lambda pins, y: y):
    """Replace the Triton ops by the reference, recording the pinned configs of ``kernels`` at each scan call;
    ``scan_hook(pins, y)`` may alter the scan's result or raise."""
    pins = []

    def scan(*args):
        pins.append(tuple(tuple(k.configs) for k in kernels))
        return scan_hook(pins[-1], bidirectional_scan_ref(*args))

    monkeypatch.setattr(triton_kernels, 'bidirectional_scan_triton', scan)
    monkeypatch.setattr(triton_kernels, 'bidirectional_conv_silu_triton', bidirectional_conv_silu_ref)
    return pins


def test_every_config_of_every_kernel_is_pinned_once_then_restored(monkeypatch):
    a, b = _FakeKernel('a', ['a0', 'a1', 'a2']), _FakeKernel('b', ['b0', 'b1'])
    a_configs = a.configs
    pins = _fake_ops(monkeypatch, (a, b))
    result = run_triton_self_check('cpu', torch.float32, cases=[TINY], kernels=(a, b))
    assert result.ok and result.configs_checked == 5, result
    assert pins == [(('a0',), ('b0',)), (('a1',), ('b0',)), (('a2',), ('b0',)), (('a0',), ('b1',)),
                    (('a0', 'a1', 'a2'), ('b0', 'b1'))]  # last: every kernel autotuned over all its configs
    assert a.configs is a_configs and b.configs == ['b0', 'b1']


def test_the_autotuned_round_starts_from_an_empty_cache_and_restores_it(monkeypatch):
    a = _FakeKernel('a', ['a0', 'a1'])
    a.cache = users_cache = {('key',): 'a1'}
    caches = []
    _fake_ops(monkeypatch, (a,), lambda pins, y: caches.append(dict(a.cache)) or y)
    assert run_triton_self_check('cpu', torch.float32, cases=[TINY], kernels=(a,)).ok
    assert caches[-1] == {} and a.cache is users_cache


@pytest.mark.skipif(not INTERPRET, reason='runs the real kernels through the Triton interpreter')
def test_check_catches_a_kernel_that_autotuning_corrupts(monkeypatch):
    """The forward's segment-boundary walk is in place on the segment states. With its autotuner's restore hooks
    removed (as before the fix the first GPU run called for), every pinned config passes and only the autotuned
    round, whose benchmark runs each config three times on the same buffers, catches it."""
    from vim.kernels.triton import CONFIGS, fwd

    from tests.kernels.test_triton_autotune import run_like_do_bench
    kernel = fwd._segment_boundary_kernel
    monkeypatch.setattr(kernel, 'configs', list(CONFIGS[kernel.fn.__name__]))
    monkeypatch.setattr(kernel, 'cache', {})
    monkeypatch.setitem(kernel.__dict__, 'do_bench', run_like_do_bench)
    monkeypatch.setattr(fwd, 'MIN_SEGMENT', 1)
    scan = triton_kernels.bidirectional_scan_triton
    monkeypatch.setattr(triton_kernels, 'bidirectional_scan_triton', lambda *a: scan(*a, chunk_size=4))
    case = CheckCase(batch=1, dim=6, dstate=3, seqlen=13, width=4, layout='mixer')
    assert fwd.plan_segments(1, 6, 13, 4)[1] > 2
    n_configs = len(CONFIGS[kernel.fn.__name__])
    result = run_triton_self_check('cpu', torch.float32, cases=[case], kernels=(kernel,))
    assert result.ok and result.configs_checked == n_configs, result
    monkeypatch.setattr(kernel, 'pre_hook', lambda kwargs, reset_only=False: 0)
    monkeypatch.setattr(kernel, 'post_hook', lambda kwargs, exception: 0)
    result = run_triton_self_check('cpu', torch.float32, cases=[case], kernels=(kernel,))
    assert not result.ok and result.reason.startswith('every kernel autotuned'), result.reason
    assert result.configs_checked == n_configs


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_a_correct_implementation_passes_the_default_cases(monkeypatch, dtype):
    """The reference in the activation dtype (fp32 arithmetic, outputs rounded to dtype) stands in for correct
    kernels: the tolerance must accept it on the cases the GPU check runs."""
    kernel = _FakeKernel('k', ['c0'])
    _fake_ops(monkeypatch, (kernel,))
    result = run_triton_self_check('cpu', dtype, kernels=(kernel,))
    assert result.ok, result.reason


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_a_wrong_config_fails_the_check_and_is_named(monkeypatch, dtype):
    a, b = _FakeKernel('scan_fwd', ['good', 'bad']), _FakeKernel('conv', ['c0'])
    # off by 4x the tolerance of the dtype: caught; off by a quarter of it: accepted
    tol = selfcheck.tolerance(dtype)
    _fake_ops(monkeypatch, (a, b), lambda pins, y: y * (1 + (4 if pins[0] == ('bad',) else 0.25) * tol))
    result = run_triton_self_check('cpu', dtype, cases=[TINY], kernels=(a, b))
    assert not result.ok
    assert 'scan_fwd config bad' in result.reason and 'scan output' in result.reason, result.reason
    assert result.configs_checked == 2  # the first round (both kernels) passed
    assert a.configs == ['good', 'bad']


def test_non_finite_output_and_exceptions_fail_the_check(monkeypatch):
    a = _FakeKernel('k', ['c0', 'c1'])
    _fake_ops(monkeypatch, (a,), lambda pins, y: y.clone().fill_(float('nan')) if pins[0] == ('c1',) else y)
    result = run_triton_self_check('cpu', torch.float32, cases=[TINY], kernels=(a,))
    assert not result.ok and 'not finite' in result.reason

    def boom(pins, y):
        raise RuntimeError('CUDA error: an illegal memory access was encountered\nmore lines')

    _fake_ops(monkeypatch, (a,), boom)
    result = run_triton_self_check('cpu', torch.float32, cases=[TINY], kernels=(a,))
    assert not result.ok
    assert result.reason.endswith('RuntimeError: CUDA error: an illegal memory access was encountered'), result.reason
    assert a.configs == ['c0', 'c1']


def test_a_config_that_does_not_fit_the_device_is_skipped(monkeypatch):
    a = _FakeKernel('k', ['small', 'huge'])

    def oor(pins, y):
        if pins[0] == ('huge',):
            raise OutOfResources(300000, 232448, 'shared memory')
        return y

    _fake_ops(monkeypatch, (a,), oor)
    result = run_triton_self_check('cpu', torch.float32, cases=[TINY], kernels=(a,))
    assert result.ok and result.configs_checked == 1
    assert len(result.configs_skipped) == 1 and 'k config huge' in result.configs_skipped[0]
    _fake_ops(monkeypatch, (a,), lambda pins, y: oor((('huge',),), y))  # nothing fits: nothing was checked
    assert not run_triton_self_check('cpu', torch.float32, cases=[TINY], kernels=(a,)).ok


def test_failed_check_warns_once_and_falls_back_per_device_and_dtype(guarded_cpu, fake_check, monkeypatch):
    fake_check.result = SelfCheckResult(False, 'scan_fwd config X: scan output: max error 1')

    def triton_must_not_run(*args, **kwargs):
        raise AssertionError('auto ran the Triton op after a failed check')

    monkeypatch.setitem(interface._BIDIRECTIONAL, 'triton', triton_must_not_run)
    args = _scan_args()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        for _ in range(3):
            torch.testing.assert_close(bidirectional_scan(*args), bidirectional_scan_ref(*args), rtol=0, atol=0)
        messages = _scan_warnings(record)
        assert len(messages) == 1, messages
        assert "failed their self-check on cpu in float32" in messages[0]
        assert 'scan_fwd config X' in messages[0] and "runs 'reference'" in messages[0]
        assert len(fake_check.calls) == 1
        assert resolve_backend(None, torch.zeros(1, dtype=torch.bfloat16)) == 'reference'  # a new key: checked
        assert len(fake_check.calls) == 2 and len(_scan_warnings(record)) == 2


def test_the_check_names_the_op_that_failed_and_checks_one_op_alone(monkeypatch):
    a, b = _FakeKernel('scan_k', ['s0']), _FakeKernel('conv_k', ['c0', 'c1'])
    pins = []

    def conv(*args):
        pins.append(tuple(b.configs))
        if b.configs == ['c1']:
            raise RuntimeError('misaligned address')
        return bidirectional_conv_silu_ref(*args)

    _fake_ops(monkeypatch, (a, b))
    monkeypatch.setattr(triton_kernels, 'bidirectional_conv_silu_triton', conv)
    result = run_triton_self_check('cpu', torch.float32, cases=[TINY], kernels=(a, b))
    assert not result.ok and result.failed_op == 'conv' and 'misaligned address' in result.reason
    # a wrong scan output is blamed on the scan
    _fake_ops(monkeypatch, (a, b), lambda pins, y: y + 1.0)
    result = run_triton_self_check('cpu', torch.float32, cases=[TINY], kernels=(a, b))
    assert not result.ok and result.failed_op == 'scan' and 'scan output' in result.reason
    # the scan alone: the conv does not run
    def scan_must_not_run(*args):
        raise AssertionError('the scan ran in a conv-only check')

    monkeypatch.setattr(triton_kernels, 'bidirectional_scan_triton', scan_must_not_run)
    monkeypatch.setattr(triton_kernels, 'bidirectional_conv_silu_triton', bidirectional_conv_silu_ref)
    result = run_triton_self_check('cpu', torch.float32, cases=[TINY], kernels=(b,), ops=('conv',))
    assert result.ok and result.failed_op is None and result.configs_checked == 2
    with pytest.raises(ValueError, match='ops must be'):
        run_triton_self_check('cpu', torch.float32, ops=('attention',))
    # the default kernels are the ops' own
    assert triton_kernels.AUTOTUNED_KERNELS == triton_kernels.SCAN_KERNELS + triton_kernels.CONV_KERNELS


def test_a_failed_conv_keeps_the_triton_scan(guarded_cpu, fake_check):
    fake_check.result = lambda ops: (SelfCheckResult(False, 'conv grad x: max error 4.98', failed_op='conv')
                                     if 'conv' in ops else SelfCheckResult(True))
    x = torch.zeros(2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        assert resolve_backend(None, x) == 'triton'
        assert resolve_backend(None, x, op='conv') == 'reference'
        assert resolve_backend(None, x, op='scan') == 'triton'
        messages = _scan_warnings(record)
    assert fake_check.ops == [('scan', 'conv'), ('scan',)]  # the whole check, then the scan alone
    assert len(messages) == 1 and 'conv grad x' in messages[0]
    assert "runs 'reference' for the conv" in messages[0] and 'keeps the Triton scan' in messages[0]
    with pytest.raises(ValueError, match='op must be one of'):
        resolve_backend(None, x, op='attention')


def test_when_the_other_op_fails_alone_too_both_fall_back(guarded_cpu, fake_check):
    fake_check.result = lambda ops: SelfCheckResult(False, f'{ops[0]} output: max error 1', failed_op=ops[0])
    with pytest.warns(ScanBackendWarning, match="checked alone, the conv failed too: conv output") as record:
        assert resolve_backend(None, torch.zeros(2), op='conv') == 'reference'
    assert resolve_backend(None, torch.zeros(2)) == 'reference'
    assert fake_check.ops == [('scan', 'conv'), ('conv',)]
    assert "runs 'reference' there for the rest of this process" in str(record[0].message)


def test_passed_check_runs_triton_silently(guarded_cpu, fake_check):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        assert [resolve_backend(None, torch.zeros(2)) for _ in range(2)] == ['triton', 'triton']
    assert _scan_warnings(record) == [] and len(fake_check.calls) == 1
    # no Triton kernel for fp64: auto's choice outside the guard (on this CPU stand-in: the fused CPU kernels)
    assert resolve_backend(None, torch.zeros(2, dtype=torch.float64)) == interface._auto_on_cpu()
    assert len(fake_check.calls) == 1


def test_a_check_that_raises_is_a_failed_check(guarded_cpu, fake_check):
    fake_check.result = MemoryError('out of memory')
    with pytest.warns(ScanBackendWarning, match='the check itself failed: MemoryError: out of memory'):
        assert resolve_backend(None, torch.zeros(2)) == 'reference'


def test_explicit_triton_skips_the_check_and_raises(guarded_cpu, fake_check, monkeypatch):
    fake_check.result = SelfCheckResult(False, 'broken')

    def failing(*args, **kwargs):
        raise RuntimeError('kernel exploded')

    monkeypatch.setitem(interface._BIDIRECTIONAL, 'triton', failing)
    args = _scan_args()
    with warnings.catch_warnings():
        warnings.simplefilter('error', ScanBackendWarning)
        with pytest.raises(RuntimeError, match='kernel exploded'):
            bidirectional_scan(*args, backend='triton')
        monkeypatch.setenv('VIM_SCAN_BACKEND', 'triton')
        with pytest.raises(RuntimeError, match='kernel exploded'):
            bidirectional_scan(*args)
    assert fake_check.calls == []


def test_no_check_inside_torch_compile_until_warmup(guarded_cpu, fake_check, monkeypatch):
    # a marker instead of the Triton op, so the compiled graph shows which backend it was traced with
    monkeypatch.setitem(interface._BIDIRECTIONAL, 'triton', lambda *a, **k: bidirectional_scan_ref(*a, **k) + 100.0)
    args = _scan_args()
    expected = bidirectional_scan_ref(*args)
    compiled = torch.compile(lambda *a: bidirectional_scan(*a), backend='eager', fullgraph=True)  # no graph break
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        torch.testing.assert_close(compiled(*args), expected, rtol=0, atol=0)
        torch.testing.assert_close(compiled(*args), expected, rtol=0, atol=0)
        messages = _scan_warnings(record)
    assert fake_check.calls == []
    assert len(messages) == 1 and 'during torch.compile tracing' in messages[0] and 'warmup' in messages[0]
    assert warmup('cpu', torch.float32) == 'triton'
    assert len(fake_check.calls) == 1
    torch.testing.assert_close(compiled(*args), expected + 100.0)  # retraced with the check's result


def test_no_check_inside_cuda_graph_capture(guarded_cpu, fake_check, monkeypatch):
    monkeypatch.setattr(interface, '_capturing', lambda x: True)
    with pytest.warns(ScanBackendWarning, match='during CUDA-graph capture'):
        assert resolve_backend(None, torch.zeros(2)) == 'reference'
    assert fake_check.calls == []
    interface.run_self_check('cpu', torch.float32)  # what warmup does before capture
    assert resolve_backend(None, torch.zeros(2)) == 'triton'


def test_warmup_checks_once_and_runs_each_shape_forward_and_backward(guarded_cpu, fake_check, monkeypatch):
    seen = []

    def spy(name, fn):
        def run(*args, **kwargs):
            seen.append((name, tuple(args[0].shape), torch.is_grad_enabled()))
            return fn(*args, **kwargs)
        return run

    monkeypatch.setitem(interface._BIDIRECTIONAL, 'triton', spy('scan', bidirectional_scan_ref))
    monkeypatch.setitem(interface._CONV, 'triton', spy('conv', bidirectional_conv_silu_ref))
    with torch.no_grad():  # warmup needs autograd for the backward whatever the caller's mode
        assert warmup('cpu', torch.float32, [(2, 8, 5), ScanShape(1, 4, 3, dstate=2, conv_width=3)]) == 'triton'
    assert len(fake_check.calls) == 1
    assert seen == [('conv', (2, 8, 5), True), ('scan', (2, 2, 8, 5), True),
                    ('conv', (1, 4, 3), True), ('scan', (1, 2, 4, 3), True)]
    seen.clear()
    assert warmup('cpu', torch.float32, [(1, 4, 3)], backward=False) == 'triton'
    assert seen == [('conv', (1, 4, 3), False), ('scan', (1, 2, 4, 3), False)] and len(fake_check.calls) == 1
    assert warmup('cpu', torch.float32, [(1, 4, 3)], backend='reference') == 'reference'


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_real_check_on_cuda(dtype, monkeypatch):
    monkeypatch.setattr(interface, '_AUTO_CHOICE', {})
    monkeypatch.delenv('VIM_SCAN_BACKEND', raising=False)
    result = run_triton_self_check('cuda', dtype)
    assert result.ok, result.reason
    assert result.configs_checked + len(result.configs_skipped) == sum(
        len(k.configs) for k in triton_kernels.AUTOTUNED_KERNELS)
    with warnings.catch_warnings():
        warnings.simplefilter('error', ScanBackendWarning)
        assert resolve_backend(None, torch.zeros(1, device='cuda', dtype=dtype)) == 'triton'
        assert resolve_backend(None, torch.zeros(1, device='cuda', dtype=dtype), op='conv') == 'triton'


@pytest.mark.gpu
def test_warmup_then_torch_compile_runs_triton_without_a_graph_break(monkeypatch):
    monkeypatch.setattr(interface, '_AUTO_CHOICE', {})
    monkeypatch.delenv('VIM_SCAN_BACKEND', raising=False)
    torch._dynamo.reset()
    assert warmup('cuda', torch.bfloat16) == 'triton'
    case = CheckCase(2, 48, 16, 197, layout='mixer')
    scan_args = [a.detach() for a in case_inputs(case, torch.bfloat16, torch.device('cuda'), seed=6)[0]]
    compiled = torch.compile(lambda *a: bidirectional_scan(*a), fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter('error', ScanBackendWarning)
        torch.testing.assert_close(compiled(*scan_args), bidirectional_scan(*scan_args, backend='triton'))


@pytest.mark.gpu
def test_warmup_then_cuda_graph_capture_matches_eager(monkeypatch):
    monkeypatch.setattr(interface, '_AUTO_CHOICE', {})
    monkeypatch.delenv('VIM_SCAN_BACKEND', raising=False)
    shape = (2, 384, 197)
    assert warmup('cuda', torch.bfloat16, [shape], backward=False) == 'triton'
    case = CheckCase(*shape[:2], 16, shape[2], layout='mixer')
    scan_args, conv_args = (
        [a.detach() for a in args] for args in case_inputs(case, torch.bfloat16, torch.device('cuda'), seed=5))

    def step():
        return bidirectional_scan(*scan_args), bidirectional_conv_silu(*conv_args)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('error', ScanBackendWarning)  # capture found the check's result
        eager = step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_maybe_compile_settles_auto_before_tracing(guarded_cpu, fake_check, monkeypatch):
    """Every tool's --torchcompile (vim.utils.maybe_compile): the check runs when the model is wrapped, so the first
    trace already sees its result: the Triton op, no warning, no retrace."""
    from vim.utils import maybe_compile
    monkeypatch.setitem(interface._BIDIRECTIONAL, 'triton', lambda *a, **k: bidirectional_scan_ref(*a, **k) + 100.0)
    args = _scan_args()
    compiled = maybe_compile(lambda *a: bidirectional_scan(*a), 'eager', device='cpu', dtype=torch.float32)
    assert len(fake_check.calls) == 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        torch.testing.assert_close(compiled(*args), bidirectional_scan_ref(*args) + 100.0)
    assert _scan_warnings(record) == []


@pytest.mark.parametrize('slow', [True, False])
def test_a_slow_check_says_so_while_it_runs(guarded_cpu, fake_check, monkeypatch, caplog, slow):
    """The first check on a machine compiles for minutes: past SLOW_CHECK_NOTICE_S it is announced (stderr, through
    logging's last-resort handler when the application set none) and timed; a quick one says nothing."""
    import time
    monkeypatch.setattr(interface, 'SLOW_CHECK_NOTICE_S', 0.05 if slow else 60.0)
    seen = []
    monkeypatch.setattr(selfcheck, 'run_triton_self_check', lambda device, dtype, ops=selfcheck.OPS: (
        time.sleep(0.3), seen.append(list(caplog.messages)), SelfCheckResult(True))[-1])
    with caplog.at_level('WARNING', logger='vim.kernels'):
        assert interface.run_self_check('cpu', torch.float32) == 'triton'
    if slow:
        assert any('compiling and checking the Triton kernels for cpu in float32' in m for m in seen[0])
        assert caplog.messages[-1].startswith('vim.kernels: done in ')
        assert 'compiling and checking the Triton kernels for cpu in float32' in caplog.messages[-1]
    else:
        assert caplog.messages == []
