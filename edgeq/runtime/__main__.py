"""``python -m edgeq.runtime MANIFEST --plan PLAN.json --out RESULT.json``: measure one artifact on this device.

The order matters and is part of the contract:

1. read and hash-verify the manifest and the files it names (nothing else of the artifact is read);
2. read the eval text, open an energy meter (``edgeq.runtime.energy``: Jetson INA3221, RAPL or a
   discharging battery, whichever the device exposes), run the bandwidth probe;
3. rewind the process's peak-RSS mark (so the probe's buffers do not count), start the RSS sampler;
4. import the backend (timed as ``import_time_ms``), open it (timed as ``load_time_ms``);
5. ``warmup`` untimed generations, ``repeat`` timed ones, then perplexity when an eval text is given;
6. write the result JSON atomically (temp file + rename), so a result file is always complete.

A user error (``EdgeqError``: bad plan, tampered artifact, context too small, ...) prints one line,
``error: ...``, on stderr and exits with code 2 without writing a result. Running out of memory (a
``MemoryError``, or a backend error that is an allocation failure: ``std::bad_alloc``, "failed to
allocate", a library that cannot be mapped) is not a user error but a measurement: the runtime prints
``OOM_MARKER {"stage", "detail", "vm_hwm_bytes", "vm_peak_bytes"}`` and then ``error: out of memory ...``
on stderr and exits with ``OOM_EXIT_CODE`` (3), so a capped host run (``edgeq.devices.caps``) can
report "does not fit" with the numbers. This module never imports torch or transformers; the device
side is torch-free.

Result keys (``*_ms`` milliseconds, ``*_mb`` MiB, ``*_gb_per_s`` 1e9 bytes/s)::

    schema, created_utc, wall_time_s, import_time_ms, load_time_ms,
    artifact     {path (of the manifest), format, variant, weight_bytes, model, method, scheme,
                  source_sha256, edgeq_version, files[{path, role, bytes, sha256}]}
    plan         {the Plan, plan_version}
    generation   {prompt_tokens, decode_tokens, repeat, warmup, prefill_ms, ttft_ms,
                  prompt_tokens_per_s, decode_tokens_per_s (means over repeats),
                  latency_ms_{p50,p90,p99,mean,stdev,min,max,n} (pooled per-token decode latencies),
                  spread{prefill_ms|ttft_ms|prompt_tokens_per_s|decode_tokens_per_s: {mean,stdev,min,max}},
                  greedy_identical, generated_ids, runs[{..., decode_latency_ms[]}]}
    perplexity   {ppl, nll_mean, tokens, eval_tokens, windows, ctx, window_nll[], time_ms,
                  eval_text, eval_text_sha256, eval_text_chars} | null (no eval text)
    memory       {peak_rss_mb, peak_rss_sampled_mb, ru_maxrss_mb, baseline_rss_mb, after_load_rss_mb,
                  rss_samples, rss_interval_ms, peak_reset}
    bandwidth    {weight_bytes_per_token, achieved_decode_gb_per_s, probe_gb_per_s, roofline_fraction,
                  roofline_decode_tokens_per_s, weights_fit_in_llc, llc_bytes, probe_*}
    energy       {source ("rapl" | "jetson-ina3221" | "power_supply:NAME"), scope, domains | rails | batteries,
                  method, joules_per_token, prefill_joules_per_token, decode_joules, prefill_joules,
                  decode_mean_w, ...} | "not available"
    energy_reason  why energy is not available ("" when it is), e.g. "charging: ..." on a plugged-in phone
    environment  {cpu_model, logical_cores, physical_cores, usable_cores, ram_total_mb, os, kernel,
                  machine, python, numpy, edgeq, backend, runtime{backend.info()}, threads,
                  execution_provider, load_average, ...}
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from edgeq import __version__
from edgeq.errors import BackendError, ConfigError, EdgeqError
from edgeq.export.manifest import Manifest, load_manifest
from edgeq.runtime.backends import Backend, BackendOptions, open_backend
from edgeq.runtime.energy import EnergyMeter, open_energy_meter
from edgeq.runtime.metrics import (
    MIB,
    GenerationTiming,
    RssSampler,
    aggregate_generations,
    current_rss_bytes,
    energy_summary,
    measure_generation,
    peak_rss_bytes,
    roofline,
    ru_maxrss_bytes,
)
from edgeq.runtime.perplexity import perplexity
from edgeq.runtime.plan import Plan

log = logging.getLogger("edgeq.runtime")

RESULT_SCHEMA = "edgeq.result/1"
#: Exit code and stderr marker of an out-of-memory failure (read by edgeq.devices.caps).
OOM_EXIT_CODE = 3
OOM_MARKER = "edgeq-out-of-memory:"
#: Allocation failures as onnxruntime, llama.cpp, C++ and the dynamic loader word them.
ALLOC_FAILURE = re.compile(
    r"bad_alloc|bad allocation|failed to allocate|unable to allocate|cannot allocate memory|out of memory"
    r"|insufficient memory|failed to map segment|failed to mmap|mmap failed|can't start new thread",
    re.IGNORECASE,
)
#: The phase the bench is in, recorded in an out-of-memory report.
_stage = "start"
#: llama.cpp's last error-level log lines (see ``capture_llama_errors``) and the callback that keeps them.
_llama_errors: list[str] = []
_llama_log_callback: Any = None
#: Modules a format's backend needs, imported before the load is timed (backends import their library lazily).
_BACKEND_MODULES = {
    "gguf": ("edgeq.runtime.backends.llamacpp", "llama_cpp"),
    "onnx": ("edgeq.runtime.backends.onnxruntime", "onnxruntime", "tokenizers"),
}
#: Prompt source when the plan names no eval text: fixed, so runs on different devices compare.
BUILTIN_PROMPT = (
    '"""Utilities for reading configuration files."""\n\nimport os\nimport sys\n\n\n'
    "def read_config(path, defaults=None):\n"
    '    """Return a dict of the key = value lines of ``path``, over ``defaults``."""\n'
    "    result = dict(defaults or {})\n"
    "    with open(path, encoding='utf-8') as f:\n"
    "        for line in f:\n"
    "            line = line.strip()\n"
    "            if not line or line.startswith('#'):\n"
    "                continue\n"
    "            key, _, value = line.partition('=')\n"
    "            result[key.strip()] = value.strip()\n"
    "    return result\n"
)


# -- inputs ------------------------------------------------------------------------------------------


def read_eval_text(path: str | None) -> tuple[str, dict] | None:
    """The eval text and its identity (path, sha256, chars), or None when the plan names none."""
    if path is None:
        return None
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read eval_text {str(p)!r} ({exc.strerror}); push the file or set eval_text to null"
        ) from None
    text = raw.decode("utf-8", errors="replace")
    if not text.strip():
        raise ConfigError(f"eval_text {str(p)!r} is empty; expected UTF-8 text to score")
    return text, {
        "eval_text": str(p),
        "eval_text_sha256": hashlib.sha256(raw).hexdigest(),
        "eval_text_chars": len(text),
    }


def tokens_of(backend: Backend, text: str, n: int, cycle: bool = False) -> list[int]:
    """The first ``n`` tokens of ``text``, tokenizing only a prefix long enough to hold them.

    A prefix's last few tokens may differ from the full text's (a word cut in two), so a prefix must
    yield a margin of 8 tokens beyond ``n``. With ``cycle`` a short text is repeated to reach ``n``.
    """
    chars = max(8 * n, 1024)
    while True:
        ids = list(backend.tokenize(text[:chars]))
        if len(ids) >= n + 8 or chars >= len(text):
            break
        chars *= 2
    if not ids:
        raise ConfigError("the prompt/eval text tokenizes to no tokens; expected non-empty text")
    if cycle and len(ids) < n:
        ids = ids * (n // len(ids) + 1)
    return ids[:n]


# -- phases ------------------------------------------------------------------------------------------


def import_backend(fmt: str) -> float:
    """Import the backend and its runtime library for ``fmt`` outside the load timing; the import time in ms.

    An unknown format imports nothing here; ``open_backend`` then refuses it with the expected formats.
    """
    t0 = time.perf_counter()
    for name in _BACKEND_MODULES.get(fmt, ()):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise BackendError(
                f"cannot import the {fmt} backend ({exc}); install its runtime (pip install 'edgeq[llama]' "
                "for gguf, onnxruntime for onnx)"
            ) from None
    return (time.perf_counter() - t0) * 1000.0


def capture_llama_errors() -> None:
    """Keep llama.cpp's error-level log lines in ``_llama_errors`` (and print them, as llama-cpp-python does).

    llama-cpp-python silences llama.cpp while it loads a model (``verbose=False`` redirects stderr) and
    then raises a bare "Failed to load model from file"; the log line it hid names the cause, e.g.
    "encountered bad_alloc error while reading value for key ..." under a memory cap.
    """
    global _llama_log_callback
    import ctypes

    import llama_cpp

    def callback(level: int, text: bytes, _user: Any) -> None:
        # ggml.h: WARN = 3, ERROR = 4 (llama-cpp-python 0.3.36's own callback still reads 3 as ERROR)
        if level in (3, 4):
            line = text.decode("utf-8", "replace").strip()
            if line and level == 4:
                _llama_errors.append(line)
                del _llama_errors[:-20]
            if line:
                print(line, file=sys.stderr)

    _llama_log_callback = llama_cpp.llama_log_callback(callback)  # kept alive: llama.cpp holds the pointer
    llama_cpp.llama_log_set(_llama_log_callback, ctypes.c_void_p(0))


def measure(backend: Backend, plan: Plan, text: str, energy: EnergyMeter | None) -> tuple[dict, list[GenerationTiming]]:
    """Warmup, then ``plan.repeat`` timed generations on the first ``prompt_tokens`` tokens of ``text``."""
    need = plan.prompt_tokens + plan.decode_tokens
    if need > backend.n_ctx:
        raise ConfigError(
            f"prompt_tokens + decode_tokens = {need} exceeds the backend's n_ctx={backend.n_ctx}; "
            "shorten the plan or raise n_ctx"
        )
    prompt = tokens_of(backend, text, plan.prompt_tokens, cycle=True)
    for i in range(plan.warmup):
        log.info("warmup generation %d/%d", i + 1, plan.warmup)
        measure_generation(backend, prompt, plan.decode_tokens)
    runs = []
    for i in range(plan.repeat):
        runs.append(measure_generation(backend, prompt, plan.decode_tokens, energy))
        log.info("generation %d/%d: %.1f decode tok/s", i + 1, plan.repeat, runs[-1].decode_tokens_per_s)
    generation = aggregate_generations(runs)
    generation["warmup"] = plan.warmup
    return generation, runs


def measure_perplexity(backend: Backend, plan: Plan, eval_text: tuple[str, dict]) -> dict:
    text, identity = eval_text
    ids = tokens_of(backend, text, plan.eval_tokens + 1)  # eval_tokens targets need one token more
    if len(ids) < plan.eval_tokens:
        log.warning(
            "eval text has %d tokens, fewer than eval_tokens=%d; scoring what there is", len(ids), plan.eval_tokens
        )
    return {**perplexity(backend, ids, plan.ctx, plan.eval_tokens).to_dict(), **identity}


def artifact_summary(man: Manifest) -> dict:
    scheme = man.scheme or {}
    return {
        "path": str(man.path),
        "format": man.format,
        "variant": man.variant,
        "weight_bytes": man.weight_bytes,
        "model": man.model,
        "method": scheme.get("method"),
        "scheme": scheme.get("default"),
        "source_sha256": (man.source or {}).get("sha256"),
        "edgeq_version": man.edgeq_version,
        "files": [{"path": f.path, "role": f.role, "bytes": f.bytes, "sha256": f.sha256} for f in man.files],
    }


# -- environment -------------------------------------------------------------------------------------


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """CPU model name from /proc/cpuinfo (x86 "model name"; ARM "Hardware"/"Model"/implementer+part)."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() not in fields:
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    for key in ("model name", "Hardware", "Model", "cpu model", "Processor"):
        if fields.get(key):
            return fields[key]
    if "CPU implementer" in fields:
        return f"ARM implementer {fields['CPU implementer']} part {fields.get('CPU part', '?')}"
    return platform.processor() or "unknown"


def environment(backend: Backend, plan: Plan) -> dict:
    info = dict(backend.info() or {})
    providers = info.get("execution_provider") or info.get("providers") or info.get("provider")
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(affinity) if affinity is not None else None,
        "ram_total_mb": psutil.virtual_memory().total / MIB,
        "ram_available_mb": psutil.virtual_memory().available / MIB,
        "os": platform.system(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "numpy": np.__version__,
        "edgeq": __version__,
        "backend": getattr(backend, "name", None),
        "runtime": info,
        "threads": info.get("threads", plan.threads),
        "execution_provider": providers or "CPU",
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# -- the bench ---------------------------------------------------------------------------------------


def _options(plan: Plan) -> BackendOptions:
    return BackendOptions(threads=plan.threads, n_ctx=plan.n_ctx, providers=tuple(plan.providers))


def _probe_in_child(threads: int | None) -> dict | None:
    """``bandwidth_probe`` in a separate interpreter; None (with a log line) when it fails."""
    import subprocess

    code = (
        "import json, sys; from edgeq.runtime.metrics import bandwidth_probe; "
        "t = int(sys.argv[1]) or None; print(json.dumps(bandwidth_probe(threads=t)))"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(threads or 0)], capture_output=True, text=True, timeout=120, check=True
        )
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.warning("bandwidth probe failed (%s); no roofline", exc)
        return None


def _memory(sampler: RssSampler, baseline: int, after_load: int, peak_reset: bool) -> dict:
    ru, hwm = ru_maxrss_bytes(), peak_rss_bytes()
    return {
        "peak_rss_mb": max(hwm, sampler.peak_bytes) / MIB,  # kernel high-water mark (VmHWM) or sampled
        "vm_hwm_mb": hwm / MIB,
        "peak_rss_sampled_mb": sampler.peak_bytes / MIB,
        "ru_maxrss_mb": ru / MIB,  # may include the launching parent's RSS at fork time (see metrics)
        "baseline_rss_mb": baseline / MIB,  # after imports, before the artifact loads
        "after_load_rss_mb": after_load / MIB,
        "rss_samples": sampler.samples,
        "rss_interval_ms": sampler.interval_ms,
        "peak_reset": peak_reset,  # the kernel peak covers the whole process (the probe runs in a child)
    }


def _measure_loaded(
    man: Manifest, plan: Plan, eval_text: tuple[str, dict] | None, energy: EnergyMeter | None
) -> tuple[dict, list[GenerationTiming], tuple[int, int]]:
    """Phases 4-5: import, load, generations, perplexity, environment; also (runs, (baseline, after-load RSS))."""
    global _stage
    _stage = "import"
    out: dict[str, Any] = {"import_time_ms": import_backend(man.format)}
    if man.format == "gguf":
        capture_llama_errors()
    baseline = current_rss_bytes()
    _stage = "load"
    t0 = time.perf_counter()
    backend = open_backend(man, _options(plan))
    out["load_time_ms"] = (time.perf_counter() - t0) * 1000.0
    try:
        after_load = current_rss_bytes()
        text = eval_text[0] if eval_text else BUILTIN_PROMPT
        _stage = "generate"
        out["generation"], runs = measure(backend, plan, text, energy)
        _stage = "perplexity"
        out["perplexity"] = measure_perplexity(backend, plan, eval_text) if eval_text else None
        out["environment"] = environment(backend, plan)
    finally:
        backend.close()
    return out, runs, (baseline, after_load)


def run_bench(manifest_path: str | os.PathLike, plan: Plan) -> dict:
    """Measure the artifact of ``manifest_path`` under ``plan``; the result dict (see module docstring)."""
    global _stage
    _stage = "start"
    wall0 = time.perf_counter()
    man = load_manifest(manifest_path, verify=True)  # hash check before anything else reads the artifact
    eval_text = read_eval_text(plan.eval_text)
    energy, energy_reason = open_energy_meter()
    # the probe runs in a child process: its buffers never count towards this process's peak RSS
    probe = _probe_in_child(plan.threads) if plan.bandwidth_probe else None
    peak_reset = False
    sampler = RssSampler(plan.rss_interval_ms).start()
    try:
        loaded, runs, (baseline, after_load) = _measure_loaded(man, plan, eval_text, energy)
    finally:
        sampler.stop()
    memory = _memory(sampler, baseline, after_load, peak_reset)
    energy_result = energy_summary(energy, runs) if energy is not None else None
    if energy is not None and energy_result is None:
        energy_reason = energy.reason or f"an {energy.source} reading was invalid"
    result: dict[str, Any] = {
        "schema": RESULT_SCHEMA,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "artifact": artifact_summary(man),
        "plan": plan.to_dict(),
        **loaded,
        "memory": memory,
        "bandwidth": roofline(man.weight_bytes, loaded["generation"]["decode_tokens_per_s"], probe),
        "energy": energy_result or "not available",
        "energy_reason": "" if energy_result else energy_reason,
    }
    result["wall_time_s"] = time.perf_counter() - wall0
    return result


# -- output ------------------------------------------------------------------------------------------


def _finite(value: Any, where: str = "result") -> Any:
    """JSON has no NaN/inf: report such a value as null (with a warning) rather than invent a number."""
    if isinstance(value, float) and not math.isfinite(value):
        log.warning("%s is %r; written as null", where, value)
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, where) for v in value]
    return value


def write_json_atomic(path: Path, data: dict) -> Path:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_finite(data), f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _out_path(out: str) -> Path:
    path = Path(out)
    if not path.parent.is_dir():
        raise ConfigError(f"--out {out!r}: directory {str(path.parent)!r} does not exist; create it first")
    if path.is_dir():
        raise ConfigError(f"--out {out!r} is a directory; expected a file path such as result.json")
    return path


def _vm_status() -> dict[str, int]:
    """VmHWM / VmPeak of this process in bytes, from /proc (empty where there is none)."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmPeak"):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def out_of_memory(exc: BaseException) -> str | None:
    """What ran out, when ``exc`` is an allocation failure; None for any other error."""
    if isinstance(exc, MemoryError):
        return f"{type(exc).__name__}: {exc}".rstrip(": ")
    text = str(exc)
    if ALLOC_FAILURE.search(text):
        return text
    cause = next((line for line in reversed(_llama_errors) if ALLOC_FAILURE.search(line)), None)
    return f"llama.cpp: {cause}" if cause else None


def report_out_of_memory(detail: str) -> int:
    """Print the structured out-of-memory line and the one-line error; the exit code to use."""
    vm = _vm_status()
    report = {"stage": _stage, "detail": detail, "vm_hwm_bytes": vm.get("VmHWM"), "vm_peak_bytes": vm.get("VmPeak")}
    print(f"{OOM_MARKER} {json.dumps(report)}", file=sys.stderr)
    print(f"error: out of memory while in {_stage}: {detail}", file=sys.stderr)
    return OOM_EXIT_CODE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgeq.runtime", description=__doc__.splitlines()[0])
    parser.add_argument("manifest", help="manifest.json, an ONNX artifact dir or a .gguf with its manifest")
    parser.add_argument("--plan", help="plan JSON (edgeq.runtime.plan.Plan); default: Plan()")
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        plan = Plan.load(args.plan) if args.plan else Plan()
        out = _out_path(args.out)
        result = run_bench(args.manifest, plan)
        write_json_atomic(out, result)
    except MemoryError as exc:
        return report_out_of_memory(out_of_memory(exc) or "MemoryError")
    except RuntimeError as exc:  # e.g. "can't start new thread": no address space left for its stack
        detail = out_of_memory(exc)
        if detail is None:
            raise
        return report_out_of_memory(detail)
    except EdgeqError as exc:
        detail = out_of_memory(exc)
        if detail is not None:
            return report_out_of_memory(detail)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
