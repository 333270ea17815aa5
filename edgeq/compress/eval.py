"""Host-side evaluation in torch: perplexity over a token stream, and agreement with a reference.

Perplexity is computed over non-overlapping windows of ``ctx`` tokens (each window scored from its
own start), the same protocol as the device-side ``edgeq.runtime.perplexity``; per-window mean NLLs
are kept so that comparisons can be paired window by window and their noise estimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int
    window_nll: np.ndarray  # (W,) mean NLL of each window

    @property
    def nll(self) -> float:
        return float(self.window_nll.mean())


def windows(ids: list[int] | np.ndarray, ctx: int, max_tokens: int | None = None) -> np.ndarray:
    """(W, ctx + 1) windows: each scores ``ctx`` next-token predictions, non-overlapping targets."""
    ids = np.asarray(ids, dtype=np.int64)
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    n = (len(ids) - 1) // ctx
    if n == 0:
        raise ValueError(f"need more than {ctx} tokens for one window, got {len(ids)}")
    return np.stack([ids[i * ctx : i * ctx + ctx + 1] for i in range(n)])


@torch.no_grad()
def perplexity(model, ids, ctx: int = 256, max_tokens: int | None = None, batch: int = 8) -> PerplexityResult:
    wins = torch.from_numpy(windows(ids, ctx, max_tokens))
    device = next(model.parameters()).device
    nll = []
    for i in range(0, len(wins), batch):
        chunk = wins[i : i + batch].to(device)
        logits = model(chunk[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none")
        nll.append(loss.mean(1).cpu())
    window_nll = torch.cat(nll).double().numpy()
    return PerplexityResult(math.exp(window_nll.mean()), int(wins[:, 1:].numel()), window_nll)


def paired_gap(q: PerplexityResult, ref: PerplexityResult) -> dict:
    """Perplexity gap of ``q`` over ``ref`` and the gap's noise (standard error, paired by window)."""
    diff = q.window_nll - ref.window_nll
    se_nll = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    # delta method: d ppl = ppl * d nll
    return {
        "gap": q.perplexity - ref.perplexity,
        "rel_gap": q.perplexity / ref.perplexity - 1,
        "gap_stderr": ref.perplexity * math.exp(float(diff.mean())) * se_nll,
        "windows": len(diff),
    }


@torch.no_grad()
def agreement(model, reference, ids, ctx: int = 256, max_tokens: int | None = None, batch: int = 8) -> dict:
    """Mean per-token KL(reference || model) and top-1 agreement over the same windows."""
    wins = torch.from_numpy(windows(ids, ctx, max_tokens))
    device = next(model.parameters()).device
    kl_sum, agree, count = 0.0, 0, 0
    for i in range(0, len(wins), batch):
        x = wins[i : i + batch, :-1].to(device)
        lq = torch.log_softmax(model(x).logits.float(), -1)
        lr = torch.log_softmax(reference(x).logits.float(), -1)
        kl_sum += float((lr.exp() * (lr - lq)).sum(-1).sum())
        agree += int((lq.argmax(-1) == lr.argmax(-1)).sum())
        count += x.numel()
    return {"kl": kl_sum / count, "top1_agreement": agree / count, "tokens": count}
