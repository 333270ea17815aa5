"""The llama.cpp backend: a GGUF artifact run through llama-cpp-python's bindings.

Device side: imports numpy and llama_cpp only (never torch or transformers).

``llama_cpp.Llama`` loads the model and context, but its ``eval`` keeps logits only with
``logits_all=True``, and then copies every row into a ``(n_ctx, n_vocab)`` ``scores`` array first
(llama-cpp-python 0.3.36, ``Llama.eval``). This backend therefore drives the context through the C
API that ``Llama.eval`` wraps: one ``llama_batch`` allocated at load, its token/position arrays
written through numpy views (a decode step sets its one slot directly), ``llama_decode``, and one
``memmove`` of ``llama_get_logits`` (the rows of the tokens flagged for output, in batch order:
``llama.h``) into the result; wrapping the pointer with ``np.ctypeslib.as_array`` instead costs ~6 us a
call, ~1% of a decode step of the bundled model (benchmarks/llamabench_compare.py). ``Llama.reset`` only
rewinds a counter (the KV cache is trimmed lazily by the next ``eval``), so ``reset`` here clears the
context's memory with ``llama_memory_clear``: a fresh sequence, whatever is called next.

``BackendOptions.provider_options`` may carry llama.cpp context settings: ``n_batch``, ``n_ubatch``,
``type_k`` / ``type_v`` (KV cache type: ``f16`` default, ``f32``, ``q8_0``), ``flash_attn`` (bool), and
``repack`` (bool, default true: llama.cpp's "extra buffer types", which repack q4_0 weights into
interleaved CPU layouts; ``false`` keeps the plain layout, which a BLAS-enabled build can then dequantize
into f32 matmuls for prompt batches: on the bundled model q4_0 and q8_0 prefill logits then equal the
fake-quant model to 3.5e-7 instead of 3.6e-3, see benchmarks/gguf_float_path.py).
``BackendOptions.threads`` None means one thread per physical core for decode and prompt batches alike
(onnxruntime's default, so both backends are measured on equal terms; llama-cpp-python's own default
would use half the logical CPUs for decode); ``info()`` records the threads actually used.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeq.errors import BackendError
from edgeq.runtime.backends.base import BackendOptions

if TYPE_CHECKING:
    from edgeq.export.manifest import Manifest

log = logging.getLogger(__name__)

_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # GGML_TYPE_* (ggml.h)
_KV_NAMES = {v: k for k, v in _KV_TYPES.items()}
_CONTEXT_OPTIONS = ("n_batch", "n_ubatch", "type_k", "type_v", "flash_attn", "repack")


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise BackendError(
            f"the llama.cpp backend needs llama-cpp-python ({exc}); install it with `pip install 'edgeq[llama]'`"
        ) from None
    return llama_cpp


class LlamaCppBackend:
    """One llama.cpp context over the manifest's GGUF file, holding one sequence (see module doc)."""

    name = "llama.cpp"

    def __init__(self, manifest: Manifest, options: BackendOptions):
        self.manifest = manifest
        self.options = options
        self.model_file = manifest.file("model")
        self._llm: Any = None
        self._lib: Any = None
        self._batch: Any = None
        self._tokens: np.ndarray | None = None  # numpy views over the batch's C arrays
        self._pos: np.ndarray | None = None
        self._n_past = 0
        self._n_batch = 0
        self._n_vocab = 0
        self._n_ctx = 0
        self._repack = True

    # -- lifecycle -----------------------------------------------------------------------------
    def _context_kwargs(self) -> dict:
        extra = dict(self.options.provider_options)
        unknown = sorted(set(extra) - set(_CONTEXT_OPTIONS))
        if unknown:
            log.warning("ignoring provider options %s; llama.cpp takes %s", unknown, list(_CONTEXT_OPTIONS))
        n_ctx = self.options.n_ctx or self.manifest.model.get("n_ctx") or 0
        kwargs: dict = {"n_ctx": int(n_ctx), "n_batch": int(extra.get("n_batch", 512))}
        if "n_ubatch" in extra:
            kwargs["n_ubatch"] = int(extra["n_ubatch"])
        for key in ("type_k", "type_v"):
            if key in extra:
                if extra[key] not in _KV_TYPES:
                    raise BackendError(
                        f"{key}={extra[key]!r} is not a KV cache type; expected one of {sorted(_KV_TYPES)}"
                    )
                kwargs[key] = _KV_TYPES[extra[key]]
        kwargs["flash_attn"] = _flag(extra.get("flash_attn", False))
        threads = self.options.threads or _physical_cores()
        kwargs["n_threads"] = kwargs["n_threads_batch"] = int(threads)
        return kwargs

    def load(self) -> None:
        """Load the GGUF file and create the context and its token batch."""
        lib = _import_llama_cpp()
        self.close()  # a second load() starts over instead of leaking the first context
        kwargs = self._context_kwargs()
        repack = _flag(self.options.provider_options.get("repack", True))
        try:
            with _model_params(lib, use_extra_bufts=repack):
                llm = lib.Llama(str(self.model_file), logits_all=False, verbose=False, **kwargs)
        except (ValueError, RuntimeError) as exc:
            raise BackendError(
                f"llama.cpp could not load {self.model_file} ({exc}); expected a GGUF file written by "
                "`edgeq export --format gguf` — re-export it, or upgrade llama-cpp-python"
            ) from None
        self._llm, self._lib, self._repack = llm, lib, repack
        self._n_batch = llm.n_batch
        self._n_vocab = llm.n_vocab()
        self._n_ctx = int(llm.n_ctx())
        self._batch = lib.llama_batch_init(self._n_batch, 0, 1)
        b = self._batch
        for i in range(self._n_batch):  # one sequence, every position outputs logits: set once
            b.seq_id[i][0] = 0
        np.ctypeslib.as_array(b.n_seq_id, shape=(self._n_batch,))[:] = 1
        np.ctypeslib.as_array(b.logits, shape=(self._n_batch,))[:] = 1
        self._tokens = np.ctypeslib.as_array(b.token, shape=(self._n_batch,))
        self._pos = np.ctypeslib.as_array(b.pos, shape=(self._n_batch,))
        self._n_past = 0

    def close(self) -> None:
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = self._tokens = self._pos = None
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def _require(self) -> Any:
        if self._llm is None:
            raise BackendError("llama.cpp backend is not loaded; call load() first (or use open_backend)")
        return self._llm

    # -- sequence ------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of ``text``: no BOS, special-token text not parsed."""
        return list(self._require().tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def reset(self) -> None:
        llm = self._require()
        self._lib.llama_memory_clear(self._lib.llama_get_memory(llm.ctx), True)
        llm.n_tokens = 0  # keep the wrapper's own view consistent
        self._n_past = 0

    def forward(self, ids: list[int]) -> np.ndarray:
        """Append ``ids``; float32 logits ``(len(ids), vocab_size)`` of those positions."""
        llm = self._require()
        n = len(ids)
        if self._n_past + n > self.n_ctx:
            raise BackendError(
                f"sequence of {self._n_past + n} tokens exceeds n_ctx={self.n_ctx}; "
                "reset() first or run with a larger n_ctx"
            )
        out = np.empty((n, self._n_vocab), dtype=np.float32)
        out_addr, row_bytes = out.ctypes.data, self._n_vocab * 4
        if n == 1:  # a decode step: fill the batch's one slot directly (each numpy temporary costs ~1 us)
            self._tokens[0] = ids[0]
            self._pos[0] = self._n_past
            self._decode(llm, 1, out_addr, row_bytes)
            return out
        ids_arr = np.asarray(ids, dtype=np.int32)
        for start in range(0, n, self._n_batch):
            chunk = ids_arr[start : start + self._n_batch]
            m = len(chunk)
            self._tokens[:m] = chunk
            self._pos[:m] = np.arange(self._n_past, self._n_past + m, dtype=np.int32)
            self._decode(llm, m, out_addr + start * row_bytes, row_bytes)
        return out

    def _decode(self, llm: Any, m: int, dst: int, row_bytes: int) -> None:
        """Decode the batch's first ``m`` slots and copy their logits rows to address ``dst``."""
        self._batch.n_tokens = m
        code = self._lib.llama_decode(llm.ctx, self._batch)
        if code != 0:
            raise BackendError(
                f"llama_decode returned {code} at position {self._n_past} (0 expected); "
                "the context may be full: reset() or raise n_ctx"
            )
        ctypes.memmove(dst, self._lib.llama_get_logits(llm.ctx), m * row_bytes)
        self._n_past += m

    @property
    def n_past(self) -> int:
        return self._n_past

    @property
    def n_ctx(self) -> int:
        self._require()
        return self._n_ctx

    @property
    def vocab_size(self) -> int:
        self._require()
        return self._n_vocab

    def info(self) -> dict:
        """llama-cpp-python version, threads, context settings and llama.cpp's system info."""
        llm = self._require()
        lib = self._lib
        params = llm.context_params
        return {
            "backend": self.name,
            "llama_cpp_python": lib.__version__,
            "threads": int(lib.llama_n_threads(llm.ctx)),
            "threads_batch": int(lib.llama_n_threads_batch(llm.ctx)),
            "n_ctx": self.n_ctx,
            "n_batch": self._n_batch,
            "n_ubatch": int(params.n_ubatch),
            "type_k": _KV_NAMES.get(int(params.type_k), int(params.type_k)),
            "type_v": _KV_NAMES.get(int(params.type_v), int(params.type_v)),
            "repack": self._repack,
            "blas": has_blas_backend(),
            "system_info": lib.llama_print_system_info().decode("utf-8", "replace").strip(),
            "model_file": self.model_file.name,
        }


def has_blas_backend() -> bool:
    """Whether the installed llama-cpp-python was built with ggml's BLAS backend (``libggml-blas`` beside
    ``libllama``), found without importing ``llama_cpp``. Such a build computes prompt batches of
    q8_0/q4_0/q4_1 weights in plain layout (``repack`` false) in f32 rather than with int8 activations."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return False
    return any((Path(spec.origin).parent / "lib").glob("libggml-blas.*"))


def _flag(value: object) -> bool:
    """A boolean option given as a bool, a number or a string ("false", "off", "0", "no" are false)."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "off", "no")
    return bool(value)


@contextlib.contextmanager
def _model_params(lib, **fields):
    """While a ``Llama`` is constructed, llama.cpp's default model params carry ``fields`` (the bindings'
    constructor exposes no ``use_extra_bufts``; it reads ``llama_model_default_params()``)."""
    low = lib.llama_cpp
    original = low.llama_model_default_params
    known = {name for name, _ in original()._fields_}

    def patched():
        params = original()
        for key, value in fields.items():
            if key in known:
                setattr(params, key, value)
        return params

    low.llama_model_default_params = patched
    try:
        yield
    finally:
        low.llama_model_default_params = original


def _physical_cores() -> int:
    """Physical cores (psutil when present, else logical CPUs): onnxruntime's default thread count."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1
