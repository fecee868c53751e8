"""Ops of Vim's mixer (selective scans, the two-branch causal conv) shared by every model. Knows nothing of models."""
from .export import export_decompositions
from .interface import (
    ScanBackendWarning,
    available_backends,
    bidirectional_conv_silu,
    bidirectional_scan,
    resolve_backend,
    run_self_check,
    selective_scan,
)
from .reference import bidirectional_conv_silu_ref, bidirectional_scan_ref, selective_scan_ref
from .warmup import ScanShape, warmup

__all__ = [
    'selective_scan', 'bidirectional_scan', 'bidirectional_conv_silu', 'selective_scan_ref', 'bidirectional_scan_ref',
    'bidirectional_conv_silu_ref', 'available_backends', 'resolve_backend', 'export_decompositions', 'warmup',
    'ScanShape', 'run_self_check', 'ScanBackendWarning',
]
