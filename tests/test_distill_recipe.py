"""The distill step of a recipe: parsed like the other sections, run between compress and export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgeq.errors import ConfigError
from edgeq.recipe import parse_recipe


def test_distill_section_parses_into_a_config():
    recipe = parse_recipe(
        {
            "model": "m",
            "compress": {"method": "rtn", "bits": 2},
            "distill": {"loss": "mse+sw+cakld", "steps": 3, "train": "scales,weights", "teacher": "t"},
        }
    )
    spec = recipe.runs[0]
    assert spec.distill.terms == frozenset({"mse", "sw", "cakld"}) and spec.distill.steps == 3
    assert spec.distill.train == ("scales", "weights") and spec.teacher == "t"
    resolved = recipe.resolved()["runs"][0]["distill"]
    assert resolved["steps"] == 3 and resolved["teacher"] == "t" and resolved["train"] == ["scales", "weights"]
    assert parse_recipe({"model": "m", "compress": {}}).runs[0].distill is None


@pytest.mark.parametrize(
    "data,fragment",
    [
        ({"model": "m", "compress": {"bits": 4}, "distill": {"stepz": 3}}, "unknown key(s) ['stepz']"),
        ({"model": "m", "distill": {"steps": 3}}, "needs a compress section"),
        ({"model": "m", "compress": {"bits": 4}, "distill": {"loss": "kl"}}, "--loss 'kl' is not supported"),
        ({"model": "m", "compress": {"bits": 4}, "distill": {"steps": -1}}, "steps=-1 is negative"),
        ({"model": "m", "compress": {"bits": 4}, "distill": {"fsdp": True}}, "fsdp needs several processes"),
        ({"model": "m", "compress": {"bits": 4}, "distill": [1]}, "must be a mapping"),
        (
            {"model": "m", "runs": [{"name": "a", "compress": {"bits": 4}, "distill": {"lr": [1]}}]},
            "lr=[1] has the wrong type; expected float",
        ),
        ({"model": "m", "runs": [], "distill": {}}, "mixes 'runs'"),
    ],
)
def test_bad_distill_sections_are_refused(data, fragment):
    with pytest.raises(ConfigError) as err:
        parse_recipe(data)
    assert fragment in str(err.value)


def test_run_compress_distill_export_through_the_cli(tmp_path, bundled_dir):
    """``edgeq run`` on a tiny recipe: compress -> distill -> export; the exported artifact carries the
    distilled codes/scales exactly (parity against the distilled run's own model)."""
    from edgeq.bundled import heldout_text
    from edgeq.rundir import RunDir

    calib = tmp_path / "calib.txt"
    calib.write_text(heldout_text(max_chars=20000))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {bundled_dir}\n"
        "name: w4kd\n"
        "compress: {method: rtn, bits: 4, group_size: 32, sym: true}\n"
        f"distill: {{loss: mse+sw+kl, steps: 2, e2e_steps: 1, n_samples: 4, seq_len: 32, batch_size: 2, calib: {calib}}}\n"
        "export: [{format: gguf, type: q4_0, parity_tokens: 64}]\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeq", "run", str(recipe), "--out", str(out)], capture_output=True, text=True,
        timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "-- distill w4kd" in proc.stderr
    run, ptq = RunDir.open(out / "runs" / "w4kd"), RunDir.open(out / "runs" / "w4kd.ptq")
    assert run.meta["method"] == "rtn+distill" and run.meta["distill"]["steps"] == 2
    assert list(run.meta["loss_curves"]) == ["block 0", "block 1", "block 2", "block 3", "end-to-end"]
    assert (out / "runs" / "w4kd" / "loss_curves.png").stat().st_size > 0
    name = run.quantized_names()[0]
    assert not np.array_equal(run.quantized(name).scales, ptq.quantized(name).scales)  # distill changed them
    manifest = json.loads((out / "artifacts" / "w4kd.q4_0.manifest.json").read_text())
    assert manifest["recipe"]["runs"][0]["distill"]["loss"] == "mse+sw+kl"
    assert manifest["parity"]["fake_quant"]["top1_agreement"] > 0.99
