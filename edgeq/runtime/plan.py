"""The measurement plan: what the device-side harness measures, as one JSON file the host pushes.

A ``Plan`` is the device's view of a bench: token counts, repetitions, threads, the perplexity window,
and where the evaluation text lies *on the device*. It is plain data (no numpy, no torch), serialized
as JSON because the device may have nothing but the runtime installed. Unknown keys are refused so a
typo in a plan never silently falls back to a default.

``eval_text`` is a path or ``None``: the runtime reads only what the host gave it (the manifest and the
files it names, plus this text), so with ``None`` it measures speed and memory and skips perplexity.
The host turns ``BenchConfig.eval_text=None`` ("the bundled held-out text") into a file it pushes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from edgeq.errors import ConfigError

PLAN_VERSION = 1


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"an integer >= {minimum}" + (" or null" if optional else "")
        raise ConfigError(f"plan {name}={value!r} is invalid; expected {expected}")


@dataclass(frozen=True)
class Plan:
    """What one bench measures. Token counts are tokens of the artifact's own tokenizer."""

    prompt_tokens: int = 64  # prompt length for prefill / TTFT
    decode_tokens: int = 64  # single-token decode steps timed after the prompt (llama-bench's "tg")
    repeat: int = 3  # timed generations; their spread is reported
    warmup: int = 1  # untimed generations before the timed ones
    threads: int | None = None  # None: the backend's default
    eval_text: str | None = None  # path on the device; None: no perplexity
    eval_tokens: int = 4096  # first tokens of the eval text scored for perplexity
    ctx: int = 256  # perplexity window (non-overlapping)
    rss_interval_ms: float = 5.0  # RSS sampling period
    n_ctx: int | None = None  # backend context; None: the model's trained context
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # onnxruntime execution providers
    bandwidth_probe: bool = True  # measure memory bandwidth for the roofline (adds ~1 s)

    def __post_init__(self) -> None:
        _check_int("prompt_tokens", self.prompt_tokens, 1)
        _check_int("decode_tokens", self.decode_tokens, 1)
        _check_int("repeat", self.repeat, 1)
        _check_int("warmup", self.warmup, 0)
        _check_int("threads", self.threads, 1, optional=True)
        _check_int("eval_tokens", self.eval_tokens, 2)
        _check_int("ctx", self.ctx, 2)
        _check_int("n_ctx", self.n_ctx, 1, optional=True)
        if isinstance(self.rss_interval_ms, bool) or not isinstance(self.rss_interval_ms, (int, float)):
            raise ConfigError(f"plan rss_interval_ms={self.rss_interval_ms!r} is invalid; expected a number > 0")
        if not 0 < self.rss_interval_ms <= 10_000:
            raise ConfigError(f"plan rss_interval_ms={self.rss_interval_ms!r} is invalid; expected 0 < ms <= 10000")
        if self.eval_text is not None and not isinstance(self.eval_text, str):
            raise ConfigError(f"plan eval_text={self.eval_text!r} is invalid; expected a path string or null")
        if not isinstance(self.bandwidth_probe, bool):
            raise ConfigError(f"plan bandwidth_probe={self.bandwidth_probe!r} is invalid; expected true or false")
        providers = self.providers
        if isinstance(providers, str) or not all(isinstance(p, str) for p in providers) or not providers:
            raise ConfigError(
                f"plan providers={providers!r} is invalid; expected a non-empty list such as ['CPUExecutionProvider']"
            )
        object.__setattr__(self, "providers", tuple(providers))
        if self.eval_tokens < self.ctx:
            raise ConfigError(
                f"plan eval_tokens={self.eval_tokens} is smaller than one perplexity window ctx={self.ctx}; "
                "raise eval_tokens or lower ctx"
            )

    # -- serialization ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["providers"] = list(self.providers)
        data["plan_version"] = PLAN_VERSION
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> Plan:
        """Build a plan from parsed JSON, refusing unknown keys with the list of known ones."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
        values = dict(data)
        version = values.pop("plan_version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise ConfigError(f"{where} has plan_version {version!r}; this runtime reads {PLAN_VERSION}: upgrade edgeq")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in {where}; expected some of {sorted(known)}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "plan") -> Plan:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{where} is not valid JSON ({exc}); write the plan with Plan.save") from None
        return cls.from_dict(data, where)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read plan {str(path)!r} ({exc.strerror}); pass an existing plan.json") from None
        return cls.from_json(text, where=str(path))

    @classmethod
    def from_bench_config(cls, config: Any, eval_text: str | os.PathLike | None, **overrides: Any) -> Plan:
        """The plan for an ``edgeq.config.BenchConfig``; ``eval_text`` is the file's path on the device."""
        return cls(
            prompt_tokens=config.prompt_tokens,
            decode_tokens=config.decode_tokens,
            repeat=config.repeat,
            warmup=config.warmup,
            threads=config.threads,
            eval_tokens=config.eval_tokens,
            ctx=config.ctx,
            eval_text=None if eval_text is None else str(eval_text),
            **overrides,
        )
