"""The manifest: the contract between the host that exported an artifact and the device that runs it.

``manifest.json`` names every file of the artifact with its sha256 and size, the format and variant,
the model's shape, the quantization scheme of every tensor, the source model and its hash, the
tokenizer, the recipe that produced it, the edgeq version, and the parity report measured at export.
The runtime reads the manifest and the files it names, nothing else, and verifies their hashes first.

numpy-free and torch-free: the device side imports this.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeq.errors import ArtifactError

MANIFEST_VERSION = 1


@dataclass
class FileEntry:
    path: str  # relative to the manifest's directory
    sha256: str
    bytes: int
    role: str  # "model", "weights", "tokenizer", "config", ...


@dataclass
class Manifest:
    format: str  # "gguf" | "onnx"
    variant: str  # gguf type (f16, q8_0, q4_0, ...) or onnx precision (fp32, int8, int4)
    files: list[FileEntry]
    model: dict  # architecture, model_type, vocab_size, n_layers, hidden_size, n_heads, n_kv_heads, ...
    scheme: dict  # method, default scheme, per-tensor schemes, per-tensor artifact types
    source: dict  # path, sha256 of the source weights
    tokenizer: dict  # kind and file(s)
    recipe: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # format specifics (ONNX io names, ...)
    edgeq_version: str = ""
    manifest_version: int = MANIFEST_VERSION
    path: Path | None = field(default=None, compare=False)  # where it was read from; not serialized

    @property
    def root(self) -> Path:
        assert self.path is not None, "manifest has not been saved or loaded"
        return self.path.parent

    def file(self, role: str) -> Path:
        for entry in self.files:
            if entry.role == role:
                return self.root / entry.path
        raise ArtifactError(f"manifest {self.path} names no file with role {role!r}; re-export the artifact")

    @property
    def weight_bytes(self) -> int:
        return sum(e.bytes for e in self.files if e.role in ("model", "weights"))

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("path")
        return data

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n")
        self.path = path
        return path

    def verify(self) -> None:
        """Check every named file exists with the recorded size and sha256."""
        from edgeq.rundir import sha256_file

        for entry in self.files:
            p = self.root / entry.path
            if not p.is_file():
                raise ArtifactError(f"artifact file {str(p)!r} named in {self.path} is missing; re-export the artifact")
            size = p.stat().st_size
            if size != entry.bytes:
                raise ArtifactError(
                    f"artifact file {entry.path!r} is {size} bytes, manifest says {entry.bytes}; "
                    "it is truncated or modified: re-export the artifact"
                )
            digest = sha256_file(p)
            if digest != entry.sha256:
                raise ArtifactError(
                    f"sha256 of {entry.path!r} is {digest[:16]}..., manifest says {entry.sha256[:16]}...; "
                    "the artifact was modified or corrupted: re-export it"
                )


def file_entry(root: Path, path: Path, role: str) -> FileEntry:
    from edgeq.rundir import sha256_file

    return FileEntry(
        path=path.relative_to(root).as_posix(), sha256=sha256_file(path), bytes=path.stat().st_size, role=role
    )


def manifest_path_for(artifact: str | os.PathLike) -> Path:
    """The manifest for an artifact path: a manifest itself, an ONNX dir, or a GGUF file."""
    p = Path(artifact)
    if not p.exists():
        raise ArtifactError(
            f"artifact {str(p)!r} does not exist; expected a manifest.json, an ONNX dir or a .gguf file"
        )
    if p.is_dir():
        cand = p / "manifest.json"
    elif p.suffix == ".json":
        cand = p
    else:
        cand = p.with_name(p.stem + ".manifest.json")
    if not cand.exists():
        raise ArtifactError(
            f"no manifest for {str(p)!r} (looked for {cand.name}); export with `edgeq export` to get one"
        )
    return cand


def load_manifest(artifact: str | os.PathLike, verify: bool = True) -> Manifest:
    """Read (and by default hash-verify) the manifest of an artifact."""
    path = manifest_path_for(artifact)
    try:
        data = json.loads(path.read_text())
        data["files"] = [FileEntry(**f) for f in data["files"]]
        man = Manifest(**data)
    except (ValueError, TypeError, KeyError) as exc:
        raise ArtifactError(f"{path} is not a valid edgeq manifest ({exc}); re-export the artifact") from None
    if man.manifest_version > MANIFEST_VERSION:
        raise ArtifactError(
            f"{path} has manifest_version {man.manifest_version}; this edgeq reads <= {MANIFEST_VERSION}: upgrade edgeq"
        )
    man.path = path
    if verify:
        man.verify()
    return man
