"""The distill stage: a quantized run dir + its teacher -> a new run dir with retrained codes/scales."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from edgeq import __version__
from edgeq.compress.distill.qat import QATLinear
from edgeq.compress.distill.trainer import LOGIT_TERMS, DistillConfig, blockwise, compute_saliency, end_to_end
from edgeq.compress.mappings import family_for
from edgeq.compress.quant import QuantizedWeight
from edgeq.errors import ConfigError
from edgeq.rundir import RunDir

log = logging.getLogger(__name__)


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
            codes, scales, zeros = module.export()
            out[f"{path}.weight"] = QuantizedWeight(codes.numpy(), scales.numpy(), zeros.numpy(), module.scheme)
    return out


def plot_curves(curves: dict[str, list[float]], path: Path) -> Path | None:
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
    fig.savefig(path)
    plt.close(fig)
    return path


def distill(
    run_dir: str | os.PathLike, config: DistillConfig, out: str | os.PathLike, teacher: str | None = None
) -> Path:
    """Retrain the quantized run ``run_dir`` against ``teacher`` (default: the run's source model)."""
    from edgeq.compress.calibration import calibration_ids, read_calibration_texts
    from edgeq.compress.model import load_torch_model
    from edgeq.compress.run import pick_device, write_run

    run = RunDir.open(run_dir)
    if not run.is_quantized:
        raise ConfigError(f"{run.path} has no integer codes; run `edgeq compress` first, then distill the run dir")
    teacher_path = Path(teacher or run.source_info().get("path", ""))
    if not (teacher_path / "config.json").exists():
        raise ConfigError(f"teacher model {str(teacher_path)!r} not found; pass --teacher MODEL_DIR")
    family = family_for(run.config)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    t0 = time.time()
    student, teacher_model = load_torch_model(run.path), load_torch_model(teacher_path)
    texts = read_calibration_texts(config.calib)
    ids = calibration_ids(run.path / "tokenizer.json", texts, config.n_samples, config.seq_len, config.seed)
    saliency = compute_saliency(teacher_model, family, ids, config.batch_size) if config.saliency else None
    curves = blockwise(teacher_model, student, family, ids, _quantized_tensors(run), config, device, saliency)
    curves = {f"block {k}": v for k, v in curves.items()}
    if config.terms & LOGIT_TERMS and config.e2e_steps > 0:
        curves["end-to-end"] = end_to_end(teacher_model, student.to(device), ids, config, device)
    quantized = _exported(student.to("cpu"))
    meta = dict(run.meta)
    meta.update(
        edgeq_version=__version__,
        method=f"{run.meta.get('method', '?')}+distill",
        distill={k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in asdict(config).items()},
        parent_run=str(run.path.resolve()),
        tensors={n: qw.scheme.to_dict() for n, qw in quantized.items()},
        loss_curves=curves,
        timings_s={**run.meta.get("timings_s", {}), "distill": time.time() - t0},
    )
    meta["config"] = {**run.meta.get("config", {}), "distill": meta["distill"]}
    out = Path(out)
    write_run(run, quantized, meta, out)
    plot_curves(curves, out / "loss_curves.png")
    (out / "distill.json").write_text(json.dumps({"curves": curves}, indent=1) + "\n")
    log.info("distilled %s -> %s in %.1fs", run.path, out, time.time() - t0)
    return out
