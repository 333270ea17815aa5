"""Energy meters (``edgeq.runtime.energy``) over fake sysfs trees with the real devices' file names and units.

The trees follow:

* Linux ``Documentation/hwmon/ina3221.rst``: ``in[123]_label``, ``in[123]_enable``, ``in[123]_input``
  (bus voltage, mV), ``curr[123]_input`` (mA), ``in[456]_input`` (shunt voltage, uV), ``in7_input`` /
  ``in7_label`` and ``curr4_input`` (sums); NVIDIA Jetson Linux Developer Guide, "Platform Power and
  Performance": Orin Nano/NX at ``/sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon*`` with rails
  ``VDD_IN``, ``VDD_CPU_GPU_CV``, ``VDD_SOC``; AGX Orin: two monitors (1-0040, 1-0041) and no
  ``VDD_IN`` (``NC`` = not connected);
* L4T 32 "Power Monitoring" (Jetson Nano): ``/sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/``
  ``rail_name_N`` (``POM_5V_IN``, ``POM_5V_GPU``, ``POM_5V_CPU``) and ``in_power{N}_input`` (mW);
* Linux ``Documentation/ABI/testing/sysfs-class-power``: ``type``, ``scope``, ``status``, ``present``,
  ``online``, ``current_now`` (uA; negative = discharging per the ABI, positive magnitude on ACPI and
  many Android kernels), ``voltage_now`` (uV), ``power_now`` (uW);
* ``/sys/class/powercap/intel-rapl:N/energy_uj`` and ``max_energy_range_uj`` (uJ).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from edgeq.runtime.energy import (
    SampledPowerMeter,
    open_energy_meter,
    open_jetson,
    open_power_supply,
    open_rapl,
)
from edgeq.runtime.metrics import energy_summary, measure_generation


def write(directory: Path, **files: object) -> Path:
    """Sysfs attributes as files; each replaced atomically, as a sampler may read it meanwhile."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        tmp = directory / f".{name}.tmp"
        tmp.write_text(f"{value}\n")
        os.replace(tmp, directory / name)
    return directory


def ina3221_hwmon(root: Path, addr: str, rails: dict[int, tuple[str, int, int]], hwmon: str = "hwmon3") -> Path:
    """An upstream-driver INA3221: channel -> (label, bus mV, mA), plus the shunt and sum channels."""
    d = root / "sys/bus/i2c/drivers/ina3221" / addr / "hwmon" / hwmon
    write(d, name="ina3221", in7_label="sum of shunt voltages", in7_input=120, curr4_input=999)
    for ch, (label, mv, ma) in rails.items():
        files = {f"in{ch}_label": label, f"in{ch}_enable": 1, f"in{ch}_input": mv, f"curr{ch}_input": ma}
        write(d, **files, **{f"in{ch + 3}_input": 40, f"shunt{ch}_resistor": 5000})
    return d


def orin_nano(root: Path, vdd_in: tuple[int, int] = (5000, 1200)) -> Path:
    return ina3221_hwmon(
        root, "1-0040", {1: ("VDD_IN", *vdd_in), 2: ("VDD_CPU_GPU_CV", 5000, 400), 3: ("VDD_SOC", 5000, 300)}
    )


def battery(root: Path, name: str = "battery", **files: object) -> Path:
    return write(root / "sys/class/power_supply" / name, type="Battery", present=1, **files)


# -- Jetson INA3221 -----------------------------------------------------------------------------------------


def test_jetson_hwmon_uses_the_labelled_total_input_rail(tmp_path):
    orin_nano(tmp_path)
    meter, reason = open_jetson(tmp_path)
    assert meter is not None and reason == ""
    info = meter.describe()
    assert info["source"] == "jetson-ina3221" and info["rails"] == ["VDD_IN"]
    assert info["all_rails"] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    assert "total input" in info["scope"]
    assert meter._read_w() == pytest.approx(6.0)  # 5000 mV x 1200 mA, not the sum with the sub-rails


def test_jetson_hwmon_without_a_total_rail_sums_connected_enabled_rails(tmp_path):
    # AGX Orin: no VDD_IN; the second monitor has two NC (not connected) channels; one channel disabled
    ina3221_hwmon(
        tmp_path,
        "1-0040",
        {1: ("VDD_GPU_SOC", 5000, 1000), 2: ("VDD_CPU_CV", 5000, 600), 3: ("VIN_SYS_5V0", 5000, 800)},
    )
    d = ina3221_hwmon(
        tmp_path, "1-0041", {1: ("NC", 0, 0), 2: ("VDDQ_VDD2_1V8AO", 5000, 200), 3: ("NC", 0, 0)}, "hwmon4"
    )
    meter, _ = open_jetson(tmp_path)
    assert meter is not None
    assert meter.describe()["rails"] == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]
    assert "sum of the monitored rails" in meter.describe()["scope"]
    assert meter._read_w() == pytest.approx(5.0 * (1.0 + 0.6 + 0.8 + 0.2))
    (d / "in2_enable").write_text("0\n")  # a disabled channel is not a rail
    meter, _ = open_jetson(tmp_path)
    assert meter is not None and "VDDQ_VDD2_1V8AO" not in meter.describe()["rails"]


def test_jetson_iio_reads_milliwatts_and_picks_pom_5v_in(tmp_path):
    d = tmp_path / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    write(d, rail_name_0="POM_5V_IN", rail_name_1="POM_5V_GPU", rail_name_2="POM_5V_CPU")
    write(d, in_power0_input=4120, in_power1_input=310, in_power2_input=1290)
    write(d, in_voltage0_input=5024, in_current0_input=820)  # present on the device, not needed
    meter, reason = open_jetson(tmp_path)
    assert meter is not None and reason == "" and meter.describe()["rails"] == ["POM_5V_IN"]
    assert meter._read_w() == pytest.approx(4.12)


def test_jetson_absent_or_unreadable_says_why(tmp_path):
    meter, reason = open_jetson(tmp_path)
    assert meter is None and "no Jetson INA3221" in reason
    d = orin_nano(tmp_path)
    for ch in (1, 2, 3):
        (d / f"curr{ch}_input").write_text("not-a-number\n")
    meter, reason = open_jetson(tmp_path)
    assert meter is None and "no INA3221 rail could be read" in reason and "VDD_IN" in reason


# -- the sampler's integration ----------------------------------------------------------------------------


def test_trapezoid_rule_is_exact_for_a_power_ramp_with_boundary_reads():
    clock_s = iter([0.0, 0.25, 0.5, 0.75, 1.0])
    watts = iter([0.0, 2.5, 5.0, 7.5, 10.0])  # 10 W/s ramp: exactly 5 J over 1 s, 1.25 J over the first 0.5 s
    meter = SampledPowerMeter("test", lambda: next(watts), {}, interval_ms=1e6, clock=lambda: next(clock_s))
    meter.start()  # sample at t=0; the thread would first sample after 1000 s
    meter.sample()
    assert meter.read_j() == pytest.approx(1.25)
    meter.sample()
    assert meter.stop() == pytest.approx(5.0)
    assert meter.samples == 5 and meter.distinct_readings == 5 and meter.reason == ""


def test_a_failed_background_sample_is_skipped_but_a_failed_boundary_read_invalidates():
    clock_s = iter([0.0, 1.0])
    readings = iter([2.0, OSError(5, "Input/output error"), 4.0, OSError(5, "Input/output error")])

    def read_w() -> float:
        value = next(readings)
        if isinstance(value, Exception):
            raise value
        return value

    meter = SampledPowerMeter("test", read_w, {}, interval_ms=1e6, clock=lambda: next(clock_s))
    meter.start()  # 2 W at t=0
    meter.sample(boundary=False)  # the thread's failed read: skipped
    assert meter.reason == "" and meter.failed_samples == 1
    assert meter.read_j() == pytest.approx(3.0)  # 4 W at t=1: the trapezoid spans the gap
    assert meter.stop() is None and "power reading failed" in meter.reason and meter.failed_samples == 2


def test_sampler_thread_integrates_constant_power_to_p_times_t(tmp_path):
    orin_nano(tmp_path, vdd_in=(5000, 1600))  # 8 W
    meter, _ = open_jetson(tmp_path, interval_ms=5.0)
    assert meter is not None
    t0 = time.perf_counter()
    meter.start()
    time.sleep(0.3)
    mid = meter.read_j()
    t_mid = time.perf_counter()
    time.sleep(0.2)
    joules = meter.stop()
    elapsed = time.perf_counter() - t0
    assert joules is not None
    assert joules == pytest.approx(8.0 * elapsed, rel=0.03)
    assert mid == pytest.approx(8.0 * (t_mid - t0), rel=0.05)
    assert meter.samples >= 10, "the background thread should have sampled between the boundary reads"
    assert meter.distinct_readings == 1
    assert meter._thread is None  # stopped


def test_sampler_follows_a_power_step(tmp_path):
    d = orin_nano(tmp_path, vdd_in=(5000, 400))  # 2 W, then 10 W
    meter, _ = open_jetson(tmp_path, interval_ms=2.0)
    assert meter is not None
    meter.start()
    time.sleep(0.2)
    first = meter.read_j()  # a boundary sample at the old power
    write(d, curr1_input=2000)
    t_step = time.perf_counter()
    time.sleep(0.2)
    second = meter.stop() - first
    t_end = time.perf_counter()
    assert first == pytest.approx(2.0 * 0.2, rel=0.15)
    # the step sits between two samples: at most one interval is integrated at the mean of 2 W and 10 W
    assert second == pytest.approx(10.0 * (t_end - t_step), rel=0.15)


# -- power_supply batteries -------------------------------------------------------------------------------


def test_android_battery_positive_discharge_current(tmp_path):
    battery(tmp_path, status="Discharging", current_now=350_000, voltage_now=3_850_000)  # uA, uV
    write(tmp_path / "sys/class/power_supply/usb", type="USB", online=0)
    write(tmp_path / "sys/class/power_supply/bms", type="BMS")
    meter, reason = open_power_supply(tmp_path)
    assert meter is not None and reason == ""
    assert meter.source == "power_supply:battery" and meter.describe()["batteries"] == ["battery"]
    assert meter._read_w() == pytest.approx(0.35 * 3.85)


def test_abi_negative_discharge_current_reads_the_same_power(tmp_path):
    battery(tmp_path, status="Discharging", current_now=-350_000, voltage_now=3_850_000)
    meter, _ = open_power_supply(tmp_path)
    assert meter is not None and meter._read_w() == pytest.approx(0.35 * 3.85)


def test_laptop_battery_power_now_and_peripheral_batteries_skipped(tmp_path):
    battery(tmp_path, "BAT0", status="Discharging", power_now=7_500_000, voltage_now=11_400_000, scope="System")
    battery(
        tmp_path, "hid-mouse-battery", scope="Device", status="Discharging", current_now=5_000, voltage_now=3_000_000
    )
    write(tmp_path / "sys/class/power_supply/AC", type="Mains", online=0)
    meter, _ = open_power_supply(tmp_path)
    assert meter is not None and meter.source == "power_supply:BAT0"
    assert meter._read_w() == pytest.approx(7.5)


@pytest.mark.parametrize("status", ["Charging", "Full", "Not charging"])
def test_a_battery_on_a_charger_is_not_available_charging(tmp_path, status):
    battery(tmp_path, status=status, current_now=900_000, voltage_now=4_200_000)
    meter, reason = open_power_supply(tmp_path)
    assert meter is None and reason.startswith("charging:") and repr(status) in reason


def test_an_online_external_supply_is_not_available_charging(tmp_path):
    battery(tmp_path, status="Discharging", current_now=350_000, voltage_now=3_850_000)  # a stale status
    write(tmp_path / "sys/class/power_supply/usb", type="USB", online=1)
    meter, reason = open_power_supply(tmp_path)
    assert meter is None and reason.startswith("charging:") and "usb" in reason


def test_no_status_file_falls_back_to_the_abi_sign(tmp_path):
    bat = battery(tmp_path, current_now=-500_000, voltage_now=4_000_000)
    meter, _ = open_power_supply(tmp_path)
    assert meter is not None and meter._read_w() == pytest.approx(2.0)
    (bat / "current_now").write_text("500000\n")
    meter, reason = open_power_supply(tmp_path)
    assert meter is None and "cannot tell discharge from charge" in reason


def test_missing_files_and_wrong_units_say_why(tmp_path):
    meter, reason = open_power_supply(tmp_path)
    assert meter is None and "no system battery" in reason
    bat = battery(tmp_path, status="Discharging", voltage_now=3_850_000)
    meter, reason = open_power_supply(tmp_path)
    assert meter is None and "current_now and voltage_now, or power_now" in reason
    (bat / "current_now").write_text("350\n")  # mA where the ABI says uA: 1.3 mW
    meter, reason = open_power_supply(tmp_path)
    assert meter is None and "implausibly low" in reason and "mA" in reason


def test_charging_during_the_measurement_invalidates_the_energy(tmp_path):
    bat = battery(tmp_path, status="Discharging", current_now=400_000, voltage_now=4_000_000)
    meter, _ = open_power_supply(tmp_path, interval_ms=5.0)
    assert meter is not None
    meter.start()
    time.sleep(0.05)
    write(bat, status="Charging")
    assert meter.stop() is None and meter.reason.startswith("charging:")
    (bat / "status").write_text("Discharging\n")
    meter.start()  # the reason stays: the bench's energy is not available
    assert meter.stop() is None and meter.reason.startswith("charging:")


# -- choosing a source, RAPL, and the harness ---------------------------------------------------------------


def rapl_package(root: Path, name: str, energy_uj: int) -> Path:
    d = root / "sys/class/powercap" / name
    return write(d, name=f"package-{name[-1]}", energy_uj=energy_uj, max_energy_range_uj=262_143_328_850)


def test_open_energy_meter_prefers_jetson_then_rapl_then_battery_and_explains_none(tmp_path):
    meter, reason = open_energy_meter(tmp_path)
    assert meter is None
    assert "INA3221" in reason and "RAPL" in reason and "no system battery" in reason
    battery(tmp_path, "BAT0", status="Discharging", power_now=9_000_000)
    assert open_energy_meter(tmp_path)[0].source == "power_supply:BAT0"
    rapl_package(tmp_path, "intel-rapl:0", 1_000_000)
    assert open_energy_meter(tmp_path)[0].source == "rapl"
    orin_nano(tmp_path)
    assert open_energy_meter(tmp_path)[0].source == "jetson-ina3221"


def test_rapl_meter_through_the_common_interface(tmp_path):
    d = rapl_package(tmp_path, "intel-rapl:0", 1_000_000)
    meter, reason = open_rapl(tmp_path / "sys/class/powercap")
    assert meter is not None and reason == "" and meter.source == "rapl"
    meter.start()
    (d / "energy_uj").write_text("3500000\n")
    assert meter.read_j() == pytest.approx(2.5)
    (d / "energy_uj").write_text("4000000\n")
    assert meter.stop() == pytest.approx(3.0)
    assert meter.describe()["domains"] == ["package-0"]


class SleepyBackend:
    """The Backend protocol with fixed logits that always pick ``ids[-1] + 1`` and a fixed time per call."""

    name = "sleepy"
    n_ctx = 1024
    vocab_size = 64

    def __init__(self, prefill_s: float, step_s: float):
        self.prefill_s, self.step_s, self.n_past = prefill_s, step_s, 0

    def reset(self) -> None:
        self.n_past = 0

    def forward(self, ids: list[int]) -> np.ndarray:
        time.sleep(self.prefill_s if len(ids) > 1 else self.step_s)
        self.n_past += len(ids)
        return np.eye(self.vocab_size, dtype=np.float32)[(np.asarray(ids) + 1) % self.vocab_size]


def test_measure_generation_splits_sampled_energy_into_prefill_and_decode(tmp_path):
    orin_nano(tmp_path, vdd_in=(5000, 800))  # 4 W
    meter, _ = open_jetson(tmp_path, interval_ms=5.0)
    assert meter is not None
    timing = measure_generation(SleepyBackend(0.1, 0.005), [1, 2, 3], decode_tokens=30, energy=meter)
    assert timing.generated_ids == list(range(4, 35))
    decode_s = sum(timing.decode_latency_ms) / 1000
    # each energy region holds its timed region plus a boundary read or two (a few ms on a loaded host)
    assert 0.99 * 4.0 * timing.ttft_ms / 1000 <= timing.prefill_joules <= 4.0 * (timing.ttft_ms / 1000 + 0.01)
    assert 0.99 * 4.0 * decode_s <= timing.decode_joules <= 4.0 * (decode_s + 0.01)
    summary = energy_summary(meter, [timing])
    assert summary is not None and summary["source"] == "jetson-ina3221" and summary["rails"] == ["VDD_IN"]
    assert summary["joules_per_token"] == pytest.approx(timing.decode_joules / 30)
    assert summary["decode_mean_w"] == pytest.approx(4.0, rel=0.1)
    assert summary["power_samples"] >= 10 and summary["distinct_power_readings"] == 1
    assert meter._thread is None


def test_energy_summary_is_none_when_a_reading_became_invalid(tmp_path):
    bat = battery(tmp_path, status="Discharging", current_now=400_000, voltage_now=4_000_000)
    meter, _ = open_power_supply(tmp_path, interval_ms=5.0)
    assert meter is not None
    backend = SleepyBackend(0.01, 0.002)
    ok = measure_generation(backend, [1, 2], decode_tokens=5, energy=meter)
    assert ok.decode_joules is not None and energy_summary(meter, [ok]) is not None
    (bat / "status").write_text("Charging\n")
    bad = measure_generation(backend, [1, 2], decode_tokens=5, energy=meter)
    assert bad.decode_joules is None and bad.prefill_joules is None
    assert energy_summary(meter, [ok, bad]) is None and meter.reason.startswith("charging:")
