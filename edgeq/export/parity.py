"""Parity: how closely an exported artifact reproduces the source model and the run's fake-quant model.

The artifact is run by the real client (llama.cpp or onnxruntime, through the runtime backends) on a
window of held-out text; the references are the torch models of the source weights and of the run's
dequantized codes. Reported per reference: mean KL(ref || artifact) per token, top-1 agreement,
relative logit error ``||a - r|| / ||r||``, max abs error, and perplexity of both on the window.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgeq.export.manifest import Manifest
from edgeq.rundir import RunDir

log = logging.getLogger(__name__)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(artifact: np.ndarray, reference: np.ndarray, targets: np.ndarray | None = None) -> dict:
    """Agreement metrics of ``artifact`` vs ``reference`` logits, both (T, V)."""
    lp_a, lp_r = log_softmax(artifact), log_softmax(reference)
    kl = float(np.mean(np.sum(np.exp(lp_r) * (lp_r - lp_a), -1)))
    out = {
        "kl": max(kl, 0.0),
        "top1_agreement": float(np.mean(artifact.argmax(-1) == reference.argmax(-1))),
        "rel_error": float(np.linalg.norm(artifact - reference) / max(np.linalg.norm(reference), 1e-30)),
        "max_abs_error": float(np.max(np.abs(artifact - reference))),
        "tokens": int(artifact.shape[0]),
    }
    if targets is not None:
        n = len(targets)
        nll_a = -lp_a[np.arange(n), targets].mean()
        nll_r = -lp_r[np.arange(n), targets].mean()
        out["ppl_artifact"] = float(np.exp(nll_a))
        out["ppl_reference"] = float(np.exp(nll_r))
        out["ppl_delta"] = out["ppl_artifact"] - out["ppl_reference"]
    return out


def torch_logits(model_path: Path, ids: list[int]) -> np.ndarray:
    import torch

    from edgeq.compress.model import load_torch_model

    model = load_torch_model(model_path)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def parity_tokens(run: RunDir, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` + 1 tokens of the held-out text, with the run's own HF tokenizer."""
    from edgeq.bundled import heldout_text

    tok = run.tokenizer()
    ids = tok.encode(heldout_text(max_chars=n_tokens * 8), add_special_tokens=False).ids
    n_ctx = run.config.get("max_position_embeddings") or n_tokens + 1
    return ids[: min(n_tokens + 1, n_ctx)]


def measure_parity(manifest: Manifest, run: RunDir, n_tokens: int = 256) -> dict:
    """Parity of the artifact described by ``manifest`` against fake-quant and source models."""
    from edgeq.runtime.backends import open_backend

    ids = parity_tokens(run, n_tokens)
    inputs, targets = ids[:-1], np.asarray(ids[1:])
    backend = open_backend(manifest)
    try:
        backend.reset()
        art = backend.forward(inputs)
    finally:
        backend.close()
    report: dict = {"text": "held-out stdlib text (edgeq.bundled.heldout_text)", "tokens": len(inputs)}
    report["fake_quant"] = compare_logits(art, torch_logits(run.path, inputs), targets)
    src = Path(run.source_info().get("path", ""))
    if run.is_quantized and src.is_dir():
        report["source"] = compare_logits(art, torch_logits(src, inputs), targets)
    elif not run.is_quantized:
        report["source"] = report["fake_quant"]
    else:
        report["source"] = {"status": f"source model not available at {src}"}
    log.info(
        "parity %s/%s: rel_error vs fake-quant %.2e, top-1 %.3f",
        manifest.format,
        manifest.variant,
        report["fake_quant"]["rel_error"],
        report["fake_quant"]["top1_agreement"],
    )
    return report
