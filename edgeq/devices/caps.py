"""Emulate a device profile on this machine: a memory cap, pinned cores, and threads = cores.

``edgeq bench ART --device raspberry-pi-5 --emulate`` runs the local measurement child (``python -m
edgeq.runtime``) under the profile's RAM as a memory cap and on its number of cores, so "will it fit a
4 GB Pi" is answered here. ``--mem-cap`` / ``--cores`` set the figures explicitly.

Memory cap, in order of preference:

* **cgroup-v2**: a child cgroup under this process's own cgroup (it must be delegated to us, i.e.
  writable, with the ``memory`` controller enabled for children or enabling it must succeed; cgroup v2
  allows that only in a cgroup without processes, so a process alone in its delegated cgroup first
  moves itself into a leaf, ``edgeq-host``), with ``memory.max`` = the cap and ``memory.swap.max`` = 0. It caps what the device would run out of:
  resident memory plus page cache (an mmap'd GGUF's pages count while resident; the kernel may evict
  clean file pages before it kills, which on a device would be thrashing). ``memory.events``
  ``oom_kill`` says precisely whether the kernel killed the child; ``memory.peak`` (Linux >= 5.19) is
  its high-water mark. The cgroup also holds the runtime's bandwidth-probe child, so ``memory.peak``
  may include the probe's buffers (the probe runs before the model is loaded).
* **rlimit-as**: ``RLIMIT_AS`` on the child. It caps *virtual address space*, which overcounts what a
  device would hold resident: every thread's stack reservation, glibc's per-thread malloc arenas,
  onnxruntime's arena reservations and a mmap'd GGUF count in full whether touched or not. So a
  "does not fit" under ``rlimit-as`` close to the cap may be a false alarm; the result says which
  mechanism applied. The peak RSS reported is resident memory all the same: the runtime's own
  ``VmHWM`` when it reports, else the host's last reading of it (polled every 10 ms, a lower bound). On the build machine the bundled model's runtime needs
  ~150-200 MiB more address space than its peak RSS; see ``AS_OVERHEAD_NOTE``.

Cores: the child is pinned (``sched_setaffinity``) to the first N CPUs this process may use; when the
profile wants more cores than there are, it runs on all of them and the result says so (no failure).
The backend runs ``threads`` = the pinned core count unless the plan names its threads.

The child is started through a tiny stdlib-only launcher (``python -c``) that pins itself, joins the
cgroup or sets the rlimit, then ``exec``s the runtime: the limits hold from the runtime's first
instruction, and no ``preexec_fn`` runs in a possibly multi-threaded host.

Out of memory is a measurement, not a crash: the runtime reports a structured error (exit code
``OOM_EXIT_CODE``, a ``OOM_MARKER`` JSON line on stderr) when it can; otherwise the host recognizes a
cgroup ``oom_kill``, a SIGKILL, or an allocation failure in the child's stderr (``MemoryError``,
``std::bad_alloc``, "failed to allocate", a shared object that cannot be mapped). The bench then
returns a result with ``status`` = ``"does not fit"`` and the numbers (cap, weight bytes, peak RSS
reached, profile) instead of raising.

torch-free: importing this module must not pull torch or transformers in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgeq.devices.profile import DeviceProfile
from edgeq.devices.transport import check_argv, last_line
from edgeq.errors import ConfigError, DeviceError
from edgeq.runtime.__main__ import ALLOC_FAILURE, OOM_EXIT_CODE, OOM_MARKER, RESULT_SCHEMA, artifact_summary
from edgeq.runtime.plan import Plan

log = logging.getLogger(__name__)

MECHANISMS = ("auto", "cgroup-v2", "rlimit-as")
DOES_NOT_FIT = "does not fit"
GIB = 2**30
MIB = 2**20
#: What RLIMIT_AS costs beyond resident memory. Measured on the build machine (x86-64, 1 thread, 10 runs a
#: cap): the bundled q4_0 GGUF (peak RSS 60 MiB) never fit at 160 MiB, always from 208 MiB; its ONNX int4
#: export (peak RSS 95 MiB) never up to 176 MiB, always from 272 MiB; in between it depends on where
#: ASLR and malloc place their reservations. README ("Emulating a device here") has the details.
AS_OVERHEAD_NOTE = (
    "RLIMIT_AS counts virtual address space (stacks, arenas, mmap reservations), not RSS: "
    "expect ~150-200 MiB beyond the peak RSS before a run fits"
)
_POLL_S = 0.01
#: Allocation failures in a child's stderr: the runtime's patterns, Python's and OpenBLAS's words.
CHILD_ALLOC_FAILURE = re.compile(ALLOC_FAILURE.pattern + r"|MemoryError|Memory allocation still failed", re.IGNORECASE)

# -- sizes and options ---------------------------------------------------------------------------------

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)
_UNIT = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str | int, what: str = "--mem-cap") -> int:
    """Bytes of a size such as ``512M``, ``4G``, ``1.5GiB`` or ``1048576``; units are binary (4G = 4 GiB)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.fullmatch(str(text))
        if not m or (m.group(3) and not m.group(2) and m.group(3).lower() == "ib"):
            raise ConfigError(
                f"{what}={text!r} is not a size; expected a number with an optional binary unit, e.g. 512M, 4G, 1.5GiB"
            )
        value = int(float(m.group(1)) * _UNIT[m.group(2).lower()])
    if value < MIB:
        raise ConfigError(f"{what}={text!r} is {value} bytes; expected at least 1M (1 MiB), e.g. 512M or 4G")
    return value


def parse_cores(value: str | int) -> int:
    """A core count from ``--cores`` (an integer >= 1)."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--cores={value!r} is invalid; expected an integer >= 1, e.g. --cores 4")
    return int(text)


def format_bytes(n: int | float | None) -> str:
    """``n`` bytes as a short binary-unit string (``4.00 GiB``)."""
    if n is None:
        return "?"
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Caps:
    """What to emulate: a memory cap in bytes and a core count (None: not capped), and whose figures."""

    mem_cap_bytes: int | None = None
    cores: int | None = None
    profile: str | None = None  # the emulated profile's name, recorded in the result
    mechanism: str = "auto"  # auto | cgroup-v2 | rlimit-as

    def __post_init__(self) -> None:
        if self.mem_cap_bytes is not None:
            if isinstance(self.mem_cap_bytes, bool) or not isinstance(self.mem_cap_bytes, int):
                raise ConfigError(f"mem_cap_bytes={self.mem_cap_bytes!r} is invalid; expected an integer byte count")
            parse_size(self.mem_cap_bytes, "mem_cap_bytes")
        if self.cores is not None and (
            isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 1
        ):
            raise ConfigError(f"--cores={self.cores!r} is invalid; expected an integer >= 1")
        if self.mechanism not in MECHANISMS:
            raise ConfigError(f"caps mechanism={self.mechanism!r} is invalid; expected one of {list(MECHANISMS)}")
        if self.mem_cap_bytes is None and self.cores is None:
            raise ConfigError("nothing to emulate: no memory cap and no core count; pass --mem-cap and/or --cores")


def caps_for(
    profile: DeviceProfile | None,
    *,
    emulate: bool = False,
    mem_cap: str | int | None = None,
    cores: str | int | None = None,
    mechanism: str = "auto",
) -> Caps | None:
    """The caps for a bench: the profile's RAM and cores under ``emulate``, overridden by explicit values.

    None when nothing is capped. ``--mem-cap``/``--cores`` on a remote profile without ``--emulate`` are
    refused: they describe a local run.
    """
    mem = parse_size(mem_cap) if mem_cap is not None else None
    cores = parse_cores(cores) if cores is not None else None
    name = profile.name if profile is not None else None
    if emulate:
        if profile is None:
            raise ConfigError("--emulate needs a device profile to emulate; pass --device PROFILE")
        if mem is None and profile.ram_gb is not None:
            mem = int(profile.ram_gb * GIB)
        cores = cores if cores is not None else profile.cores
        if mem is None and cores is None:
            raise ConfigError(
                f"profile {profile.name!r} gives no ram_gb and no cores to emulate; pass --mem-cap and/or --cores"
            )
    elif profile is not None and profile.transport != "local" and (mem is not None or cores is not None):
        raise ConfigError(
            f"--mem-cap/--cores cap a local run; profile {profile.name!r} is a remote device: "
            "add --emulate to emulate it here, or drop them"
        )
    if mem is None and cores is None:
        return None
    return Caps(mem_cap_bytes=mem, cores=cores, profile=name, mechanism=mechanism)


def pick_cpus(cores: int | None) -> tuple[list[int], str]:
    """The first ``cores`` CPUs this process may run on, and a note when there are fewer than asked."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if cores is None:
        return allowed, ""
    if cores > len(allowed):
        note = (
            f"wanted {cores} cores but this machine allows {len(allowed)} (cpus {allowed}); "
            f"emulated with {len(allowed)}: speed is not the device's"
        )
        return allowed, note
    return allowed[:cores], ""


# -- cgroup v2 -----------------------------------------------------------------------------------------


def own_cgroup_v2(proc_cgroup: str, mountinfo: str) -> Path | None:
    """This process's cgroup v2 directory, from ``/proc/self/cgroup`` and ``/proc/self/mountinfo`` text.

    None when there is no unified (``0::``) entry or no cgroup2 mount that contains it.
    """
    rel = next((ln[3:] for ln in proc_cgroup.splitlines() if ln.startswith("0::")), None)
    if rel is None:
        return None
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep or not post.startswith("cgroup2 "):
            continue
        fields = pre.split()
        root, mount = fields[3], fields[4]
        if rel == root or rel.startswith(root.rstrip("/") + "/"):
            return Path(mount) / rel[len(root) :].lstrip("/")
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _enable_memory(base: Path) -> str:
    """Give ``base``'s children the memory controller; '' on success, else why it cannot.

    cgroup v2 hands a controller to the children of a non-root cgroup only while that cgroup holds no
    processes. In a delegated cgroup that holds this process alone (``systemd-run --user --scope -p
    Delegate=yes edgeq bench ...``) this process first moves itself into a leaf, ``edgeq-host``, as
    delegation intends; a cgroup shared with other processes is left as it is.
    """
    control = base / "cgroup.subtree_control"
    if "memory" in _read(control).split():
        return ""
    try:
        control.write_text("+memory")
        return ""
    except OSError as exc:
        first = exc.strerror
    if _read(base / "cgroup.procs").split() != [str(os.getpid())]:
        return (
            f"cannot enable the memory controller under {base} ({first}): it holds other processes; "
            "start edgeq alone in a delegated cgroup (systemd-run --user --scope -p Delegate=yes ...)"
        )
    try:
        (base / "edgeq-host").mkdir(exist_ok=True)
        (base / "edgeq-host" / "cgroup.procs").write_text(str(os.getpid()))
        control.write_text("+memory")
    except OSError as exc:
        return f"cannot enable the memory controller under {base} ({exc.strerror}); it is not delegated to this user"
    return ""


class CgroupV2:
    """A child cgroup with ``memory.max``; ``create`` returns (None, why) where it cannot be made here."""

    _count = 0

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, cap_bytes: int, base: Path | None = None) -> tuple[CgroupV2 | None, str]:
        if base is None:
            base = own_cgroup_v2(_read(Path("/proc/self/cgroup")), _read(Path("/proc/self/mountinfo")))
        if base is None or not (base / "cgroup.controllers").is_file():
            return None, "this process is in no cgroup v2 hierarchy (cgroup v1 or none)"
        if "memory" not in _read(base / "cgroup.controllers").split():
            return None, f"the memory controller is not delegated to {base} (cgroup.controllers lacks it)"
        why = _enable_memory(base)
        if why:
            return None, why
        cls._count += 1
        path = base / f"edgeq-caps-{os.getpid()}-{cls._count}"
        try:
            path.mkdir()
        except OSError as exc:
            return None, f"cannot create a child cgroup in {base} ({exc.strerror}); it is not delegated to this user"
        group = cls(path)
        try:
            (path / "memory.max").write_text(str(cap_bytes))
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
            if (path / "memory.oom.group").exists():
                (path / "memory.oom.group").write_text("1")  # an OOM kill takes the whole child group
        except OSError as exc:
            group.remove()
            return None, f"cannot set memory.max in {path} ({exc.strerror})"
        return group, ""

    @property
    def procs_file(self) -> str:
        return str(self.path / "cgroup.procs")

    def events(self) -> dict[str, int]:
        out = {}
        for line in _read(self.path / "memory.events").splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
        return out

    def peak_bytes(self) -> int | None:
        text = _read(self.path / "memory.peak").strip()
        return int(text) if text.isdigit() else None

    def remove(self) -> None:
        """Kill what is left in the group and remove it (a cgroup dir is removed with rmdir)."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if (self.path / "cgroup.kill").exists():
                    try:
                        (self.path / "cgroup.kill").write_text("1")
                    except OSError:
                        pass
                time.sleep(0.02)
        log.warning("could not remove cgroup %s; remove it with rmdir when its processes are gone", self.path)


# -- the launcher ------------------------------------------------------------------------------------

#: Runs in the child before the runtime: stdlib only, then exec (which keeps affinity, rlimits and cgroup).
_LAUNCHER = """\
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
argv = sys.argv[2:]
stage = "pin"
try:
    if cfg["cpus"]:
        os.sched_setaffinity(0, cfg["cpus"])
    stage = "cgroup"
    if cfg["cgroup_procs"]:
        with open(cfg["cgroup_procs"], "w") as f:
            f.write(str(os.getpid()))
    stage = "exec"
    if cfg["rlimit_as"]:
        resource.setrlimit(resource.RLIMIT_AS, (cfg["rlimit_as"], cfg["rlimit_as"]))
    os.execv(argv[0], argv)
except OSError as exc:
    oom = exc.errno == 12 and stage == "exec"
    if oom:
        print(cfg["marker"] + " " + json.dumps({"stage": "exec", "detail": "exec: " + str(exc)}), file=sys.stderr)
    print("error: launcher could not " + stage + " (" + str(exc) + ")", file=sys.stderr)
    sys.exit(cfg["oom_exit"] if oom else 127)
"""


def _physical_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _proc_status(pid: int, launcher: bytes) -> dict[str, int]:
    """VmHWM / VmPeak of a live process in bytes; empty once it is gone or while it is still the launcher.

    Both are per address space, and ``exec`` makes a new one: figures read before the launcher has
    exec'd would be the launcher's, not the runtime's.
    """
    try:
        if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(launcher):
            return {}
    except OSError:
        return {}
    out = {}
    for line in _read(Path(f"/proc/{pid}/status")).splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmPeak", "VmRSS"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


def _oom_report(stderr: str) -> dict | None:
    """The runtime's (or launcher's) structured out-of-memory line, parsed; None when there is none."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(OOM_MARKER):
            try:
                data = json.loads(line[len(OOM_MARKER) :])
            except ValueError:
                return {"detail": line[len(OOM_MARKER) :].strip()}
            return data if isinstance(data, dict) else None
    return None


@dataclass
class CappedRun:
    """A finished capped child: exit status, output, and whether it ran out of memory (with evidence)."""

    rc: int
    stdout: str
    stderr: str
    out_of_memory: dict | None = None  # {evidence, detail, stage, ...} when the child did not fit


class CappedLaunch:
    """One capped run: CPUs picked and the cap mechanism chosen up front, so the plan can take the threads."""

    def __init__(self, caps: Caps) -> None:
        self.caps = caps
        self.cpus, note = pick_cpus(caps.cores)
        self.notes = [note] if note else []
        ram = _physical_ram_bytes()
        if caps.mem_cap_bytes is not None and ram and caps.mem_cap_bytes > ram:
            self.notes.append(
                f"the cap {format_bytes(caps.mem_cap_bytes)} exceeds this machine's RAM {format_bytes(ram)}: "
                "running out of memory here says little about the device"
            )
        self.mechanism: str | None = None
        self.fallback_reason = ""
        self.record: dict[str, Any] = {}
        if caps.mem_cap_bytes is not None:
            self.mechanism = "rlimit-as" if caps.mechanism == "rlimit-as" else "cgroup-v2"
        self._polled: dict[str, int] = {}

    def plan(self, plan: Plan) -> Plan:
        """``plan`` with threads = the pinned core count, unless it names its own threads."""
        if plan.threads is None:
            return dataclasses.replace(plan, threads=len(self.cpus))
        if plan.threads != len(self.cpus):
            self.notes.append(f"threads={plan.threads} as the plan asked, on {len(self.cpus)} pinned cpus")
        return plan

    def describe(self) -> str:
        """One phrase for error messages: what the run was capped to."""
        mem = (
            f"memory cap {format_bytes(self.caps.mem_cap_bytes)} ({self.mechanism})"
            if self.mechanism
            else "no memory cap"
        )
        return f"emulated run: {mem}, cpus {self.cpus}"

    def _open_cgroup(self) -> CgroupV2 | None:
        if self.mechanism != "cgroup-v2":
            return None
        group, why = CgroupV2.create(self.caps.mem_cap_bytes)
        if group is None:
            if self.caps.mechanism == "cgroup-v2":
                raise DeviceError(f"cannot cap memory with cgroup v2 here: {why}; use mechanism 'rlimit-as' or 'auto'")
            log.info("cgroup v2 unavailable (%s); capping address space with RLIMIT_AS", why)
            self.mechanism, self.fallback_reason = "rlimit-as", why
        return group

    def run(
        self, argv: Sequence[str], *, cwd: str | os.PathLike, env: Mapping[str, str], timeout_s: float | None = None
    ) -> CappedRun:
        """Run ``argv`` (argv[0] a Python interpreter) capped; classify how it ended."""
        args = check_argv(argv)
        group = self._open_cgroup()
        cfg = {
            "cpus": self.cpus,
            "cgroup_procs": group.procs_file if group else None,
            "rlimit_as": self.caps.mem_cap_bytes if self.mechanism == "rlimit-as" else None,
            "marker": OOM_MARKER,
            "oom_exit": OOM_EXIT_CODE,
        }
        # ggml's abort attaches gdb for a backtrace: under a memory cap that only fails noisily
        env = {"GGML_NO_BACKTRACE": "1", **env} if self.mechanism else dict(env)
        try:
            rc, stdout, stderr = self._spawn([args[0], "-c", _LAUNCHER, json.dumps(cfg), *args], cwd, env, timeout_s)
            events = group.events() if group else {}
            cgroup_peak = group.peak_bytes() if group else None
        finally:
            if group is not None:
                group.remove()
        self._fill_record(events, cgroup_peak)
        return CappedRun(rc, stdout, stderr, self._classify(rc, stderr, events))

    def _spawn(
        self, argv: list[str], cwd: str | os.PathLike, env: Mapping[str, str], timeout_s: float | None
    ) -> tuple[int, str, str]:
        """Start ``argv``, poll its VmHWM/VmPeak until it exits; (rc, stdout, stderr)."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(  # argv list, no shell
                    argv, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                raise DeviceError(
                    f"cannot run {argv[0]!r} on the local device ({exc.strerror}); check the executable"
                ) from None
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            launcher = "\0".join(argv[:3]).encode()
            status = None
            while status is None:
                polled = _proc_status(proc.pid, launcher)
                self._polled.update({k: max(v, self._polled.get(k, 0)) for k, v in polled.items()})
                pid, wstatus = os.waitpid(proc.pid, os.WNOHANG)
                if pid:
                    status = wstatus
                elif deadline is not None and time.monotonic() > deadline:
                    _kill_group(proc.pid)
                    os.waitpid(proc.pid, 0)
                    proc.returncode = -signal.SIGKILL
                    raise DeviceError(
                        f"command {argv[4:7]}... timed out after {timeout_s} s on the local device; "
                        "raise the timeout or shrink the plan"
                    )
                else:
                    time.sleep(_POLL_S)
            proc.returncode = rc = _exit_code(status)
            _kill_group(proc.pid)  # nothing the child started outlives it
            out.seek(0)
            err.seek(0)
            return rc, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")

    def _fill_record(self, events: dict[str, int], cgroup_peak: int | None) -> None:
        counts = {
            "cgroup-v2": "resident memory + page cache of the child's cgroup (memory.max), no swap",
            "rlimit-as": f"virtual address space of the child (RLIMIT_AS): {AS_OVERHEAD_NOTE}",
            None: "not capped",
        }[self.mechanism]
        self.record = {
            "profile": self.caps.profile,
            "mechanism": self.mechanism,
            "mem_cap_bytes": self.caps.mem_cap_bytes,
            "mem_cap_counts": counts,
            "cpus": self.cpus,
            "cores_requested": self.caps.cores,
            "cores_pinned": len(self.cpus),
            "notes": list(self.notes),
            "fallback_reason": self.fallback_reason,
            "peak_rss_polled_bytes": self._polled.get("VmHWM"),
            "peak_vm_polled_bytes": self._polled.get("VmPeak"),
            "cgroup_memory_peak_bytes": cgroup_peak,
            "cgroup_memory_events": events or None,
        }

    def _classify(self, rc: int, stderr: str, events: dict[str, int]) -> dict | None:
        """Evidence that the child ran out of memory, or None (it fit, or it failed for another reason)."""
        if rc == 0 or self.mechanism is None:
            return None
        report = _oom_report(stderr) if rc == OOM_EXIT_CODE else None
        if events.get("oom_kill", 0) > 0:
            evidence = f"cgroup memory.events oom_kill={events['oom_kill']}"
        elif report is not None:
            evidence = "the runtime reported an allocation failure"
        elif rc == -signal.SIGKILL:
            evidence = "killed by SIGKILL (the kernel's out-of-memory killer)"
        elif CHILD_ALLOC_FAILURE.search(stderr):
            evidence = f"allocation failure in the child's stderr (exit {rc})"
        else:
            return None
        report = report or {}
        lines = [ln.strip() for ln in stderr.splitlines() if CHILD_ALLOC_FAILURE.search(ln)]
        line = lines[-1] if lines else last_line(stderr)
        return {
            "evidence": evidence,
            "stage": report.get("stage"),
            "detail": (report.get("detail") or (line[len("error: ") :] if line.startswith("error: ") else line))[:300],
            "child_vm_hwm_bytes": report.get("vm_hwm_bytes"),
            "child_vm_peak_bytes": report.get("vm_peak_bytes"),
        }


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# -- the "does not fit" result ---------------------------------------------------------------------------


def peak_rss_reached(record: dict, oom: dict) -> tuple[int | None, str]:
    """The best peak-RSS figure of a run that did not fit, and where it came from."""
    for value, source in (
        (record.get("cgroup_memory_peak_bytes"), "cgroup memory.peak"),
        (oom.get("child_vm_hwm_bytes"), "VmHWM reported by the runtime"),
        (record.get("peak_rss_polled_bytes"), "VmHWM polled by the host (a lower bound)"),
    ):
        if value:
            return int(value), source
    return None, "not captured (the child ended before it could be read)"


def does_not_fit_result(manifest: Path, plan: Plan, record: dict, oom: dict) -> dict:
    """The bench result of a capped run that ran out of memory: status, numbers, no measurements."""
    from edgeq.export.manifest import load_manifest

    artifact = artifact_summary(load_manifest(manifest, verify=False))
    peak, source = peak_rss_reached(record, oom)
    numbers = {
        "profile": record.get("profile"),
        "mechanism": record.get("mechanism"),
        "mem_cap_bytes": record.get("mem_cap_bytes"),
        "weight_bytes": artifact.get("weight_bytes"),
        "peak_rss_bytes": peak,
        "peak_rss_source": source,
        "peak_vm_bytes": oom.get("child_vm_peak_bytes") or record.get("peak_vm_polled_bytes"),
        **{k: oom.get(k) for k in ("evidence", "stage", "detail")},
    }
    who = f"profile {numbers['profile']}, " if numbers["profile"] else ""
    reached = f"peak RSS reached {format_bytes(peak)}" if peak else "peak RSS not captured"
    message = (
        f"{DOES_NOT_FIT}: {who}cap {format_bytes(numbers['mem_cap_bytes'])} ({numbers['mechanism']}); "
        f"weights {format_bytes(numbers['weight_bytes'])}; {reached}"
        + (f" while in {numbers['stage']}" if numbers["stage"] else "")
        + f"; {numbers['evidence']}"
    )
    return {
        "schema": RESULT_SCHEMA,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": DOES_NOT_FIT,
        "message": message,
        "artifact": artifact,
        "plan": plan.to_dict(),
        "does_not_fit": numbers,
        "memory": {"peak_rss_mb": peak / MIB if peak else None},
        "caps": record,
    }
