"""Perplexity of an artifact over a token stream, in numpy, through the ``Backend`` protocol.

The first ``eval_tokens`` + 1 tokens are cut into non-overlapping windows: window ``w`` feeds tokens
``[w·ctx, (w+1)·ctx)`` from an empty sequence (``backend.reset()``) and scores the ``ctx`` tokens one
ahead, so every target is predicted once, under the same context length; a trailing partial window is
dropped. This is exactly the host's protocol (``edgeq.compress.eval``), so host and device perplexities
of the same model agree. (llama-perplexity scores only each window's second half: not comparable.)

``ppl = exp(total NLL / predictions)``. The per-window mean NLLs are returned as well: two artifacts
scored on the same windows give paired differences, from which the host estimates noise.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from edgeq.errors import BackendError, ConfigError
from edgeq.runtime.backends.base import Backend

log = logging.getLogger(__name__)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64. ``logits``: (T, V)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets`` (T,) under ``logits`` (T, V), in nats."""
    lp = log_softmax(logits)
    return -lp[np.arange(len(targets)), targets]


@dataclass
class PerplexityResult:
    ppl: float
    nll_mean: float  # nats per predicted token
    tokens: int  # predictions scored
    eval_tokens: int  # tokens of the stream used (windows x ctx)
    windows: int
    ctx: int
    window_nll: list[float]  # mean NLL of each window, in order
    time_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


def _window_nll(backend: Backend, window: list[int], index: int) -> tuple[float, int]:
    """Sum of NLLs of one window's ``len(window) - 1`` predictions (the last token is only a target)."""
    backend.reset()
    inputs = window[:-1]
    logits = np.asarray(backend.forward(inputs))  # (ctx, V)
    if logits.ndim != 2 or logits.shape[0] != len(inputs):
        raise BackendError(
            f"backend {getattr(backend, 'name', '?')} returned logits of shape {logits.shape} for window {index} "
            f"of {len(inputs)} tokens; expected ({len(inputs)}, vocab_size): the backend must return every position"
        )
    nll = token_nll(logits, np.asarray(window[1:], dtype=np.int64))
    if not np.all(np.isfinite(nll)):
        raise BackendError(f"non-finite logits in perplexity window {index}; the artifact or backend is broken")
    return float(nll.sum()), len(window) - 1


def perplexity(backend: Backend, token_ids: list[int], ctx: int, eval_tokens: int | None = None) -> PerplexityResult:
    """Perplexity over non-overlapping ``ctx``-token windows of the first ``eval_tokens`` of ``token_ids``."""
    if ctx < 2:
        raise ConfigError(f"perplexity ctx={ctx} is invalid; expected >= 2")
    n_ctx = getattr(backend, "n_ctx", None)
    if n_ctx is not None and ctx > n_ctx:
        raise ConfigError(f"perplexity ctx={ctx} exceeds the backend's n_ctx={n_ctx}; lower ctx or raise n_ctx")
    ids = [int(t) for t in token_ids[: eval_tokens + 1 if eval_tokens is not None else len(token_ids)]]
    n_windows = (len(ids) - 1) // ctx
    if n_windows == 0:
        raise ConfigError(
            f"eval text gives {len(ids)} tokens, fewer than one window of ctx={ctx}; use a longer text or lower ctx"
        )
    t0 = time.perf_counter()
    totals: list[float] = []
    counts: list[int] = []
    for w in range(n_windows):
        total, count = _window_nll(backend, ids[w * ctx : (w + 1) * ctx + 1], w)
        totals.append(total)
        counts.append(count)
    nll_mean = sum(totals) / sum(counts)
    result = PerplexityResult(
        ppl=math.exp(nll_mean),
        nll_mean=nll_mean,
        tokens=sum(counts),
        eval_tokens=n_windows * ctx,
        windows=n_windows,
        ctx=ctx,
        window_nll=[t / c for t, c in zip(totals, counts, strict=True)],
        time_ms=(time.perf_counter() - t0) * 1000.0,
    )
    log.info("perplexity %.3f over %d windows of %d tokens", result.ppl, n_windows, ctx)
    return result
