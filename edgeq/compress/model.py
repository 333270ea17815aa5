"""Loading source models (local Hugging Face dirs or hub ids) and run dirs as torch models."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from edgeq.compress.mappings import family_for
from edgeq.errors import ModelError
from edgeq.rundir import RunDir

log = logging.getLogger(__name__)


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local dir for ``model``: the path itself, or a hub id fetched into the HF cache.

    Offline (no network, ``HF_HUB_OFFLINE=1``) a hub id that is not cached fails with a clear message.
    """
    path = Path(model)
    if path.exists():
        return path
    text = str(model)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelError(f"model dir {text!r} does not exist; expected a local model dir or a hub id like org/name")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            text, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as exc:  # network errors come in many classes; all mean "could not fetch"
        raise ModelError(
            f"could not fetch hub model {text!r} ({type(exc).__name__}); this machine may be offline: "
            "download it elsewhere and pass the local dir"
        ) from None
    return Path(local)


def check_supported(config: dict) -> None:
    family_for(config)


def load_source_config(model: str | os.PathLike) -> tuple[Path, dict]:
    path = resolve_model_path(model)
    run = RunDir.open(path)  # validates dir, config.json and weights
    check_supported(run.config)
    return path, run.config


def load_torch_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """The effective model of a model dir or run dir as a float32 HF model (fake-quant for runs).

    Weights come from ``RunDir.tensor`` (dequantized codes for quantized tensors), so this is exactly
    the model that every export of the run must reproduce.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    run = RunDir.open(path)
    check_supported(run.config)
    config = AutoConfig.from_pretrained(run.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: torch.from_numpy(run.tensor(name).copy()) for name in run.names()}
    if config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing = set(model.state_dict()) - set(state)
    missing = {m for m in missing if "rotary_emb" not in m}
    if missing:
        raise ModelError(f"{run.path} lacks tensors {sorted(missing)[:3]}...; the model or run dir is incomplete")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = _materialize_buffers(model, config)
    return model.to(device).eval()


def _materialize_buffers(model, config):
    """Rebuild non-persistent buffers (rotary inv_freq) that stayed on the meta device."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            rope_init = getattr(module, "rope_init_fn", None)
            inv_freq, scaling = rope_init(module.config, torch.device("cpu"))
            module.register_buffer("inv_freq", inv_freq, persistent=False)
            module.original_inv_freq = inv_freq
            module.attention_scaling = scaling
    return model


def model_summary(config: dict) -> dict:
    """The shape facts every artifact's manifest records."""
    n_heads = config["num_attention_heads"]
    return {
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config.get("intermediate_size"),
        "n_layers": config["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads", n_heads),
        "head_dim": config.get("head_dim") or config["hidden_size"] // n_heads,
        "n_ctx": config.get("max_position_embeddings"),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
    }


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
