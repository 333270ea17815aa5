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
from edgeq.rundir import FP_FILE, QUANT_FILE, RUN_FILE, AtomicDir, RunDir

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def quantize_tensor(w: np.ndarray, scheme, config: CompressConfig, device: torch.device) -> QuantizedWeight:
    wt = torch.from_numpy(np.asarray(w, dtype=np.float32)).to(device)
    clip = 1.0
    if config.clip_search:
        clip = clip_search(_grouped(wt, scheme), scheme)
    codes, scales, zeros = rtn_quantize(wt, scheme, clip)
    return QuantizedWeight(codes.cpu().numpy(), scales.cpu().numpy(), zeros.cpu().numpy(), scheme)


def compress(model: str | os.PathLike, config: CompressConfig, out: str | os.PathLike) -> Path:
    """Quantize ``model`` (local dir or hub id) with ``config`` into the run dir ``out``."""
    from safetensors.numpy import save_file

    src = RunDir.open(resolve_model_path(model))
    if src.is_quantized:
        from edgeq.errors import ConfigError

        raise ConfigError(f"{src.path} is already a quantized run; expected an unquantized source model dir")
    family = family_for(src.config)
    device = pick_device(config.device)
    scheme = config.scheme
    overrides = config.parsed_overrides
    t0 = time.time()
    fp_tensors: dict[str, np.ndarray] = {}
    quant_tensors: dict[str, np.ndarray] = {}
    tensor_schemes: dict[str, dict] = {}
    errors: dict[str, float] = {}
    names = src.names()
    try:
        from tqdm import tqdm

        iterator = tqdm(names, desc=f"rtn {scheme.label}", unit="tensor", disable=None, leave=False)
    except ImportError:  # tqdm is in the compress extra, but progress is never required
        iterator = names
    for name in iterator:
        w = src.fp_tensor(name)
        chosen = resolve_scheme(name, scheme, overrides) if family.quantizable(name) else None
        if chosen is None:
            fp_tensors[name] = np.ascontiguousarray(w)
            continue
        chosen.groups(w.shape[1])  # a clear error before any work when the group does not divide
        qw = quantize_tensor(w, chosen, config, device)
        quant_tensors[f"{name}.codes"] = qw.codes
        quant_tensors[f"{name}.scales"] = qw.scales
        quant_tensors[f"{name}.zeros"] = qw.zeros
        tensor_schemes[name] = chosen.to_dict()
        w32 = np.asarray(w, dtype=np.float32)
        errors[name] = float(np.sum((qw.dequantize() - w32) ** 2) / max(np.sum(w32**2), 1e-30))
    meta = {
        "edgeq_version": __version__,
        "method": config.method,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
        "scheme": scheme.to_dict(),
        "tensors": tensor_schemes,
        "source": src.source_info(),
        "model_type": src.model_type,
        "timings_s": {"total": time.time() - t0},
        "weight_rel_error": errors,
        "device": str(device),
    }
    with AtomicDir(out) as tmp:
        for f in src.side_files():
            shutil.copy2(f, tmp / f.name)
        save_file(fp_tensors, str(tmp / FP_FILE))
        save_file(quant_tensors, str(tmp / QUANT_FILE))
        (tmp / RUN_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    log.info("wrote %s (%d quantized tensors, %.1fs)", out, len(tensor_schemes), time.time() - t0)
    return Path(out)
