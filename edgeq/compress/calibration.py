"""Calibration data and the layer-sequential driver shared by every calibrated method.

The driver captures the inputs of decoder block 0 once, then walks the blocks in order: the block
moves to the compute device, hooks collect what the method needs from its Linears' inputs, the
method quantizes the block's Linears, and the block is run again -- now quantized -- to produce the
inputs of the next block. Only the current block lives on the device; the others stay on the CPU.

After every block the driver writes its state (finished codes and the next block's inputs) so that
``resume=True`` after a crash continues from the last finished block with identical results.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgeq.compress.mappings import Family
from edgeq.errors import ConfigError

log = logging.getLogger(__name__)


# -- calibration text -------------------------------------------------------------------------------
def read_calibration_texts(source: str | os.PathLike | None, text_field: str = "text") -> list[str]:
    """Texts from a plain-text file, a JSONL file (``text_field`` of each line) or a folder of files.

    ``None`` or ``"stdlib"`` means the training split of the bundled model's text (Python's stdlib).
    """
    if source in (None, "stdlib"):
        from edgeq.bundled import read_text, split_files

        return [read_text(p) for p in split_files()[0]]
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return [t for p in files for t in read_calibration_texts(p, text_field)]
    if not path.is_file():
        raise ConfigError(f"calibration source {str(path)!r} does not exist; expected a .txt/.jsonl file or a folder")
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)[text_field]))
            except (ValueError, KeyError, TypeError):
                raise ConfigError(
                    f"{path}:{i + 1} is not a JSON object with a {text_field!r} field; fix the line or the field name"
                ) from None
        return texts
    return [path.read_text(encoding="utf-8", errors="replace")]


def calibration_ids(tokenizer, texts: list[str], n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """(n_samples, seq_len) token windows drawn (seeded) from the tokenized texts.

    ``tokenizer``: a ``tokenizers.Tokenizer`` or the path of a ``tokenizer.json``.

    Texts are visited in a seeded random order and tokenized only until there are four times as many
    tokens as the windows need (or the texts run out), so a large corpus costs little.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer)) if isinstance(tokenizer, (str, Path)) else tokenizer
    rng = np.random.default_rng(seed)
    need = 4 * n_samples * seq_len
    parts, have = [], 0
    order = rng.permutation(len(texts))
    for start in range(0, len(order), 64):
        batch = [texts[i] for i in order[start : start + 64]]
        for enc in tok.encode_batch(batch, add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=np.int64))
            have += len(enc.ids)
        if have >= need:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if len(stream) <= seq_len:
        raise ConfigError(
            f"calibration text has {len(stream)} tokens; need more than seq_len={seq_len} (add text or lower --seq-len)"
        )
    starts = rng.integers(0, len(stream) - seq_len, size=n_samples)
    return torch.from_numpy(np.stack([stream[s : s + seq_len] for s in starts]))


# -- the driver ------------------------------------------------------------------------------------
class _StopForward(Exception):
    pass


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


@torch.no_grad()
def capture_block_inputs(model, family: Family, ids: torch.Tensor, batch_size: int) -> tuple[list, dict]:
    """Inputs (hidden states per batch, CPU) and the shared keyword arguments of block 0."""
    block0 = get_module(model, family.blocks)[0]
    hidden, kwargs = [], {}

    def hook(module, args, kw):
        hidden.append(args[0].detach().cpu() if args else kw.pop("hidden_states").detach().cpu())
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(ids), batch_size):
            try:
                model(ids[i : i + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    return obj


@torch.no_grad()
def run_block(block, hidden: list[torch.Tensor], kwargs: dict, device) -> list[torch.Tensor]:
    kw = {k: _to(v, device) for k, v in kwargs.items()}
    outs = []
    for h in hidden:
        out = block(h.to(device), **kw)
        outs.append((out[0] if isinstance(out, tuple) else out).detach().cpu())
    return outs


@dataclass
class BlockResult:
    """What a method returns for one block: per Linear name (inside the block) codes/scales/zeros."""

    tensors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    stats: dict = field(default_factory=dict)
    fp: dict[str, torch.Tensor] = field(default_factory=dict)  # full name -> changed float tensor (AWQ folds)


BlockMethod = Callable[[int, torch.nn.Module, list, dict, torch.device], BlockResult]


def sequential_quantize(
    model,
    family: Family,
    ids: torch.Tensor,
    method: BlockMethod,
    device: torch.device,
    state_dir: Path | None = None,
    resume: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[dict[str, tuple], dict, dict[str, torch.Tensor]]:
    """Quantize every block with ``method``.

    Returns ({full name: (codes, scales, zeros)}, per-block stats, {full name: changed float tensor}).
    """
    from edgeq.compress.state import load_state, save_state

    blocks = get_module(model, family.blocks)
    start, results, stats, fp_updates, hidden = 0, {}, {}, {}, None
    if resume and state_dir is not None:
        loaded = load_state(state_dir)
        if loaded is not None:
            start, results, stats, fp_updates, hidden = loaded
            log.info("resuming after block %d", start - 1)
    # the shared keyword arguments (rotary tables, masks) are cheap to recapture; hidden states are not
    captured, kwargs = capture_block_inputs(model, family, ids, batch_size)
    hidden = captured if hidden is None else hidden
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(blocks), initial=start, desc="blocks", unit="block", disable=not progress or None)
    except ImportError:
        bar = None
    for index in range(start, len(blocks)):
        t0 = time.time()
        block = blocks[index].to(device)
        res = method(index, block, hidden, kwargs, device)
        prefix = family.block_prefix(index)
        for name, (codes, scales, zeros) in res.tensors.items():
            results[f"{prefix}{name}.weight"] = (codes.cpu(), scales.cpu(), zeros.cpu())
        fp_updates.update({k: v.cpu() for k, v in res.fp.items()})
        hidden = run_block(block, hidden, kwargs, device)
        blocks[index] = block.to("cpu")
        stats[str(index)] = {**res.stats, "seconds": time.time() - t0}
        if state_dir is not None:
            save_state(state_dir, index + 1, results, stats, fp_updates, hidden)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results, stats, fp_updates
