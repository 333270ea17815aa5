"""The Python API: one function per stage, over the stages' frozen config dataclasses.

    import edgeq
    run = edgeq.compress("path/to/model", edgeq.CompressConfig(bits=4, group_size=32), "runs/w4")
    man = edgeq.export(run, edgeq.ExportConfig(format="gguf", type="q4_0"), "model.q4_0.gguf")
    result = edgeq.bench(man.path, edgeq.BenchConfig(repeat=3))
    edgeq.report([result], "report/")

The CLI (``edgeq.cli``) is a thin layer over these functions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edgeq.config import BenchConfig, CompressConfig, ExportConfig

if TYPE_CHECKING:
    from edgeq.devices.caps import Caps


def compress(model: str | os.PathLike, config: CompressConfig, out: str | os.PathLike, resume: bool = False) -> Path:
    """Quantize ``model`` into the run dir ``out`` (integer codes, fp16 scales, integer zeros)."""
    from edgeq.compress.run import compress as _compress

    return _compress(model, config, out, resume=resume)


def export(source: str | os.PathLike, config: ExportConfig, out: str | os.PathLike, recipe: dict | None = None):
    """Export a run dir or model dir; returns the artifact's ``Manifest`` (with parity)."""
    from edgeq.export.api import export as _export

    return _export(source, config, out, recipe)


def bench(
    artifact: str | os.PathLike | Sequence[str | os.PathLike],
    config: BenchConfig | None = None,
    eval_text: str | os.PathLike | None = None,
    device: str | os.PathLike = "local",
    *,
    host: str | None = None,
    port: int | None = None,
    identity: str | os.PathLike | None = None,
    known_hosts: str | os.PathLike | None = None,
    serial: str | None = None,
    results_dir: str | os.PathLike | None = None,
    resume: bool = True,
    timeout_s: float | None = None,
    caps: Caps | None = None,
) -> dict | list[dict]:
    """Measure an artifact (or a list of them: then a list of results) on a device; the runtime's result.

    ``device``: a profile name (``local``, ``jetson-orin-nano``, ...) or a profile ``.toml`` file. Locally
    the runtime runs in a separate process; on a remote device (``host``/``port``/``identity``/
    ``known_hosts`` for ssh, ``serial`` for adb) each result is kept in ``results_dir`` (default: a temp
    dir) and a rerun with the same one skips it (``resume=False``: measure again). ``eval_text`` (or
    ``config.eval_text``) is the perplexity text; default: the held-out stdlib text. ``caps``
    (``edgeq.devices.caps.Caps``, e.g. from ``caps_for(profile, emulate=True)``): run here, emulating
    the device under a memory cap on pinned cores; a run out of memory is a "does not fit" result.
    """
    import sys
    import tempfile

    from edgeq.devices.profile import load_profile
    from edgeq.runtime.plan import Plan

    single = isinstance(artifact, (str, os.PathLike))
    artifacts = [artifact] if single else list(artifact)
    config = config or BenchConfig()
    profile = load_profile(device)
    connection = {"host": host, "port": port, "identity": identity, "known_hosts": known_hosts, "serial": serial}
    with tempfile.TemporaryDirectory(prefix="edgeq-bench-") as tmp:
        text = eval_text or config.eval_text
        if text is None:
            from edgeq.pipeline import write_eval_text

            text = write_eval_text(Path(tmp), config)
        if (profile.transport == "local" and profile.has_python) or caps is not None:
            from edgeq.devices.local import bench_local
            from edgeq.errors import ConfigError
            from edgeq.export.manifest import manifest_path_for

            given = ", ".join("--" + k.replace("_", "-") for k, v in connection.items() if v is not None)
            if given:
                raise ConfigError(f"{given}: for remote devices only; profile {profile.name!r} is this machine")
            plan, python = Plan.from_bench_config(config, str(text)), profile.python or sys.executable
            if profile.transport != "local":  # emulated here: the device's interpreter is not this one's
                python = sys.executable
            results = [bench_local(manifest_path_for(a), plan, python, timeout_s, caps) for a in artifacts]
            if caps is not None:
                for r in results:
                    r["device"] = {**profile.to_dict(), "target": "local emulation", "transport": "local"}
        else:
            from edgeq.devices.remote import bench_on_device

            plan = Plan.from_bench_config(config, None)
            out = Path(results_dir) if results_dir is not None else Path(tmp) / "results"
            results = bench_on_device(
                profile, artifacts, plan, out, eval_text=text, timeout_s=timeout_s, resume=resume, **connection
            )
    return results[0] if single else results


def report(results: list[dict], out: str | os.PathLike) -> dict[str, Path]:
    """Markdown, JSON and CSV tables and a Pareto plot of runtime results."""
    from edgeq.report.write import write_report

    return write_report(results, Path(out))
