"""edgeq: compress a language model on a GPU host, export it exactly, and measure it on a device.

The Python API mirrors the CLI: ``edgeq.compress``, ``edgeq.export``, ``edgeq.bench`` and
``edgeq.report`` over frozen config dataclasses. They are imported lazily so that ``import edgeq``
(and the device side, ``edgeq.runtime`` / ``edgeq.devices``) never pulls in torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "compress": ("edgeq.api", "compress"),
    "export": ("edgeq.api", "export"),
    "bench": ("edgeq.api", "bench"),
    "report": ("edgeq.api", "report"),
    "CompressConfig": ("edgeq.api", "CompressConfig"),
    "ExportConfig": ("edgeq.api", "ExportConfig"),
    "BenchConfig": ("edgeq.api", "BenchConfig"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'edgeq' has no attribute {name!r}")
