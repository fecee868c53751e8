"""Selective-scan ops shared by every Vim model. Knows nothing of models."""
from .interface import available_backends, bidirectional_scan, resolve_backend, selective_scan
from .reference import bidirectional_scan_ref, selective_scan_ref

__all__ = [
    'selective_scan', 'bidirectional_scan', 'selective_scan_ref', 'bidirectional_scan_ref',
    'available_backends', 'resolve_backend',
]
