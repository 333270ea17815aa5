"""The Python API: one function per stage, over the stages' frozen config dataclasses.

    import edgeq
    run = edgeq.compress("path/to/model", edgeq.CompressConfig(bits=4, group_size=32), "runs/w4")
    man = edgeq.export(run, edgeq.ExportConfig(format="gguf", type="q4_0"), "model.q4_0.gguf")
    result = edgeq.bench(man.path, edgeq.BenchConfig(repeat=3))
    edgeq.report([result], "report/")

The CLI (``edgeq.cli``) is a thin layer over these functions.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeq.config import BenchConfig, CompressConfig, ExportConfig


def compress(model: str | os.PathLike, config: CompressConfig, out: str | os.PathLike, resume: bool = False) -> Path:
    """Quantize ``model`` into the run dir ``out`` (integer codes, fp16 scales, integer zeros)."""
    from edgeq.compress.run import compress as _compress

    return _compress(model, config, out, resume=resume)


def export(source: str | os.PathLike, config: ExportConfig, out: str | os.PathLike, recipe: dict | None = None):
    """Export a run dir or model dir; returns the artifact's ``Manifest`` (with parity)."""
    from edgeq.export.api import export as _export

    return _export(source, config, out, recipe)


def bench(
    artifact: str | os.PathLike, config: BenchConfig | None = None, eval_text: str | os.PathLike | None = None
) -> dict:
    """Measure an artifact on this machine in a separate process; returns the runtime's result.

    ``eval_text`` (or ``config.eval_text``) is the perplexity text; default: the held-out stdlib text.
    """
    import tempfile

    from edgeq.devices.local import bench_local
    from edgeq.export.manifest import manifest_path_for
    from edgeq.runtime.plan import Plan

    config = config or BenchConfig()
    manifest = manifest_path_for(artifact)
    text = eval_text or config.eval_text
    if text is not None:
        return bench_local(manifest, Plan.from_bench_config(config, str(text)))
    from edgeq.pipeline import write_eval_text

    with tempfile.TemporaryDirectory(prefix="edgeq-eval-") as tmp:
        path = write_eval_text(Path(tmp), config)
        return bench_local(manifest, Plan.from_bench_config(config, str(path)))


def report(results: list[dict], out: str | os.PathLike) -> dict[str, Path]:
    """Markdown, JSON and CSV tables and a Pareto plot of runtime results."""
    from edgeq.report.write import write_report

    return write_report(results, Path(out))
