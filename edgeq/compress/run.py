"""The compress stage: source model -> run dir of integer codes, fp16 scales and integer zeros.

``compress(model, config, out)`` streams the source weights one tensor at a time: decoder-block
Linears get the configured scheme (or an override's), everything else is copied unchanged. The run
dir is written under a temporary name and renamed when complete (see ``edgeq.rundir``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from edgeq import __version__
from edgeq.compress.mappings import family_for
from edgeq.compress.model import resolve_model_path
from edgeq.compress.quant import QuantizedWeight, resolve_scheme
from edgeq.compress.rtn import _grouped, clip_search, rtn_quantize
from edgeq.config import CompressConfig
from edgeq.errors import ConfigError
from edgeq.rundir import FP_FILE, QUANT_FILE, RUN_FILE, AtomicDir, RunDir

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def quantize_tensor(w: np.ndarray, scheme, config: CompressConfig, device: torch.device) -> QuantizedWeight:
    wt = torch.from_numpy(np.array(w, dtype=np.float32)).to(device)  # a float32 copy of the read tensor
    clip = 1.0
    if config.clip_search:
        clip = clip_search(_grouped(wt, scheme), scheme)
    codes, scales, zeros = rtn_quantize(wt, scheme, clip)
    return QuantizedWeight(codes.cpu().numpy(), scales.cpu().numpy(), zeros.cpu().numpy(), scheme)


def _iter(names, desc):
    try:
        from tqdm import tqdm

        return tqdm(names, desc=desc, unit="tensor", disable=None, leave=False)
    except ImportError:  # tqdm is in the compress extra, but progress is never required
        return names


def rtn_tensors(src: RunDir, config: CompressConfig, scheme_for, device) -> dict[str, QuantizedWeight]:
    """RTN streams the source one tensor at a time: no calibration, no model in memory."""
    out = {}
    for name in _iter(src.names(), f"rtn {config.scheme.label}"):
        chosen = scheme_for(name)
        if chosen is not None:
            out[name] = quantize_tensor(src.fp_tensor(name), chosen, config, device)
    return out


def calibrated_tensors(src: RunDir, config: CompressConfig, scheme_for, device, state_dir, resume):
    """GPTQ (and later AWQ) through the layer-sequential driver."""
    from edgeq.compress import awq, gptq
    from edgeq.compress.calibration import calibration_ids, read_calibration_texts, sequential_quantize
    from edgeq.compress.model import load_torch_model

    torch.manual_seed(config.seed)
    family = family_for(src.config)
    model = load_torch_model(src.path, "cpu")
    n_ctx = src.config.get("max_position_embeddings") or config.seq_len
    if config.seq_len > n_ctx:
        raise ConfigError(f"seq_len={config.seq_len} exceeds the model's context {n_ctx}; use --seq-len {n_ctx}")
    texts = read_calibration_texts(config.calib)
    ids = calibration_ids(src.tokenizer(), texts, config.n_samples, config.seq_len, config.seed)
    if config.method == "gptq":
        method = gptq.make_block_method(family, scheme_for, config.damp, config.act_order)
    else:
        method = awq.make_block_method(family, scheme_for, clip=True)
    results, stats, fp_updates = sequential_quantize(model, family, ids, method, device, state_dir, resume)
    out = {}
    for name, (codes, scales, zeros) in results.items():
        out[name] = QuantizedWeight(codes.numpy(), scales.numpy(), zeros.numpy(), scheme_for(name))
    return out, stats, {k: v.numpy() for k, v in fp_updates.items()}


def compress(model: str | os.PathLike, config: CompressConfig, out: str | os.PathLike, resume: bool = False) -> Path:
    """Quantize ``model`` (local dir or hub id) with ``config`` into the run dir ``out``.

    Calibrated methods keep resumable state in ``OUT.state/`` (removed on success); ``resume=True``
    continues from the last finished block.
    """
    src = RunDir.open(resolve_model_path(model))
    if src.is_quantized:
        raise ConfigError(f"{src.path} is already a quantized run; expected an unquantized source model dir")
    family = family_for(src.config)
    device = pick_device(config.device)
    out = Path(out)
    state_dir = out.with_name(out.name + ".state")
    overrides = config.parsed_overrides

    def scheme_for(name: str):
        return resolve_scheme(name, config.scheme, overrides) if family.quantizable(name) else None

    for name in src.names():  # refuse a group size that does not divide before any work
        if (chosen := scheme_for(name)) is not None:
            chosen.groups(src.shape(name)[1])
    t0 = time.time()
    stats: dict = {}
    fp_updates: dict[str, np.ndarray] = {}
    if config.method == "rtn":
        quantized = rtn_tensors(src, config, scheme_for, device)
    else:
        quantized, stats, fp_updates = calibrated_tensors(src, config, scheme_for, device, state_dir, resume)
    meta = {
        "edgeq_version": __version__,
        "method": config.method,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
        "scheme": config.scheme.to_dict(),
        "tensors": {name: qw.scheme.to_dict() for name, qw in quantized.items()},
        "source": src.source_info(),
        "model_type": src.model_type,
        "timings_s": {"total": time.time() - t0},
        "blocks": stats,
        "weight_rel_error": {name: _rel_error(src.fp_tensor(name), qw) for name, qw in quantized.items()},
        "device": str(device),
    }
    write_run(src, quantized, meta, out, fp_updates)
    from edgeq.compress.state import clear_state

    clear_state(state_dir)
    log.info("wrote %s (%d quantized tensors, %.1fs)", out, len(quantized), time.time() - t0)
    return out


def _rel_error(w: np.ndarray, qw: QuantizedWeight) -> float:
    w32 = np.asarray(w, dtype=np.float32)
    return float(np.sum((qw.dequantize() - w32) ** 2) / max(float(np.sum(w32**2)), 1e-30))


def write_run(
    src: RunDir, quantized: dict[str, QuantizedWeight], meta: dict, out: Path, fp_updates: dict | None = None
) -> None:
    """Write the run dir atomically: side files, fp tensors (``fp_updates`` replace source tensors,
    e.g. norms that AWQ folded scales into), codes/scales/zeros, run.json."""
    from safetensors.numpy import save_file

    fp_updates = fp_updates or {}
    fp = {}
    for n in src.names():
        if n not in quantized:
            fp[n] = np.ascontiguousarray(fp_updates[n].astype(np.float32) if n in fp_updates else src.fp_tensor(n))
    quant = {}
    for name, qw in quantized.items():
        quant[f"{name}.codes"], quant[f"{name}.scales"], quant[f"{name}.zeros"] = qw.codes, qw.scales, qw.zeros
    with AtomicDir(out) as tmp:
        for f in src.side_files():
            shutil.copy2(f, tmp / f.name)
        if not (tmp / "tokenizer.json").exists():  # tokenizer.model only: every later stage reads tokenizer.json
            (tmp / "tokenizer.json").write_text(src.tokenizer_json(), encoding="utf-8")
        save_file(fp, str(tmp / FP_FILE))
        save_file(quant, str(tmp / QUANT_FILE))
        (tmp / RUN_FILE).write_text(json.dumps(meta, indent=1) + "\n")
