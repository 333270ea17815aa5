"""The compress stage: source model -> run dir of integer codes, fp16 scales and integer zeros.

``compress(model, config, out)`` streams the source weights one tensor at a time: decoder-block
Linears get the configured scheme (or an override's), everything else is copied unchanged. The run
dir is written under a temporary name and renamed when complete (see ``edgeq.rundir``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
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
from edgeq.rundir import FP_FILE, QUANT_FILE, RUN_FILE, AtomicDir, RunDir, SafetensorsWriter

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

    schemes = {name: chosen for name in src.names() if (chosen := scheme_for(name)) is not None}
    for name, chosen in schemes.items():  # refuse a group size that does not divide before any work
        chosen.groups(src.shape(name)[1])
    t0 = time.time()

    def meta(stats: dict, rel_errors: dict) -> dict:
        return {
            "edgeq_version": __version__,
            "method": config.method,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
            "scheme": config.scheme.to_dict(),
            "tensors": {name: schemes[name].to_dict() for name in rel_errors},
            "source": src.source_info(),
            "model_type": src.model_type,
            "timings_s": {"total": time.time() - t0},
            "blocks": stats,
            "weight_rel_error": rel_errors,
            "device": str(device),
        }

    if config.method == "rtn":  # streams: one source tensor in, its codes out, nothing kept
        with RunWriter(src, out, schemes) as writer:
            rel_errors = {}
            for name in _iter(writer.order, f"rtn {config.scheme.label}"):
                w = src.fp_tensor(name)
                qw = quantize_tensor(w, schemes[name], config, device)
                writer.add(name, qw)
                rel_errors[name] = _rel_error(w, qw)
                del w, qw
            writer.finish(meta({}, rel_errors))
    else:
        quantized, stats, fp_updates = calibrated_tensors(src, config, scheme_for, device, state_dir, resume)
        rel_errors = {name: _rel_error(src.fp_tensor(name), qw) for name, qw in quantized.items()}
        write_run(src, quantized, meta(stats, rel_errors), out, fp_updates)
    from edgeq.compress.state import clear_state

    clear_state(state_dir)
    log.info("wrote %s (%d quantized tensors, %.1fs)", out, len(rel_errors), time.time() - t0)
    return out


def _rel_error(w: np.ndarray, qw: QuantizedWeight) -> float:
    w32 = np.asarray(w, dtype=np.float32)
    return float(np.sum((qw.dequantize() - w32) ** 2) / max(float(np.sum(w32**2)), 1e-30))


class RunWriter:
    """Writes a run dir while the codes are produced, one tensor at a time.

    Side files and the float tensors (``fp_updates`` replace source tensors, e.g. norms that AWQ
    folded scales into) are written on entry; ``add`` appends one quantized tensor's codes, scales
    and zeros to ``quant.safetensors`` (declared up front from ``schemes``, in source order: see
    ``SafetensorsWriter``); ``finish`` writes run.json. Everything happens in an ``AtomicDir``, so
    an interrupted run leaves no run dir behind. The writer holds one tensor at a time: RTN of a
    7B model no longer keeps 1 byte per weight of codes in memory until the end.
    """

    def __init__(self, src: RunDir, out: Path, schemes: dict, fp_updates: dict | None = None):
        self.src, self.out, self.fp_updates = src, Path(out), fp_updates or {}
        self.order = [n for n in src.names() if n in schemes]
        if len(self.order) != len(schemes):
            raise ValueError(f"quantized tensors not in the source model: {sorted(set(schemes) - set(self.order))[:3]}")
        self.schemes = schemes
        self._finished = False
        self._atomic = AtomicDir(self.out)
        self._quant: SafetensorsWriter | None = None

    def __enter__(self) -> RunWriter:
        tmp = self._atomic.__enter__()
        try:
            self.src.copy_side_files(tmp)
            fp_names = [n for n in self.src.names() if n not in self.schemes]
            specs = []
            for n in fp_names:
                dtype = np.float32 if n in self.fp_updates else self.src.fp_dtype(n)
                specs.append((n, dtype, self.src.shape(n)))
            with SafetensorsWriter(tmp / FP_FILE, specs) as fp:
                for n in fp_names:
                    fp.write(
                        n, self.fp_updates[n].astype(np.float32) if n in self.fp_updates else self.src.fp_tensor(n)
                    )
            specs = []
            for n in self.order:
                rows, cols = self.src.shape(n)
                groups = self.schemes[n].groups(cols)
                specs += [(f"{n}.codes", np.uint8, (rows, cols)), (f"{n}.scales", np.float16, (rows, groups)),
                          (f"{n}.zeros", np.uint8, (rows, groups))]  # fmt: skip
            self._quant = SafetensorsWriter(tmp / QUANT_FILE, specs)
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        return self

    def add(self, name: str, qw: QuantizedWeight) -> None:
        assert self._quant is not None
        self._quant.write(f"{name}.codes", qw.codes)
        self._quant.write(f"{name}.scales", qw.scales)
        self._quant.write(f"{name}.zeros", qw.zeros)

    def finish(self, meta: dict) -> None:
        assert self._quant is not None and self._atomic.tmp is not None
        self._quant.close()
        (self._atomic.tmp / RUN_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        self._finished = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._quant is not None and not self._finished:
            self._quant.abandon()
        if exc_type is None and not self._finished:  # never rename a run dir without run.json into place
            error = RuntimeError(f"run dir {self.out} was left without finish(); nothing was written")
            self._atomic.__exit__(RuntimeError, error, None)
            raise error
        self._atomic.__exit__(exc_type, exc, tb)


def write_run(
    src: RunDir, quantized: dict[str, QuantizedWeight], meta: dict, out: Path, fp_updates: dict | None = None
) -> None:
    """Write the run dir of codes already in memory (calibrated methods, distillation) atomically."""
    with RunWriter(src, out, {n: qw.scheme for n, qw in quantized.items()}, fp_updates) as writer:
        for name in writer.order:
            writer.add(name, quantized[name])
        writer.finish(meta)
