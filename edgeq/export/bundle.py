"""Integration bundles: an exported artifact with everything an app developer needs to run it.

``write_bundle(manifest, out)`` writes, atomically (``edgeq.rundir.AtomicDir``)::

    BUNDLE/
      README.md                 what is inside, the parity measured at export, how to run each example
      model/                    the artifact's files and its manifest, byte for byte (hard links when
                                the file system allows, else copies), plus the tokenizer files
      python/run_onnxruntime.py | run_llamacpp.py   greedy generation, verifying the manifest's hashes
      python/requirements.txt   the runtime packages, pinned to the versions that measured parity
      cpp/main.cpp, CMakeLists.txt                  onnxruntime C/C++ API | llama.cpp C API
      android/                  Kotlin with onnxruntime-android + the Gradle line (ONNX); notes (GGUF)

The Python snippets are real programs (``edgeq/export/snippets/*.py``, linted with the package);
the C++/Kotlin sources are text in ``edgeq.export.snippets.native``. The snippets locate the
manifest in ``../model/`` themselves, so the bundle can be moved or zipped as a whole.
"""

from __future__ import annotations

import logging
import os
import shutil
from importlib import metadata
from pathlib import Path

from edgeq.errors import ConfigError, ExportError
from edgeq.export.manifest import Manifest
from edgeq.export.snippets import native
from edgeq.rundir import TOKENIZER_FILES, AtomicDir

log = logging.getLogger(__name__)

SNIPPETS = Path(__file__).resolve().parent / "snippets"
PYTHON_SNIPPET = {"onnx": "run_onnxruntime.py", "gguf": "run_llamacpp.py"}
RUNTIME_PACKAGES = {"onnx": ("onnxruntime", "tokenizers", "numpy"), "gguf": ("llama-cpp-python", "numpy")}
MARKER = "README.md"  # with model/: what an earlier bundle looks like (safe to replace)


def default_bundle_dir(artifact: str | os.PathLike) -> Path:
    """``model.q4_0.gguf`` -> ``model.q4_0.bundle``; ONNX dir ``out/int4`` -> ``out/int4.bundle``."""
    artifact = Path(artifact)
    stem = artifact.stem if artifact.suffix == ".gguf" else artifact.name
    return artifact.with_name(f"{stem}.bundle")


def check_bundle_target(out: Path, artifact: Path) -> None:
    """Refuse a bundle folder that holds the artifact or something that is not an earlier bundle.

    Called before the export starts (fail fast) and again before the bundle is written.
    """
    out, artifact_root = Path(out), Path(artifact)
    if out.resolve() == artifact_root.resolve() or artifact_root.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"--bundle {str(out)!r} would contain or replace the artifact itself; choose another folder")
    earlier_bundle = out.is_dir() and (out / MARKER).exists() and (out / "model").is_dir()
    if out.exists() and not earlier_bundle and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(f"--bundle {str(out)!r} exists and is not an edgeq bundle; choose a new path or remove it")


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no extra disk for multi-GB weights) where possible, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not supported
        shutil.copy2(src, dst)


def place_artifact(manifest: Manifest, model_dir: Path, tokenizer_dir: Path | None) -> list[str]:
    """The manifest and every file it names under ``model_dir``; returns the names placed."""
    root = manifest.root
    for entry in manifest.files:
        src = root / entry.path
        if not src.is_file() or src.stat().st_size != entry.bytes:
            raise ExportError(
                f"artifact file {str(src)!r} is missing or not {entry.bytes} bytes as the manifest says; re-export"
            )
        link_or_copy(src, model_dir / entry.path)
    placed = [e.path for e in manifest.files]
    # Side files (tokenizer_config.json, ...) the manifest does not name: ONNX keeps them in its
    # dir (optimum's loader reads them); for GGUF, whose tokenizer is inside the file, they come
    # from the run dir for apps that tokenize on the host.
    extra_dir = root if manifest.format == "onnx" else tokenizer_dir
    for name in TOKENIZER_FILES + ("config.json", "generation_config.json"):
        src = extra_dir / name if extra_dir is not None else None
        if src is not None and src.is_file() and not (model_dir / name).exists():
            shutil.copy2(src, model_dir / name)
            placed.append(name)
    assert manifest.path is not None, "a bundle is made from a saved manifest"
    shutil.copy2(manifest.path, model_dir / manifest.path.name)
    return [*placed, manifest.path.name]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def write_python(fmt: str, folder: Path) -> str:
    """The Python snippet and a requirements.txt pinned to this machine's runtime versions."""
    folder.mkdir()
    name = PYTHON_SNIPPET[fmt]
    shutil.copy2(SNIPPETS / name, folder / name)
    pins = [f"{p}=={v}" if (v := _version(p)) else p for p in RUNTIME_PACKAGES[fmt]]
    (folder / "requirements.txt").write_text("\n".join(pins) + "\n")
    return name


def write_native(fmt: str, cpp: Path, android: Path) -> None:
    """The C++ example with its CMakeLists.txt, and the Android folder."""
    cpp.mkdir()
    android.mkdir()
    if fmt == "onnx":
        (cpp / "main.cpp").write_text(native.ORT_CPP)
        (cpp / "CMakeLists.txt").write_text(native.ORT_CMAKE)
        (android / "EdgeqGreedy.kt").write_text(native.KOTLIN)
        version = _version("onnxruntime") or "1.20.0"
        (android / "build.gradle.kts.txt").write_text(native.GRADLE.format(ort_version=version))
    else:
        (cpp / "main.cpp").write_text(native.LLAMA_CPP)
        (cpp / "CMakeLists.txt").write_text(native.LLAMA_CMAKE)
        (android / "README.md").write_text(native.ANDROID_GGUF_README)


def _parity_lines(parity: dict) -> list[str]:
    lines = []
    for ref, what in (("fake_quant", "the run's fake-quant model"), ("source", "the source model")):
        got = parity.get(ref) or {}
        if "rel_error" in got:
            lines.append(
                f"- vs {what}: relative logit error {got['rel_error']:.2e}, top-1 agreement "
                f"{got['top1_agreement']:.3f}, KL {got['kl']:.2e}"
                + (
                    f", perplexity {got['ppl_artifact']:.3f} vs {got['ppl_reference']:.3f}"
                    if "ppl_artifact" in got
                    else ""
                )
            )
    if not lines:
        return ["Parity was not measured at export (`--no-parity`)."]
    return [f"Parity measured at export on {parity.get('tokens')} held-out tokens, run by the real client:", *lines]


def _howto(fmt: str, model_file: str, script: str) -> str:
    if fmt == "onnx":
        cpp = (
            "    cmake -S cpp -B build -DONNXRUNTIME_ROOT=/path/to/onnxruntime-<os>-<arch>-<version>\n"
            "    cmake --build build\n"
            f"    ./build/edgeq_greedy model/{model_file} 32 464 2068 7586   # prompt token ids in, ids out\n\n"
            f'Get a prompt\'s ids with `python python/{script} --json --prompt "..."` (`prompt_ids`).'
        )
        android = (
            "Add the dependency in `android/build.gradle.kts.txt` to the app module, copy `model/` into the app\n"
            "(assets -> filesDir) and `android/EdgeqGreedy.kt` into the sources:\n\n"
            '    EdgeqGreedy(File(filesDir, "model/model.onnx").path).use { it.generate(promptIds, 32) }'
        )
    else:
        cpp = (
            "    cmake -S cpp -B build -DLLAMA_INCLUDE_DIR=<llama.cpp>/include -DLLAMA_LIB_DIR=<dir with libllama>\n"
            "    cmake --build build\n"
            f'    ./build/edgeq_greedy model/{model_file} 32 "The quick brown fox"'
        )
        android = "See `android/README.md`: GGUF runs on Android through llama.cpp (NDK build of `cpp/`)."
    python = (
        "    pip install -r python/requirements.txt\n"
        f'    python python/{script} --prompt "The quick brown fox" --max-new-tokens 32\n\n'
        "Options: `--json` (prompt ids, generated ids and text as one JSON line), `--ignore-eos`, `--threads N`,\n"
        "`--manifest PATH`, `--no-verify` (skip the sha256 check)."
    )
    return f"## Python\n\n{python}\n\n## C++\n\n{cpp}\n\n## Android\n\n{android}\n"


def readme(manifest: Manifest, placed: list[str], script: str) -> str:
    """The bundle's README.md: what it holds, how well it matches, how to run each example."""
    model = manifest.model
    scheme = manifest.scheme.get("default") or {}
    label = f"{scheme.get('bits')}-bit, group {scheme.get('group_size')}" if scheme else "unquantized"
    name = Path(str(manifest.source.get("path") or manifest.file("model").name)).name
    head = [
        f"# {name}: edgeq integration bundle",
        "",
        f"{manifest.format.upper()} `{manifest.variant}` export of a {model.get('architecture')} "
        f"({model.get('n_layers')} layers, hidden {model.get('hidden_size')}, vocab {model.get('vocab_size')}), "
        f"compressed with {manifest.scheme.get('method', 'none')} ({label}); edgeq {manifest.edgeq_version}.",
        "",
        *_parity_lines(manifest.parity),
        "",
        "## model/",
        "",
        f"`{manifest.path.name if manifest.path else 'manifest.json'}` is the contract: it names every file with its"
        " sha256; check them before loading (the Python examples do). Files:",
        "",
        "| file | role | bytes | sha256 |",
        "|---|---|---:|---|",
        *[f"| {e.path} | {e.role} | {e.bytes} | {e.sha256[:16]}... |" for e in manifest.files],
        "",
        f"Also here: {', '.join(n for n in placed if n not in {e.path for e in manifest.files})}. The model files"
        " may be hard links to the exported artifact: replace them, never edit them in place.",
        "",
    ]
    return "\n".join(head) + "\n" + _howto(manifest.format, manifest.file("model").name, script)


def write_bundle(manifest: Manifest, out: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write the integration bundle of a saved artifact's ``manifest`` at ``out``; returns ``out``.

    ``tokenizer_dir`` (the run dir) supplies tokenizer files a GGUF artifact does not hold as files.
    """
    if manifest.format not in PYTHON_SNIPPET:
        raise ExportError(f"no bundle for format {manifest.format!r}; expected one of {sorted(PYTHON_SNIPPET)}")
    out = Path(out)
    check_bundle_target(out, manifest.root if manifest.format == "onnx" else manifest.file("model"))
    with AtomicDir(out) as tmp:
        placed = place_artifact(manifest, tmp / "model", Path(tokenizer_dir) if tokenizer_dir else None)
        script = write_python(manifest.format, tmp / "python")
        write_native(manifest.format, tmp / "cpp", tmp / "android")
        (tmp / MARKER).write_text(readme(manifest, placed, script))
    log.info("wrote bundle %s (%s %s, %d model files)", out, manifest.format, manifest.variant, len(placed))
    return out
