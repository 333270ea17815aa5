"""Energy meters: whichever power source the device exposes in sysfs, behind one interface.

``open_energy_meter`` picks the first source that is present and readable (no root, no extra
process) and otherwise says why none is, for every source it tried:

* **Jetson INA3221** (``jetson-ina3221``). The module's power monitors are instantaneous readings, so
  a ``SampledPowerMeter`` integrates them. Orin/Xavier with the upstream driver (L4T >= 34): hwmon
  under ``/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/`` with ``in[123]_label`` (rail name),
  ``in[123]_input`` (bus voltage, mV), ``curr[123]_input`` (current, mA) and ``in[123]_enable``
  (Linux ``Documentation/hwmon/ina3221.rst``; NVIDIA Jetson Linux Developer Guide, "Platform Power
  and Performance", Jetson Orin Nano/NX: rails ``VDD_IN``, ``VDD_CPU_GPU_CV``, ``VDD_SOC``). Older
  L4T (32.x, Nano/TX2/Xavier, NVIDIA's ``ina3221x`` driver): iio under
  ``/sys/bus/i2c/drivers/ina3221x/*/iio:device*/`` with ``rail_name_N`` and ``in_power{N}_input``
  (mW) (L4T 32 "Power Monitoring": ``POM_5V_IN``, ``POM_5V_GPU``, ``POM_5V_CPU`` on the Nano). The
  total input rail (``VDD_IN`` / ``POM_5V_IN``) is used alone when labelled (it already contains the
  others); otherwise the sum of the connected rails (``NC`` = not connected is skipped), which may miss
  unmonitored parts of the board. The result names the rails used.
* **RAPL** (``rapl``): Intel/AMD package counters under ``/sys/class/powercap`` (``RaplMeter``).
  These are energy counters, so no sampling is needed; root-only since Linux 5.10 (CVE-2020-8694).
* **power_supply batteries** (``power_supply:NAME``, Android phones, Linux laptops): Linux
  ``Documentation/ABI/testing/sysfs-class-power``: ``type`` (``Battery``), ``scope`` (``Device``
  = a peripheral's battery, skipped), ``status`` (``Charging``/``Discharging``/``Not charging``/
  ``Full``), ``current_now`` (uA), ``voltage_now`` (uV), ``power_now`` (uW, ACPI batteries that
  report energy rather than charge). Sign conventions differ: the ABI says negative current =
  discharging, but ACPI laptop batteries and many Android fuel gauges report a positive magnitude
  while discharging. So the *direction* comes from ``status`` (only ``Discharging`` is measured, as
  ``|I| x V``), falling back to the ABI sign only where there is no status file; a battery on a
  charger (charging, full, "not charging", or a mains/USB supply online) draws from the charger, not
  the battery, and is reported as not available (charging) rather than as a wrong number. A reading
  below 10 mW while discharging is refused as implausible (some vendor kernels report mA/mV). Fuel
  gauges refresh ``current_now`` at their own pace (often 0.25-10 s), so only regions of several
  seconds (decode, not prefill) are meaningful; ``distinct_power_readings`` in the result shows
  whether the gauge updated at all.

The sampled meters run a daemon thread (default every 20 ms) that reads the rails and integrates total
power with the trapezoid rule; ``read_j`` takes a fresh sample on the calling thread, so every region
boundary is a sample. The thread needs the GIL ~50 times a second inside timed regions, a quarter of
the RSS sampler's rate that cost 4-7% on a loaded 2-core host (see ``edgeq.runtime.metrics``): decode
speed measured with a sampled power meter running may read ~1% low on small CPUs. Torch-free.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

log = logging.getLogger(__name__)

SYSFS_ROOT = Path("/")
RAPL_ROOT = SYSFS_ROOT / "sys/class/powercap"
DEFAULT_INTERVAL_MS = 20.0
#: INA3221 rail labels that carry the whole module's input power.
TOTAL_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
#: Below this a discharging battery's reading is not credible (wrong units in the driver).
MIN_PLAUSIBLE_BATTERY_W = 0.01


class EnergyMeter(Protocol):
    """Joules over a measured region. ``reason`` is "" while the readings are valid, else why not."""

    source: str
    reason: str

    def start(self) -> None: ...

    def read_j(self) -> float: ...  # joules since start()

    def stop(self) -> float | None: ...  # joules since start(), None when invalid; stops sampling

    def describe(self) -> dict: ...  # source, scope, rails/domains, method


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


# -- RAPL (energy counters) ----------------------------------------------------------------------------


@dataclass
class RaplMeter:
    """Package-level RAPL energy counters (``intel-rapl:N``; sub-domains would double count)."""

    domains: list[Path]
    max_range_uj: list[int] = field(default_factory=list)
    reason: str = ""
    source: ClassVar[str] = "rapl"

    def read_uj(self) -> list[int]:
        return [int((d / "energy_uj").read_text()) for d in self.domains]

    def joules(self, before: list[int] | None, after: list[int] | None) -> float:
        """Energy between two readings, with counter wrap-around handled."""
        assert before is not None and after is not None
        total = 0
        for b, a, rng in zip(before, after, self.max_range_uj, strict=True):
            total += a - b if a >= b else a + rng - b
        return total / 1e6

    def names(self) -> list[str]:
        out = []
        for d in self.domains:
            try:
                out.append((d / "name").read_text().strip())
            except OSError:
                out.append(d.name)
        return out

    def start(self) -> None:
        self._start_uj = self.read_uj()

    def read_j(self) -> float:
        return self.joules(self._start_uj, self.read_uj())

    def stop(self) -> float | None:
        return self.read_j()

    def describe(self) -> dict:
        return {
            "source": self.source,
            "domains": self.names(),
            "scope": "package (whole socket, all processes)",
            "method": "energy counters (energy_uj), read at region boundaries",
        }


def open_rapl(root: Path = RAPL_ROOT) -> tuple[RaplMeter | None, str]:
    """A meter over the readable package domains, or ``(None, reason)`` when energy cannot be read."""
    domains = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
    if not domains:
        return None, f"no RAPL package domains under {root} (not an x86 host with powercap, or a VM/container)"
    ranges = []
    for d in domains:
        try:
            int((d / "energy_uj").read_text())
            ranges.append(int((d / "max_energy_range_uj").read_text()))
        except PermissionError:
            return None, (
                f"{d / 'energy_uj'} is not readable by this user (root-only since Linux 5.10); "
                "run as root or grant read access to measure energy"
            )
        except (OSError, ValueError) as exc:
            return None, f"cannot read {d / 'energy_uj'} ({exc})"
    return RaplMeter(domains, ranges), ""


# -- sampled power (instantaneous readings, integrated) ---------------------------------------------------


class SampledPowerMeter:
    """Integrates ``read_w()`` (total watts now) over time with the trapezoid rule on a daemon thread.

    ``check()`` (optional) returns "" while the source is valid, else the reason (e.g. a charger was
    plugged in); it runs at ``start`` and ``stop``. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        source: str,
        read_w: Callable[[], float],
        info: dict,
        interval_ms: float = DEFAULT_INTERVAL_MS,
        check: Callable[[], str] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.source, self.info, self.interval_ms = source, info, float(interval_ms)
        self.reason = ""
        self._read_w, self._check, self._clock = read_w, check, clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t = 0.0
        self._w = 0.0
        self.joules = 0.0
        self.samples = 0
        self.distinct_readings = 0
        self.failed_samples = 0

    def sample(self, boundary: bool = True) -> float:
        """Read power now and add the trapezoid since the previous sample; the joules so far.

        A failed reading on the background thread is skipped (the next trapezoid spans the gap) and
        counted in ``failed_samples``; one at a region boundary (``start``/``read_j``/``stop``)
        invalidates the meter, since the region's edge would then be a guess.
        """
        try:
            watts = float(self._read_w())
        except (OSError, ValueError) as exc:
            self.failed_samples += 1
            if boundary:
                self.reason = self.reason or f"a {self.source} power reading failed ({exc})"
            return self.joules
        t = self._clock()
        with self._lock:
            if self.samples and t > self._t:
                self.joules += 0.5 * (watts + self._w) * (t - self._t)
            if t >= self._t or not self.samples:
                self.distinct_readings += not self.samples or watts != self._w
                self._t, self._w = t, watts
                self.samples += 1
            return self.joules

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_ms / 1000.0):
            self.sample(boundary=False)

    def start(self) -> None:
        """Begin a region at joules 0. A reason, once set, stays: the bench's energy is then unavailable."""
        self.stop_thread()
        if self._check and not self.reason:
            self.reason = self._check()
        with self._lock:
            self.joules, self.samples, self.distinct_readings, self._t = 0.0, 0, 0, 0.0
            self.failed_samples = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"edgeq-{self.source}", daemon=True)
        self._thread.start()
        self.sample()  # the region's first sample, after the thread's start-up (it first samples an interval later)

    def read_j(self) -> float:
        return self.sample()

    def stop_thread(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def stop(self) -> float | None:
        joules = self.sample()
        self.stop_thread()
        if self._check and not self.reason:
            self.reason = self._check()
        return None if self.reason else joules

    def describe(self) -> dict:
        return {
            "source": self.source,
            **self.info,
            "method": f"instantaneous power sampled every {self.interval_ms:g} ms, trapezoid rule",
            "sampler_interval_ms": self.interval_ms,
        }


# -- Jetson INA3221 -----------------------------------------------------------------------------------------


@dataclass
class Rail:
    """One monitored rail: power from ``power_mw`` (iio) or ``voltage_mv`` x ``current_ma`` (hwmon)."""

    name: str
    power_mw: Path | None = None
    voltage_mv: Path | None = None
    current_ma: Path | None = None

    def watts(self) -> float:
        if self.power_mw is not None:
            return _read_int(self.power_mw) / 1e3
        assert self.voltage_mv is not None and self.current_ma is not None
        return _read_int(self.voltage_mv) * _read_int(self.current_ma) / 1e6


def _hwmon_rails(root: Path) -> list[Rail]:
    """Channels 1-3 of every ina3221 hwmon device (in4-7/curr4 are shunt voltages and sums)."""
    rails = []
    for hwmon in sorted(root.glob("sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*")):
        for ch in (1, 2, 3):
            volt, curr = hwmon / f"in{ch}_input", hwmon / f"curr{ch}_input"
            if not (volt.exists() and curr.exists()) or _read_text(hwmon / f"in{ch}_enable") == "0":
                continue
            label = _read_text(hwmon / f"in{ch}_label") or f"{hwmon.parent.parent.name}:in{ch}"
            rails.append(Rail(label, voltage_mv=volt, current_ma=curr))
    return rails


def _iio_rails(root: Path) -> list[Rail]:
    rails = []
    for dev in sorted(root.glob("sys/bus/i2c/drivers/ina3221x/*/iio:device*")):
        for power in sorted(dev.glob("in_power*_input")):
            index = power.name[len("in_power") : -len("_input")]
            label = _read_text(dev / f"rail_name_{index}") or f"{dev.parent.name}:power{index}"
            rails.append(Rail(label, power_mw=power))
    return rails


def open_jetson(
    root: Path = SYSFS_ROOT, interval_ms: float = DEFAULT_INTERVAL_MS
) -> tuple[SampledPowerMeter | None, str]:
    """A meter over the INA3221 rails (total input rail when labelled, else the sum), or (None, reason)."""
    rails = [r for r in _hwmon_rails(root) or _iio_rails(root) if r.name.upper() != "NC"]
    if not rails:
        return None, "no Jetson INA3221 power monitor (ina3221 hwmon or ina3221x iio under /sys/bus/i2c/drivers)"
    readable = []
    for rail in rails:
        try:
            rail.watts()
            readable.append(rail)
        except PermissionError:
            return None, f"the INA3221 rail {rail.name} is not readable by this user; grant read access"
        except (OSError, ValueError) as exc:  # a disabled channel reads ENODATA
            log.info("skipping INA3221 rail %s (%s)", rail.name, exc)
    if not readable:
        return None, f"no INA3221 rail could be read ({', '.join(r.name for r in rails)})"
    total = [r for r in readable if r.name.upper() in TOTAL_INPUT_RAILS]
    used = total[:1] or readable
    scope = (
        f"{used[0].name}: the module's total input power"
        if total
        else "sum of the monitored rails (no total-input rail labelled; unmonitored parts of the board are missed)"
    )
    info = {"rails": [r.name for r in used], "all_rails": [r.name for r in readable], "scope": scope}

    def read_w() -> float:
        return sum(r.watts() for r in used)

    return SampledPowerMeter("jetson-ina3221", read_w, info, interval_ms), ""


# -- power_supply batteries -----------------------------------------------------------------------------------


def _batteries(supplies: Path) -> list[Path]:
    out = []
    for d in sorted(supplies.glob("*")):
        if _read_text(d / "type") != "Battery" or _read_text(d / "scope") == "Device":
            continue
        if _read_text(d / "present") == "0":
            continue
        out.append(d)
    return out


def _battery_watts(bat: Path) -> float:
    """|power| of one battery: power_now (uW), else |current_now (uA)| x voltage_now (uV)."""
    if (bat / "power_now").exists():
        return abs(_read_int(bat / "power_now")) / 1e6
    return abs(_read_int(bat / "current_now")) * _read_int(bat / "voltage_now") / 1e12


def _discharge_problem(supplies: Path, batteries: list[Path]) -> str:
    """ "" when every battery is discharging (the device runs on them alone), else why not."""
    for d in sorted(supplies.glob("*")):
        if _read_text(d / "type") not in (None, "Battery") and _read_text(d / "online") == "1":
            return f"charging: the external supply {d.name} is online (unplug it to measure battery power)"
    for bat in batteries:
        status = _read_text(bat / "status")
        if status is None:  # no status: the ABI's sign convention, negative = discharging
            current = _read_text(bat / "current_now") or _read_text(bat / "power_now")
            if current is None or not current.lstrip().startswith("-"):
                return f"{bat.name} has no status file and a non-negative current; cannot tell discharge from charge"
        elif status != "Discharging":
            return f"charging: {bat.name} status is {status!r} (unplug the charger to measure battery power)"
    return ""


def open_power_supply(
    root: Path = SYSFS_ROOT, interval_ms: float = DEFAULT_INTERVAL_MS
) -> tuple[SampledPowerMeter | None, str]:
    """A meter over the system batteries while they discharge, or (None, reason)."""
    supplies = root / "sys/class/power_supply"
    batteries = _batteries(supplies)
    if not batteries:
        return None, f"no system battery under {supplies}"
    problem = _discharge_problem(supplies, batteries)
    if problem:
        return None, problem
    try:
        watts = sum(_battery_watts(b) for b in batteries)
    except PermissionError as exc:
        return None, f"{exc.filename} is not readable by this user; grant read access"
    except (OSError, ValueError) as exc:
        return None, f"cannot read battery power ({exc}); expected current_now and voltage_now, or power_now"
    if watts < MIN_PLAUSIBLE_BATTERY_W:
        return None, (
            f"battery power reads {watts * 1e3:.3f} mW while discharging, implausibly low: this kernel may "
            "report current_now/voltage_now in mA/mV instead of the ABI's uA/uV"
        )
    names = [b.name for b in batteries]
    info = {
        "batteries": names,
        "scope": "whole device, from the battery fuel gauge (refresh rate is the gauge's, often >= 1 s)",
    }

    def read_w() -> float:
        return sum(_battery_watts(b) for b in batteries)

    def check() -> str:
        return _discharge_problem(supplies, batteries)

    return SampledPowerMeter(f"power_supply:{'+'.join(names)}", read_w, info, interval_ms, check), ""


# -- choosing -----------------------------------------------------------------------------------------------


def open_energy_meter(
    root: Path = SYSFS_ROOT, interval_ms: float = DEFAULT_INTERVAL_MS
) -> tuple[EnergyMeter | None, str]:
    """The first available source (Jetson INA3221, RAPL, battery), or (None, every source's reason)."""
    reasons = []
    for open_source in (
        lambda: open_jetson(root, interval_ms),
        lambda: open_rapl(root / "sys/class/powercap"),
        lambda: open_power_supply(root, interval_ms),
    ):
        meter, reason = open_source()
        if meter is not None:
            return meter, ""
        reasons.append(reason)
    return None, "; ".join(reasons)
