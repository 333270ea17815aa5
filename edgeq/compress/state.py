"""Resumable state of the layer-sequential driver, written after every finished block.

``STATE_DIR/`` holds ``progress.json`` (next block index, per-block stats), ``codes.safetensors``
(codes/scales/zeros of finished blocks), ``fp.safetensors`` (float tensors a method changed) and ``hidden.safetensors`` (the next block's inputs). Each
save goes to a temporary directory that replaces the previous state atomically, so a kill -9 at any
moment leaves either the old or the new state, never a mix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file


def save_state(state_dir: Path, next_index: int, results: dict, stats: dict, fp: dict, hidden: list) -> None:
    state_dir = Path(state_dir)
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    flat = {}
    for name, (codes, scales, zeros) in results.items():
        flat[f"{name}.codes"], flat[f"{name}.scales"], flat[f"{name}.zeros"] = codes, scales, zeros
    save_file({k: v.contiguous() for k, v in flat.items()}, str(tmp / "codes.safetensors"))
    save_file({k: v.contiguous() for k, v in fp.items()}, str(tmp / "fp.safetensors"))
    save_file({f"h{i}": h.contiguous() for i, h in enumerate(hidden)}, str(tmp / "hidden.safetensors"))
    (tmp / "progress.json").write_text(json.dumps({"next_block": next_index, "stats": stats}))
    old = state_dir.with_name(state_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if state_dir.exists():
        state_dir.rename(old)
    tmp.rename(state_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_state(state_dir: Path):
    """(next_index, results, stats, fp updates, hidden) or None when there is no complete state."""
    state_dir = Path(state_dir)
    if not (state_dir / "progress.json").exists():
        old = state_dir.with_name(state_dir.name + ".old")  # killed between the two renames
        if (old / "progress.json").exists():
            state_dir = old
        else:
            return None
    progress = json.loads((state_dir / "progress.json").read_text())
    flat = load_file(str(state_dir / "codes.safetensors"))
    names = sorted({k.rsplit(".", 1)[0] for k in flat})
    results = {n: (flat[f"{n}.codes"], flat[f"{n}.scales"], flat[f"{n}.zeros"]) for n in names}
    hid = load_file(str(state_dir / "hidden.safetensors"))
    hidden = [hid[f"h{i}"] for i in range(len(hid))]
    fp = load_file(str(state_dir / "fp.safetensors"))
    return progress["next_block"], results, progress["stats"], fp, hidden


def clear_state(state_dir: Path) -> None:
    for suffix in ("", ".tmp", ".old"):
        shutil.rmtree(Path(str(state_dir) + suffix), ignore_errors=True)
