"""Parity: how closely an exported artifact reproduces the source model and the run's fake-quant model.

The artifact is run by the real client (llama.cpp or onnxruntime, through the runtime backends) on a
window of held-out text; the references are the torch models of the source weights and of the run's
dequantized codes. Reported per reference: mean KL(ref || artifact) per token, top-1 agreement,
relative logit error ``||a - r|| / ||r||``, max abs error, and perplexity of both on the window.

GGUF files with block types (q8_0 / q4_0 / q4_1) get a third reference, ``fake_quant_llamacpp_arithmetic``:
llama.cpp's CPU kernels for those weights round the *activations* to int8 blocks of 32 (``vec_dot_type``
q8_0 / q8_1) and compute f16 matmuls with fp16 activations, which alone moves the logits by a few 1e-3.
That reference is the run's fake-quant model with this rounding simulated, against the artifact run with
an f32 KV cache, so a manifest shows how much of the difference is llama.cpp's arithmetic and how much
could be the artifact. The arithmetic has its own floor: a last-bit difference flips int8 roundings that
cascade through the layers (the same simulation in float32 vs float64 differs by ~1e-3 on the bundled
model), so ~1e-3 there means the codes are carried exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgeq.export.gguf import BLOCK_TYPES
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


def torch_logits(model_path: Path, ids: list[int], gguf_types: dict[str, str] | None = None) -> np.ndarray:
    """Logits of the torch model at ``model_path``; with ``gguf_types`` (HF tensor name -> GGUF type), each
    Linear's input is rounded the way llama.cpp's CPU kernels round it (``simulate_llamacpp_activations``)."""
    import torch

    from edgeq.compress.model import load_torch_model

    model = load_torch_model(model_path)
    if gguf_types is not None:
        simulate_llamacpp_activations(model, gguf_types)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def simulate_llamacpp_activations(model, gguf_types: dict[str, str]) -> int:
    """Round each Linear's input as ggml's CPU matmul does for its weight's GGUF type, in the model's float
    type: q8_0 / q4_0 / q4_1 weights -> activations to int8 blocks of 32 with an fp16 scale (``d = amax / 127``,
    ``q = round(x / d)``); f16 weights -> activations to fp16; f32 -> unchanged. A tied lm_head reads the
    token embedding's type. Returns the number of hooked Linears."""
    import torch

    def q8_blocks(x):
        xb = x.reshape(*x.shape[:-1], -1, 32)
        d = xb.abs().amax(-1, keepdim=True) / 127
        v = xb * torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = torch.sign(v) * torch.floor(v.abs() + 0.5)  # ggml's reference rounds half away from zero
        return (q * d.half().to(x.dtype)).reshape(x.shape)

    def fp16(x):
        return x.half().to(x.dtype)

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    hooked = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        kind = gguf_types.get(f"{name}.weight")
        if kind is None and name == "lm_head" and tied:
            kind = gguf_types.get("model.embed_tokens.weight")
        fn = q8_blocks if kind in BLOCK_TYPES and mod.in_features % 32 == 0 else fp16 if kind == "f16" else None
        if fn is not None:
            mod.register_forward_pre_hook(lambda m, args, fn=fn: (fn(args[0]),))
            hooked += 1
    return hooked


def parity_tokens(run: RunDir, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` + 1 tokens of the held-out text, with the run's own HF tokenizer."""
    from edgeq.bundled import heldout_text

    tok = run.tokenizer()
    ids = tok.encode(heldout_text(max_chars=n_tokens * 8), add_special_tokens=False).ids
    n_ctx = run.config.get("max_position_embeddings") or n_tokens + 1
    return ids[: min(n_tokens + 1, n_ctx)]


# llama.cpp settings of the GGUF parity runs: an f32 KV cache, and for the main run the stored weight layout
F32_KV = {"type_k": "f32", "type_v": "f32"}
GGUF_EXACT = {"repack": False, **F32_KV}
GGUF_NOTE = (
    "weights in their stored layout (repack off) and an f32 KV cache; a build with a BLAS backend computes "
    "the prompt in f32 (exact: ~1e-7), the default build's kernels round activations to int8 blocks for "
    "q8_0/q4_0/q4_1 weights (~4e-3; see fake_quant_llamacpp_arithmetic)"
)


def _artifact_logits(manifest: Manifest, inputs: list[int], provider_options: dict | None = None) -> np.ndarray:
    """The artifact's logits for ``inputs`` (one fresh sequence), computed by the real client."""
    from edgeq.runtime.backends import open_backend
    from edgeq.runtime.backends.base import BackendOptions

    backend = open_backend(manifest, BackendOptions(provider_options=dict(provider_options or {})))
    try:
        backend.reset()
        return backend.forward(inputs)
    finally:
        backend.close()


def _llamacpp_arithmetic(manifest: Manifest, run: RunDir, inputs: list[int], targets, types: dict) -> dict:
    """The artifact (f32 KV cache) against the fake-quant model with llama.cpp's activation rounding."""
    # micro-batches under 32 tokens: a BLAS-enabled build would otherwise compute them in f32 (exactly)
    art = _artifact_logits(manifest, inputs, {**F32_KV, "n_batch": 16, "n_ubatch": 16})
    out = compare_logits(art, torch_logits(run.path, inputs, types), targets)
    out["note"] = (
        "artifact with an f32 KV cache vs the run's fake-quant model with llama.cpp's CPU activation rounding "
        "simulated (int8 blocks for q8_0/q4_0/q4_1 weights, fp16 for f16); ~1e-3 is that arithmetic's own floor"
    )
    return out


def measure_parity(manifest: Manifest, run: RunDir, n_tokens: int = 256) -> dict:
    """Parity of the artifact described by ``manifest`` against fake-quant and source models."""
    ids = parity_tokens(run, n_tokens)
    inputs, targets = ids[:-1], np.asarray(ids[1:])
    report: dict = {"text": "held-out stdlib text (edgeq.bundled.heldout_text)", "tokens": len(inputs)}
    settings = None
    if manifest.format == "gguf":  # the client's most exact settings: they measure the file, not a runtime choice
        from edgeq.runtime.backends.llamacpp import has_blas_backend

        settings = dict(GGUF_EXACT)
        report["llama_cpp"] = {**settings, "blas": has_blas_backend(), "note": GGUF_NOTE}
    art = _artifact_logits(manifest, inputs, settings)
    report["fake_quant"] = compare_logits(art, torch_logits(run.path, inputs), targets)
    src = Path(run.source_info().get("path", ""))
    if run.is_quantized and src.is_dir():
        report["source"] = compare_logits(art, torch_logits(src, inputs), targets)
    elif not run.is_quantized:
        report["source"] = report["fake_quant"]
    else:
        report["source"] = {"status": f"source model not available at {src}"}
    types = (manifest.scheme or {}).get("artifact_types") or {}
    if manifest.format == "gguf" and any(t in BLOCK_TYPES for t in types.values()):
        report["fake_quant_llamacpp_arithmetic"] = _llamacpp_arithmetic(manifest, run, inputs, targets, types)
    log.info(
        "parity %s/%s: rel_error vs fake-quant %.2e, top-1 %.3f",
        manifest.format,
        manifest.variant,
        report["fake_quant"]["rel_error"],
        report["fake_quant"]["top1_agreement"],
    )
    return report
