"""Runtime backends, chosen by the manifest's format. Imported lazily: a device needs only its own."""

from __future__ import annotations

from edgeq.errors import BackendError
from edgeq.runtime.backends.base import Backend, BackendOptions


def open_backend(manifest, options: BackendOptions | None = None) -> Backend:
    """A loaded backend for a verified manifest (``edgeq.export.manifest.Manifest``)."""
    options = options or BackendOptions()
    if manifest.format == "gguf":
        from edgeq.runtime.backends.llamacpp import LlamaCppBackend as cls
    elif manifest.format == "onnx":
        from edgeq.runtime.backends.onnxruntime import OnnxRuntimeBackend as cls
    else:
        raise BackendError(f"no backend for format {manifest.format!r}; expected 'gguf' or 'onnx'")
    backend = cls(manifest, options)
    backend.load()
    return backend


__all__ = ["Backend", "BackendOptions", "open_backend"]
