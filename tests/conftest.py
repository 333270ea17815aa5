"""Shared fixtures: the bundled model, tiny random models built from configs, and cached runs.

``EDGEQ_TEST_MODEL`` overrides the bundled model dir (useful while retraining it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from edgeq.bundled import MODEL_DIR


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA; none on this machine")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    path = Path(os.environ.get("EDGEQ_TEST_MODEL", MODEL_DIR))
    assert (path / "model.safetensors").exists(), f"bundled model missing at {path}"
    return path


@pytest.fixture(scope="session")
def tiny_random_dir(tmp_path_factory, bundled_dir) -> Path:
    """A 2-layer random Llama (hidden 64, GQA) with the bundled tokenizer, built from a config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    out = tmp_path_factory.mktemp("tiny_random")
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled_dir / f, out / f)
    return out


@pytest.fixture(scope="session")
def make_run(tmp_path_factory, bundled_dir):
    """``make_run(bits=4, group_size=32, sym=True, model=None, **cfg)`` -> cached RTN run dir."""
    from edgeq.compress.run import compress
    from edgeq.config import CompressConfig

    cache: dict = {}
    root = tmp_path_factory.mktemp("runs")

    def _make(model: Path | None = None, **kwargs) -> Path:
        model = Path(model or bundled_dir)
        key = (str(model), tuple(sorted(kwargs.items())))
        if key not in cache:
            out = root / f"run{len(cache)}"
            compress(model, CompressConfig(**kwargs), out)
            cache[key] = out
        return cache[key]

    return _make
