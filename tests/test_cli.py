"""The command line: fast help, and bad input -> one-line error, exit code 2, nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

COMMANDS = ["compress", "eval", "export", "bench", "run", "demo", "report"]


def edgeq(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgeq.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


@pytest.mark.parametrize("cmd", [None, *COMMANDS])
def test_help_is_fast_and_imports_no_torch(cmd):
    args = ["--help"] if cmd is None else [cmd, "--help"]
    code = (
        "import sys, time; t = time.perf_counter(); from edgeq.cli import cli\n"
        f"try:\n    cli.main({args!r}, standalone_mode=False)\nfinally:\n"
        "    print('ELAPSED', time.perf_counter() - t, 'torch' in sys.modules, file=sys.stderr)"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    elapsed, torch_loaded = proc.stderr.split("ELAPSED")[1].split()
    assert torch_loaded == "False"
    assert float(elapsed) < 1.0 and wall < 3.0, (elapsed, wall)


def test_missing_model_dir(tmp_path):
    out = tmp_path / "run"
    assert_user_error(edgeq("compress", tmp_path / "nope", "--out", out), "does not exist")
    assert not out.exists()


def test_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    assert_user_error(edgeq("compress", tmp_path / "empty", "--out", out), "no config.json")
    assert not out.exists()


def test_unsupported_architecture(tmp_path, bundled_dir):
    model = tmp_path / "gpt2ish"
    shutil.copytree(bundled_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert_user_error(edgeq("compress", model, "--out", out), "model_type='gpt2'", "llama")
    assert not out.exists()


def test_group_size_that_does_not_divide(tmp_path, bundled_dir):
    out = tmp_path / "run"
    assert_user_error(edgeq("compress", bundled_dir, "--group-size", "48", "--out", out), "group_size=48")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_group_size_the_format_cannot_hold(tmp_path, make_run):
    run = make_run(bits=4, group_size=16, sym=True)
    out = tmp_path / "m.q4_0.gguf"
    assert_user_error(edgeq("export", run, "--format", "gguf", "--type", "q4_0", "--out", out), "q4_0")
    assert list(tmp_path.iterdir()) == []


def test_foreign_output_dir_is_not_clobbered(tmp_path, bundled_dir):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(edgeq("compress", bundled_dir, "--out", out), "not an edgeq output")
    assert (out / "keep.txt").read_text() == "mine"


def test_corrupt_run_dir(tmp_path, make_run):
    run = tmp_path / "run"
    shutil.copytree(make_run(bits=8, group_size=32, sym=True), run)
    data = (run / "quant.safetensors").read_bytes()
    (run / "quant.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "m.gguf"
    assert_user_error(edgeq("export", run, "--format", "gguf", "--type", "q8_0", "--out", out), "corrupt")
    assert not out.exists()


def test_compress_writes_codes_not_floats(tmp_path, bundled_dir):
    out = tmp_path / "run"
    proc = edgeq("compress", bundled_dir, "--bits", "4", "--group-size", "32", "--out", out)
    assert proc.returncode == 0, proc.stderr
    from edgeq.rundir import RunDir

    run = RunDir.open(out)
    names = run.quantized_names()
    assert len(names) == 7 * run.config["num_hidden_layers"]
    qw = run.quantized(names[0])
    assert qw.codes.dtype.name == "uint8" and qw.codes.max() <= 15 and qw.scales.dtype.name == "float16"
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory, make_run):
    from edgeq.api import export
    from edgeq.config import ExportConfig

    out = tmp_path_factory.mktemp("gguf") / "m.q8_0.gguf"
    export(make_run(bits=8, group_size=32, sym=True), ExportConfig("gguf", "q8_0", parity=False), out)
    return out


def _copy_artifact(src: Path, dst_dir: Path) -> Path:
    shutil.copy(src, dst_dir / src.name)
    man = src.with_name(src.stem + ".manifest.json")
    shutil.copy(man, dst_dir / man.name)
    return dst_dir / src.name


def test_bench_refuses_a_corrupt_artifact(tmp_path, small_gguf):
    art = _copy_artifact(small_gguf, tmp_path)
    data = bytearray(art.read_bytes())
    data[len(data) // 3] ^= 0xFF
    art.write_bytes(bytes(data))
    out = tmp_path / "result.json"
    assert_user_error(edgeq("bench", art, "--json", out, "--repeat", "1"), "sha256", "re-export")
    assert not out.exists()


def test_bench_refuses_a_manifest_whose_hash_does_not_match(tmp_path, small_gguf):
    art = _copy_artifact(small_gguf, tmp_path)
    man_path = art.with_name(art.stem + ".manifest.json")
    man = json.loads(man_path.read_text())
    man["files"][0]["sha256"] = "0" * 64
    man_path.write_text(json.dumps(man))
    out = tmp_path / "result.json"
    assert_user_error(edgeq("bench", man_path, "--json", out, "--repeat", "1"), "sha256", "manifest says 0000")
    assert not out.exists()


def test_bench_refuses_a_truncated_artifact(tmp_path, small_gguf):
    art = _copy_artifact(small_gguf, tmp_path)
    art.write_bytes(art.read_bytes()[:1000])
    assert_user_error(edgeq("bench", art, "--json", tmp_path / "r.json"), "truncated")


def test_export_refuses_a_plain_model_for_block_types(tmp_path, bundled_dir):
    out = tmp_path / "m.q4_0.gguf"
    assert_user_error(
        edgeq("export", bundled_dir, "--format", "gguf", "--type", "q4_0", "--out", out), "edgeq compress"
    )
    assert list(tmp_path.iterdir()) == []
