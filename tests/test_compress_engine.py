"""The compression engine across architectures, calibration sources and the eval command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from edgeq.compress.calibration import calibration_ids, read_calibration_texts
from edgeq.compress.model import load_torch_model
from edgeq.compress.run import compress
from edgeq.config import CompressConfig
from edgeq.errors import ConfigError, ModelError
from edgeq.rundir import RunDir

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=4096, max_position_embeddings=128)  # fmt: skip


def _tiny(tmp_path, bundled_dir, model_type: str):
    from transformers import (
        MistralConfig,
        MistralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "phi3": (Phi3Config, Phi3ForCausalLM),
    }
    cfg_cls, model_cls = classes[model_type]
    torch.manual_seed(0)
    extra = {"pad_token_id": 0} if model_type == "phi3" else {}
    out = tmp_path / model_type
    model_cls(cfg_cls(**TINY, **extra)).save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled_dir / f, out / f)
    return out


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "phi3"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_on_each_family(tmp_path, bundled_dir, model_type, method):
    src = _tiny(tmp_path, bundled_dir, model_type)
    cfg = CompressConfig(method=method, bits=4, group_size=32, n_samples=8, seq_len=64)
    run = RunDir.open(compress(src, cfg, tmp_path / "run"))
    n_linears = {"phi3": 4}.get(model_type, 7)
    assert len(run.quantized_names()) == n_linears * 2
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp = load_torch_model(src)(ids).logits
        q = load_torch_model(run.path)(ids).logits
    rel = float((q - fp).norm() / fp.norm())
    assert 0 < rel < 0.5, rel  # quantized (not identical) but the same function
    meta = json.loads((run.path / "run.json").read_text())
    assert meta["method"] == method and set(meta["blocks"]) == {"0", "1"}


def test_unsupported_family_names_the_supported(tmp_path, bundled_dir):
    src = tmp_path / "m"
    shutil.copytree(bundled_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="falcon.*llama.*mistral.*phi3.*qwen2"):
        compress(src, CompressConfig(method="gptq"), tmp_path / "run")


def test_calibration_sources(tmp_path, bundled_dir):
    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 50)
    (tmp_path / "b.jsonl").write_text('{"text": "import os\\nprint(os.getcwd())"}\n\n{"text": "x = [1, 2, 3]"}\n')
    (tmp_path / "folder").mkdir()
    shutil.copy(tmp_path / "a.txt", tmp_path / "folder" / "a.txt")
    shutil.copy(tmp_path / "b.jsonl", tmp_path / "folder" / "b.jsonl")
    assert len(read_calibration_texts(tmp_path / "a.txt")) == 1
    assert read_calibration_texts(tmp_path / "b.jsonl") == ["import os\nprint(os.getcwd())", "x = [1, 2, 3]"]
    assert len(read_calibration_texts(tmp_path / "folder")) == 3
    assert len(read_calibration_texts(None)) > 100  # the stdlib training split
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1 .*'text'"):
        read_calibration_texts(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        read_calibration_texts(tmp_path / "missing.txt")
    texts = read_calibration_texts(tmp_path / "a.txt")
    a = calibration_ids(bundled_dir / "tokenizer.json", texts, 4, 16, seed=1)
    b = calibration_ids(bundled_dir / "tokenizer.json", texts, 4, 16, seed=1)
    c = calibration_ids(bundled_dir / "tokenizer.json", texts, 4, 16, seed=2)
    assert a.shape == (4, 16) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ConfigError, match="seq_len=4096"):
        calibration_ids(bundled_dir / "tokenizer.json", ["tiny"], 4, 4096, seed=0)


def test_gptq_with_calib_file_and_override(tmp_path, bundled_dir):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(f"def f{i}(a, b):\n    return a * {i} + b\n" for i in range(400)))
    cfg = CompressConfig(method="gptq", bits=3, group_size=32, calib=str(calib), n_samples=8, seq_len=64,
                         overrides=("down_proj=8:g32", r"layers\.0\.self_attn\.q_proj=fp"))  # fmt: skip
    run = RunDir.open(compress(bundled_dir, cfg, tmp_path / "run"))
    assert run.scheme("model.layers.1.mlp.down_proj.weight").bits == 8
    assert run.scheme("model.layers.1.mlp.up_proj.weight").bits == 3
    assert "model.layers.0.self_attn.q_proj.weight" in run.fp_names()
    errors = json.loads((run.path / "run.json").read_text())["blocks"]["0"]["output_rel_error"]
    assert all(0 <= e < 1 for e in errors.values()) and "self_attn.q_proj" not in errors


def test_eval_command_reports_gap_kl_and_writes_json(tmp_path, make_run):
    run = make_run(bits=4, group_size=-1, sym=True)
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeq.cli", "eval", str(run), "--max-tokens", "2048", "--json", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    ref = result["reference"]
    assert result["tokens"] == 2048 and result["perplexity"] > ref["perplexity"]
    assert ref["kl"] > 0 and 0.5 < ref["top1_agreement"] < 1.0 and ref["gap_stderr"] > 0
    assert "perplexity" in proc.stdout and "KL" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "edgeq.cli", "eval", str(run), "--ctx", "4096"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--ctx 4096 exceeds" in bad.stderr


# -- the run dir is written while the codes are produced ------------------------------------------
def test_rtn_streams_into_a_run_dir_safetensors_reads(tmp_path, bundled_dir):
    """RTN writes each tensor's codes as soon as they exist (``RunWriter``); the files are ordinary
    safetensors (read back with the safetensors library) holding exactly the RTN codes, and the float
    tensors keep the source's dtype and values."""
    import numpy as np
    from safetensors.numpy import load_file

    from edgeq.compress.quant import QuantScheme
    from edgeq.compress.rtn import rtn_quantize

    out = compress(bundled_dir, CompressConfig(bits=3, group_size=64, sym=False), tmp_path / "run")
    src, run = RunDir.open(bundled_dir), RunDir.open(out)
    quant, fp = load_file(str(out / "quant.safetensors")), load_file(str(out / "fp.safetensors"))
    assert len(run.quantized_names()) == 28 and set(fp) == set(src.names()) - set(run.quantized_names())
    for name in run.quantized_names()[:6]:
        codes, scales, zeros = rtn_quantize(torch.from_numpy(src.fp_tensor(name).astype(np.float32)),
                                            QuantScheme(3, 64, False))  # fmt: skip
        np.testing.assert_array_equal(quant[f"{name}.codes"], codes.numpy())
        np.testing.assert_array_equal(quant[f"{name}.scales"], scales.numpy())
        np.testing.assert_array_equal(quant[f"{name}.zeros"], zeros.numpy())
    for name, arr in fp.items():
        assert arr.dtype == src.fp_tensor(name).dtype
        np.testing.assert_array_equal(arr, src.fp_tensor(name))


def test_interrupted_rtn_leaves_nothing(tmp_path, bundled_dir, monkeypatch):
    import edgeq.compress.run as run_mod

    calls = {"n": 0}
    real = run_mod.quantize_tensor

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # what Ctrl-C mid-run raises
        return real(*args, **kwargs)

    monkeypatch.setattr(run_mod, "quantize_tensor", failing)
    with pytest.raises(KeyboardInterrupt):
        compress(bundled_dir, CompressConfig(bits=4, group_size=32), tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_run_writer_refuses_incomplete_runs(tmp_path, bundled_dir):
    from edgeq.compress.quant import QuantScheme
    from edgeq.compress.run import RunWriter

    src = RunDir.open(bundled_dir)
    name = next(n for n in src.names() if n.endswith("q_proj.weight"))
    with pytest.raises(RuntimeError, match="left without finish"):
        with RunWriter(src, tmp_path / "run", {name: QuantScheme(4, 32, True)}):
            pass
    with pytest.raises(ValueError, match="declared tensors were never written"):
        with RunWriter(src, tmp_path / "run", {name: QuantScheme(4, 32, True)}) as writer:
            writer.finish({})
    assert list(tmp_path.iterdir()) == []
