"""The onnxruntime backend: runs an edgeq ONNX export (optimum's KV-cache layout) with its own cache loop.

Device side: numpy, onnxruntime and ``tokenizers`` only (no torch, transformers or onnx).

The graph (see ``edgeq.export.onnx``) takes ``input_ids``, ``attention_mask``, ``position_ids`` and
``past_key_values.{i}.key/value`` ``[1, n_kv, past, head_dim]`` and returns ``logits`` and
``present.{i}.key/value`` ``[1, n_kv, past + new, head_dim]``. Names are discovered from the session,
so any graph of this layout runs.

The cache stays in ORT-owned ``OrtValue`` s between calls: each step binds the previous presents as
the next pasts through I/O binding (ORT docs, "I/O Binding": inputs and outputs bound once, no
conversion to numpy), so decode copies nothing but the logits back to numpy; on CUDA/TensorRT the
cache never leaves the GPU. The attention mask and position ids are views into arrays built once at
load. (The graph itself concatenates past and new keys each step; that copy is the graph's.)

``forward`` is the decode hot path, so it makes the onnxruntime calls of a bare I/O-binding loop and
as little Python around them as it can: a one-token step writes its id into a preallocated ``(1, 1)``
array (no list -> array conversion), ``n_ctx`` and the bound names are resolved once at load, the
cache is a list aligned with the input names (no dict rebuilt per step), and the logits are converted
to float32 only when the graph does not already return float32.
"""

from __future__ import annotations

import logging
import re
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from edgeq.errors import BackendError
from edgeq.runtime.backends.base import BackendOptions

if TYPE_CHECKING:
    from edgeq.export.manifest import Manifest

log = logging.getLogger(__name__)

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
# Execution providers whose outputs can stay in device memory between steps (OrtValue device "cuda").
_CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
DEFAULT_N_CTX = 2048


class OnnxRuntimeBackend:
    """One sequence on one ``InferenceSession``: ``forward`` appends tokens and returns their logits."""

    name = "onnxruntime"

    def __init__(self, manifest: Manifest, options: BackendOptions | None = None):
        self.manifest = manifest
        self.options = options or BackendOptions()
        self._session = None
        self._tokenizer = None
        self._binding = None
        self._past: list = []  # OrtValues aligned with _past_names: the previous step's presents
        self._n_past = 0
        self._n_ctx = 0  # resolved at load (see n_ctx)
        self._device = "cpu"

    # -- loading ---------------------------------------------------------------------------------
    def load(self) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        providers = self._providers(ort)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self.options.threads:
            so.intra_op_num_threads = int(self.options.threads)
        model_path = self.manifest.file("model")
        try:
            self._session = ort.InferenceSession(str(model_path), so, providers=providers)
        except Exception as exc:  # ORT raises Fail/InvalidGraph/NoSuchFile/... from C++
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(
                f"onnxruntime {ort.__version__} cannot load {model_path.name} ({first}); "
                "re-export the artifact or upgrade onnxruntime"
            ) from None
        missing = [p for p, _ in providers if p not in self._session.get_providers()]
        if missing:
            raise BackendError(
                f"execution provider(s) {missing} failed to initialize (session uses {self._session.get_providers()}); "
                "check the CUDA/TensorRT libraries onnxruntime-gpu needs, or use CPUExecutionProvider"
            )
        self._device = "cuda" if providers[0][0] in _CUDA_PROVIDERS else "cpu"
        self._discover_io()
        self._tokenizer = Tokenizer.from_file(str(self.manifest.file("tokenizer")))
        self._binding = self._session.io_binding()
        self._n_ctx = int(self.options.n_ctx or self.manifest.model.get("n_ctx") or DEFAULT_N_CTX)
        self._positions = np.arange(self._n_ctx, dtype=self._pos_dtype)[None, :]  # (1, n_ctx)
        self._mask = np.ones((1, self._n_ctx), dtype=self._mask_dtype)  # (1, n_ctx)
        self._one = np.zeros((1, 1), dtype=self._ids_dtype)  # a one-token step's input_ids, rewritten in place
        self.reset()
        log.info("loaded %s on %s", model_path.name, self._session.get_providers())

    def _providers(self, ort: ModuleType) -> list[tuple[str, dict]]:
        """(provider, options) pairs; a requested provider this onnxruntime build lacks is an error."""
        requested = list(self.options.providers or ("CPUExecutionProvider",))
        available = ort.get_available_providers()
        absent = [p for p in requested if p not in available]
        if absent:
            raise BackendError(
                f"execution provider(s) {absent} are not in onnxruntime {ort.__version__} (available: {available}); "
                "install onnxruntime-gpu for CUDA/TensorRT, or use CPUExecutionProvider"
            )
        opts = dict(self.options.provider_options or {})
        # provider_options: {provider: {key: value}}, or one flat dict for the first provider.
        per_provider = opts if opts and all(k in requested for k in opts) else {requested[0]: opts}
        pairs = [(p, {k: str(v) for k, v in (per_provider.get(p) or {}).items()}) for p in requested]
        if "CPUExecutionProvider" not in requested:
            pairs.append(("CPUExecutionProvider", {}))  # fallback for nodes the accelerator lacks
        return pairs

    def _discover_io(self) -> None:
        """Input/output names, dtypes and cache geometry from the session (manifest as fallback)."""
        session = self._session
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        if "input_ids" not in inputs:
            raise BackendError(
                f"graph inputs {sorted(inputs)} lack input_ids; expected optimum's text-generation-with-past "
                "layout: re-export with `edgeq export --format onnx`"
            )
        self._past_names = sorted((n for n in inputs if _PAST.fullmatch(n)), key=_past_order)
        self._present_names = [n.replace("past_key_values", "present") for n in self._past_names]
        unknown = set(inputs) - {"input_ids", "attention_mask", "position_ids", *self._past_names}
        absent = [n for n in ["logits", *self._present_names] if n not in outputs]
        if unknown or absent:
            raise BackendError(
                f"graph has inputs {sorted(unknown)} edgeq does not feed / lacks outputs {absent}; expected "
                "input_ids, attention_mask, position_ids, past_key_values.*: re-export with edgeq"
            )
        self._has_mask = "attention_mask" in inputs
        self._has_pos = "position_ids" in inputs
        self._ids_dtype = _ORT_DTYPES.get(inputs["input_ids"].type, np.int64)
        self._mask_dtype = _ORT_DTYPES.get(inputs["attention_mask"].type, np.int64) if self._has_mask else np.int64
        self._pos_dtype = _ORT_DTYPES.get(inputs["position_ids"].type, np.int64) if self._has_pos else np.int64
        model = self.manifest.model
        self._kv_shape = (1, model.get("n_kv_heads"), 0, model.get("head_dim"))
        if self._past_names:
            past = inputs[self._past_names[0]]
            self._kv_dtype = _ORT_DTYPES.get(past.type, np.float32)
            n_kv, head_dim = past.shape[1], past.shape[3]
            if isinstance(n_kv, int) and isinstance(head_dim, int):
                self._kv_shape = (1, n_kv, 0, head_dim)

    # -- the sequence ----------------------------------------------------------------------------
    def reset(self) -> None:
        import onnxruntime as ort

        self._check_loaded()
        if self._past_names and None in self._kv_shape:
            raise BackendError("manifest.model lacks n_kv_heads/head_dim and the graph has dynamic ones; re-export")
        empty = np.zeros(self._kv_shape, dtype=self._kv_dtype) if self._past_names else None
        self._empty = empty  # an OrtValue over CPU memory borrows the numpy buffer: keep it alive
        self._past = [ort.OrtValue.ortvalue_from_numpy(empty, self._device, 0) for _ in self._past_names]
        self._n_past = 0

    def forward(self, ids: list[int]) -> np.ndarray:
        """Append ``ids``; float32 logits ``(len(ids), vocab_size)``; the presents become the cache."""
        self._check_loaded()
        n = len(ids)
        if n == 0:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        start = self._n_past
        end = start + n
        if end > self._n_ctx:
            raise BackendError(
                f"sequence of {end} tokens exceeds n_ctx={self._n_ctx}; expected <= n_ctx: reset() first or raise n_ctx"
            )
        if n == 1:
            input_ids = self._one
            input_ids[0, 0] = ids[0]
        else:
            input_ids = np.asarray(ids, dtype=self._ids_dtype).reshape(1, n)
        binding, device = self._binding, self._device
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_cpu_input("input_ids", input_ids)
        if self._has_mask:
            binding.bind_cpu_input("attention_mask", self._mask[:, :end])
        if self._has_pos:
            binding.bind_cpu_input("position_ids", self._positions[:, start:end])
        for name, value in zip(self._past_names, self._past, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._present_names:
            binding.bind_output(name, device, 0)
        try:
            self._session.run_with_iobinding(binding)
        except Exception as exc:  # ORT's C++ errors surface as several exception types
            raise BackendError(
                f"onnxruntime failed on {n} tokens at position {start} ({str(exc).strip()[:200]})"
            ) from None
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()[0]  # (n, V)
        self._past = outputs[1:]
        self._n_past = end
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)

    def tokenize(self, text: str) -> list[int]:
        self._check_loaded()
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    @property
    def n_past(self) -> int:
        return self._n_past

    @property
    def n_ctx(self) -> int:
        if self._n_ctx:
            return self._n_ctx
        return int(self.options.n_ctx or self.manifest.model.get("n_ctx") or DEFAULT_N_CTX)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest.model["vocab_size"])

    def info(self) -> dict:
        import onnxruntime as ort

        session_providers = self._session.get_providers() if self._session is not None else []
        intra = self._session.get_session_options().intra_op_num_threads if self._session is not None else None
        return {
            "backend": self.name,
            "onnxruntime_version": ort.__version__,
            "providers": session_providers,
            "threads": self.options.threads,  # None: ORT's default, one per physical core
            "intra_op_num_threads": intra,  # 0: ORT's default
            "kv_cache_device": self._device,
            "io_binding": True,
        }

    def close(self) -> None:
        self._past = []
        self._binding = None
        self._session = None

    def _check_loaded(self) -> None:
        if self._session is None:
            raise BackendError("the onnxruntime backend is not loaded; call load() first (open_backend does)")


def _past_order(name: str) -> tuple[int, int]:
    layer, kind = _PAST.fullmatch(name).groups()  # type: ignore[union-attr]
    return int(layer), 0 if kind == "key" else 1
