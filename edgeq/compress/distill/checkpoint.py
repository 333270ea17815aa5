"""Resumable distillation state in ``OUT.state/``: tensors in safetensors, progress in JSON.

Saved after every finished block and every ``checkpoint_every`` end-to-end steps:

* ``params.safetensors`` -- the trainable tensors of every ``QATLinear`` trained so far (scales, latent
  weights, adapters), by full module path;
* ``optim.safetensors`` -- the end-to-end Adam state (``exp_avg``, ``exp_avg_sq``, ``step`` per
  parameter), flattened to tensors; empty between blocks (each block starts a fresh optimizer);
* ``progress.json`` -- the next block / end-to-end step, the loss curves so far and a fingerprint of
  the inputs (config, run dir, teacher) that ``--resume`` checks.

No RNG state is stored because there is none to store: every random draw (batch index, SW directions,
end-to-end batch) comes from a generator seeded by ``(seed, block, step)``, so a resumed run draws
what the uninterrupted run would have drawn. Nothing is unpickled: tensors load through safetensors.
Each save is a new directory renamed into place (``edgeq.rundir.AtomicDir``), so a kill at any moment
leaves the previous complete state or the new one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgeq.errors import ConfigError
from edgeq.rundir import AtomicDir

PROGRESS, PARAMS, OPTIM = "progress.json", "params.safetensors", "optim.safetensors"


@dataclass
class DistillState:
    """What a resumed run needs: where to continue and what was learned until then."""

    fingerprint: str
    next_block: int = 0
    e2e_step: int = 0
    curves: dict[str, list[float]] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    optim: dict[str, torch.Tensor] = field(default_factory=dict)


def fingerprint(payload: dict) -> str:
    """A short hash of what must not change between an interrupted run and its resume."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def state_dir_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".state")


def save(state_dir: Path, state: DistillState) -> None:
    with AtomicDir(state_dir) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.params.items()}, str(tmp / PARAMS))
        save_file({k: v.detach().cpu().contiguous() for k, v in state.optim.items()}, str(tmp / OPTIM))
        progress = {
            "fingerprint": state.fingerprint,
            "next_block": state.next_block,
            "e2e_step": state.e2e_step,
            "curves": state.curves,
        }
        (tmp / PROGRESS).write_text(json.dumps(progress) + "\n")


def load(state_dir: Path, expected_fingerprint: str) -> DistillState | None:
    """The saved state, or None when there is none; a state of other inputs is refused."""
    state_dir = Path(state_dir)
    if not (state_dir / PROGRESS).exists():
        old = state_dir.with_name(f".{state_dir.name}.old")  # killed between AtomicDir's two renames
        if not (old / PROGRESS).exists():
            return None
        state_dir = old
    progress = json.loads((state_dir / PROGRESS).read_text())
    if progress.get("fingerprint") != expected_fingerprint:
        raise ConfigError(
            f"{state_dir} was written by a distill run with other inputs (config, run dir or teacher); "
            "rerun with the same options, or drop --resume to start over"
        )
    return DistillState(
        fingerprint=expected_fingerprint,
        next_block=int(progress["next_block"]),
        e2e_step=int(progress["e2e_step"]),
        curves={k: [float(x) for x in v] for k, v in progress["curves"].items()},
        params=load_file(str(state_dir / PARAMS)),
        optim=load_file(str(state_dir / OPTIM)),
    )


def clear(state_dir: Path) -> None:
    import shutil

    state_dir = Path(state_dir)
    for p in (state_dir, state_dir.with_name(f".{state_dir.name}.old")):
        shutil.rmtree(p, ignore_errors=True)


# -- tensors in and out of modules and optimizers ------------------------------------------------------
def trainable_tensors(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """``{path.param: tensor}`` of the parameters that training may change, from ``{path: QATLinear}``."""
    out = {}
    for path, module in modules.items():
        for name, p in module.named_parameters():
            if name != "bias":  # the bias stays fixed in every training mode
                out[f"{path}.{name}"] = p.detach()
    return out


@torch.no_grad()
def restore_tensors(modules: dict[str, torch.nn.Module], saved: dict[str, torch.Tensor]) -> None:
    for path, module in modules.items():
        for name, p in module.named_parameters():
            key = f"{path}.{name}"
            if key in saved:
                p.copy_(saved[key].to(p.device, p.dtype))


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as ``{"i.key": tensor}`` (i = index in the optimizer's param order)."""
    sd = opt.state_dict()
    out = {}
    for index, st in sd["state"].items():
        for key, value in st.items():
            out[f"{index}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return out


def restore_optimizer(opt: torch.optim.Optimizer, saved: dict[str, torch.Tensor]) -> None:
    if not saved:
        return
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for flat, value in saved.items():
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    sd["state"] = state
    opt.load_state_dict(sd)
