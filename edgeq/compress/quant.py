"""The quantization contract: a scheme, and the integer codes + scales + zeros it produces.

This module is numpy-only so that exporters and the device side can read runs without torch.

Every quantized weight ``W[N, K]`` (``nn.Linear.weight`` layout: N outputs, K inputs) is stored as

* ``codes``  uint8 ``[N, K]``, each in ``[0, 2**bits - 1]`` (one code per weight, unpacked);
* ``scales`` float16 ``[N, G]`` with ``G = K // group_size`` (``G = 1`` per-channel);
* ``zeros``  uint8 ``[N, G]``, integer zero points in ``[0, 2**bits - 1]``;

and dequantizes as ``W[n, k] = (codes[n, k] - zeros[n, g]) * scales[n, g]`` with ``g = k // group_size``,
computed in float32. That is exactly ONNX Runtime's ``MatMulNBits`` formula, and exactly GGUF's
``q8_0`` (zero 128) / ``q4_0`` (zero 8) blocks when the scheme is symmetric with groups of 32; ``q4_1``
holds it up to the fp16 rounding of ``m = -d * zero``. Scales are fp16 values by contract, so no
format has to round them again.

A symmetric scheme has the fixed zero ``2**(bits-1)``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from edgeq.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (-1, 32, 64, 128)


@dataclass(frozen=True)
class QuantScheme:
    """Weight-only quantization scheme: bit width, group size along K (-1: per output channel), sym."""

    bits: int = 4
    group_size: int = 32
    sym: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(
                f"bits={self.bits} is not supported; expected one of {SUPPORTED_BITS} (use --bits 4 or 8)"
            )
        if self.group_size != -1 and (self.group_size < 16 or self.group_size % 16):
            raise ConfigError(
                f"group_size={self.group_size} is not supported; expected -1 (per-channel) or a multiple "
                f"of 16 such as 32, 64, 128 (use --group-size 32)"
            )

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        return 1 << (self.bits - 1)

    def groups(self, in_features: int) -> int:
        """Number of groups along K for a row of ``in_features``; refuses sizes that do not divide."""
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            raise ConfigError(
                f"group_size={self.group_size} does not divide in_features={in_features}; "
                f"expected a divisor of every quantized layer's input size (use --group-size -1 or 32)"
            )
        return in_features // self.group_size

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    @property
    def label(self) -> str:
        group = "pc" if self.group_size == -1 else f"g{self.group_size}"
        return f"w{self.bits}{group}{'' if self.sym else 'a'}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantScheme:
        unknown = set(data) - {"bits", "group_size", "sym"}
        if unknown:
            raise ConfigError(f"unknown scheme keys {sorted(unknown)}; expected bits, group_size, sym")
        return cls(**data)


@dataclass
class QuantizedWeight:
    """Integer codes, fp16 scales and integer zeros of one ``[N, K]`` weight (see module docstring)."""

    codes: np.ndarray  # (N, K) uint8
    scales: np.ndarray  # (N, G) float16
    zeros: np.ndarray  # (N, G) uint8
    scheme: QuantScheme = field(default_factory=QuantScheme)

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        g = self.scheme.groups(k)
        assert self.codes.dtype == np.uint8, self.codes.dtype
        assert self.scales.shape == (n, g) and self.scales.dtype == np.float16, (self.scales.shape, g)
        assert self.zeros.shape == (n, g) and self.zeros.dtype == np.uint8, self.zeros.shape

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> np.ndarray:
        """float32 ``[N, K]`` weights: ``(codes - zeros) * scales`` per group."""
        n, k = self.codes.shape
        gl = self.scheme.group_len(k)
        codes = self.codes.reshape(n, -1, gl).astype(np.float32)
        w = (codes - self.zeros.astype(np.float32)[..., None]) * self.scales.astype(np.float32)[..., None]
        return w.reshape(n, k)

    def check(self) -> None:
        """Validate value ranges (a corrupt run dir must not reach an exporter)."""
        maxq = self.scheme.maxq
        if int(self.codes.max(initial=0)) > maxq or int(self.zeros.max(initial=0)) > maxq:
            raise ConfigError(f"codes or zeros exceed {maxq} for {self.scheme.bits}-bit; the run dir is corrupt")
        if self.scheme.sym and not np.all(self.zeros == self.scheme.sym_zero):
            raise ConfigError(f"symmetric scheme with zeros != {self.scheme.sym_zero}; the run dir is corrupt")
        if not np.all(np.isfinite(self.scales.astype(np.float32))):
            raise ConfigError("non-finite scales in run dir; the run dir is corrupt")


@dataclass(frozen=True)
class SchemeOverride:
    """A per-tensor override: tensors whose name matches ``pattern`` (regex search) get ``scheme``
    (or stay unquantized when ``scheme`` is None)."""

    pattern: str
    scheme: QuantScheme | None

    @classmethod
    def parse(cls, text: str, default: QuantScheme) -> SchemeOverride:
        """Parse ``PATTERN=BITS[:gGROUP][:sym|:asym]`` or ``PATTERN=fp``, e.g. ``down_proj=8:g32``."""
        if "=" not in text:
            raise ConfigError(f"override {text!r} has no '='; expected PATTERN=BITS[:gGROUP][:sym|:asym] or PATTERN=fp")
        pattern, spec = text.split("=", 1)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"override pattern {pattern!r} is not a valid regex ({exc})") from None
        if spec == "fp":
            return cls(pattern, None)
        parts = spec.split(":")
        fields = {"bits": default.bits, "group_size": default.group_size, "sym": default.sym}
        try:
            fields["bits"] = int(parts[0])
            for part in parts[1:]:
                if part in ("sym", "asym"):
                    fields["sym"] = part == "sym"
                elif part.startswith("g"):
                    fields["group_size"] = -1 if part in ("gpc", "g-1") else int(part[1:])
                else:
                    raise ValueError(part)
        except ValueError:
            raise ConfigError(
                f"override {text!r} is malformed; expected PATTERN=BITS[:gGROUP][:sym|:asym], e.g. down_proj=8:g32"
            ) from None
        return cls(pattern, QuantScheme(**fields))


def resolve_scheme(name: str, default: QuantScheme, overrides: tuple[SchemeOverride, ...] = ()) -> QuantScheme | None:
    """The scheme for tensor ``name``: the last matching override wins, else the default."""
    chosen: QuantScheme | None = default
    for ov in overrides:
        if re.search(ov.pattern, name):
            chosen = ov.scheme
    return chosen
