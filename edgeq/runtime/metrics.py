"""What the device-side harness measures: memory, latency, throughput, bandwidth and energy.

* **Memory.** ``RssSampler`` polls the measuring process's own RSS (psutil) on a background thread and
  keeps the peak; ``ru_maxrss_bytes`` is the kernel's high-water mark of the same process, which
  ``reset_peak_rss`` rewinds (``/proc/self/clear_refs``, Linux >= 4.0) so that the bandwidth probe's
  buffers do not count against the model. Both are whole-process numbers (interpreter and runtime
  libraries included); the harness also records the baseline before load so the model's share can be
  read off. ``*_mb`` values are mebibytes (2**20 bytes), the unit of ``/usr/bin/time -v`` / 1024.
  The sampler sleeps through timed generations (``paused_sampling``): at a 5 ms period its wake-ups and
  GIL requests cost 4-7% of decode speed on a loaded 2-core host (benchmarks/llamabench_compare.py),
  while the kernel's high-water mark covers those regions anyway; it samples again as soon as they end.
* **Generation.** ``measure_generation`` times one greedy generation over the ``Backend`` protocol:
  prefill of the prompt (prompt tokens/s), time to first token (prefill + argmax), then
  ``decode_tokens`` single-token steps (per-token latency, decode tokens/s), like llama-bench's
  ``pp``/``tg``. Load, reset and tokenization are outside every timed region, so the numbers do not
  depend on how the artifact was loaded. ``aggregate_generations`` reports each quantity's mean and
  spread (stdev/min/max) across repetitions and percentiles of the pooled per-token latencies.
* **Roofline.** Decode is memory-bound: tokens/s <= bandwidth / bytes read per token (see
  /work/shared/reference.md, "Devices and limits"). ``bandwidth_probe`` measures a STREAM-style copy
  (2 bytes moved per byte copied) of a buffer larger than the last-level cache; ``roofline`` relates
  achieved decode bandwidth (weight bytes x tokens/s, an upper estimate of bytes read) to it.
* **Energy.** ``measure_generation`` takes any ``edgeq.runtime.energy.EnergyMeter`` (RAPL counters,
  Jetson INA3221 rails, a discharging battery: whichever ``open_energy_meter`` finds) and records the
  prefill and decode joules; ``energy_summary`` turns them into joules per token, or None when a
  reading became invalid (the result then says ``"not available"`` and why). Every source sees the
  whole package/board/device: other processes' work counts too.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil

from edgeq.errors import ConfigError
from edgeq.runtime.backends.base import Backend
from edgeq.runtime.energy import EnergyMeter, SampledPowerMeter

log = logging.getLogger(__name__)

MIB = 2**20


# -- memory ------------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def ru_maxrss_bytes() -> int:
    """The kernel's peak RSS of this process (KiB on Linux, bytes on macOS)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def peak_rss_bytes() -> int:
    """The kernel's RSS high-water mark of this process's address space (``VmHWM``).

    Preferred over ``ru_maxrss``: on Linux, a process started by fork + exec inherits in ``ru_maxrss``
    the peak of the *parent's* address space at fork time (the pre-exec mm's high-water mark is folded
    into the new program's ``maxrss``), so a runtime launched from a big host process (torch loaded)
    would report the host's memory. ``VmHWM`` belongs to the address space made by exec alone.
    Falls back to ``ru_maxrss`` where /proc is missing (macOS).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return ru_maxrss_bytes()


def reset_peak_rss() -> bool:
    """Rewind this process's RSS high-water mark to its current RSS; False where the kernel cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        log.info("cannot reset the peak RSS (%s); ru_maxrss covers the whole process life", exc)
        return False
    return True


#: Set while RSS samplers may poll; cleared inside timed regions (``paused_sampling``).
_SAMPLING = threading.Event()
_SAMPLING.set()


@contextmanager
def paused_sampling() -> Iterator[None]:
    """Every ``RssSampler`` sleeps (no wake-ups, no GIL requests) inside this block, then samples at once."""
    _SAMPLING.clear()
    try:
        yield
    finally:
        _SAMPLING.set()


class RssSampler:
    """Polls this process's RSS every ``interval_ms`` on a daemon thread; ``peak_bytes`` is the max seen.

    psutil reads ``/proc/self/statm`` (~20 us); at 5 ms that is < 1% of one core. The sampler needs the
    GIL only between backend calls (llama.cpp and onnxruntime release it while they compute).
    """

    def __init__(self, interval_ms: float = 5.0) -> None:
        if interval_ms <= 0:
            raise ConfigError(f"rss interval_ms={interval_ms} is invalid; expected > 0")
        self.interval_ms = float(interval_ms)
        self.peak_bytes = 0
        self.samples = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        rss = int(self._proc.memory_info().rss)
        self.peak_bytes = max(self.peak_bytes, rss)
        self.samples += 1
        return rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_ms / 1000.0):
            while not _SAMPLING.wait(1.0):  # a timed region runs (paused_sampling): sleep until it ends
                if self._stop.is_set():
                    return
            self.sample()

    def start(self) -> RssSampler:
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="edgeq-rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()
        return self.peak_bytes

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- statistics --------------------------------------------------------------------------------------


def spread(values: list[float] | np.ndarray) -> dict[str, float]:
    """Mean, sample stdev (0 for one value), min and max."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("spread() of no values")
    stdev = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return {"mean": float(x.mean()), "stdev": stdev, "min": float(x.min()), "max": float(x.max())}


def latency_stats(values_ms: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p90/p99 (linear interpolation, numpy's default), mean, stdev, min, max and count."""
    x = np.asarray(values_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(x, [50, 90, 99]) if x.size else (math.nan,) * 3
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), **spread(x), "n": int(x.size)}


def prefixed(stats: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in stats.items()}


# -- generation --------------------------------------------------------------------------------------


@dataclass
class GenerationTiming:
    """One greedy generation: a prefill of ``prompt_tokens`` then ``decode_tokens`` single-token steps."""

    prompt_tokens: int
    prefill_ms: float  # backend.forward(prompt)
    ttft_ms: float  # prefill + argmax of the first generated token
    decode_latency_ms: list[float]  # per decode step: forward([token]) + argmax
    generated_ids: list[int]  # 1 + decode_tokens ids
    prefill_joules: float | None = None
    decode_joules: float | None = None

    @property
    def decode_tokens(self) -> int:
        return len(self.decode_latency_ms)

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / (self.prefill_ms / 1000.0)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / (sum(self.decode_latency_ms) / 1000.0)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(prompt_tokens_per_s=self.prompt_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s)
        return data


def _ms(t0_ns: int, t1_ns: int) -> float:
    return (t1_ns - t0_ns) / 1e6


def measure_generation(
    backend: Backend, prompt_ids: list[int], decode_tokens: int, energy: EnergyMeter | None = None
) -> GenerationTiming:
    """Time one greedy generation from an empty sequence (see module docstring). Returns ``GenerationTiming``.

    The garbage collector is paused inside the timed region so that a collection does not land on one
    token's latency (as ``timeit`` does). The decode loop reads the clock once per token: token i's
    latency runs from the end of token i-1 (or of the decode start) to the end of its own argmax, so
    the latencies add up to the loop's wall time, as a bare loop timed around the whole loop would
    read it. ``energy`` (started here, stopped at the end) gives the prefill and decode joules.
    """
    if not prompt_ids:
        raise ConfigError("measure_generation got an empty prompt; expected at least one token id")
    if decode_tokens < 1:
        raise ConfigError(f"decode_tokens={decode_tokens} is invalid; expected >= 1")
    prompt = [int(t) for t in prompt_ids]
    backend.reset()
    forward, argmax, clock = backend.forward, np.argmax, time.perf_counter_ns
    stamps = [0] * (decode_tokens + 1)  # clock at the decode start and after each token
    generated = [0] * (decode_tokens + 1)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    with paused_sampling():  # no RSS polling inside the timed region (see the module docstring)
        try:
            if energy is not None:
                energy.start()
            t0 = clock()
            logits = forward(prompt)  # (P, V)
            t1 = clock()
            token = int(argmax(logits[-1]))
            t2 = clock()
            e1 = energy.read_j() if energy is not None else None
            generated[0] = token
            stamps[0] = clock()
            for i in range(1, decode_tokens + 1):
                token = int(argmax(forward([token])[-1]))  # (1, V) -> the next token
                stamps[i] = clock()
                generated[i] = token
            e2 = energy.stop() if energy is not None else None
        except BaseException:
            if energy is not None:
                energy.stop()  # no sampler thread outlives a failed generation
            raise
        finally:
            if gc_was_enabled:
                gc.enable()
    latencies = [_ms(a, b) for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    timing = GenerationTiming(len(prompt), _ms(t0, t1), _ms(t0, t2), latencies, generated)
    if energy is not None and e1 is not None and e2 is not None:
        timing.prefill_joules = e1
        timing.decode_joules = e2 - e1
    return timing


def aggregate_generations(runs: list[GenerationTiming]) -> dict:
    """Means and spread across repetitions, plus percentiles of all per-token decode latencies."""
    if not runs:
        raise ValueError("aggregate_generations() of no runs")
    per_run = {
        "prefill_ms": [r.prefill_ms for r in runs],
        "ttft_ms": [r.ttft_ms for r in runs],
        "prompt_tokens_per_s": [r.prompt_tokens_per_s for r in runs],
        "decode_tokens_per_s": [r.decode_tokens_per_s for r in runs],
    }
    pooled = [ms for r in runs for ms in r.decode_latency_ms]
    out: dict = {
        "prompt_tokens": runs[0].prompt_tokens,
        "decode_tokens": runs[0].decode_tokens,
        "repeat": len(runs),
        **{key: spread(vals)["mean"] for key, vals in per_run.items()},
        **prefixed(latency_stats(pooled), "latency_ms_"),
        "spread": {key: spread(vals) for key, vals in per_run.items()},
        "greedy_identical": all(r.generated_ids == runs[0].generated_ids for r in runs),
        "generated_ids": runs[0].generated_ids,
        "runs": [r.to_dict() for r in runs],
    }
    return out


# -- bandwidth and roofline --------------------------------------------------------------------------


def _parse_cache_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1024, "M": MIB, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def llc_bytes(sysfs: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Size of the last-level (highest-level data/unified) cache of cpu0, or None when unknown."""
    best: tuple[int, int] | None = None
    for index in sysfs.glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _parse_cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if best is None or level > best[0]:
            best = (level, size)
    return best[1] if best else None


def _copy_gb_per_s(src: np.ndarray, dst: np.ndarray, repeats: int, threads: int) -> float:
    """Best STREAM-copy bandwidth over ``repeats`` (bytes read + bytes written, 1e9 per GB)."""
    bounds = np.linspace(0, src.size, threads + 1, dtype=np.int64)
    parts = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def copy(part: tuple[int, int]) -> None:
        np.copyto(dst[part[0] : part[1]], src[part[0] : part[1]])  # releases the GIL

    best = 0.0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(copy, parts))
            best = max(best, 2 * src.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def bandwidth_probe(buffer_bytes: int | None = None, repeats: int = 5, threads: int | None = None) -> dict:
    """Memory bandwidth from a numpy copy of a buffer larger than the LLC: best of ``repeats``, GB/s.

    Measured with one thread and with ``threads`` (default: physical cores); the larger is the probe.
    The buffer defaults to 4x the LLC (at least 64 MiB, at most 1/8 of RAM).
    """
    llc = llc_bytes()
    if buffer_bytes is None:
        buffer_bytes = max(4 * (llc or 16 * MIB), 64 * MIB)
        buffer_bytes = min(buffer_bytes, psutil.virtual_memory().total // 8)
    threads = threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    src = np.full(buffer_bytes, 1, dtype=np.uint8)
    dst = np.full(buffer_bytes, 0, dtype=np.uint8)  # fault every page in before timing
    try:
        single = _copy_gb_per_s(src, dst, repeats, 1)
        multi = _copy_gb_per_s(src, dst, repeats, threads) if threads > 1 else single
    finally:
        del src, dst
    return {
        "probe_gb_per_s": max(single, multi),
        "probe_single_thread_gb_per_s": single,
        "probe_threads": threads,
        "probe_multi_thread_gb_per_s": multi,
        "probe_buffer_mb": buffer_bytes / MIB,
        "probe_repeats": repeats,
        "probe_method": "numpy copy, best of repeats, 2 bytes moved per byte copied",
        "llc_bytes": llc,
    }


def roofline(weight_bytes: int, decode_tokens_per_s: float, probe: dict | None) -> dict:
    """Achieved decode bandwidth (weight bytes x tokens/s) and its fraction of the probed bandwidth."""
    achieved = weight_bytes * decode_tokens_per_s / 1e9
    out: dict = {"weight_bytes_per_token": weight_bytes, "achieved_decode_gb_per_s": achieved}
    if not probe:
        return out
    peak = probe["probe_gb_per_s"]
    llc = probe.get("llc_bytes")
    out.update(
        {
            **probe,
            "roofline_fraction": achieved / peak if peak > 0 else None,
            "roofline_decode_tokens_per_s": peak * 1e9 / weight_bytes if weight_bytes else None,
            # weights that fit in the LLC are served from cache: the fraction can then exceed 1
            "weights_fit_in_llc": bool(llc and weight_bytes <= llc),
        }
    )
    return out


# -- energy ------------------------------------------------------------------------------------------


def energy_summary(meter: EnergyMeter, runs: list[GenerationTiming]) -> dict | None:
    """Joules per token over the timed generations, or None when a reading was invalid (see ``meter.reason``).

    The scope is the meter's (``describe()``): RAPL and the board/battery meters see every process.
    """
    if meter.reason or any(r.decode_joules is None or r.prefill_joules is None for r in runs):
        return None
    decode_j = sum(r.decode_joules or 0.0 for r in runs)
    prefill_j = sum(r.prefill_joules or 0.0 for r in runs)
    decode_n = sum(r.decode_tokens for r in runs)
    prompt_n = sum(r.prompt_tokens for r in runs)
    decode_s = sum(sum(r.decode_latency_ms) for r in runs) / 1000.0
    out = {
        **meter.describe(),
        "decode_joules": decode_j,
        "prefill_joules": prefill_j,
        "joules_per_token": decode_j / decode_n,
        "prefill_joules_per_token": prefill_j / prompt_n,
        "decode_mean_w": decode_j / decode_s if decode_s > 0 else None,
    }
    if isinstance(meter, SampledPowerMeter):  # the last run's sampling, to judge the resolution
        out.update(
            power_samples=meter.samples,
            distinct_power_readings=meter.distinct_readings,
            failed_power_samples=meter.failed_samples,
        )
    return out
