"""The remote bench driver: measure artifacts on a device over any ``Transport`` (ssh, adb), resumably.

For each artifact the host pushes the manifest and the files it names (nothing else of the artifact
dir), runs ``PYTHON -m edgeq.runtime`` in the device's temp dir, pulls ``result.json`` back and
removes the artifact from the device before the next one. The plan and the eval text are pushed once.

Resumable per artifact: each pulled result is written to the host's ``results_dir`` under a key made of
the manifest's sha256, the plan (with the eval text's sha256 in place of its path), the device target
and the interpreter; a rerun with the same inputs keeps those results and measures only the rest, and
connects to nothing when all are kept. When the connection drops mid-way, the results measured so far
stay in ``results_dir`` and a one-line ``DeviceError`` says so. A temp dir that could not be removed
because the link was gone is recorded there too, and removed by the next bench to the same target.

A profile with ``has_python = false`` and a ``llama_bin_dir`` is measured with llama.cpp's own tools
instead (``edgeq.runtime.backends.native``): the same push, resume and cleanup, with ``llama-bench`` /
``llama-perplexity`` run in place of the runtime and their output turned into a result of the same schema.

Each result is the runtime's result plus ``device`` (the profile's figures and the target) and
``resume_key``; ``artifact.path`` is the host's manifest path (``artifact.device_path``: the device's).

torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgeq.devices.profile import DeviceProfile
from edgeq.devices.transport import Transport, check_remote, last_line
from edgeq.errors import ConfigError, DeviceError
from edgeq.export.manifest import load_manifest, manifest_path_for
from edgeq.runtime.backends.native import NativeTools, measure_native
from edgeq.runtime.plan import Plan

log = logging.getLogger(__name__)

LEFTOVERS = "leftover-workdirs.json"  # in results_dir: temp dirs a dropped connection left on devices
DEVICE_EVAL_TEXT = "eval.txt"
DEVICE_PLAN = "plan.json"


def open_transport(
    profile: DeviceProfile,
    *,
    host: str | None = None,
    port: int | None = None,
    identity: str | os.PathLike | None = None,
    known_hosts: str | os.PathLike | None = None,
    serial: str | None = None,
) -> Transport:
    """The transport a remote ``profile`` names; command-line values override the profile's."""
    ssh_given = [n for n, v in (("--host", host), ("--port", port), ("--identity", identity)) if v is not None]
    if profile.transport == "ssh":
        if serial is not None:
            raise ConfigError(f"--serial applies to adb devices; profile {profile.name!r} is reached over ssh")
        from edgeq.devices.ssh import SshTransport

        host = host or profile.host
        if not host:
            raise ConfigError(
                f"profile {profile.name!r} is reached over ssh and names no host; pass --host user@address"
            )
        return SshTransport(
            host,
            port=port or profile.port,
            identity=identity or profile.identity,
            known_hosts=known_hosts or profile.known_hosts,
            base_dir=profile.workdir or "/tmp",
            connect_timeout_s=profile.connect_timeout_s,
        )
    if ssh_given or known_hosts is not None:
        raise ConfigError(
            f"{', '.join(ssh_given) or '--known-hosts'} applies to ssh devices; "
            f"profile {profile.name!r} is reached over {profile.transport}"
        )
    if profile.transport == "adb":
        from edgeq.devices.adb import AdbTransport

        return AdbTransport(serial or profile.serial, base_dir=profile.workdir or "/data/local/tmp")
    from edgeq.devices.local import LocalTransport  # this machine without Python: the native tools

    return LocalTransport()


# -- the resume key and the results dir ----------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resume_key(manifest_sha256: str, plan: Plan, eval_sha256: str | None, target: str, python: str) -> str:
    """The identity of one measurement: same artifact, plan, eval text, device and interpreter."""
    plan_dict = {**plan.to_dict(), "eval_text": eval_sha256}
    blob = json.dumps([manifest_sha256, plan_dict, target, python], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def result_name(manifest: Path, key: str) -> str:
    """A file name for a kept result: readable, safe, unique per key."""
    stem = manifest.parent.name if manifest.name == "manifest.json" else manifest.name.removesuffix(".manifest.json")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:60] or "artifact"
    return f"{slug}-{key[:16]}.json"


def _load_kept(manifest: Path, path: Path, key: str, target: str) -> dict | None:
    """The result kept at ``path`` for ``key`` (with the manifest's current host path), or None."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("kept result %s is unreadable (%s); measuring again", path, exc)
        return None
    if not isinstance(data, dict) or data.get("resume_key") != key or not isinstance(data.get("artifact"), dict):
        return None
    log.info("%s: kept the result measured before on %s (%s)", manifest.name, target, path)
    data["artifact"]["path"] = str(manifest)
    return data


def _write_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _leftovers(results_dir: Path) -> list[dict]:
    try:
        data = json.loads((results_dir / LEFTOVERS).read_text())
    except (OSError, ValueError):
        return []
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def _save_leftovers(results_dir: Path, entries: list[dict]) -> None:
    if entries:
        _write_atomic(results_dir / LEFTOVERS, entries)
    else:
        (results_dir / LEFTOVERS).unlink(missing_ok=True)


def _remove_leftovers(transport: Transport, target: str, results_dir: Path) -> None:
    """Remove temp dirs an earlier, interrupted bench left on this device."""
    entries = _leftovers(results_dir)
    remove = getattr(transport, "remove_stale_workdir", None)
    if remove is None or not any(e.get("target") == target for e in entries):
        return
    kept = [e for e in entries if e.get("target") != target or not remove(str(e.get("workdir")))]
    _save_leftovers(results_dir, kept)


def _cleanup(transport: Transport, target: str, results_dir: Path) -> None:
    """``transport.cleanup()``; when the device is gone, record its temp dir for the next bench."""
    try:
        transport.cleanup()
    except DeviceError as exc:
        left = getattr(transport, "leftover_workdir", None)
        log.warning("%s; the next bench to %s with this results dir removes it", exc, target)
        if left:
            _save_leftovers(results_dir, [*_leftovers(results_dir), {"target": target, "workdir": left}])


# -- one artifact --------------------------------------------------------------------------------------


def runtime_failure(target: str, rc: int, stderr: str) -> DeviceError:
    """The ``DeviceError`` for a failed ``edgeq.runtime`` run on the device, with its one-line error."""
    line = last_line(stderr)
    line = line[len("error: ") :] if line.startswith("error: ") else line
    hint = ""
    if "No module named" in stderr and "edgeq" in stderr:
        hint = "; install edgeq's base package on the device (pip install edgeq) for the profile's python"
    elif rc == 127:
        hint = "; the device has no such interpreter: set python in the device profile"
    return DeviceError(f"edgeq.runtime failed on {target} (exit {rc}): {line or '(no stderr)'}{hint}")


def _push_artifact(transport: Transport, manifest: Path, remote_dir: str) -> str:
    """Push the manifest and the files it names under ``remote_dir``; the manifest's device path."""
    man = load_manifest(manifest, verify=False)  # the device verifies the hashes
    transport.push(manifest, f"{remote_dir}/{manifest.name}")
    for entry in man.files:
        rel = check_remote(entry.path)
        transport.push(manifest.parent / entry.path, f"{remote_dir}/{rel}")
    return f"{remote_dir}/{manifest.name}"


def _measure_one(
    transport: Transport, target: str, manifest: Path, remote_dir: str, python: str, timeout_s: float | None
) -> dict:
    """Push one artifact, run the runtime on it, pull its result; the result with host-side paths."""
    remote_manifest = _push_artifact(transport, manifest, remote_dir)
    argv = [python, "-m", "edgeq.runtime", remote_manifest, "--plan", DEVICE_PLAN, "--out", f"{remote_dir}/result.json"]
    rc, _stdout, stderr = transport.run(argv, timeout=timeout_s)
    if stderr.strip():
        log.debug("edgeq.runtime stderr on %s:\n%s", target, stderr.rstrip())
    if rc != 0:
        raise runtime_failure(target, rc, stderr)
    with tempfile.TemporaryDirectory(prefix="edgeq-pull-") as tmp:
        local = Path(transport.pull(f"{remote_dir}/result.json", Path(tmp) / "result.json"))
        try:
            result = json.loads(local.read_text())
        except ValueError as exc:
            raise DeviceError(
                f"edgeq.runtime on {target} wrote an unreadable result ({exc}); rerun the bench"
            ) from None
    result["artifact"]["device_path"] = result["artifact"].get("path")
    result["artifact"]["path"] = str(manifest)
    return result


def _measure_one_native(
    transport: Transport,
    manifest: Path,
    remote_dir: str,
    plan: Plan,
    native: NativeTools,
    eval_identity: dict | None,
    device: Mapping[str, Any] | None,
    timeout_s: float | None,
) -> dict:
    """Push one artifact and measure it with llama.cpp's tools on the device; the result, host paths."""
    remote_manifest = _push_artifact(transport, manifest, remote_dir)
    result = measure_native(
        transport, load_manifest(manifest, verify=False), remote_manifest, plan, native,
        eval_text=DEVICE_EVAL_TEXT if eval_identity else None, eval_identity=eval_identity,
        bandwidth_gb_per_s=(device or {}).get("memory_bandwidth_gb_per_s"), timeout_s=timeout_s,
    )  # fmt: skip
    result["artifact"]["device_path"] = remote_manifest
    result["artifact"]["path"] = str(manifest)
    return result


# -- the driver ----------------------------------------------------------------------------------------


def _with_kept(exc: DeviceError, results: Sequence[dict | None], results_dir: Path) -> DeviceError:
    """``exc``, saying how many results are kept when some are (the error stays one line)."""
    done = sum(r is not None for r in results)
    if not done:
        return exc
    return DeviceError(
        f"{exc} [{done} of {len(results)} artifact(s) measured and kept in {str(results_dir)!r}; "
        "a rerun with the same results dir skips them]"
    )


def _eval_identity(path: Path, sha256: str | None) -> dict:
    chars = len(path.read_bytes().decode("utf-8", errors="replace"))
    return {"eval_text": DEVICE_EVAL_TEXT, "eval_text_sha256": sha256, "eval_text_chars": chars}


def bench_remote(
    transport: Transport,
    artifacts: Sequence[str | os.PathLike],
    plan: Plan,
    results_dir: str | os.PathLike,
    *,
    eval_text: str | os.PathLike | None = None,
    python: str = "python3",
    device: Mapping[str, Any] | None = None,
    timeout_s: float | None = None,
    resume: bool = True,
    on_result: Callable[[int, dict], None] | None = None,
    native: NativeTools | None = None,
) -> list[dict]:
    """Measure ``artifacts`` on the transport's device under ``plan``; their results, in order.

    ``eval_text``: a host file pushed as the perplexity text (``plan.eval_text`` is ignored).
    ``device``: extra identity recorded in each result (the profile). ``resume=False`` measures again
    what ``results_dir`` already holds. ``on_result(i, result)`` runs after each measured artifact.
    ``native``: measure with llama.cpp's tools there instead of ``python -m edgeq.runtime`` (``python``
    is then unused).
    The transport is cleaned up before returning (or raising).
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    manifests = [manifest_path_for(a).resolve() for a in artifacts]
    target = str(getattr(transport, "target", transport.name))
    device_plan = dataclasses.replace(plan, eval_text=DEVICE_EVAL_TEXT if eval_text is not None else None)
    eval_sha = _sha256(Path(eval_text)) if eval_text is not None else None
    runner = python if native is None else f"llama.cpp-native:{native.bin_dir}"
    keys = [resume_key(_sha256(m), device_plan, eval_sha, target, runner) for m in manifests]
    paths = [results_dir / result_name(m, k) for m, k in zip(manifests, keys, strict=True)]
    results = [_load_kept(m, p, k, target) if resume else None for m, p, k in zip(manifests, paths, keys, strict=True)]
    todo = [i for i, r in enumerate(results) if r is None]
    if not todo:
        transport.cleanup()  # nothing was opened on the device: this only releases local state
        return [r for r in results if r is not None]
    try:
        _remove_leftovers(transport, target, results_dir)
        with tempfile.TemporaryDirectory(prefix="edgeq-plan-") as tmp:
            transport.push(device_plan.save(Path(tmp) / DEVICE_PLAN), DEVICE_PLAN)
        if eval_text is not None:
            transport.push(eval_text, DEVICE_EVAL_TEXT)
        for n, i in enumerate(todo):
            log.info("measuring %s on %s (%d/%d)", manifests[i].name, target, n + 1, len(todo))
            if native is None:
                result = _measure_one(transport, target, manifests[i], f"a{i}", python, timeout_s)
            else:
                identity = _eval_identity(Path(eval_text), eval_sha) if eval_text is not None else None
                result = _measure_one_native(
                    transport, manifests[i], f"a{i}", device_plan, native, identity, device, timeout_s
                )
            result["device"] = {**(device or {}), "target": target, "transport": transport.name}
            result["resume_key"] = keys[i]
            _write_atomic(paths[i], result)  # kept before anything else can fail
            results[i] = result
            if on_result is not None:
                on_result(i, result)
            if n + 1 < len(todo):
                transport.run(["rm", "-rf", f"a{i}"])  # free the device's storage for the next artifact
    except DeviceError as exc:
        raise _with_kept(exc, results, results_dir) from None
    finally:
        _cleanup(transport, target, results_dir)
    return [r for r in results if r is not None]


def bench_on_device(
    profile: DeviceProfile,
    artifacts: Sequence[str | os.PathLike],
    plan: Plan,
    results_dir: str | os.PathLike,
    *,
    eval_text: str | os.PathLike | None = None,
    timeout_s: float | None = None,
    resume: bool = True,
    **connection: Any,
) -> list[dict]:
    """``bench_remote`` on the device ``profile`` names; ``connection``: host, port, identity, known_hosts, serial.

    A profile without Python is measured with llama.cpp's tools in its ``llama_bin_dir``.
    """
    if not profile.has_python and profile.llama_bin_dir is None:
        raise DeviceError(
            f"profile {profile.name!r} has no Python (has_python = false), so edgeq.runtime cannot run there; "
            "push llama.cpp's llama-bench and llama-perplexity to the device and set llama_bin_dir to their "
            "directory in a copy of the profile, or install Python and edgeq's base package there and set "
            "has_python = true"
        )
    native = None if profile.has_python else NativeTools(profile.llama_bin_dir)
    transport = open_transport(profile, **connection)
    return bench_remote(
        transport,
        artifacts,
        plan,
        results_dir,
        eval_text=eval_text,
        python=profile.remote_python,
        device=profile.to_dict(),
        timeout_s=timeout_s,
        resume=resume,
        native=native,
    )
