"""Runs a recipe's stages in order and owns the output layout::

OUT/
  runs/NAME/                 run dirs (compress stage; with a distill section: the distilled run)
  runs/NAME.ptq/             the compress stage's run when a distill section retrains it into runs/NAME/
  artifacts/NAME.TYPE.gguf   GGUF artifacts (+ NAME.TYPE.manifest.json)
  artifacts/NAME.onnx-TYPE/  ONNX artifacts (model.onnx, tokenizer, manifest.json)
  bench/LABEL.json           one runtime result per artifact
  eval.txt                   the evaluation text every artifact was scored on
  report.md, results.json, results.csv, pareto.png
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.config import BenchConfig, ExportConfig
from edgeq.recipe import Recipe, RunSpec

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    out: Path
    runs: dict[str, Path] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)  # label -> manifest path
    bench: dict[str, dict] = field(default_factory=dict)  # label -> runtime result
    report: dict[str, Path] = field(default_factory=dict)


def resolve_model(model: str) -> Path | str:
    if model == "bundled":
        from edgeq.bundled import MODEL_DIR

        return MODEL_DIR
    return model


def artifact_path(out: Path, run_name: str, cfg: ExportConfig) -> Path:
    if cfg.format == "gguf":
        return out / "artifacts" / f"{run_name}.{cfg.type}.gguf"
    return out / "artifacts" / f"{run_name}.onnx-{cfg.type}"


def artifact_label(run_name: str, cfg: ExportConfig) -> str:
    return f"{run_name}/{cfg.format}-{cfg.type}"


def _distill(spec: RunSpec, ptq_dir: Path, out: Path, say: Callable[[str], None]) -> Path:
    """The distill step: retrain the compressed run (in this process) into ``out``."""
    from edgeq.compress.distill.run import distill

    cfg = spec.distill
    say(f"distill {spec.name}: {cfg.loss}, {cfg.steps} steps per block")
    teacher = str(resolve_model(spec.teacher)) if spec.teacher else None  # None: the run's source model
    return distill(ptq_dir, cfg, out, teacher)


def write_eval_text(out: Path, bench: BenchConfig) -> Path:
    """The evaluation text file: the configured one, or the bundled held-out stdlib text."""
    if bench.eval_text:
        return Path(bench.eval_text)
    from edgeq.bundled import heldout_text

    path = out / "eval.txt"
    path.write_text(heldout_text(max_chars=bench.eval_tokens * 8))
    return path


def run_recipe(
    recipe: Recipe, out: Path | None = None, progress: Callable[[str], None] | None = None
) -> PipelineResult:
    """Compress, distill, export, bench and report as the recipe says; returns where everything went."""
    from edgeq.api import bench as bench_artifact
    from edgeq.api import compress, export, report

    out = Path(out or recipe.out)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: log.info(msg))
    result = PipelineResult(out)
    model = resolve_model(recipe.model)
    resolved = recipe.resolved()
    for spec in recipe.runs:
        if spec.compress is None:
            run_dir = Path(model)
        else:
            say(f"compress {spec.name}: {spec.compress.method} {spec.compress.scheme.label}")
            ptq_dir = out / "runs" / (f"{spec.name}.ptq" if spec.distill else spec.name)
            run_dir = compress(model, spec.compress, ptq_dir)
            if spec.distill is not None:
                run_dir = _distill(spec, run_dir, out / "runs" / spec.name, say)
        result.runs[spec.name] = run_dir
        for cfg in spec.exports:
            label = artifact_label(spec.name, cfg)
            say(f"export {label}")
            man = export(run_dir, cfg, artifact_path(out, spec.name, cfg), recipe=resolved)
            result.artifacts[label] = man.path
    if recipe.bench is not None:
        bench_cfg = recipe.bench
        eval_path = write_eval_text(out, bench_cfg)
        for label, man_path in result.artifacts.items():
            say(f"bench {label}")
            res = bench_artifact(man_path, bench_cfg, eval_text=eval_path)
            res["label"] = label
            result.bench[label] = res
            bench_file = out / "bench" / (label.replace("/", "__") + ".json")
            bench_file.parent.mkdir(parents=True, exist_ok=True)
            import json

            bench_file.write_text(json.dumps(res, indent=1) + "\n")
        result.report = report(list(result.bench.values()), out)
    return result
