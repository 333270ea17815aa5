"""ONNX fp16 exports, integration bundles (their Python snippets run for real), interrupted exports.

* fp16: ``edgeq export --precision fp16`` (the CLI, in process) writes a float16 graph with a float16
  KV cache and float32 logits; the onnxruntime backend runs it (prefill, then single-token decode
  through the fp16 cache) within fp16 rounding (relative logit error <= 1e-3) of the fake-quant model,
  also at positions past 2048, where float16 rotary angles would be wrong;
* bundles: the Python snippets of a GGUF q4_0 and an ONNX int4 bundle, run as subprocesses, verify the
  manifest's hashes and print text whose token ids equal the runtime backend's greedy ids;
* an export interrupted mid-way (a packer raising, or KeyboardInterrupt) leaves neither the artifact
  nor its manifest nor any temporary file; a failed bundle leaves the finished artifact alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer

from edgeq.bundled import heldout_text
from edgeq.compress.model import load_torch_model
from edgeq.config import ExportConfig
from edgeq.errors import ConfigError
from edgeq.export.api import export
from edgeq.export.manifest import load_manifest
from edgeq.runtime.backends import open_backend
from edgeq.runtime.backends.base import BackendOptions

FP16_REL_TOL = 1e-3  # fp16 weights and activations: measured 1.8e-4 (255 tokens) on the bundled w4g32 run
PROMPT = "def main():\n    parser = argparse."
NEW_TOKENS = 16
W4G32 = {"bits": 4, "group_size": 32, "sym": True}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def bundle_manifest(bundle: Path) -> Path:
    """``model/manifest.json`` (ONNX) or ``model/<stem>.manifest.json`` (GGUF), as the exporter names it."""
    (path,) = (bundle / "model").glob("*manifest.json")
    return path


def greedy_ids(manifest: Path, prompt_ids: list[int], n: int) -> list[int]:
    """The runtime backend's greedy continuation of ``prompt_ids`` (the reference for the snippets)."""
    backend = open_backend(load_manifest(manifest), BackendOptions(threads=2))
    out, logits = [], backend.forward(prompt_ids)
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = backend.forward([out[-1]])
    backend.close()
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- fp16 ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp16_export(make_run, tmp_path_factory) -> tuple[Path, Path]:
    from edgeq.cli import cli

    run = make_run(**W4G32)
    out = tmp_path_factory.mktemp("fp16") / "onnx-fp16"
    args = ["export", str(run), "--format", "onnx", "--precision", "fp16", "--out", str(out), "--parity-tokens", "128"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "wrote onnx fp16" in result.output
    return run, out


def test_fp16_graph_is_float16_with_float32_logits(fp16_export):
    _, out = fp16_export
    man = load_manifest(out)
    model = onnx.load(str(out / "model.onnx"))
    io = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert io["logits"] == onnx.TensorProto.FLOAT
    assert {t for n, t in io.items() if n.startswith(("past_key_values.", "present."))} == {onnx.TensorProto.FLOAT16}
    big = [i for i in model.graph.initializer if int(np.prod(i.dims)) >= 1024]
    assert big and all(i.data_type == onnx.TensorProto.FLOAT16 for i in big)
    assert set(man.scheme["artifact_types"].values()) == {"MatMul(fp16)", "Gather(fp16)+MatMul(fp16)", "Mul(fp16)"}
    assert man.variant == "fp16"
    fq = man.parity["fake_quant"]
    assert fq["rel_error"] <= FP16_REL_TOL and fq["top1_agreement"] >= 0.99, fq


def test_fp16_backend_prefill_and_decode_match_fake_quant(fp16_export, bundled_dir):
    run, out = fp16_export
    tok = Tokenizer.from_file(str(bundled_dir / "tokenizer.json"))
    ids = tok.encode(heldout_text(8000), add_special_tokens=False).ids[:96]
    backend = open_backend(load_manifest(out), BackendOptions(threads=2))
    got = np.concatenate([backend.forward(ids[:64]), *[backend.forward([t]) for t in ids[64:]]])
    backend.close()
    with torch.no_grad():
        ref = load_torch_model(run)(torch.tensor([ids])).logits[0].numpy()
    assert got.dtype == np.float32 and got.shape == ref.shape
    err = rel_err(got, ref)
    print(f"fp16 vs fake-quant: rel err {err:.2e}")
    assert 1e-6 < err <= FP16_REL_TOL  # not exact (fp16), but close; > 0 shows it really ran in fp16
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.98


def test_int4_with_fp16_activations(make_run, tmp_path, bundled_dir):
    """``--activations fp16``: MatMulNBits with float16 scales in a float16 graph, close to the fake-quant model."""
    from edgeq.cli import cli

    run = make_run(**W4G32)
    out = tmp_path / "int4-fp16"
    args = ["export", str(run), "--format", "onnx", "--precision", "int4", "--activations", "fp16", "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--parity-tokens", "128"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    man = load_manifest(out)
    model = onnx.load(str(out / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 28  # 7 Linears x 4 blocks
    assert {inits[n.input[2]].data_type for n in nbits} == {onnx.TensorProto.FLOAT16}  # scales
    io = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert io["logits"] == onnx.TensorProto.FLOAT and io["present.0.key"] == onnx.TensorProto.FLOAT16
    assert man.scheme["artifact_types"]["model.embed_tokens.weight"] == "Gather(fp16)+MatMul(fp16)"
    fq = man.parity["fake_quant"]
    assert 1e-6 < fq["rel_error"] <= FP16_REL_TOL and fq["top1_agreement"] >= 0.99, fq
    # an fp32-activation int4 export of the same run is larger: fp32 scales and KV cache
    fp32 = tmp_path / "int4-fp32"
    assert CliRunner().invoke(cli, [*args[:-4], "--out", str(fp32), "--no-parity"]).exit_code == 0
    # the fp32-activation graph stores the fp16 scales and fp16-exact tables in fp16 behind Casts, so the
    # weights cost the same; fp16 activations save the float32 norms (and halve the KV cache at run time)
    data = {d: (d / "model.onnx_data").stat().st_size for d in (out, fp32)}
    assert data[out] < data[fp32] < data[out] * 1.01


def test_fp16_activations_refused_where_they_do_not_apply(make_run, tmp_path):
    run = make_run(**W4G32)
    for fmt in (["--format", "onnx", "--precision", "fp32"], ["--format", "gguf", "--type", "q4_0"]):
        out = tmp_path / "x"
        args = ["export", str(run), *fmt, "--activations", "fp16", "--out", str(out)]
        proc = subprocess.run([sys.executable, "-m", "edgeq.cli", *args], capture_output=True, text=True)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "activations=fp16 applies to ONNX int4/int8" in lines[0]
        assert not out.exists()


def test_fp16_rotary_angles_stay_exact_at_long_positions(fp16_export):
    """Positions 3001.. (float16 holds integers exactly only up to 2048): still within fp16 rounding."""
    import onnxruntime as ort

    run, out = fp16_export
    ids = [755, 645, 199, 3, 100, 200, 300, 375, 293, 705, 321, 892]
    positions = 3001 + np.arange(len(ids))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64)}
    feed["position_ids"] = positions[None, :]
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            feed[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), np.float16)
    got = session.run(["logits"], feed)[0][0]
    with torch.no_grad():
        ref = load_torch_model(run)(torch.tensor([ids]), position_ids=torch.tensor(positions[None, :])).logits[0]
    err = rel_err(got, ref.numpy())
    assert err <= FP16_REL_TOL, f"fp16 logits at positions 3001+ off by {err:.2e} (naive fp16 RoPE: ~7e-2)"


# -- bundles -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundles(make_run, tmp_path_factory) -> dict[str, Path]:
    """GGUF q4_0 through the CLI (bundle beside the file), ONNX int4 through the API (bundle dir given)."""
    from edgeq.cli import cli

    run = make_run(**W4G32)
    root = tmp_path_factory.mktemp("bundles")
    gguf = root / "m.q4_0.gguf"
    args = ["export", str(run), "--format", "gguf", "--type", "q4_0", "--out", str(gguf), "--no-parity", "--bundle"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0 and "wrote bundle" in result.output, result.output
    cfg = ExportConfig("onnx", "int4", parity=False, bundle=True, bundle_dir=str(root / "ort-bundle"))
    export(run, cfg, root / "onnx-int4")
    return {"gguf": root / "m.q4_0.bundle", "onnx": root / "ort-bundle"}


def run_snippet(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    script = next((bundle / "python").glob("run_*.py"))
    cmd = [sys.executable, str(script), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--threads", "2"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_bundle_layout(bundles, fmt):
    bundle = bundles[fmt]
    man = load_manifest(bundle_manifest(bundle))  # verifies every file's size and sha256
    assert man.format == fmt and (bundle / "model" / "tokenizer.json").is_file()
    assert {"README.md", "model", "python", "cpp", "android"} <= set(leftovers(bundle))
    assert {"CMakeLists.txt", "main.cpp"} <= set(leftovers(bundle / "cpp"))
    readme = (bundle / "README.md").read_text()
    assert "## Python" in readme and "## C++" in readme and "## Android" in readme
    reqs = (bundle / "python" / "requirements.txt").read_text()
    if fmt == "onnx":
        assert "onnxruntime==" in reqs and "tokenizers==" in reqs
        kotlin = (bundle / "android" / "EdgeqGreedy.kt").read_text()
        assert "OrtEnvironment" in kotlin and "OrtSession" in kotlin
        assert "onnxruntime-android:" in (bundle / "android" / "build.gradle.kts.txt").read_text()
        assert "onnxruntime_cxx_api.h" in (bundle / "cpp" / "main.cpp").read_text()
    else:
        assert "llama-cpp-python==" in reqs
        assert "llama.h" in (bundle / "cpp" / "main.cpp").read_text()
    assert not any(p.name.startswith(".") for p in bundle.parent.iterdir())  # no temp dirs left


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_bundle_python_snippet_matches_backend_greedy(bundles, fmt, bundled_dir):
    bundle = bundles[fmt]
    proc = run_snippet(bundle, "--json", "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    backend = open_backend(load_manifest(bundle_manifest(bundle)), BackendOptions(threads=2))
    assert got["prompt_ids"] == backend.tokenize(PROMPT)  # this tokenizer adds no BOS
    backend.close()
    expected = greedy_ids(bundle_manifest(bundle), got["prompt_ids"], NEW_TOKENS)
    assert got["ids"] == expected
    tok = Tokenizer.from_file(str(bundled_dir / "tokenizer.json"))
    assert got["text"] == tok.decode(expected)
    plain = run_snippet(bundle, "--ignore-eos", "--no-verify")  # the default output: prompt + text
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == PROMPT + got["text"] + "\n"


def test_bundle_snippet_refuses_tampered_file(bundles):
    bundle = bundles["onnx"]
    victim = bundle / "model" / "tokenizer.json"
    data = victim.read_bytes()
    victim.unlink()  # the bundle's file may be a hard link to the artifact: replace, never edit in place
    victim.write_bytes(data.replace(b'"model"', b'"modal"', 1))
    try:
        proc = run_snippet(bundle, "--json")
        assert proc.returncode != 0 and "sha256" in proc.stderr and "tokenizer.json" in proc.stderr
    finally:
        victim.write_bytes(data)


def test_bundle_refuses_foreign_dir_before_exporting(make_run, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    cfg = ExportConfig("gguf", "q4_0", parity=False, bundle=True, bundle_dir=str(tmp_path / "mine"))
    with pytest.raises(ConfigError, match="is not an edgeq bundle; choose a new path"):
        export(make_run(**W4G32), cfg, tmp_path / "m.q4_0.gguf")
    assert leftovers(tmp_path) == ["mine"] and leftovers(tmp_path / "mine") == ["notes.txt"]


# -- interrupted exports -------------------------------------------------------------------------
def fail_after(real: Callable, n_calls: int, exc: BaseException) -> Callable:
    """``real``, except that call number ``n_calls`` raises ``exc``: an export dying mid-way."""
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] >= n_calls:
            raise exc
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_interrupted_gguf_export_leaves_nothing(make_run, tmp_path, monkeypatch, exc):
    from edgeq.export import gguf

    monkeypatch.setitem(gguf.PACKERS, "q4_0", fail_after(gguf.PACKERS["q4_0"], 5, exc))
    out = tmp_path / "m.q4_0.gguf"
    with pytest.raises(type(exc)):
        export(make_run(**W4G32), ExportConfig("gguf", "q4_0", parity=False), out)
    assert leftovers(tmp_path) == []  # no .gguf, no manifest, no temp dir


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_interrupted_onnx_export_leaves_nothing(make_run, tmp_path, monkeypatch, exc):
    from edgeq.export import onnx as onnx_export

    monkeypatch.setattr(onnx_export, "pack_matmul_nbits", fail_after(onnx_export.pack_matmul_nbits, 5, exc))
    out = tmp_path / "onnx-int4"
    with pytest.raises(type(exc)):
        export(make_run(**W4G32), ExportConfig("onnx", "int4", parity=False), out)
    assert leftovers(tmp_path) == []


def test_failed_bundle_keeps_finished_artifact(make_run, tmp_path, monkeypatch):
    from edgeq.export import bundle

    monkeypatch.setattr(bundle, "write_native", fail_after(bundle.write_native, 1, OSError("no space left")))
    out = tmp_path / "m.q4_0.gguf"
    with pytest.raises(OSError, match="no space left"):
        export(make_run(**W4G32), ExportConfig("gguf", "q4_0", parity=False, bundle=True), out)
    assert leftovers(tmp_path) == ["m.q4_0.gguf", "m.q4_0.manifest.json"]
    load_manifest(out)  # the artifact itself is complete and verified
