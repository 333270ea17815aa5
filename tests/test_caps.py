"""Local emulation of a device profile (memory cap, pinned cores) and the latency-distribution plot.

The capped runs are real: a child process under RLIMIT_AS (or a cgroup v2 ``memory.max`` where this
machine delegates one), the real runtime on the bundled model's GGUF q4_0 / ONNX int4 exports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeq.devices.caps import (
    DOES_NOT_FIT,
    MIB,
    OOM_EXIT_CODE,
    OOM_MARKER,
    CappedLaunch,
    Caps,
    CgroupV2,
    caps_for,
    own_cgroup_v2,
    parse_cores,
    parse_size,
    pick_cpus,
)
from edgeq.devices.local import EDGEQ_SOURCE_ROOT, bench_local
from edgeq.devices.profile import load_profile
from edgeq.errors import ConfigError, DeviceError
from edgeq.runtime.plan import Plan

PLAN = Plan(prompt_tokens=16, decode_tokens=16, repeat=2, warmup=0, bandwidth_probe=False)
ALLOWED = sorted(os.sched_getaffinity(0))
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(p for p in (str(EDGEQ_SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p),
}


def edgeq(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgeq.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def run_python(launch: CappedLaunch, code: str, tmp_path: Path, timeout_s: float | None = 60):
    return launch.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, timeout_s=timeout_s)


# -- sizes, options, cpus --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("512M", 512 * MIB), ("4G", 4 * 2**30), ("4gb", 4 * 2**30), ("1.5GiB", 3 * 2**29), ("1048576", MIB),
     ("64m", 64 * MIB), (" 2K ", None)],
)  # fmt: skip
def test_parse_size_reads_binary_units(text, expected):
    if expected is None:  # 2 KiB parses but is below the 1 MiB floor
        with pytest.raises(ConfigError, match="at least 1M"):
            parse_size(text)
    else:
        assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "4X", "-1G", "0", "1.5.2G", "G", "4 G B", "iB"])
def test_parse_size_refuses_bad_values_with_one_line(bad):
    with pytest.raises(ConfigError) as info:
        parse_size(bad)
    msg = str(info.value)
    assert "\n" not in msg and repr(bad) in msg and "512M" in msg


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5", ""])
def test_parse_cores_refuses_bad_values(bad):
    with pytest.raises(ConfigError, match="expected an integer >= 1"):
        parse_cores(bad)


def test_caps_for_takes_the_profile_figures_and_explicit_overrides():
    pi = load_profile("raspberry-pi-5")
    caps = caps_for(pi, emulate=True)
    assert (caps.mem_cap_bytes, caps.cores, caps.profile) == (int(pi.ram_gb * 2**30), pi.cores, "raspberry-pi-5")
    caps = caps_for(pi, emulate=True, mem_cap="512M", cores="1")
    assert (caps.mem_cap_bytes, caps.cores) == (512 * MIB, 1)
    local = load_profile("local")
    assert caps_for(local) is None
    assert caps_for(local, mem_cap="1G") == Caps(mem_cap_bytes=2**30, profile="local")
    with pytest.raises(ConfigError, match="no ram_gb and no cores"):
        caps_for(local, emulate=True)
    with pytest.raises(ConfigError, match="add --emulate"):
        caps_for(pi, mem_cap="1G")
    with pytest.raises(ConfigError, match="nothing to emulate"):
        Caps()


def test_pick_cpus_takes_the_first_allowed_and_says_when_there_are_too_few():
    assert pick_cpus(1) == (ALLOWED[:1], "")
    cpus, note = pick_cpus(len(ALLOWED) + 62)
    assert cpus == ALLOWED and f"wanted {len(ALLOWED) + 62} cores" in note and f"allows {len(ALLOWED)}" in note


def test_own_cgroup_v2_is_found_from_proc_text():
    hybrid_mounts = (
        "30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
        "35 30 0:31 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw\n"
        "36 30 0:32 / /sys/fs/cgroup/memory rw shared:10 - cgroup cgroup rw,memory\n"
    )
    assert own_cgroup_v2("4:memory:/x\n0::/\n", hybrid_mounts) == Path("/sys/fs/cgroup/unified")
    unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
    scope = "0::/user.slice/user-1000.slice/session-2.scope\n"
    assert own_cgroup_v2(scope, unified) == Path("/sys/fs/cgroup/user.slice/user-1000.slice/session-2.scope")
    # a container whose cgroup2 mount is rooted below the hierarchy's root
    nested = "40 30 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert own_cgroup_v2("0::/docker/abc/sub\n", nested) == Path("/sys/fs/cgroup/sub")
    assert own_cgroup_v2("4:memory:/x\n", hybrid_mounts) is None  # v1 only
    assert own_cgroup_v2("0::/a\n", hybrid_mounts.replace("cgroup2 cgroup2", "tmpfs tmpfs")) is None


# -- the capped launch, on small Python children ---------------------------------------------------------

HOG = "x = bytearray(b'1') * (512 << 20); print(len(x))"  # 512 MiB, every page written


def test_rlimit_as_turns_a_memoryerror_into_out_of_memory(tmp_path):
    launch = CappedLaunch(Caps(mem_cap_bytes=256 * MIB, mechanism="rlimit-as"))
    run = run_python(launch, HOG, tmp_path)
    assert run.rc == 1 and run.out_of_memory is not None, run
    assert "MemoryError" in run.out_of_memory["detail"] and "allocation failure" in run.out_of_memory["evidence"]
    rec = launch.record
    assert (rec["mechanism"], rec["mem_cap_bytes"]) == ("rlimit-as", 256 * MIB)
    assert "virtual address space" in rec["mem_cap_counts"]
    assert 0 < (rec["peak_rss_polled_bytes"] or 1) <= 256 * MIB  # RSS never exceeds the address-space cap


def test_a_child_that_fits_is_pinned_and_not_out_of_memory(tmp_path):
    launch = CappedLaunch(Caps(mem_cap_bytes=512 * MIB, cores=1, mechanism="rlimit-as"))
    code = "import json, os, resource; print(json.dumps([sorted(os.sched_getaffinity(0)), resource.getrlimit(resource.RLIMIT_AS)[0]]))"
    run = run_python(launch, code, tmp_path)
    assert run.rc == 0 and run.out_of_memory is None, run
    assert json.loads(run.stdout) == [ALLOWED[:1], 512 * MIB] and launch.record["cpus"] == ALLOWED[:1]


def test_other_failures_under_a_cap_are_not_out_of_memory(tmp_path):
    launch = CappedLaunch(Caps(mem_cap_bytes=512 * MIB, mechanism="rlimit-as"))
    run = run_python(launch, "import sys; sys.exit('error: the plan is bad')", tmp_path)
    assert run.rc == 1 and run.out_of_memory is None


def test_sigkill_under_a_cap_counts_as_out_of_memory(tmp_path):
    # the kernel's OOM killer sends SIGKILL; the host cannot tell it from another SIGKILL, so under a cap it counts
    launch = CappedLaunch(Caps(mem_cap_bytes=512 * MIB, mechanism="rlimit-as"))
    run = run_python(launch, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", tmp_path)
    assert run.rc == -signal.SIGKILL and "SIGKILL" in run.out_of_memory["evidence"]


def test_a_capped_child_that_hangs_is_killed_at_the_timeout(tmp_path):
    launch = CappedLaunch(Caps(cores=1))
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="timed out after 0.5 s"):
        run_python(launch, "import time; time.sleep(60)", tmp_path, timeout_s=0.5)
    assert time.monotonic() - t0 < 10


def test_cgroup_v2_cap_on_this_machine(tmp_path):
    group, why = CgroupV2.create(64 * MIB)
    if group is None:
        pytest.skip(f"cgroup v2 memory capping is not available here: {why}")
    group.remove()
    launch = CappedLaunch(Caps(mem_cap_bytes=64 * MIB, mechanism="cgroup-v2"))
    run = run_python(launch, HOG, tmp_path)
    rec = launch.record
    assert rec["mechanism"] == "cgroup-v2" and run.out_of_memory is not None, (run, rec)
    assert "oom_kill" in run.out_of_memory["evidence"] or "SIGKILL" in run.out_of_memory["evidence"]
    assert rec["cgroup_memory_peak_bytes"] is None or rec["cgroup_memory_peak_bytes"] <= 64 * MIB
    assert not [p for p in group.path.parent.glob(f"edgeq-caps-{os.getpid()}-*")], "cgroups left behind"


def test_cgroup_v2_is_refused_when_asked_for_and_unavailable(tmp_path):
    group, why = CgroupV2.create(64 * MIB)
    if group is not None:
        group.remove()
        pytest.skip("cgroup v2 memory capping works here; the refusal path cannot be reached")
    with pytest.raises(DeviceError, match="cannot cap memory with cgroup v2 here"):
        run_python(CappedLaunch(Caps(mem_cap_bytes=64 * MIB, mechanism="cgroup-v2")), "pass", tmp_path)
    fallback = CappedLaunch(Caps(mem_cap_bytes=512 * MIB))  # auto: falls back, and says why
    assert run_python(fallback, "pass", tmp_path).rc == 0
    assert fallback.record["mechanism"] == "rlimit-as" and fallback.record["fallback_reason"] == why


# -- the real runtime under caps ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(make_run, tmp_path_factory) -> dict[str, Path]:
    """The bundled model, RTN w4g32 sym, as GGUF q4_0 and ONNX int4 (no parity: speed)."""
    from edgeq.config import ExportConfig
    from edgeq.export.api import export

    run = make_run(bits=4, group_size=32, sym=True)
    root = tmp_path_factory.mktemp("caps_artifacts")
    gguf = export(run, ExportConfig(format="gguf", type="q4_0", parity=False), root / "model.q4_0.gguf")
    onnx = export(run, ExportConfig(format="onnx", type="int4", parity=False), root / "onnx_int4")
    return {"gguf": gguf.path, "onnx": onnx.path}


@pytest.fixture(scope="module")
def capped_fit(artifacts) -> dict:
    return bench_local(artifacts["gguf"], PLAN, caps=Caps(mem_cap_bytes=2**30, cores=1), timeout_s=120)


def test_a_capped_run_that_fits_records_the_cap_and_the_pinned_cpus(capped_fit, artifacts):
    r = capped_fit
    caps = r["caps"]
    assert r["status"] == "ok" and r["generation"]["decode_tokens_per_s"] > 0
    assert caps["mechanism"] in ("cgroup-v2", "rlimit-as") and caps["mem_cap_bytes"] == 2**30
    assert caps["mechanism"] == "cgroup-v2" or caps["fallback_reason"]  # rlimit-as only as a fallback, with why
    assert caps["cpus"] == ALLOWED[:1] and caps["cores_pinned"] == 1 and not caps["notes"]
    env = r["environment"]
    assert env["usable_cores"] == 1 and env["threads"] == 1 and r["plan"]["threads"] == 1
    assert r["memory"]["peak_rss_mb"] * MIB < 2**30
    # the host polls the child's VmHWM until it exits: it sees the runtime's peak, plus the few MB the runtime
    # allocates after reading its own VmHWM (writing the result; 60.0 vs 63.0 MB seen under load), and it can
    # only miss a peak inside the last poll interval before exit
    hwm = r["memory"]["vm_hwm_mb"] * MIB
    assert 0.8 * hwm <= caps["peak_rss_polled_bytes"] <= 1.2 * hwm, (caps["peak_rss_polled_bytes"], hwm)


def test_a_capped_run_that_runs_out_of_memory_is_a_result_with_the_numbers(artifacts):
    cap = 128 * MIB  # the runtime needs more address space than this here (README: --emulate)
    r = bench_local(artifacts["gguf"], PLAN, caps=Caps(mem_cap_bytes=cap, cores=1, profile="tiny-box"), timeout_s=120)
    assert r["status"] == DOES_NOT_FIT, r
    n = r["does_not_fit"]
    manifest = json.loads(Path(artifacts["gguf"]).read_text())
    assert n["mem_cap_bytes"] == cap and n["profile"] == "tiny-box" and n["mechanism"] == r["caps"]["mechanism"]
    assert n["weight_bytes"] == r["artifact"]["weight_bytes"] > 0 and r["artifact"]["format"] == manifest["format"]
    assert 0 < n["peak_rss_bytes"] <= cap and n["peak_rss_source"]
    assert n["evidence"] and n["detail"] and "Traceback" not in n["detail"]
    assert n["stage"] in (None, "start", "import", "load", "generate", "perplexity")
    assert (
        r["message"].startswith("does not fit: profile tiny-box, cap 128.00 MiB") and "weights 3.75 MiB" in r["message"]
    )


def test_the_runtime_reports_out_of_memory_as_a_structured_error(artifacts, tmp_path):
    # cap the address space a few MiB above what the runtime holds after its imports: loading must fail
    code = (
        "import resource, sys\nimport llama_cpp\nfrom edgeq.runtime.__main__ import main\n"
        "size = next(int(ln.split()[1]) * 1024 for ln in open('/proc/self/status') if ln.startswith('VmSize:'))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + (16 << 20),) * 2)\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    plan = PLAN.save(tmp_path / "plan.json")
    argv = [sys.executable, "-c", code, str(artifacts["gguf"]), "--plan", str(plan), "--out", str(tmp_path / "r.json")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == OOM_EXIT_CODE, proc.stderr[-2000:]
    report = json.loads(next(ln for ln in proc.stderr.splitlines() if ln.startswith(OOM_MARKER))[len(OOM_MARKER) :])
    assert report["stage"] in ("start", "import", "load") and report["detail"] and report["vm_hwm_bytes"] > 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: out of memory while in ")
    assert not (tmp_path / "r.json").exists()


# -- the command line ------------------------------------------------------------------------------------


def test_cli_emulated_run_far_below_the_artifact_size_does_not_fit_and_exits_0(artifacts, capped_fit, tmp_path):
    out = tmp_path / "pi.json"
    args = ["--json", out, "--repeat", "1", "--prompt-tokens", "16", "--decode-tokens", "16", "--eval-tokens", "512"]
    proc = edgeq("bench", artifacts["gguf"], "--device", "raspberry-pi-5", "--emulate", "--mem-cap", "1M", *args)
    assert proc.returncode == 0, proc.stderr
    assert DOES_NOT_FIT in proc.stdout and "Traceback" not in proc.stderr
    r = json.loads(out.read_text())
    n = r["does_not_fit"]
    assert r["status"] == DOES_NOT_FIT and n["profile"] == "raspberry-pi-5" and r["device"]["name"] == "raspberry-pi-5"
    assert n["mem_cap_bytes"] == MIB < n["weight_bytes"] == r["artifact"]["weight_bytes"]
    assert r["caps"]["cores_requested"] == 4 and r["caps"]["cpus"] == ALLOWED[:4]
    assert f"{r['label']}: does not fit: profile raspberry-pi-5, cap 1.00 MiB" in proc.stdout
    # the report shows it beside a run that fit
    capped_fit["label"] = "fits"
    (tmp_path / "fit.json").write_text(json.dumps(capped_fit))
    rep = edgeq("report", out, tmp_path / "fit.json", "--out", tmp_path / "report")
    assert rep.returncode == 0, rep.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| does not fit |" in md and "cap 1.00 MiB" in md and "weights 3.75 MiB" in md
    assert "status" in (tmp_path / "report" / "results.csv").read_text().splitlines()[0]


def test_cli_emulate_fits_with_the_profile_figures(artifacts, tmp_path):
    out = tmp_path / "pi.json"
    proc = edgeq(
        "bench", artifacts["onnx"], "--device", "raspberry-pi-5", "--emulate", "--json", out,
        "--repeat", "1", "--prompt-tokens", "8", "--decode-tokens", "8", "--eval-tokens", "256",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["status"] == "ok" and r["caps"]["mem_cap_bytes"] == 8 * 2**30 and r["caps"]["profile"] == "raspberry-pi-5"
    wanted = load_profile("raspberry-pi-5").cores
    assert r["caps"]["cpus"] == ALLOWED[:wanted] and r["environment"]["threads"] == min(wanted, len(ALLOWED))
    short = any(n.startswith(f"wanted {wanted} cores") for n in r["caps"]["notes"])
    assert short == (wanted > len(ALLOWED))  # fewer cores here than the Pi: said, not failed
    assert r["perplexity"]["ppl"] > 1 and " ok " in proc.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--mem-cap", "4X"], "--mem-cap='4X' is not a size"),
        (["--mem-cap", "0"], "expected at least 1M"),
        (["--cores", "0"], "--cores='0' is invalid"),
        (["--cores", "abc"], "--cores='abc' is invalid"),
        (["--emulate"], "no ram_gb and no cores"),
        (["--device", "raspberry-pi-5", "--mem-cap", "1G"], "add --emulate"),
        (["--device", "raspberry-pi-5", "--emulate", "--host", "pi@x"], "--host: for remote runs"),
    ],
)
def test_cli_bad_caps_are_one_line_errors_with_exit_2(tmp_path, args, fragment):
    proc = edgeq("bench", tmp_path / "missing.gguf", "--json", tmp_path / "r.json", *args, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
    assert not (tmp_path / "r.json").exists()


# -- the report ------------------------------------------------------------------------------------------


def test_report_writes_a_latency_distribution_with_one_series_per_result(artifacts, capped_fit, tmp_path):
    from edgeq.report.write import decode_latencies_ms, format_table, latency_figure, write_report

    onnx = bench_local(artifacts["onnx"], PLAN, timeout_s=120)
    unfit = bench_local(artifacts["gguf"], PLAN, caps=Caps(mem_cap_bytes=MIB), timeout_s=60)
    results = [{**capped_fit, "label": "gguf capped"}, {**onnx, "label": "onnx"}, {**unfit, "label": "gguf 1M"}]
    assert [len(decode_latencies_ms(r)) for r in results] == [32, 32, 0]  # repeat 2 x 16 decode tokens
    fig = latency_figure(results)
    ax = fig.axes[0]
    assert len(ax.lines) == 2  # one ECDF per result that has latencies; none for the run that did not fit
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("gguf capped (p50") and labels[1].startswith("onnx (p50")
    for line, r in zip(ax.lines, results, strict=False):
        xs = sorted(decode_latencies_ms(r))
        assert list(line.get_xdata()) == xs and line.get_ydata()[-1] == pytest.approx(1.0)
    paths = write_report(results, tmp_path / "rep")
    png = paths["latency_plot"].read_bytes()
    assert paths["latency_plot"].name == "latency.png" and png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = paths["markdown"].read_text()
    assert "![decode latency distribution](latency.png)" in md and "gguf 1M**: does not fit" in md
    assert "status" in format_table(results).splitlines()[0]
    assert "status" not in format_table([onnx]).splitlines()[0]  # uncapped results keep the old table
    assert not list((tmp_path / "rep").glob(".*"))  # no temp files left by the atomic writes
