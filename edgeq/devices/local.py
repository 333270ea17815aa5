"""The local device: this machine, through the same ``Transport`` protocol as ssh and adb.

``LocalTransport`` gives a bench a private temporary work dir; ``run`` starts a subprocess from an argv
list (never a shell). ``bench_local`` runs ``python -m edgeq.runtime`` in a separate process, so the
measured process holds only the runtime (no host-side libraries, no torch) and its peak RSS is the
artifact's, not the host's. The artifact is not copied: a local device reads it where it lies. With
``caps`` (``edgeq.devices.caps``) that process runs under a memory cap on pinned cores, and running out
of memory there is a result with status "does not fit", not an error.

torch-free: importing this module must not pull torch or transformers in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import edgeq
from edgeq.devices.transport import RunResult, check_argv, check_remote, last_line
from edgeq.errors import DeviceError
from edgeq.runtime.plan import Plan

if TYPE_CHECKING:
    from edgeq.devices.caps import Caps

log = logging.getLogger(__name__)

#: Where the running edgeq package lives; put first on the child's PYTHONPATH so it runs the same code.
EDGEQ_SOURCE_ROOT = Path(edgeq.__file__).resolve().parent.parent


class LocalTransport:
    """A transport onto this machine. ``workdir``: a dir to use (kept by ``cleanup``) or None (a temp
    dir that ``cleanup`` removes). ``env`` entries override the inherited environment of commands."""

    name = "local"

    def __init__(self, workdir: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> None:
        self._owned = workdir is None
        self._workdir = Path(tempfile.mkdtemp(prefix="edgeq-local-") if workdir is None else workdir).resolve()
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._env = {**os.environ, **(env or {})}
        self._closed = False

    @property
    def workdir(self) -> str:
        return str(self._workdir)

    def _path(self, remote: str) -> Path:
        if self._closed:
            raise DeviceError(f"local transport {self.workdir!r} was cleaned up; open a new LocalTransport")
        return self._workdir / check_remote(remote)

    def push(self, local: str | os.PathLike, remote: str) -> str:
        src, dst = Path(local), self._path(remote)
        if not src.exists():
            raise DeviceError(f"cannot push {str(src)!r}: no such file or directory; check the path")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
        return str(dst)

    def pull(self, remote: str, local: str | os.PathLike) -> str:
        src, dst = self._path(remote), Path(local)
        if not src.exists():
            raise DeviceError(
                f"cannot pull {remote!r}: it does not exist in {self.workdir!r}; did the command write it?"
            )
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
        return str(dst)

    def run(self, argv: Sequence[str], timeout: float | None = None) -> RunResult:
        args = check_argv(argv)
        if self._closed:
            raise DeviceError(f"local transport {self.workdir!r} was cleaned up; open a new LocalTransport")
        log.debug("local run: %s", args)
        try:
            proc = subprocess.run(  # argv list, no shell
                args,
                cwd=self._workdir,
                env=self._env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise DeviceError(
                f"command {args[:3]}... timed out after {timeout} s on the local device; raise the timeout or shrink the plan"
            ) from None
        except OSError as exc:
            raise DeviceError(
                f"cannot run {args[0]!r} on the local device ({exc.strerror}); check the executable"
            ) from None
        return RunResult(proc.returncode, proc.stdout, proc.stderr)

    def cleanup(self) -> None:
        if self._owned and not self._closed:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> LocalTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _absolute_plan(plan: Plan) -> Plan:
    """The runtime runs in the transport's work dir: make the plan's local paths absolute."""
    if plan.eval_text is None:
        return plan
    return dataclasses.replace(plan, eval_text=str(Path(plan.eval_text).resolve()))


def _failure(rc: int, stderr: str) -> DeviceError:
    line = last_line(stderr)
    if line.startswith("error: "):
        line = line[len("error: ") :]
    if rc < 0:
        why = f"killed by signal {-rc}" + (" (out of memory?)" if rc == -9 else "")
        return DeviceError(f"edgeq.runtime was {why} on the local device; last stderr line: {line or '(none)'}")
    return DeviceError(f"edgeq.runtime failed on the local device (exit {rc}): {line or '(no stderr)'}")


def bench_local(
    manifest_path: str | os.PathLike,
    plan: Plan,
    python: str = sys.executable,
    timeout_s: float | None = None,
    caps: Caps | None = None,
) -> dict:
    """Run ``python -m edgeq.runtime`` on ``manifest_path`` in a separate process; the parsed result.

    A failing runtime raises ``DeviceError`` carrying the runtime's last stderr line (its one-line error).
    ``caps``: run it under a memory cap / on pinned cores; the result then has ``caps`` (what applied),
    and a run that ran out of memory returns a ``status: "does not fit"`` result instead of raising.
    """
    manifest = Path(manifest_path).resolve()
    pythonpath = os.pathsep.join(p for p in (str(EDGEQ_SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p)
    launch = None
    if caps is not None:
        from edgeq.devices.caps import CappedLaunch

        launch = CappedLaunch(caps)
        plan = launch.plan(plan)
    with LocalTransport(env={"PYTHONPATH": pythonpath}) as transport, tempfile.TemporaryDirectory() as tmp:
        transport.push(_absolute_plan(plan).save(Path(tmp) / "plan.json"), "plan.json")
        argv = [python, "-m", "edgeq.runtime", str(manifest), "--plan", "plan.json", "--out", "result.json"]
        if launch is None:
            rc, _stdout, stderr = transport.run(argv, timeout=timeout_s)
        else:
            env = {**os.environ, "PYTHONPATH": pythonpath}
            capped = launch.run(argv, cwd=transport.workdir, env=env, timeout_s=timeout_s)
            rc, stderr = capped.rc, capped.stderr
            if capped.out_of_memory is not None:
                from edgeq.devices.caps import does_not_fit_result

                return does_not_fit_result(manifest, plan, launch.record, capped.out_of_memory)
        if stderr.strip():
            log.debug("edgeq.runtime stderr:\n%s", stderr.rstrip())
        if rc != 0:
            exc = _failure(rc, stderr)
            raise exc if launch is None else DeviceError(f"{exc} [{launch.describe()}]")
        result_file = Path(transport.pull("result.json", Path(tmp) / "result.json"))
        try:
            result = json.loads(result_file.read_text())
        except ValueError as exc:
            raise DeviceError(f"edgeq.runtime wrote an unreadable result ({exc}); this is a bug: report it") from None
        if launch is not None:
            result["status"] = "ok"
            result["caps"] = launch.record
        return result
