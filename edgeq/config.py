"""The stages' configs: frozen dataclasses that the CLI, the recipe and the Python API all build.

torch-free, so a recipe can be validated (unknown keys, bad values) before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from edgeq.compress.quant import QuantScheme, SchemeOverride
from edgeq.errors import ConfigError

METHODS = ("rtn", "gptq", "awq")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
ONNX_PRECISIONS = ("fp32", "fp16", "int8", "int4")


def _check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{what}={value!r} is not supported; expected one of {list(choices)}")


@dataclass(frozen=True)
class CompressConfig:
    method: str = "rtn"
    bits: int = 4
    group_size: int = 32
    sym: bool = True
    overrides: tuple[str, ...] = ()  # PATTERN=BITS[:gGROUP][:sym|:asym] or PATTERN=fp
    clip_search: bool = False  # per-group clipping search (RTN: weight error; AWQ: output error)
    device: str = "auto"
    seed: int = 0
    # calibrated methods (gptq, awq)
    calib: str | None = None  # .txt / .jsonl / folder; None = the stdlib training text
    n_samples: int = 128
    seq_len: int = 256
    damp: float = 0.01  # GPTQ dampening, fraction of mean(diag H)
    act_order: bool = True  # GPTQ column order by descending diag(H), with static groups

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _ = self.scheme, self.parsed_overrides  # validate bits, group size and override syntax early

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.group_size, self.sym)

    @property
    def parsed_overrides(self) -> tuple[SchemeOverride, ...]:
        return tuple(SchemeOverride.parse(o, self.scheme) for o in self.overrides)


@dataclass(frozen=True)
class ExportConfig:
    format: str = "gguf"  # gguf | onnx
    type: str = "q4_0"  # gguf tensor type for quantized tensors; for onnx the precision
    parity: bool = True  # measure KL / top-1 / rel. error against source and fake-quant models
    parity_tokens: int = 256
    accuracy_level: int = 0  # MatMulNBits accuracy_level; 0 = exact (fp32 activations)
    activations: str = "fp32"  # ONNX int4/int8 graph float type: fp32 (exact) or fp16 (smaller)
    bundle: bool = False  # also write an integration bundle (edgeq.export.bundle)
    bundle_dir: str | None = None  # where; None: beside the artifact (model.q4_0.bundle, DIR.bundle)

    def __post_init__(self) -> None:
        _check_choice("format", self.format, ("gguf", "onnx"))
        _check_choice(f"{self.format} type", self.type, GGUF_TYPES if self.format == "gguf" else ONNX_PRECISIONS)
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"accuracy_level={self.accuracy_level} is not supported; expected 0..4")
        _check_choice("activations", self.activations, ("fp32", "fp16"))
        if self.activations == "fp16" and (self.format != "onnx" or self.type not in ("int4", "int8")):
            raise ConfigError(
                f"activations=fp16 applies to ONNX int4/int8 exports, not {self.format} {self.type}; "
                "drop --activations, or use --precision fp16 for a float16 ONNX graph"
            )


@dataclass(frozen=True)
class BenchConfig:
    prompt_tokens: int = 64
    decode_tokens: int = 64
    repeat: int = 3
    warmup: int = 1
    threads: int | None = None
    eval_tokens: int = 4096  # tokens of eval text scored for perplexity
    ctx: int = 256  # perplexity window
    eval_text: str | None = None  # path; None: the bundled held-out stdlib text


def config_from_dict(cls, data: dict, where: str):
    """Build a config dataclass from a dict, refusing unknown keys with the list of known ones."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; expected some of {sorted(known)}")
    values = dict(data)
    if "overrides" in values:
        values["overrides"] = tuple(values["overrides"])
    return cls(**values)
