"""The backend protocol every runtime implements: tokenize, then feed tokens and read logits.

A backend holds one sequence's state (its KV cache). ``forward(ids)`` appends ``ids`` to that state and
returns the logits of each appended position, so the same calls serve prefill (many ids), decode (one
id at a time) and perplexity (a window after ``reset()``). Greedy decoding, timing and perplexity are
written once, over this protocol, in ``edgeq.runtime.metrics`` / ``perplexity``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class BackendOptions:
    threads: int | None = None  # None: the backend's default (all physical cores)
    n_ctx: int | None = None  # None: the model's trained context
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # onnxruntime execution providers
    provider_options: dict = field(default_factory=dict)


class Backend(Protocol):
    name: str  # "onnxruntime" | "llama.cpp"

    def load(self) -> None:
        """Load the artifact (timed by the caller as load time)."""

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with the artifact's own tokenizer, no special tokens added."""

    def reset(self) -> None:
        """Forget the sequence (clear the KV cache)."""

    def forward(self, ids: list[int]) -> np.ndarray:
        """Append ``ids`` to the sequence; float32 logits ``(len(ids), vocab_size)`` of those positions."""

    @property
    def n_past(self) -> int:
        """Tokens in the current sequence."""

    @property
    def n_ctx(self) -> int:
        """Longest sequence the backend holds."""

    @property
    def vocab_size(self) -> int: ...

    def info(self) -> dict:
        """Runtime versions, threads, execution provider: recorded in every result."""

    def close(self) -> None: ...
