"""Recipes: YAML files naming the stages to run, parsed into the stages' config dataclasses.

A recipe is the configs of the stages in order. Unknown keys are errors. Two shapes are accepted:
a single run (top-level ``compress`` and ``export``), or several (``runs:``, each with its own). ::

    model: bundled            # a model dir, a hub id, or "bundled" for the bundled reference model
    out: edgeq-out            # where run dirs, artifacts and the report go
    runs:
      - name: fp              # no compress section: the source model itself is exported
        export: [{format: gguf, type: f16}, {format: onnx, type: fp32}]
      - name: rtn-w4g32
        compress: {method: rtn, bits: 4, group_size: 32, sym: true}
        export: [{format: gguf, type: q4_0}, {format: onnx, type: int4}]
      - name: gptq-w2g32-kd
        compress: {method: gptq, bits: 2, group_size: 32}
        distill: {loss: mse+sw, steps: 200}   # optional, after compress: retrain, then export that
        export: [{format: onnx, type: int4}]
    bench: {repeat: 3, decode_tokens: 64}   # optional: measure every artifact

A ``distill`` section takes the fields of ``edgeq.compress.distill.config.DistillConfig`` (the options of
``edgeq distill``) plus ``teacher`` (default: the recipe's model).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeq.compress.distill.config import DistillConfig
from edgeq.compress.distill.config import config_from_dict as distill_config_from_dict
from edgeq.config import BenchConfig, CompressConfig, ExportConfig, config_from_dict
from edgeq.errors import ConfigError

TOP_KEYS = {"model", "out", "runs", "compress", "distill", "export", "bench", "name"}
RUN_KEYS = {"name", "compress", "distill", "export"}


@dataclass(frozen=True)
class RunSpec:
    name: str
    compress: CompressConfig | None
    exports: tuple[ExportConfig, ...]
    distill: DistillConfig | None = None  # retrain the compressed run before exporting it
    teacher: str | None = None  # the distill teacher; None: the recipe's model


@dataclass(frozen=True)
class Recipe:
    model: str
    out: str
    runs: tuple[RunSpec, ...]
    bench: BenchConfig | None = None
    source: dict = field(default_factory=dict)  # the YAML as read, copied into every manifest

    def resolved(self) -> dict:
        """The recipe with every default filled in (what manifests record)."""
        return {
            "model": self.model,
            "out": self.out,
            "runs": [
                {
                    "name": r.name,
                    "compress": asdict(r.compress) if r.compress else None,
                    "distill": {**r.distill.to_dict(), "teacher": r.teacher} if r.distill else None,
                    "export": [asdict(e) for e in r.exports],
                }
                for r in self.runs
            ],
            "bench": asdict(self.bench) if self.bench else None,
        }


def _unknown(data: dict, known: set, where: str) -> None:
    extra = sorted(set(data) - known)
    if extra:
        raise ConfigError(f"unknown key(s) {extra} in {where}; expected some of {sorted(known)}")


def _run_spec(data: dict, where: str) -> RunSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping with name/compress/export, got {type(data).__name__}")
    _unknown(data, RUN_KEYS, where)
    name = str(data.get("name", "run"))
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"run name {name!r} in {where} must use letters, digits, '.', '_' or '-'")
    compress = config_from_dict(CompressConfig, data["compress"], f"{where}.compress") if data.get("compress") else None
    distill, teacher = _distill_section(data, compress, where)
    exports = data.get("export") or []
    if isinstance(exports, dict):
        exports = [exports]
    parsed = tuple(config_from_dict(ExportConfig, e, f"{where}.export[{i}]") for i, e in enumerate(exports))
    return RunSpec(name, compress, parsed, distill, teacher)


def _distill_section(data: dict, compress: CompressConfig | None, where: str):
    if "distill" not in data:
        return None, None
    section = data["distill"]
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise ConfigError(f"{where}.distill must be a mapping, got {type(section).__name__}")
    if compress is None:
        raise ConfigError(f"{where}.distill needs a compress section in the same run (distill retrains its codes)")
    section = dict(section)
    teacher = section.pop("teacher", None)
    cfg = distill_config_from_dict(section, f"{where}.distill")
    if cfg.fsdp:
        raise ConfigError(f"{where}.distill: fsdp needs several processes; run `edgeq distill --nproc N --fsdp`")
    return cfg, None if teacher is None else str(teacher)


def parse_recipe(data: dict, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a YAML mapping, got {type(data).__name__}")
    _unknown(data, TOP_KEYS, where)
    if "model" not in data:
        raise ConfigError(f"{where} has no 'model'; expected a model dir, hub id or 'bundled'")
    if "runs" in data:
        if any(k in data for k in ("compress", "distill", "export", "name")):
            raise ConfigError(f"{where} mixes 'runs' with top-level compress/distill/export; put them inside runs")
        runs = tuple(_run_spec(r, f"{where}.runs[{i}]") for i, r in enumerate(data["runs"] or []))
    else:
        runs = (_run_spec({k: data[k] for k in ("name", "compress", "distill", "export") if k in data}, where),)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"run names in {where} repeat ({names}); give each run a distinct name")
    bench = config_from_dict(BenchConfig, data["bench"], f"{where}.bench") if data.get("bench") is not None else None
    return Recipe(str(data["model"]), str(data.get("out", "edgeq-out")), runs, bench, dict(data))


def load_recipe(path: str | os.PathLike) -> Recipe:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {str(p)!r} does not exist; expected a YAML file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"recipe {str(p)!r} is not valid YAML ({first})") from None
    return parse_recipe(data, where=p.name)


def builtin_recipe(name: str) -> Path:
    path = Path(__file__).resolve().parent / "recipes" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"no built-in recipe {name!r}")
    return path
