"""Data-parallel distillation: 2 CPU processes (torchrun, gloo) compute what 1 process computes on the
same global batch; an interrupted run resumed from its state equals the uninterrupted run bit for bit.

Tolerances: the multi-process objective equals the one-process objective up to float summation
order (per-shard means averaged, gathered SW projections). Measured on the bundled model with the
settings below: at most 1.3e-7 relative difference per block step and 6.3e-7 per end-to-end step. A
wrong reduction is far larger: SW computed per shard instead of on the gathered batch moves the block
curves by 1-2e-3 relative (and, through the trained scales, the end-to-end curve by 1.7e-4). So
``rtol=1e-5`` sits ~10x above the noise and ~100x below the smallest error it must catch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeq.compress.distill.config import DistillConfig
from edgeq.errors import ConfigError

RTOL = 1e-5
# fisher on: its normalization over the global calibration set is the part that needs every rank; windows of
# 3 blocks: a checkpoint after block 1 must carry what blocks 2 and 3 learned in the windows before
SETTINGS = dict(loss="mse+sw+tsld", steps=5, e2e_steps=4, n_samples=8, seq_len=64, batch_size=4, fisher=True, window=3)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as torchrun gives each rank: on 2 shared cores a second OpenMP thread
    per process oversubscribes the machine (measured: a 47 s run took 160 s with two threads under
    load), and results must not depend on the thread count anyway."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    from edgeq.bundled import heldout_text

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(heldout_text(max_chars=40000))
    return path


@pytest.fixture(scope="module")
def ptq(make_run) -> Path:
    return make_run(bits=2, group_size=32, sym=True)


@pytest.fixture(scope="module")
def one_process(one_thread, ptq, calib, tmp_path_factory) -> Path:
    """The reference: one process, the whole global batch."""
    from edgeq.compress.distill.run import distill

    out = tmp_path_factory.mktemp("one") / "d"
    return distill(ptq, DistillConfig(calib=str(calib), checkpoint_every=2, **SETTINGS), out)


def _cli_args(ptq: Path, calib: Path, out: Path) -> list[str]:
    args = [str(ptq), "--calib", str(calib), "--out", str(out)]
    for key, value in SETTINGS.items():
        option = key.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{option}" if value else f"--no-{option}")
        else:
            args += [f"--{option}", str(value)]
    return args


def _curves(run: Path) -> dict[str, list[float]]:
    return json.loads((run / "distill.json").read_text())["curves"]


def _assert_same_training(reference: Path, other: Path, ptq: Path) -> None:
    from edgeq.rundir import RunDir

    ref, oth = _curves(reference), _curves(other)
    assert list(ref) == ["block 0", "block 1", "block 2", "block 3", "end-to-end"]
    assert list(oth) == list(ref)
    for name in ref:
        np.testing.assert_allclose(oth[name], ref[name], rtol=RTOL, err_msg=name)
    a, b, parent = RunDir.open(reference), RunDir.open(other), RunDir.open(ptq)
    moved = same = total = 0
    for name in a.quantized_names():
        qa, qb, qp = a.quantized(name), b.quantized(name), parent.quantized(name)
        assert np.array_equal(qa.codes, qb.codes) and np.array_equal(qa.zeros, qb.zeros), name
        sa, sb = qa.scales.astype(np.float32), qb.scales.astype(np.float32)
        np.testing.assert_allclose(sb, sa, rtol=1e-3, err_msg=name)  # at most one fp16 step apart
        same += int((sa == sb).sum())
        moved += int((sa != qp.scales.astype(np.float32)).sum())
        total += sa.size
    assert same > 0.995 * total, same / total  # fp16 rounding of float32 values ~1e-7 apart: rarely differs
    assert moved > 0.5 * total, moved / total  # training did move the scales: the comparison is not vacuous
    norms = [n for n in a.fp_names() if "layernorm" in n]  # the default trains the blocks' norms too
    assert len(norms) == 8
    for name in norms:
        na, nb = a.fp_tensor(name), b.fp_tensor(name)
        np.testing.assert_allclose(nb, na, rtol=1e-4, atol=1e-6, err_msg=name)
        assert not np.array_equal(na, parent.fp_tensor(name)), name


def test_two_processes_ddp_match_one_process(ptq, calib, one_process, tmp_path):
    """``torchrun --nproc-per-node 2 -m edgeq distill`` (gloo, DDP) == one process on the same global batch."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(_port()), "-m", "edgeq", "distill",
           *_cli_args(ptq, calib, out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "CI": "true"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("wrote run dir") == 1  # rank 0 alone reports (and writes)
    assert json.loads((out / "run.json").read_text())["distill"]["processes"] == 2
    assert not (tmp_path / "ddp.state").exists()
    _assert_same_training(one_process, out, ptq)


def test_nproc_fsdp_matches_one_process(ptq, calib, one_process, tmp_path):
    """``edgeq distill --nproc 2 --fsdp`` relaunches itself under torchrun; the FSDP-sharded student
    trains the same end-to-end curve."""
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "edgeq", "distill", *_cli_args(ptq, calib, out), "--nproc", "2", "--fsdp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "CI": "true"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "run.json").read_text())["distill"]["fsdp"] is True
    _assert_same_training(one_process, out, ptq)
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("stop", ["block:1", "e2e:2"])
def test_resume_equals_uninterrupted_bit_for_bit(ptq, calib, one_process, tmp_path, monkeypatch, stop):
    """Stop right after a checkpoint (after block 1 / after end-to-end step 2), resume: same bytes."""
    from edgeq.compress.distill.run import DistillInterrupted, distill

    cfg = DistillConfig(calib=str(calib), checkpoint_every=2, **SETTINGS)
    out = tmp_path / "d"
    monkeypatch.setenv("EDGEQ_DISTILL_STOP_AFTER", stop)
    with pytest.raises(DistillInterrupted):
        distill(ptq, cfg, out)
    monkeypatch.delenv("EDGEQ_DISTILL_STOP_AFTER")
    assert not out.exists() and (tmp_path / "d.state" / "progress.json").exists()
    progress = json.loads((tmp_path / "d.state" / "progress.json").read_text())
    assert (progress["next_block"], progress["e2e_step"]) == ((2, 0) if stop == "block:1" else (4, 2))
    with pytest.raises(ConfigError, match="other inputs"):  # a state of another config is refused
        distill(ptq, DistillConfig(calib=str(calib), **{**SETTINGS, "steps": 6}), out, resume=True)
    distill(ptq, cfg, out, resume=True)
    assert not (tmp_path / "d.state").exists()
    assert (out / "quant.safetensors").read_bytes() == (one_process / "quant.safetensors").read_bytes()
    assert (out / "fp.safetensors").read_bytes() == (one_process / "fp.safetensors").read_bytes()  # trained norms
    assert _curves(out) == _curves(one_process)


# -- the reductions themselves, without models: 2 spawned gloo processes vs. one -------------------------
def _reduction_worker(rank: int, port: int, result_dir: str) -> None:
    import torch.distributed as dist

    from edgeq.compress.distill.dist import DistContext
    from edgeq.compress.distill.trainer import block_loss, logit_loss, step_generator

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, world=2, group=dist.new_group(backend="gloo"))
    results = {}
    for name, loss_fn in _LOSSES.items():
        value, grad = loss_fn(ctx, block_loss, logit_loss, step_generator)
        dist.all_reduce(grad)  # what DDP does with the gradients: average over ranks
        results[name] = (float(value), (grad / 2).tolist())
    Path(result_dir, f"{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _problem(seed: int, dim: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, 8, generator=g)  # (B, T, C): a global batch of 4 sequences
    w = torch.randn(8, dim, generator=g)
    target = torch.randn(4, 6, dim, generator=g)
    return x, w, target


def _block(ctx, block_loss, logit_loss, step_generator):
    x, w, target = _problem(0, 16)
    w.requires_grad_(True)
    cfg = DistillConfig(loss="mse+sw", sw_directions=5)
    loss = block_loss(ctx.shard(x) @ w, ctx.shard(target), cfg, step_generator(0, 0, 0), "output", None, ctx)
    loss.backward()
    return ctx.mean(loss.detach()), w.grad


def _logits(term):
    def run(ctx, block_loss, logit_loss, step_generator):
        x, w, t_logits = _problem(1, 32)
        w.requires_grad_(True)
        labels = torch.randint(32, (4, 6), generator=torch.Generator().manual_seed(2))
        loss = logit_loss(term, ctx.shard(x) @ w, ctx.shard(t_logits) * 3, ctx.shard(labels), ctx)
        loss.backward()
        return ctx.mean(loss.detach()), w.grad

    return run


_LOSSES = {"mse+sw": _block, "kl": _logits("kl"), "cakld": _logits("cakld"), "tsld": _logits("tsld")}


def test_sharded_losses_and_gradients_equal_the_full_batch(tmp_path):
    """Each loss's value and DDP-averaged gradient over 2 shards == one process on the whole batch."""
    import torch.multiprocessing as mp

    from edgeq.compress.distill.dist import DistContext
    from edgeq.compress.distill.trainer import block_loss, logit_loss, step_generator

    mp.spawn(_reduction_worker, args=(_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    for name, loss_fn in _LOSSES.items():
        value, grad = loss_fn(DistContext(), block_loss, logit_loss, step_generator)
        for rank in ranks:
            np.testing.assert_allclose(rank[name][0], float(value), rtol=1e-5, err_msg=name)
            np.testing.assert_allclose(np.array(rank[name][1]), grad.numpy(), rtol=1e-4, atol=1e-7, err_msg=name)


def test_a_batch_that_does_not_split_is_refused():
    from edgeq.compress.distill.dist import DistContext

    with pytest.raises(ConfigError, match="multiple of 2"):
        DistContext(rank=0, world=2).shard(torch.zeros(3, 4))


def test_nproc_refuses_bad_input_before_starting_processes(ptq, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edgeq", "distill", str(ptq), "--nproc", "2", "--batch-size", "3", "--out",
         str(tmp_path / "o")], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --batch-size 3 does not split over 2 processes")
    assert not (tmp_path / "o").exists()
    proc = subprocess.run([sys.executable, "-m", "edgeq", "distill", str(ptq), "--fsdp", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "--fsdp shards the student" in proc.stderr


def test_freezing_a_layer_whose_codes_trained_keeps_them():
    """After training latent weights (codes move through the STE), freezing the layer for the next
    block or for end-to-end training must not fall back to the PTQ codes."""
    from edgeq.compress.distill.qat import QATLinear
    from edgeq.compress.gptq import dequantize_torch
    from edgeq.compress.quant import QuantScheme
    from edgeq.compress.rtn import rtn_quantize

    torch.manual_seed(0)
    scheme = QuantScheme(2, 32, True)
    codes, scales, zeros = rtn_quantize(torch.randn(8, 64) * 0.1, scheme)
    qat = QATLinear(dequantize_torch(codes, scales, zeros), codes, scales, zeros, scheme)
    qat.set_trainable(("scales", "weights"))
    with torch.no_grad():
        qat.weight_latent.add_(torch.randn_like(qat.weight_latent) * 0.05)  # what many STE steps do
    x = torch.randn(3, 64)
    before, exported = qat(x).detach(), qat.export()[0]
    assert not torch.equal(exported, codes)
    qat.freeze()
    assert not any(p.requires_grad for p in qat.parameters())
    assert torch.equal(qat(x), before) and torch.equal(qat.export()[0], exported)
    qat.set_trainable(("scales",))  # end-to-end trains scales only, on the trained codes
    assert torch.equal(qat.export()[0], exported)


def test_scale_gradient_is_not_rounding_noise_when_codes_learn():
    """With the latent weights on their grid, training them too must leave the scales' gradient what
    it is when only scales train (not the STE's rounding residual, float noise that Adam would turn
    into full-size random steps and that made 1 and 2 processes disagree)."""
    from edgeq.compress.distill.qat import QATLinear
    from edgeq.compress.gptq import dequantize_torch
    from edgeq.compress.quant import QuantScheme
    from edgeq.compress.rtn import rtn_quantize

    torch.manual_seed(1)
    scheme = QuantScheme(2, 32, True)
    codes, scales, zeros = rtn_quantize(torch.randn(16, 64) * 0.1, scheme)
    x, y = torch.randn(32, 64), torch.randn(32, 16)
    grads = []
    for groups in [("scales",), ("scales", "weights")]:
        qat = QATLinear(dequantize_torch(codes, scales, zeros), codes, scales, zeros, scheme)
        qat.set_trainable(groups)
        ((qat(x) - y) ** 2).mean().backward()
        grads.append(qat.scales.grad)
    assert grads[0].abs().min() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)
