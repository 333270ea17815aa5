"""GPTQ and AWQ: reconstruction against RTN on known Hessians, folding exactness, and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from edgeq.compress.awq import search_clip, search_scale
from edgeq.compress.gptq import HessianAccumulator, dequantize_torch, gptq_quantize
from edgeq.compress.quant import QuantScheme
from edgeq.compress.rtn import rtn_quantize


def _inputs(seed: int, n: int, k: int, dist: int = 0) -> torch.Tensor:
    """``n`` samples of distribution ``dist`` (a fixed channel mixing), drawn with ``seed``."""
    mix = torch.randn(k, k, generator=torch.Generator().manual_seed(10_000 + dist)) / k**0.5
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) @ mix  # correlated channels
    return x * torch.linspace(0.2, 3.0, k)  # and uneven channel magnitudes


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "scheme", [QuantScheme(4, 32, True), QuantScheme(3, 32, False), QuantScheme(4, -1, True), QuantScheme(2, 64, True)]
)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_fresh_inputs(seed, scheme, act_order):
    k, n = 256, 96
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    acc = HessianAccumulator(k)
    acc.add(_inputs(seed, 4096, k, dist=seed))
    wq_gptq = dequantize_torch(*gptq_quantize(w, acc.H, scheme, act_order=act_order))
    wq_rtn = dequantize_torch(*rtn_quantize(w, scheme))
    x = _inputs(seed + 100, 2048, k, dist=seed)  # fresh samples of the same distribution
    err_gptq = ((x @ (w - wq_gptq).T) ** 2).mean()
    err_rtn = ((x @ (w - wq_rtn).T) ** 2).mean()
    assert err_gptq < 0.9 * err_rtn, (float(err_gptq), float(err_rtn))


def test_gptq_static_groups_stay_contiguous_and_exact():
    """With act-order the codes still dequantize with contiguous groups (no g_idx needed)."""
    k, n = 128, 16
    w = torch.randn(n, k)
    acc = HessianAccumulator(k)
    acc.add(_inputs(0, 512, k))
    codes, scales, zeros = gptq_quantize(w, acc.H, QuantScheme(4, 32, True), act_order=True)
    assert codes.shape == (n, k) and scales.shape == (n, 4) and int(codes.max()) <= 15
    assert torch.all(zeros == 8)


def test_gptq_dead_columns_are_zeroed():
    k, n = 64, 8
    x = _inputs(0, 512, k)
    x[:, 5] = 0.0
    acc = HessianAccumulator(k)
    acc.add(x)
    wq = dequantize_torch(*gptq_quantize(torch.randn(n, k), acc.H, QuantScheme(4, 32, False)))
    assert torch.all(wq[:, 5] == 0)  # a column no input ever reaches is dropped, exactly
    assert torch.isfinite(wq).all() and torch.count_nonzero(wq) > 0


def test_awq_scale_search_never_worse_than_rtn_and_clip_helps():
    k, n = 256, 64
    torch.manual_seed(0)
    x = _inputs(3, 1024, k)
    x[:, :4] *= 20  # salient input channels
    w = torch.randn(n, k) * 0.05
    scheme = QuantScheme(3, 32, True)
    s, alpha = search_scale(x, [w], [scheme])
    y = x @ w.T

    def out_err(wq):
        return float(((x @ wq.T - y) ** 2).sum())

    rtn = dequantize_torch(*rtn_quantize(w, scheme))
    scaled = dequantize_torch(*rtn_quantize(w * s, scheme)) / s
    assert out_err(scaled) <= out_err(rtn) and alpha > 0
    ratio = search_clip(x / s, w * s, scheme)
    clipped = dequantize_torch(*rtn_quantize(w * s, scheme, ratio)) / s
    assert out_err(clipped) <= out_err(scaled)


def _compress_cmd(model, out, *extra):
    return [sys.executable, "-m", "edgeq.cli", "compress", str(model), "--method", "gptq", "--bits", "3",
            "--group-size", "32", "--n-samples", "24", "--seq-len", "128", "--out", str(out), *extra]  # fmt: skip


@pytest.mark.slow
def test_resume_after_kill_gives_identical_codes(tmp_path, bundled_dir):
    ref = tmp_path / "ref"
    subprocess.run(_compress_cmd(bundled_dir, ref), check=True, capture_output=True)
    out = tmp_path / "run"
    state = tmp_path / "run.state" / "progress.json"
    proc = subprocess.Popen(_compress_cmd(bundled_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["next_block"] >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()
    done = subprocess.run(_compress_cmd(bundled_dir, out, "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = (ref / "quant.safetensors").read_bytes(), (out / "quant.safetensors").read_bytes()
    assert a == b
    assert not (tmp_path / "run.state").exists()
    assert np.isfinite(json.loads((out / "run.json").read_text())["timings_s"]["total"])


@pytest.mark.gpu
def test_gptq_on_cuda_matches_cpu(tiny_random_dir, tmp_path):
    """Same code path on CUDA: codes agree with the CPU run except for rare rounding ties."""
    from edgeq.compress.run import compress
    from edgeq.config import CompressConfig
    from edgeq.rundir import RunDir

    runs = {}
    for device in ("cpu", "cuda"):
        cfg = CompressConfig(method="gptq", bits=4, group_size=32, n_samples=8, seq_len=64, device=device)
        runs[device] = RunDir.open(compress(tiny_random_dir, cfg, tmp_path / device))
    for name in runs["cpu"].quantized_names():
        a, b = runs["cpu"].quantized(name).codes, runs["cuda"].quantized(name).codes
        assert np.mean(a == b) > 0.99, name
