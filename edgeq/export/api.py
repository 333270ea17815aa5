"""The export stage: a run dir (or plain model dir) -> an artifact, its manifest and its parity report.

``export(source, config, out)`` checks that the run's scheme fits the target before writing anything,
writes the artifact under a temporary name, measures parity with the real client, writes the
manifest, and renames into place only when everything succeeded.

* GGUF: ``out`` is the ``.gguf`` file; the manifest is ``<stem>.manifest.json`` beside it.
* ONNX: ``out`` is a directory holding ``model.onnx``, config, tokenizer and ``manifest.json``.

With ``config.bundle`` an integration bundle (``edgeq.export.bundle``) is written from the finished
artifact, at ``config.bundle_dir`` or beside the artifact.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from edgeq import __version__
from edgeq.config import ExportConfig
from edgeq.errors import ConfigError
from edgeq.export.manifest import Manifest, file_entry
from edgeq.rundir import AtomicDir, RunDir

log = logging.getLogger(__name__)


def scheme_summary(run: RunDir, artifact_types: dict[str, str]) -> dict:
    return {
        "method": run.meta.get("method", "none"),
        "default": run.meta.get("scheme"),
        "tensors": run.meta.get("tensors", {}),
        "artifact_types": artifact_types,
    }


def tokenizer_summary(run: RunDir) -> dict:
    """What tokenizes for the artifact: the model's fast tokenizer (``tokenizer.json``, or the one
    converted from a SentencePiece-only checkpoint's ``tokenizer.model``)."""
    import json

    converted = not (run.path / "tokenizer.json").exists()
    model = json.loads(run.tokenizer_json()).get("model", {})
    out = {"kind": "hf-tokenizers", "model": model.get("type"), "file": "tokenizer.json"}
    if converted:
        out["converted_from"] = "tokenizer.model"
    return out


def _refuse_existing(out: Path, marker: str) -> None:
    """Never clobber something that is not a previous artifact of the same kind."""
    if out.is_dir() and not (out / marker).exists():
        raise ConfigError(f"output {str(out)!r} exists and is not an edgeq artifact; choose a new --out path")


def _manifest(run: RunDir, config: ExportConfig, root: Path, files: list, types: dict, recipe: dict | None, extra=None):
    from edgeq.compress.model import model_summary

    return Manifest(
        format=config.format,
        variant=config.type,
        files=[file_entry(root, p, role) for p, role in files],
        model=model_summary(run.config),
        scheme=scheme_summary(run, types),
        source=run.source_info(),
        tokenizer=tokenizer_summary(run),
        recipe=recipe or {},
        extra=extra or {},
        edgeq_version=__version__,
    )


def export_gguf_artifact(run: RunDir, config: ExportConfig, out: Path, recipe: dict | None) -> Manifest:
    from edgeq.export.gguf import check_gguf_compat, export_gguf
    from edgeq.export.parity import measure_parity

    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a directory; GGUF export writes a file such as model.q4_0.gguf")
    check_gguf_compat(run, config.type)
    out.parent.mkdir(parents=True, exist_ok=True)
    man_path = out.with_name(out.stem + ".manifest.json")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model_file = tmp / out.name
        info = export_gguf(run, config.type, model_file)
        man = _manifest(run, config, tmp, [(model_file, "model")], info["tensor_types"], recipe)
        man.save(tmp / man_path.name)
        if config.parity:
            man.parity = measure_parity(man, run, config.parity_tokens)
            man.save(tmp / man_path.name)
        os.replace(model_file, out)  # the manifest lands last: its presence marks a finished export
        os.replace(tmp / man_path.name, man_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    man.path = man_path
    return man


def export_onnx_artifact(run: RunDir, config: ExportConfig, out: Path, recipe: dict | None) -> Manifest:
    from edgeq.export.onnx import export_onnx
    from edgeq.export.parity import measure_parity

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; ONNX export writes a directory")
    _refuse_existing(out, "manifest.json")
    with AtomicDir(out) as tmp:
        info = export_onnx(run, config.type, tmp, accuracy_level=config.accuracy_level, activations=config.activations)
        files = [(tmp / "model.onnx", "model"), (tmp / "tokenizer.json", "tokenizer"), (tmp / "config.json", "config")]
        files += [(p, "weights") for p in sorted(tmp.glob("*.onnx_data")) + sorted(tmp.glob("*.onnx.data"))]
        extra = {"onnx": {k: v for k, v in info.items() if k != "tensors"}}
        man = _manifest(run, config, tmp, files, info["tensors"], recipe, extra)
        man.save(tmp / "manifest.json")
        if config.parity:
            man.parity = measure_parity(man, run, config.parity_tokens)
            man.save(tmp / "manifest.json")
    man.path = out / "manifest.json"
    return man


def export(
    source: str | os.PathLike, config: ExportConfig, out: str | os.PathLike, recipe: dict | None = None
) -> Manifest:
    """Export a run dir or model dir to ``config.format``; returns the written (verified) manifest."""
    run = RunDir.open(source)
    from edgeq.compress.mappings import family_for

    family_for(run.config)
    out = Path(out)
    bundle_dir = None
    if config.bundle:
        from edgeq.export.bundle import check_bundle_target, default_bundle_dir, write_bundle

        bundle_dir = Path(config.bundle_dir) if config.bundle_dir else default_bundle_dir(out)
        check_bundle_target(bundle_dir, out)
    if config.format == "gguf":
        man = export_gguf_artifact(run, config, out, recipe)
    else:
        man = export_onnx_artifact(run, config, out, recipe)
    if bundle_dir is not None:
        write_bundle(man, bundle_dir, run.path)
    return man
