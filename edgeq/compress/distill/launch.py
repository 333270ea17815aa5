"""``edgeq distill --nproc N``: relaunch the same distillation under torchrun, on this machine only.

torch-free (the parent process only builds a command line). The children run
``python -m torch.distributed.run --nproc-per-node N --master-addr 127.0.0.1 --master-port P -m edgeq
distill ...`` with the options that produced ``config``, so ``--nproc 2`` and a hand-written torchrun
command are the same run. The rendezvous listens on the loopback address only.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from edgeq.compress.distill.config import DistillConfig
from edgeq.errors import ConfigError
from edgeq.rundir import RunDir

log = logging.getLogger(__name__)

# DistillConfig field -> the `edgeq distill` option that sets it (fields without one keep defaults)
_OPTIONS = {
    "loss": "--loss",
    "sw_weight": "--sw-weight",
    "steps": "--steps",
    "window": "--window",
    "e2e_steps": "--e2e-steps",
    "lr": "--lr",
    "lr_norms": "--lr-norms",
    "adapter_rank": "--adapter-rank",
    "batch_size": "--batch-size",
    "calib": "--calib",
    "n_samples": "--n-samples",
    "seq_len": "--seq-len",
    "seed": "--seed",
    "device": "--device",
    "checkpoint_every": "--checkpoint-every",
}
_FLAGS = {"saliency": "--saliency", "fsdp": "--fsdp"}


def launched_world() -> int:
    """The world size torchrun announced (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched_rank() -> int:
    """This process's rank under torchrun (0 when not launched by it)."""
    return int(os.environ.get("RANK", "0") or 0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distill_args(run_dir: Path, config: DistillConfig, out: Path, teacher: str | None, resume: bool) -> list[str]:
    """The ``edgeq distill`` arguments that rebuild ``config`` exactly."""
    args = [str(run_dir)]
    defaults = DistillConfig()
    for field, option in _OPTIONS.items():
        value = getattr(config, field)
        if value != getattr(defaults, field) and value is not None:
            args += [option, repr(value) if isinstance(value, float) else str(value)]
    args += ["--train", ",".join(config.train)]
    args += [flag for field, flag in _FLAGS.items() if getattr(config, field)]
    args += ["--fisher" if config.fisher else "--no-fisher"]
    unsupported = [f for f in ("sw_directions", "lr_weights", "saliency_lambda")
                   if getattr(config, f) != getattr(defaults, f)]  # fmt: skip
    if unsupported:
        raise ValueError(f"{unsupported} have no command-line option; launch torchrun from Python instead")
    if teacher:
        args += ["--teacher", str(teacher)]
    if resume:
        args.append("--resume")
    return args + ["--out", str(out)]


def torchrun_command(nproc: int, args: list[str], port: int | None = None) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    launcher += ["--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", str(port or free_port())]
    verbose = ["-v"] if logging.getLogger().getEffectiveLevel() <= logging.INFO else []
    return launcher + ["-m", "edgeq", *verbose, "distill", *args]


def teacher_path(run: RunDir, teacher: str | None) -> Path:
    return Path(teacher or run.source_info().get("path", ""))


def check_inputs(run: RunDir, teacher: Path, config: DistillConfig, world: int) -> None:
    """Refuse what cannot work before any process starts or any model loads."""
    if not run.is_quantized:
        raise ConfigError(f"{run.path} has no integer codes; run `edgeq compress` first, then distill the run dir")
    if not (teacher / "config.json").exists():
        raise ConfigError(f"teacher model {str(teacher)!r} not found; pass --teacher MODEL_DIR")
    if world > 1:
        if config.batch_size % world:
            raise ConfigError(
                f"--batch-size {config.batch_size} does not split over {world} processes; use a multiple of {world}"
            )
        if config.n_samples % config.batch_size:
            raise ConfigError(
                f"--n-samples {config.n_samples} is not a multiple of --batch-size {config.batch_size}; "
                "multi-process distillation needs full batches"
            )
    elif config.fsdp:
        raise ConfigError("--fsdp shards the student over processes; use --nproc N (N > 1) or torchrun")


def relaunch(nproc: int, run_dir: Path, config: DistillConfig, out: Path, teacher: str | None, resume: bool) -> int:
    """Run the distillation in ``nproc`` processes; returns torchrun's exit code.

    Bad input is refused here, once, before the processes start (a rank's error would otherwise
    reach the user wrapped in torchrun's report).
    """
    run = RunDir.open(run_dir)
    check_inputs(run, teacher_path(run, teacher), config, nproc)
    cmd = torchrun_command(nproc, distill_args(run_dir, config, out, teacher, resume))
    log.info("launching %s", " ".join(cmd))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(cmd, env=env, check=False).returncode
