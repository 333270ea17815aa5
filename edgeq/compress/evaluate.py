"""``edgeq eval``: perplexity of a model or run dir, and its agreement with the unquantized model."""

from __future__ import annotations

import os
from pathlib import Path

from edgeq.errors import ConfigError


def evaluate(
    model: str | os.PathLike,
    text: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
    ctx: int = 256,
    max_tokens: int = 32768,
    device: str = "auto",
) -> dict:
    """Perplexity (non-overlapping ``ctx`` windows) and, for runs, gap / KL / top-1 vs the reference."""
    from edgeq.bundled import heldout_text
    from edgeq.compress.eval import agreement, paired_gap, perplexity
    from edgeq.compress.model import load_torch_model
    from edgeq.compress.run import pick_device
    from edgeq.rundir import RunDir

    run = RunDir.open(model)
    dev = pick_device(device)
    n_ctx = run.config.get("max_position_embeddings") or ctx
    if ctx > n_ctx:
        raise ConfigError(f"--ctx {ctx} exceeds the model's context {n_ctx}; use --ctx {n_ctx} or less")
    body = Path(text).read_text(encoding="utf-8", errors="replace") if text else heldout_text(max_chars=max_tokens * 6)
    tok = run.tokenizer()
    ids = tok.encode(body, add_special_tokens=False).ids[: max_tokens + 1]
    if len(ids) <= ctx:
        raise ConfigError(f"eval text has {len(ids)} tokens; need more than --ctx {ctx} (use a longer --text)")
    qmodel = load_torch_model(run.path, dev)
    q = perplexity(qmodel, ids, ctx)
    result = {"model": str(run.path), "perplexity": q.perplexity, "tokens": q.tokens, "ctx": ctx}
    ref_path = Path(reference) if reference else Path(run.source_info().get("path", "")) if run.is_quantized else None
    if ref_path is not None and ref_path.is_dir():
        ref_model = load_torch_model(ref_path, dev)
        r = perplexity(ref_model, ids, ctx)
        result["reference"] = {"model": str(ref_path), "perplexity": r.perplexity, **paired_gap(q, r)}
        result["reference"].update(agreement(qmodel, ref_model, ids, ctx))
    return result
