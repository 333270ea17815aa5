"""Run directories: what compression writes and what exporters read (numpy only, no torch).

A run dir is a Hugging Face model dir's config and tokenizer plus the weights split in two::

    RUN_DIR/
      run.json             method, default scheme, per-tensor schemes, source model + hash, timings
      config.json, tokenizer.json, ...   copied from the source model
      fp.safetensors       tensors kept in floating point (embeddings, norms, unquantized linears)
      quant.safetensors    per quantized tensor NAME: NAME.codes (uint8 N,K), NAME.scales (f16 N,G),
                           NAME.zeros (uint8 N,G) -- see edgeq.compress.quant

A plain Hugging Face model dir (safetensors weights) opens as a run with nothing quantized, so every
exporter takes either. Tensors are read lazily, one at a time, each into its own array.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.compress.quant import QuantizedWeight, QuantScheme
from edgeq.errors import ArtifactError, ModelError

RUN_FILE = "run.json"
FP_FILE = "fp.safetensors"
QUANT_FILE = "quant.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
MODEL_SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 on read
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """A torch-free reader of one safetensors file (bf16 widened to float32).

    Each ``get`` reads its tensor's bytes into a fresh array (no memory map): a tensor costs memory
    while the caller holds it and not after, so an exporter that converts one tensor at a time has a
    resident set of one tensor. (With a memory map every page ever touched stayed in the process's
    RSS: 7 GiB of "resident" codes when exporting a 7B run, although the kernel could drop them.)
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                if header_len > 100_000_000:
                    raise ValueError("header too large")
                header = json.loads(fh.read(header_len))
        except (OSError, ValueError, struct.error) as exc:
            raise ArtifactError(
                f"{self.path} is not a readable safetensors file ({exc}); re-create it from the source model"
            ) from None
        self.meta = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._base = 8 + header_len
        size = self.path.stat().st_size
        for name, ent in header.items():
            if ent["dtype"] not in _ST_DTYPES or ent["data_offsets"][1] + self._base > size:
                raise ArtifactError(f"{self.path}: tensor {name} is truncated or of unknown dtype; file is corrupt")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def get(self, name: str) -> np.ndarray:
        ent = self.entries[name]
        start, end = ent["data_offsets"]
        raw = np.empty(end - start, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self._base + start)
            got = fh.readinto(memoryview(raw)) if end > start else 0
        if got != end - start:
            raise ArtifactError(f"{self.path}: tensor {name} is truncated (file changed while reading); re-create it")
        arr = raw.view(_ST_DTYPES[ent["dtype"]]).reshape(ent["shape"])
        if ent["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model dir (single or sharded)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise ModelError(
            f"{model_dir} holds only pickle weights (.bin/.pt), which edgeq never unpickles; "
            "expected model.safetensors (convert with save_pretrained(safe_serialization=True))"
        )
    raise ModelError(f"{model_dir} has no model.safetensors; expected a Hugging Face model dir or an edgeq run dir")


@dataclass
class RunDir:
    """A run dir or plain model dir opened for reading."""

    path: Path
    config: dict
    meta: dict = field(default_factory=dict)
    _fp: list[SafetensorsFile] = field(default_factory=list, repr=False)
    _quant: SafetensorsFile | None = field(default=None, repr=False)
    _tokenizer_json: str | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunDir:
        path = Path(path)
        if not path.exists():
            raise ModelError(f"model or run dir {str(path)!r} does not exist; expected a directory path")
        if not path.is_dir():
            raise ModelError(f"{str(path)!r} is a file, not a model dir; expected a directory with config.json")
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise ModelError(f"{str(path)!r} is not a model: no config.json; expected a Hugging Face model dir")
        try:
            config = json.loads(cfg_path.read_text())
        except ValueError as exc:
            raise ModelError(f"{cfg_path} is not valid JSON ({exc}); restore the model's config.json") from None
        if (path / RUN_FILE).exists():
            meta = json.loads((path / RUN_FILE).read_text())
            fp = [SafetensorsFile(path / FP_FILE)]
            quant = SafetensorsFile(path / QUANT_FILE) if (path / QUANT_FILE).exists() else None
            return cls(path, config, meta, fp, quant)
        return cls(path, config, {}, [SafetensorsFile(p) for p in weight_files(path)], None)

    # -- what is in it -------------------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        return self._quant is not None and bool(self.meta.get("tensors"))

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return archs[0]

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "?")

    def quantized_names(self) -> list[str]:
        return list(self.meta.get("tensors", {})) if self._quant is not None else []

    def fp_names(self) -> list[str]:
        return [n for f in self._fp for n in f.keys()]

    def names(self) -> list[str]:
        return self.fp_names() + self.quantized_names()

    def scheme(self, name: str) -> QuantScheme | None:
        spec = self.meta.get("tensors", {}).get(name)
        return QuantScheme.from_dict(spec) if spec else None

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.meta.get("tensors", {}):
            return self._quant.shape(f"{name}.codes")  # type: ignore[union-attr]
        for f in self._fp:
            if name in f.entries:
                return f.shape(name)
        raise KeyError(name)

    def fp_dtype(self, name: str) -> np.dtype:
        """The numpy dtype ``fp_tensor(name)`` returns (bf16 is widened to float32)."""
        for f in self._fp:
            if name in f.entries:
                code = f.dtype(name)
                return np.dtype(np.float32 if code == "BF16" else _ST_DTYPES[code])
        raise KeyError(name)

    # -- reading -------------------------------------------------------------------------------
    def fp_tensor(self, name: str) -> np.ndarray:
        for f in self._fp:
            if name in f.entries:
                return f.get(name)
        raise KeyError(name)

    def quantized(self, name: str) -> QuantizedWeight:
        scheme = self.scheme(name)
        if scheme is None or self._quant is None:
            raise KeyError(name)
        qw = QuantizedWeight(
            codes=np.asarray(self._quant.get(f"{name}.codes")),
            scales=np.asarray(self._quant.get(f"{name}.scales")),
            zeros=np.asarray(self._quant.get(f"{name}.zeros")),
            scheme=scheme,
        )
        qw.check()
        return qw

    def tensor(self, name: str) -> np.ndarray:
        """The effective float32 weights of ``name`` (dequantized codes when quantized)."""
        if name in self.meta.get("tensors", {}):
            return self.quantized(name).dequantize()
        return np.asarray(self.fp_tensor(name), dtype=np.float32)

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.names():
            yield name, self.tensor(name)

    def side_files(self) -> list[Path]:
        return [self.path / f for f in MODEL_SIDE_FILES if (self.path / f).exists()]

    def copy_side_files(self, dest: Path) -> None:
        """Copy config and tokenizer files into ``dest``, with a ``tokenizer.json`` even where the model
        ships only ``tokenizer.model`` (every later stage, and the device runtime, tokenizes with it)."""
        for f in self.side_files():
            shutil.copy2(f, dest / f.name)
        if not (dest / "tokenizer.json").exists():
            (dest / "tokenizer.json").write_text(self.tokenizer_json(), encoding="utf-8")

    def tokenizer_json(self) -> str:
        """The model's Hugging Face fast-tokenizer JSON: ``tokenizer.json``, or -- for a checkpoint that
        ships only SentencePiece's ``tokenizer.model`` (older Llama/Mistral repos) -- the fast tokenizer
        ``transformers`` converts from it (host side: needs transformers, sentencepiece, protobuf)."""
        path = self.path / "tokenizer.json"
        if path.exists():
            return path.read_text(encoding="utf-8")
        if self._tokenizer_json is not None:
            return self._tokenizer_json
        if not (self.path / "tokenizer.model").exists():
            raise ModelError(
                f"{self.path} has no tokenizer.json or tokenizer.model; expected the model's Hugging Face "
                "tokenizer files beside config.json (copy them from the source checkpoint)"
            )
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.path, use_fast=True)
            backend = tok.backend_tokenizer
        except Exception as exc:  # noqa: BLE001 -- any failure of the conversion is the same user error
            raise ModelError(
                f"cannot convert {self.path / 'tokenizer.model'} to a fast tokenizer ({type(exc).__name__}: "
                f"{exc}); expected a SentencePiece tokenizer transformers can load (pip install sentencepiece protobuf)"
            ) from None
        self._tokenizer_json = backend.to_str()
        return self._tokenizer_json

    def tokenizer(self):
        """A ``tokenizers.Tokenizer`` for the model (see ``tokenizer_json``)."""
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.tokenizer_json())

    def source_info(self) -> dict:
        """Where the weights came from: the source model's path and weights hash."""
        if self.meta.get("source"):
            return dict(self.meta["source"])
        return {"path": str(self.path.resolve()), "sha256": weights_hash(self.path)}


def weights_hash(model_dir: Path) -> str:
    """sha256 over the sha256s of a model's safetensors files (order-stable)."""
    digest = hashlib.sha256()
    for p in weight_files(Path(model_dir)):
        digest.update(p.name.encode() + b"\0" + sha256_file(p).encode())
    return digest.hexdigest()


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, so a writer holds one tensor at a time.

    The format puts every tensor's name, dtype, shape and byte range in a JSON header before the
    data, so the tensors are declared up front (``specs``, in file order) and then written in that
    order. ``safetensors.numpy.save_file`` needs all tensors in memory at once -- 1 byte per weight
    of codes for a whole 7B model -- hence this writer; files are read back by ``safetensors`` itself
    in the tests. ``close`` refuses a file whose tensors were not all written.
    """

    _CODES = {np.dtype(v).str: k for k, v in _ST_DTYPES.items() if k != "BF16"}

    def __init__(self, path: Path, specs: list[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict | None = None):
        self.path = Path(path)
        self._specs = [(name, np.dtype(dtype), tuple(int(d) for d in shape)) for name, dtype, shape in specs]
        header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
        offset = 0
        for name, dtype, shape in self._specs:
            size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            header[name] = {
                "dtype": self._CODES[dtype.str],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._fh = open(self.path, "wb")  # noqa: SIM115 -- closed by close()
        self._fh.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def write(self, name: str, arr: np.ndarray) -> None:
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path.name}: {name} written after every declared tensor")
        want, dtype, shape = self._specs[self._next]
        arr = np.ascontiguousarray(arr)
        if name != want or arr.dtype != dtype or arr.shape != shape:
            raise ValueError(
                f"{self.path.name}: got {name} {arr.dtype}{list(arr.shape)}, expected {want} {dtype}{list(shape)}"
            )
        self._fh.write(memoryview(arr).cast("B") if arr.size else b"")
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self._specs):
            raise ValueError(f"{self.path.name}: {len(self._specs) - self._next} declared tensors were never written")

    def abandon(self) -> None:
        """Close without the completeness check (the caller is discarding the file)."""
        self._fh.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


class AtomicDir:
    """Write a directory under a temporary sibling name and rename it into place on success.

    On any exception the temporary directory is removed, so an interrupted write never leaves a
    directory that looks finished. An existing target is replaced only after the new one is complete.
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            self.target.rename(old)
            self.tmp.rename(self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.target)


class AtomicFile:
    """Like AtomicDir for a single file: yields a temporary path, renamed onto the target on success."""

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent)
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        os.replace(self.tmp, self.target)
