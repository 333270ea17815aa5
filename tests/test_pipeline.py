"""Recipes and the end-to-end pipeline: unknown keys refused; the demo produces a real report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgeq.errors import ConfigError
from edgeq.recipe import builtin_recipe, load_recipe, parse_recipe


def test_builtin_demo_recipe_parses():
    recipe = load_recipe(builtin_recipe("demo"))
    assert [r.name for r in recipe.runs] == ["fp", "rtn-w8g32", "rtn-w4g32"]
    assert recipe.runs[2].compress.scheme.label == "w4g32"
    assert {(e.format, e.type) for r in recipe.runs for e in r.exports} >= {("gguf", "q4_0"), ("onnx", "int4")}
    resolved = recipe.resolved()
    assert resolved["runs"][1]["compress"]["bits"] == 8 and resolved["bench"]["repeat"] == 3


@pytest.mark.parametrize(
    "data,fragment",
    [
        ({"model": "m", "compres": {}}, "unknown key(s) ['compres']"),
        ({"model": "m", "compress": {"bitz": 4}}, "unknown key(s) ['bitz']"),
        ({"model": "m", "export": [{"format": "gguf", "type": "q5_k"}]}, "q5_k"),
        ({"model": "m", "bench": {"repeats": 3}}, "unknown key(s) ['repeats']"),
        ({"compress": {}}, "no 'model'"),
        ({"model": "m", "runs": [{"name": "a"}, {"name": "a"}]}, "repeat"),
    ],
)
def test_bad_recipes_are_refused(data, fragment):
    with pytest.raises(ConfigError) as err:
        parse_recipe(data)
    assert fragment in str(err.value)


def test_run_rejects_bad_yaml_with_exit_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: bundled\ncompress: {bits: 4, group: 32}\n")
    proc = subprocess.run([sys.executable, "-m", "edgeq.cli", "run", str(recipe)], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown key(s) ['group']" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeq.cli", "demo", "--out", str(out)], capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("report.md", "results.json", "results.csv", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    results = {r["label"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(results) == {
        "fp/gguf-f16", "fp/onnx-fp32", "rtn-w8g32/gguf-q8_0", "rtn-w8g32/onnx-int8",
        "rtn-w4g32/gguf-q4_0", "rtn-w4g32/onnx-int4",
    }  # fmt: skip
    for label, res in results.items():
        assert res["perplexity"]["ppl"] < 100, label  # trained model: far below the 4096 vocabulary
        assert res["generation"]["decode_tokens_per_s"] > 0
        # the runtime's own peak, not the torch-laden pipeline process that launched it
        assert 0 < res["memory"]["peak_rss_mb"] < 300, (label, res["memory"])
    size = {k: v["artifact"]["weight_bytes"] for k, v in results.items()}
    assert size["rtn-w4g32/gguf-q4_0"] < size["rtn-w8g32/gguf-q8_0"] < size["fp/gguf-f16"]
    assert size["rtn-w4g32/onnx-int4"] < size["rtn-w8g32/onnx-int8"] < size["fp/onnx-fp32"]
    # both runtimes score the same model on the same text alike
    for run in ("fp", "rtn-w8g32", "rtn-w4g32"):
        g = [v["perplexity"]["ppl"] for k, v in results.items() if k.startswith(run + "/")]
        assert abs(g[0] / g[1] - 1) < 0.02, (run, g)
    # every artifact's manifest carries parity against the run's own model: the export is exact
    for man in list((out / "artifacts").glob("*.manifest.json")) + list((out / "artifacts").glob("*/manifest.json")):
        parity = json.loads(man.read_text())["parity"]
        assert parity["fake_quant"]["top1_agreement"] > 0.99, man
    assert "decode tok/s" in proc.stdout and "report.md" in proc.stdout
    # device-side perplexity (onnxruntime, numpy) equals the host's (torch) on the same text and windows
    from edgeq.bundled import MODEL_DIR
    from edgeq.compress.evaluate import evaluate

    bench = results["fp/onnx-fp32"]["perplexity"]
    host = evaluate(MODEL_DIR, out / "eval.txt", ctx=bench["ctx"], max_tokens=bench["eval_tokens"], device="cpu")
    assert host["tokens"] == bench["tokens"]
    assert host["perplexity"] == pytest.approx(bench["ppl"], rel=1e-4)


def test_readme_python_api_snippet_runs(tmp_path):
    """The README's Python API example, run as written (paths made absolute, in a fresh interpreter).

    ``edgeq.compress`` / ``edgeq.export`` are also packages; the calls must keep working after those
    packages are imported (the first call imports them), which is what the second and third lines test.
    """
    import re
    from pathlib import Path

    from edgeq.bundled import MODEL_DIR

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "edgeq.compress(" in b)
    code = code.replace('"edgeq/bundled/edgeq-tiny-stdlib"', repr(str(MODEL_DIR)))
    code += "\nimport edgeq.compress.rtn, edgeq.export.gguf, edgeq.report.write\n"
    code += "assert all(callable(f) for f in (edgeq.compress, edgeq.export, edgeq.report, edgeq.bench))\n"
    code += (
        "print('RESULT', result['generation']['decode_tokens_per_s'] > 0, man.parity['fake_quant']['top1_agreement'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "w4.q4_0.gguf").exists() and (tmp_path / "runs" / "w4" / "run.json").exists()
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    assert line.split()[1] == "True" and float(line.split()[2]) > 0.9
