"""The distill stage: a quantized run dir + its teacher -> a new run dir with retrained codes/scales.

``distill(run_dir, config, out)`` runs in one process, or data parallel when launched by ``torchrun``
(``torchrun --nproc-per-node N -m edgeq distill ...``; see ``edgeq.compress.distill.dist``). Progress is
kept in ``OUT.state/`` (``edgeq.compress.distill.checkpoint``) after every block and every
``checkpoint_every`` end-to-end steps; ``resume=True`` continues from there with the same result as an
uninterrupted run. Rank 0 alone writes; the state dir is removed once the run dir is complete.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from edgeq import __version__
from edgeq.compress.distill import checkpoint as ckpt
from edgeq.compress.distill import launch
from edgeq.compress.distill.config import DistillConfig
from edgeq.compress.distill.dist import DistContext, init_distributed
from edgeq.compress.distill.qat import QATLinear
from edgeq.compress.mappings import family_for
from edgeq.compress.quant import QuantizedWeight
from edgeq.rundir import RunDir

log = logging.getLogger(__name__)
STOP_ENV = "EDGEQ_DISTILL_STOP_AFTER"  # test hook: "block:K" or "e2e:S" stops after that checkpoint


class DistillInterrupted(RuntimeError):
    """Raised by the ``EDGEQ_DISTILL_STOP_AFTER`` hook right after a checkpoint was written."""


def _quantized_tensors(run: RunDir) -> dict:
    out = {}
    for name in run.quantized_names():
        qw = run.quantized(name)
        codes, scales, zeros = (torch.from_numpy(a.copy()) for a in (qw.codes, qw.scales, qw.zeros))
        out[name] = (codes, scales, zeros, qw.scheme)
    return out


def _exported(student) -> dict[str, QuantizedWeight]:
    out = {}
    for path, module in student.named_modules():
        if isinstance(module, QATLinear):
            codes, scales, zeros = (t.cpu().numpy() for t in module.export())
            out[f"{path}.weight"] = QuantizedWeight(codes, scales, zeros, module.scheme)
    return out


def plot_curves(curves: dict[str, list[float]], path: Path) -> Path | None:
    """Loss curves (log scale) as a PNG, written under a temporary name and renamed into place."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, curve in curves.items():
        ax.plot(curve, label=name, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("distillation loss per block / end-to-end")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _fingerprint(run: RunDir, teacher_path: Path, config: DistillConfig) -> str:
    cfg = config.to_dict()
    for key in ("device", "fsdp", "checkpoint_every"):  # how, not what: may change between resumes
        cfg.pop(key)
    run_json = (run.path / "run.json").read_text()
    return ckpt.fingerprint({"config": cfg, "run": run_json, "teacher": str(teacher_path.resolve())})


class _Checkpointer:
    """Saves state on rank 0 (the others wait) and applies the stop hook."""

    def __init__(self, ctx: DistContext, state_dir: Path, fp: str, config: DistillConfig):
        self.ctx, self.state_dir, self.fp, self.config = ctx, state_dir, fp, config
        self.stop = os.environ.get(STOP_ENV, "")

    def _save(self, state: ckpt.DistillState, where: str) -> None:
        if self.ctx.is_main:
            ckpt.save(self.state_dir, state)
        self.ctx.barrier()
        if self.stop == where:
            raise DistillInterrupted(f"stopped by {STOP_ENV}={where} after writing {self.state_dir}")

    def block_done(self, index: int, curves: dict, trained: dict) -> None:
        params = ckpt.trainable_tensors(trained)
        self._save(ckpt.DistillState(self.fp, index + 1, 0, curves, params), f"block:{index}")

    def e2e_step(self, step: int, curves: dict, qats: dict, opt, n_blocks: int) -> None:
        params, optim = ckpt.trainable_tensors(qats), ckpt.optimizer_tensors(opt)
        if self.config.fsdp:  # gather the shards (a collective: every rank takes part)
            from edgeq.compress.distill.fsdp import full_tensors

            params, optim = full_tensors(params), full_tensors(optim)
        self._save(ckpt.DistillState(self.fp, n_blocks, step, curves, params, optim), f"e2e:{step}")


def distill(
    run_dir: str | os.PathLike,
    config: DistillConfig,
    out: str | os.PathLike,
    teacher: str | None = None,
    resume: bool = False,
) -> Path:
    """Retrain the quantized run ``run_dir`` against ``teacher`` (default: the run's source model).

    Under torchrun every rank calls this; all return ``out``, rank 0 writes it.
    """
    run = RunDir.open(run_dir)
    teacher_path = launch.teacher_path(run, teacher)
    launch.check_inputs(run, teacher_path, config, launch.launched_world())
    ctx = init_distributed(config.device)
    try:
        return _distill(run, teacher_path, config, Path(out), resume, ctx)
    finally:
        ctx.close()


def _distill(run: RunDir, teacher_path: Path, config: DistillConfig, out: Path, resume: bool, ctx) -> Path:
    from edgeq.compress.calibration import calibration_ids, get_module, read_calibration_texts
    from edgeq.compress.distill.trainer import blockwise, compute_saliency, qat_groups, trained_modules, wrap_block
    from edgeq.compress.model import load_torch_model

    family = family_for(run.config)
    fp = _fingerprint(run, teacher_path, config)
    state_dir = ckpt.state_dir_for(out)
    state = ckpt.load(state_dir, fp) if resume else None
    if state is None:
        state = ckpt.DistillState(fp)
        if ctx.is_main:
            ckpt.clear(state_dir)
    else:
        log.info("resuming %s: next block %d, end-to-end step %d", state_dir, state.next_block, state.e2e_step)
    ctx.barrier()
    torch.manual_seed(config.seed)
    t0 = time.time()
    student, teacher_model = load_torch_model(run.path), load_torch_model(teacher_path)
    texts = read_calibration_texts(config.calib)
    ids = calibration_ids(run.tokenizer(), texts, config.n_samples, config.seq_len, config.seed)
    quantized = _quantized_tensors(run)
    n_blocks = len(get_module(student, family.blocks))
    saver = _Checkpointer(ctx, state_dir, fp, config)
    curves = dict(state.curves)
    if state.next_block < n_blocks:
        saliency = None
        if config.saliency:
            saliency = compute_saliency(teacher_model.to(ctx.device), family, ids, config.batch_size, ctx)
            teacher_model.to("cpu")
        curves = blockwise(teacher_model, student, family, ids, quantized, config, ctx, saliency,
                           state.next_block, state.params, curves, saver.block_done)  # fmt: skip
    else:  # every block finished before the interruption: restore them, no forward passes needed
        for index, block in enumerate(get_module(student, family.blocks)):
            prefix = family.block_prefix(index)
            qats = wrap_block(block, family, prefix, quantized, config)
            modules = trained_modules(block, qats, config)
            for q in qats.values():
                q.set_trainable(qat_groups(config))
                q.freeze()
            ckpt.restore_tensors({f"{prefix}{p}": m for p, m in modules.items()}, state.params)
    if config.logit_term and config.e2e_steps > 0:
        curves = _end_to_end(teacher_model, student, ids, config, ctx, state, curves, saver, n_blocks)
    if ctx.is_main:
        _write(run, student, config, curves, out, t0)  # (an FSDP student cannot move devices any more)
        ckpt.clear(state_dir)
    ctx.barrier()
    return out


def _end_to_end(teacher_model, student, ids, config, ctx, state, curves, saver, n_blocks) -> dict:
    from edgeq.compress.distill.trainer import end_to_end

    key = "end-to-end"
    start = state.e2e_step if state.next_block >= n_blocks else 0

    def restore_optim(opt) -> None:
        if start:
            from edgeq.compress.distill import fsdp as fsdp_mod

            (fsdp_mod.restore_optimizer if config.fsdp else ckpt.restore_optimizer)(opt, state.optim)

    def on_checkpoint(step, curve, qats, opt) -> None:
        saver.e2e_step(step, {**curves, key: curve}, qats, opt, n_blocks)

    curve = end_to_end(teacher_model, student, ids, config, ctx, start, curves.get(key) if start else None,
                       restore_optim, on_checkpoint, _norms(student, config))  # fmt: skip
    return {**curves, key: curve}


def _norms(student, config: DistillConfig) -> dict:
    """The trained norm layers by full path (empty unless "norms" trains)."""
    from edgeq.compress.calibration import get_module
    from edgeq.compress.distill.trainer import block_norms

    if "norms" not in config.train:
        return {}
    family = family_for(student.config.to_dict())
    blocks = get_module(student, family.blocks)
    return {f"{family.block_prefix(i)}{n}": m for i, blk in enumerate(blocks) for n, m in block_norms(blk).items()}


def _write(run: RunDir, student, config: DistillConfig, curves: dict, out: Path, t0: float) -> None:
    from edgeq.compress.run import write_run

    quantized = _exported(student)
    meta = dict(run.meta)
    meta.update(
        edgeq_version=__version__,
        method=f"{run.meta.get('method', '?')}+distill",
        distill={**config.to_dict(), "processes": launch.launched_world()},
        parent_run=str(run.path.resolve()),
        tensors={n: qw.scheme.to_dict() for n, qw in quantized.items()},
        loss_curves=curves,
        timings_s={**run.meta.get("timings_s", {}), "distill": time.time() - t0},
    )
    meta["config"] = {**run.meta.get("config", {}), "distill": meta["distill"]}
    norms = {f"{path}.weight": m.weight.detach().cpu().float().numpy() for path, m in _norms(student, config).items()}
    write_run(run, quantized, meta, out, norms)
    plot_curves(curves, out / "loss_curves.png")
    tmp = out / ".distill.json.tmp"
    tmp.write_text(json.dumps({"curves": curves}, indent=1) + "\n")
    os.replace(tmp, out / "distill.json")
    log.info("distilled %s -> %s in %.1fs", run.path, out, time.time() - t0)
