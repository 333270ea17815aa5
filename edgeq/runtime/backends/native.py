"""llama.cpp's own tools for devices without Python: run ``llama-bench`` / ``llama-perplexity``, parse them.

A phone reached over adb (``has_python = false``) cannot run ``python -m edgeq.runtime``, but it runs
llama.cpp's command-line tools built for it. This module is that path's host side:

* parsers of the tools' real output (fixtures in ``tests/data/native``): ``parse_llama_bench`` (the
  default markdown table, ``-o json``, ``-o jsonl``, ``-o csv``), ``parse_llama_perplexity`` (stdout and
  stderr), ``parse_version`` (``--version``) and ``parse_peak_rss`` (GNU ``time -v``), each refusing output
  it cannot read with one line;
* ``NativeTools``: the argv lists (lists, never shell strings: a remote transport quotes every word);
* ``measure_native``: runs them through a ``Transport`` on an artifact already pushed to the device and
  returns a result in the runtime's schema (``edgeq.result/1``). What the tools cannot measure is ``None``
  and named, with the reason, in the result's ``not_available``.

How the numbers relate to the Python harness's (``edgeq.runtime.metrics``):

* decode tokens/s is llama-bench's ``tg N`` test: N single-token decodes of random tokens from an empty KV
  cache, logits not read back; its mean and sample stdev over the ``-r`` repetitions, as the harness
  reports the mean over its repeats. The harness decodes after a real prompt of ``prompt_tokens``.
* prompt tokens/s is ``pp N``: one batch of N random tokens. There is no time to first token.
* perplexity: llama-perplexity cuts the text (BOS first when the vocab adds one) into ``ctx``-token
  chunks and scores only the second half of each, so it is *not* comparable with the harness's
  perplexity; the result says ``protocol: "llama-perplexity"``. Its ``+/-`` is the standard error of the
  mean token NLL times the perplexity.
* peak RSS comes from GNU ``time -v`` when the device has it (the whole llama-bench process, all tests).
* the roofline fraction is relative to the *profile's theoretical* bandwidth (no probe runs without
  Python), where the harness uses a measured copy bandwidth.

llama-perplexity prints through llama.cpp's common logger, whose worker thread the tool does not drain
before exiting (``common_log_main`` in ``common/log.cpp``): its last lines, the final estimate included,
are now and then lost while the exit status is still 0. ``measure_native`` reruns it (``attempts``).

torch-free (device side of the package, like the other backends); it runs on the host.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from edgeq.devices.transport import Transport, last_line
from edgeq.errors import ArtifactError, BackendError, DeviceError

if TYPE_CHECKING:
    from edgeq.export.manifest import Manifest
    from edgeq.runtime.plan import Plan

log = logging.getLogger(__name__)

LLAMA_BENCH = "llama-bench"
LLAMA_PERPLEXITY = "llama-perplexity"
GNU_TIME = "/usr/bin/time"
PERPLEXITY_ATTEMPTS = 4
_MIB = 2**20


class TruncatedOutput(BackendError):
    """llama-perplexity exited before printing its final estimate (its logger dropped the last lines)."""


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0][:120] + ("..." if len(lines[0]) > 120 else "")) if lines else "(empty)"


# -- llama-bench ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchTest:
    """One llama-bench test: ``pp{n_prompt}``, ``tg{n_gen}`` or ``pp+tg``, after ``n_depth`` cached tokens."""

    n_prompt: int
    n_gen: int
    n_depth: int
    tokens_per_s: float  # llama-bench's avg_ts: mean over repetitions of tokens / seconds
    tokens_per_s_stddev: float  # sample stdev over repetitions
    n_threads: int | None = None
    samples_tokens_per_s: tuple[float, ...] = ()  # per repetition (json/jsonl only)
    samples_ns: tuple[int, ...] = ()  # per repetition, nanoseconds (json/jsonl only)
    model_type: str | None = None  # e.g. "llama ?B Q4_0"
    model_size_bytes: int | None = None  # exact in json/jsonl/csv; rounded to 0.01 MiB in markdown
    model_n_params: int | None = None  # exact in json/jsonl/csv; rounded to 0.01 M in markdown
    backend: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # any other column, as printed

    @property
    def name(self) -> str:
        """The markdown table's test name: ``pp64``, ``tg32``, ``pp64+tg32``, ``tg32 @ d64``."""
        parts = ([f"pp{self.n_prompt}"] if self.n_prompt else []) + ([f"tg{self.n_gen}"] if self.n_gen else [])
        return "+".join(parts) + (f" @ d{self.n_depth}" if self.n_depth else "")


@dataclass(frozen=True)
class BenchReport:
    """A parsed llama-bench run: its tests in order and the build that ran them."""

    tests: tuple[BenchTest, ...]
    output_format: str  # "md" | "json" | "jsonl" | "csv"
    build_commit: str | None = None
    build_number: int | None = None
    cpu_info: str | None = None

    def find(self, n_prompt: int, n_gen: int, n_depth: int = 0) -> BenchTest | None:
        """The first test with exactly these token counts, or None."""
        for t in self.tests:
            if (t.n_prompt, t.n_gen, t.n_depth) == (n_prompt, n_gen, n_depth):
                return t
        return None


def _bench_error(why: str, text: str) -> BackendError:
    return BackendError(
        f"cannot parse llama-bench output ({why}; first line {_first_line(text)!r}); expected its markdown "
        "table or -o json/jsonl/csv output: check that the device runs llama.cpp's llama-bench"
    )


def _int(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


def _test_from_fields(row: dict[str, Any], text: str) -> BenchTest:
    """A test from llama-bench's named fields (json/jsonl values or csv strings)."""
    try:
        known = {
            "n_prompt": int(row["n_prompt"]),
            "n_gen": int(row["n_gen"]),
            "n_depth": int(row.get("n_depth") or 0),
            "tokens_per_s": float(row["avg_ts"]),
            "tokens_per_s_stddev": float(row["stddev_ts"]),
            "n_threads": _int(row.get("n_threads")),
            "samples_tokens_per_s": tuple(float(x) for x in row.get("samples_ts") or ()),
            "samples_ns": tuple(int(x) for x in row.get("samples_ns") or ()),
            "model_type": row.get("model_type"),
            "model_size_bytes": _int(row.get("model_size")),
            "model_n_params": _int(row.get("model_n_params")),
            "backend": row.get("backends"),
        }
    except KeyError as exc:
        raise _bench_error(f"a test has no {exc.args[0]!r} field", text) from None
    except (TypeError, ValueError) as exc:
        raise _bench_error(f"a test has an unreadable number ({exc})", text) from None
    used = {"n_prompt", "n_gen", "n_depth", "avg_ts", "stddev_ts", "n_threads", "samples_ts", "samples_ns"}
    used |= {"model_type", "model_size", "model_n_params", "backends"}
    extra = {k: str(v) for k, v in row.items() if k not in used}
    return BenchTest(**known, extra=extra)


def _report_from_rows(rows: list[dict[str, Any]], fmt: str, text: str) -> BenchReport:
    if not rows:
        raise _bench_error("no test rows", text)
    tests = tuple(_test_from_fields(r, text) for r in rows)
    first = rows[0]
    return BenchReport(tests, fmt, first.get("build_commit"), _int(first.get("build_number")), first.get("cpu_info"))


def _parse_json(text: str) -> BenchReport:
    try:
        rows = json.loads(text)
    except ValueError as exc:
        raise _bench_error(f"invalid JSON: {exc}", text) from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise _bench_error("JSON is not a list of test objects", text)
    return _report_from_rows(rows, "json", text)


def _parse_jsonl(text: str) -> BenchReport:
    rows = []
    for line in text.splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise _bench_error(f"invalid JSON line: {exc}", text) from None
    if not all(isinstance(r, dict) for r in rows):
        raise _bench_error("a JSON line is not a test object", text)
    return _report_from_rows(rows, "jsonl", text)


def _parse_csv(text: str) -> BenchReport:
    return _report_from_rows(list(csv.DictReader(io.StringIO(text.strip()))), "csv", text)


_MD_TEST = re.compile(r"^(?:pp(\d+))?\+?(?:tg(\d+))?(?: @ d(\d+))?$")
_MD_TS = re.compile(r"^([0-9.]+) ± ([0-9.]+)$")
_MD_BUILD = re.compile(r"^build: (\S+) \((\d+)\)$", re.MULTILINE)
_MD_SIZE = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_MD_PARAMS = {"K": 1e3, "M": 1e6, "B": 1e9}


def _md_number(cell: str, units: dict[str, float], text: str) -> int:
    value, _, unit = cell.partition(" ")
    if unit not in units:
        raise _bench_error(f"unknown unit in {cell!r}", text)
    return round(float(value) * units[unit])


def _md_row(cells: dict[str, str], text: str) -> BenchTest:
    m, ts = _MD_TEST.match(cells.get("test", "")), _MD_TS.match(cells.get("t/s", ""))
    if not m or not (m.group(1) or m.group(2)) or not ts:
        raise _bench_error(f"unreadable test {cells.get('test')!r} / t/s {cells.get('t/s')!r}", text)
    size, params = cells.get("size"), cells.get("params")
    return BenchTest(
        n_prompt=int(m.group(1) or 0),
        n_gen=int(m.group(2) or 0),
        n_depth=int(m.group(3) or 0),
        tokens_per_s=float(ts.group(1)),
        tokens_per_s_stddev=float(ts.group(2)),
        n_threads=_int(cells.get("threads")),
        model_type=cells.get("model"),
        model_size_bytes=_md_number(size, _MD_SIZE, text) if size else None,
        model_n_params=_md_number(params, _MD_PARAMS, text) if params else None,
        backend=cells.get("backend"),
        extra={
            k: v for k, v in cells.items() if k not in ("test", "t/s", "threads", "model", "size", "params", "backend")
        },
    )


def _parse_markdown(text: str) -> BenchReport:
    table = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    if len(table) < 2:
        raise _bench_error("no markdown table", text)
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in table]
    header, rows = split[0], split[2:]  # split[1] is the |---:| separator
    if "test" not in header or "t/s" not in header:
        raise _bench_error(f"table header {header} has no 'test' and 't/s' columns", text)
    if any(len(r) != len(header) for r in rows):
        raise _bench_error("a table row has a different number of cells than the header", text)
    tests = tuple(_md_row(dict(zip(header, r, strict=True)), text) for r in rows)
    if not tests:
        raise _bench_error("no test rows", text)
    build = _MD_BUILD.search(text)
    return BenchReport(tests, "md", build.group(1) if build else None, int(build.group(2)) if build else None)


def parse_llama_bench(text: str, output_format: str | None = None) -> BenchReport:
    """Parse llama-bench's stdout; ``output_format`` (md, json, jsonl, csv) or None to detect it."""
    body = text.strip()
    if output_format is None:
        if body.startswith("["):
            output_format = "json"
        elif body.startswith("{"):
            output_format = "jsonl"
        elif body.startswith("build_commit,"):
            output_format = "csv"
        elif any(ln.strip().startswith("|") for ln in body.splitlines()):
            output_format = "md"
        else:
            raise _bench_error("not a table, JSON or CSV", text)
    parsers: dict[str, Callable[[str], BenchReport]] = {
        "json": _parse_json,
        "jsonl": _parse_jsonl,
        "csv": _parse_csv,
        "md": _parse_markdown,
    }
    if output_format not in parsers:
        raise BackendError(
            f"llama-bench output format {output_format!r} is not parsed; expected one of {list(parsers)}"
        )
    return parsers[output_format](body)


_VERSION = re.compile(r"version: (\S+) \(build (\d+), commit (\S+)\)")
_BUILT_WITH = re.compile(r"built with (.+) for (.+)$", re.MULTILINE)


def parse_version(text: str) -> dict[str, Any]:
    """``llama-bench --version`` -> {version, build_number, build_commit, compiler, target}."""
    m = _VERSION.search(text)
    if not m:
        raise BackendError(
            f"cannot parse the tool's --version output (first line {_first_line(text)!r}); expected "
            "'version: X (build N, commit C)': check that the binary is llama.cpp's"
        )
    built = _BUILT_WITH.search(text)
    return {
        "version": m.group(1),
        "build_number": int(m.group(2)),
        "build_commit": m.group(3),
        "compiler": built.group(1).strip() if built else None,
        "target": built.group(2).strip() if built else None,
    }


_MAX_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")


def parse_peak_rss(time_stderr: str) -> int | None:
    """Peak RSS in bytes from GNU ``time -v``'s report on stderr (kbytes = KiB there), or None."""
    m = _MAX_RSS.search(time_stderr)
    return int(m.group(1)) * 1024 if m else None


# -- llama-perplexity ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerplexityReport:
    """A parsed llama-perplexity run (perplexity mode)."""

    ppl: float
    ppl_stderr: float  # llama-perplexity's "+/-"
    chunk_ppl: tuple[float, ...]  # running estimate after each chunk: [1], [2], ...
    chunks: int
    n_ctx: int
    batch_size: int | None = None
    n_seq: int | None = None
    n_threads: int | None = None
    seconds_per_pass: float | None = None
    tokenization_ms: float | None = None
    system_info: str | None = None

    @property
    def scored_tokens(self) -> int:
        """Predictions scored: the second half of each chunk but its last token (perplexity.cpp)."""
        return self.chunks * (self.n_ctx - self.n_ctx // 2 - 1)


_LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [A-Z] ")
_NEED_TOKENS = re.compile(r"you need at least (\d+) tokens to evaluate perplexity with a context of (\d+)")
_ONLY_TOKENS = re.compile(r"tokenizes to only (\d+) tokens")
_COMPUTING = re.compile(r"over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)")
_CHUNK = re.compile(r"\[(\d+)\]([0-9.]+|nan|inf|-nan),")
_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+|nan|inf) \+/- ([0-9.]+|nan|inf)")
_THREADS = re.compile(r"system_info: n_threads = (\d+)")
_PER_PASS = re.compile(r"([0-9.]+) seconds per pass")
_TOKENIZE_MS = re.compile(r"tokenization took ([0-9.]+) ms")


def _lines(text: str) -> list[str]:
    return [_LOG_PREFIX.sub("", ln).strip() for ln in text.splitlines()]


def _perplexity_failure(text: str) -> BackendError | None:
    """The one-line error for a run that failed (its exit status may still be 0), or None."""
    need = _NEED_TOKENS.search(text)
    if need:
        have = _ONLY_TOKENS.search(text)
        return BackendError(
            f"llama-perplexity needs at least {need.group(1)} tokens for ctx={need.group(2)}; the eval text has "
            f"{have.group(1) if have else 'fewer'}: give a longer eval text or a smaller ctx"
        )
    for line in _lines(text):
        if "unable to load model" in line or "failed to load model" in line:
            return BackendError(
                f"llama-perplexity could not load the model ({line}); expected a GGUF file this llama.cpp build "
                "reads: re-export it or update the device's llama.cpp"
            )
    return None


def _search_float(pattern: re.Pattern, text: str) -> float | None:
    m = pattern.search(text)
    return float(m.group(1)) if m else None


def parse_llama_perplexity(text: str) -> PerplexityReport:
    """Parse llama-perplexity's stdout and stderr (together, any order) in its default perplexity mode.

    ``TruncatedOutput`` when the run got going but its final estimate is missing (see module doc).
    """
    failure = _perplexity_failure(text)
    if failure is not None:
        raise failure
    computing = _COMPUTING.search(text)
    chunk_ppl = tuple(float(v) for _, v in _CHUNK.findall(text))
    final = _FINAL.search(text)
    if final is None:
        if computing or chunk_ppl:
            announced = computing.group(1) if computing else "?"
            raise TruncatedOutput(
                f"llama-perplexity's output ended before its final estimate ({len(chunk_ppl)} of {announced} "
                "chunks printed); llama.cpp's logger can drop its last lines at exit: rerun it"
            )
        raise BackendError(
            f"cannot parse llama-perplexity output (no 'Final estimate: PPL' line; first line "
            f"{_first_line(text)!r}); expected a perplexity run of llama.cpp's llama-perplexity"
        )
    if computing is None:
        raise BackendError(
            "cannot parse llama-perplexity output (no 'calculating perplexity over N chunks, n_ctx=...' line); "
            "run it at the default log verbosity"
        )
    info = next((ln.removeprefix("system_info: ") for ln in _lines(text) if ln.startswith("system_info:")), None)
    threads = _THREADS.search(text)
    return PerplexityReport(
        ppl=float(final.group(1)),
        ppl_stderr=float(final.group(2)),
        chunk_ppl=chunk_ppl,
        chunks=int(computing.group(1)),
        n_ctx=int(computing.group(2)),
        batch_size=int(computing.group(3)),
        n_seq=int(computing.group(4)),
        n_threads=int(threads.group(1)) if threads else None,
        seconds_per_pass=_search_float(_PER_PASS, text),
        tokenization_ms=_search_float(_TOKENIZE_MS, text),
        system_info=info,
    )


# -- the argv ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NativeTools:
    """llama.cpp's tools in ``bin_dir`` on the device (an absolute POSIX path).

    Each tool runs as ``env LD_LIBRARY_PATH=BIN:BIN/../lib BIN/TOOL ...`` so that a build with shared
    libraries (libllama.so, libggml*.so beside the binaries or in ../lib, as llama.cpp installs them) runs
    without a wrapper script; ``env`` exists on Linux and on Android (toybox). ``time_bin``: GNU time to
    wrap llama-bench with for its peak RSS, or None.
    """

    bin_dir: str
    time_bin: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bin_dir, str) or not PurePosixPath(self.bin_dir).is_absolute():
            raise DeviceError(
                f"llama_bin_dir={self.bin_dir!r} is invalid; expected the absolute device path of the directory "
                "holding llama-bench and llama-perplexity, such as '/data/local/tmp/llama.cpp/bin'"
            )

    def tool(self, name: str) -> str:
        return str(PurePosixPath(self.bin_dir) / name)

    def _run(self, name: str) -> list[str]:
        libs = f"{self.bin_dir}:{PurePosixPath(self.bin_dir).parent / 'lib'}"
        return ["env", f"LD_LIBRARY_PATH={libs}", self.tool(name)]

    def version_argv(self, name: str = LLAMA_BENCH) -> list[str]:
        return [*self._run(name), "--version"]

    def bench_argv(self, model: str, plan: Plan) -> list[str]:
        """llama-bench: a ``pp{prompt_tokens}`` and a ``tg{decode_tokens}`` test, ``repeat`` times, as JSON."""
        argv = [*self._run(LLAMA_BENCH), "-m", model, "-p", str(plan.prompt_tokens), "-n", str(plan.decode_tokens)]
        argv += ["-r", str(plan.repeat), "-o", "json"]
        if plan.threads is not None:
            argv += ["-t", str(plan.threads)]
        if plan.warmup == 0:
            argv.append("--no-warmup")
        return [self.time_bin, "-v", *argv] if self.time_bin else argv

    def perplexity_argv(self, model: str, text: str, plan: Plan) -> list[str]:
        """llama-perplexity over ``eval_tokens // ctx`` chunks of ``ctx`` tokens, one sequence per batch."""
        chunks = max(1, plan.eval_tokens // plan.ctx)
        argv = [*self._run(LLAMA_PERPLEXITY), "-m", model, "-f", text, "-c", str(plan.ctx), "-b", str(plan.ctx)]
        argv += ["--chunks", str(chunks)]
        if plan.threads is not None:
            argv += ["-t", str(plan.threads)]
        return argv


# -- running them through a transport ------------------------------------------------------------------


def _check_tools(transport: Transport, tools: NativeTools, names: tuple[str, ...], target: str) -> dict:
    """``--version`` of each tool: the build info, or a DeviceError saying the binaries are missing."""
    info: dict = {}
    for name in names:
        rc, out, err = transport.run(tools.version_argv(name), timeout=60)
        if rc in (126, 127) or (rc != 0 and "No such file" in err):
            raise DeviceError(
                f"{tools.tool(name)} is missing or not executable on {target} (exit {rc}: {last_line(err) or '-'}); "
                "push llama.cpp's tools (built for the device) there, or set llama_bin_dir in the device profile "
                "to where they are"
            )
        if rc != 0:
            raise DeviceError(f"{tools.tool(name)} --version failed on {target} (exit {rc}): {last_line(err) or '-'}")
        info[name] = parse_version(out + "\n" + err)
    return info


def _gnu_time(transport: Transport) -> str | None:
    """GNU time's path when the device has it (``-v`` reports the peak RSS), else None."""
    try:
        rc, _, err = transport.run([GNU_TIME, "-v", "true"], timeout=30)
    except DeviceError:  # the local transport raises when the executable does not exist
        return None
    return GNU_TIME if rc == 0 and parse_peak_rss(err) is not None else None


def _verify_on_device(transport: Transport, man: Manifest, device_dir: PurePosixPath) -> dict:
    """Check the pushed files' sha256 with the device's ``sha256sum``; ArtifactError on a mismatch."""
    for entry in man.files:
        path = str(device_dir / entry.path)
        try:
            rc, out, err = transport.run(["sha256sum", path], timeout=300)
        except DeviceError as exc:
            return {"verified": False, "reason": f"sha256sum cannot run on the device ({exc})"}
        if rc != 0 or not out.split():
            return {"verified": False, "reason": f"sha256sum failed (exit {rc}: {last_line(err) or '-'})"}
        if out.split()[0].lower() != entry.sha256:
            raise ArtifactError(
                f"{entry.path} on the device has sha256 {out.split()[0]}, the manifest says {entry.sha256}; "
                "the push was corrupted or the artifact changed: export it again and rerun"
            )
    return {"verified": True, "reason": "", "tool": "sha256sum"}


def _run_bench(transport: Transport, tools: NativeTools, model: str, plan: Plan, target: str, timeout_s) -> tuple:
    argv = tools.bench_argv(model, plan)
    rc, out, err = transport.run(argv, timeout=timeout_s)
    if rc != 0:
        lines = [ln for ln in err.splitlines() if "error" in ln.lower() and not ln.startswith("\t")]
        why = lines[-1].strip() if lines else last_line(err) or "(no stderr)"
        raise BackendError(f"llama-bench failed on {target} (exit {rc}): {why}")
    return argv, parse_llama_bench(out, "json"), parse_peak_rss(err) if tools.time_bin else None


def _run_perplexity(transport, tools, model, text, plan, target, timeout_s, attempts) -> tuple:
    argv = tools.perplexity_argv(model, text, plan)
    for attempt in range(1, attempts + 1):
        rc, out, err = transport.run(argv, timeout=timeout_s)
        try:
            report = parse_llama_perplexity(out + "\n" + err)
        except TruncatedOutput as exc:
            if rc != 0:  # a crash, not the logger losing lines: no point in rerunning it
                raise BackendError(
                    f"llama-perplexity failed on {target} (exit {rc}): {last_line(err) or exc}"
                ) from None
            log.info("llama-perplexity attempt %d/%d on %s: %s", attempt, attempts, target, exc)
            if attempt == attempts:
                raise TruncatedOutput(f"{exc} [{attempts} attempts on {target}]") from None
            continue
        if rc != 0:
            raise BackendError(f"llama-perplexity failed on {target} (exit {rc}): {last_line(err) or '(no stderr)'}")
        return argv, report, attempt
    raise AssertionError("unreachable")


def measure_native(
    transport: Transport,
    manifest: Manifest,
    device_manifest: str,
    plan: Plan,
    tools: NativeTools,
    *,
    eval_text: str | None = None,
    eval_identity: dict | None = None,
    bandwidth_gb_per_s: float | None = None,
    timeout_s: float | None = None,
    attempts: int = PERPLEXITY_ATTEMPTS,
) -> dict:
    """Measure the artifact pushed to ``device_manifest`` (relative to the transport's work dir).

    ``manifest``: the same manifest, read on the host. ``eval_text``: the eval text's device path (None:
    no perplexity); ``eval_identity``: its {eval_text, eval_text_sha256, eval_text_chars}.
    ``bandwidth_gb_per_s``: the profile's theoretical bandwidth, for the roofline. Returns the result dict.
    """
    wall0 = time.perf_counter()
    target = str(getattr(transport, "target", transport.name))
    if manifest.format != "gguf":
        raise BackendError(
            f"the native llama.cpp tools run GGUF artifacts; {manifest.path} is {manifest.format!r}: export "
            "--format gguf for this device, or give it Python (has_python = true)"
        )
    names = (LLAMA_BENCH, LLAMA_PERPLEXITY) if eval_text is not None else (LLAMA_BENCH,)
    versions = _check_tools(transport, tools, names, target)
    device_dir = PurePosixPath(device_manifest).parent
    model = str(device_dir / manifest.file("model").relative_to(manifest.root).as_posix())
    hashes = _verify_on_device(transport, manifest, device_dir)
    tools = NativeTools(tools.bin_dir, _gnu_time(transport))
    bench_argv, bench, peak_rss = _run_bench(transport, tools, model, plan, target, timeout_s)
    ppl = None
    if eval_text is not None:
        ppl = _run_perplexity(transport, tools, model, eval_text, plan, target, timeout_s, attempts)
    uname = transport.run(["uname", "-srm"], timeout=30)
    result = native_result(
        manifest, plan, bench, ppl[1] if ppl else None, peak_rss_bytes=peak_rss,
        bandwidth_gb_per_s=bandwidth_gb_per_s, versions=versions, eval_identity=eval_identity,
        kernel=uname.stdout.strip() if uname.rc == 0 else None,
    )  # fmt: skip
    result["artifact"]["verified_on_device"] = hashes
    result["native"]["argv"] = {LLAMA_BENCH: bench_argv, **({LLAMA_PERPLEXITY: ppl[0]} if ppl else {})}
    result["native"]["perplexity_attempts"] = ppl[2] if ppl else None
    result["wall_time_s"] = time.perf_counter() - wall0
    return result


# -- the result ----------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, float]:
    """Mean, sample stdev (0 for one value), min and max: ``edgeq.runtime.metrics.spread`` without numpy."""
    stdev = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "stdev": stdev, "min": min(values), "max": max(values)}


def _test_spread(test: BenchTest) -> dict | None:
    if test.samples_tokens_per_s:
        return _spread(list(test.samples_tokens_per_s))
    return {"mean": test.tokens_per_s, "stdev": test.tokens_per_s_stddev, "min": None, "max": None}


def _generation(plan: Plan, bench: BenchReport) -> dict:
    pp, tg = bench.find(plan.prompt_tokens, 0), bench.find(0, plan.decode_tokens)
    if pp is None or tg is None:
        raise BackendError(
            f"llama-bench output has no pp{plan.prompt_tokens} and tg{plan.decode_tokens} tests (it has "
            f"{[t.name for t in bench.tests]}); expected the tests edgeq asked for"
        )
    prefill_ms = [ns / 1e6 for ns in pp.samples_ns]
    decode_ms = sum(tg.samples_ns) / 1e6 if tg.samples_ns else None
    return {
        "prompt_tokens": pp.n_prompt,
        "decode_tokens": tg.n_gen,
        "repeat": len(tg.samples_ns) or plan.repeat,
        "warmup": min(plan.warmup, 1),  # llama-bench warms up once per test (one token for tg) or not at all
        "prefill_ms": statistics.fmean(prefill_ms) if prefill_ms else pp.n_prompt / pp.tokens_per_s * 1000.0,
        "ttft_ms": None,
        "prompt_tokens_per_s": pp.tokens_per_s,
        "decode_tokens_per_s": tg.tokens_per_s,
        "decode_tokens_per_s_stdev": tg.tokens_per_s_stddev,
        "latency_ms_mean": decode_ms / (tg.n_gen * len(tg.samples_ns)) if decode_ms else 1000.0 / tg.tokens_per_s,
        **{f"latency_ms_{k}": None for k in ("p50", "p90", "p99", "stdev", "min", "max", "n")},
        "spread": {
            "prefill_ms": _spread(prefill_ms) if prefill_ms else None,
            "ttft_ms": None,
            "prompt_tokens_per_s": _test_spread(pp),
            "decode_tokens_per_s": _test_spread(tg),
        },
        "greedy_identical": None,
        "generated_ids": None,
        "decode_depth": tg.n_depth,
        "tokens": "random token ids (llama-bench)",
    }


def _perplexity(report: PerplexityReport, identity: dict | None) -> dict:
    return {
        "ppl": report.ppl,
        "ppl_stderr": report.ppl_stderr,
        "nll_mean": math.log(report.ppl) if report.ppl > 0 else None,
        "tokens": report.scored_tokens,
        "eval_tokens": report.chunks * report.n_ctx,
        "windows": report.chunks,
        "ctx": report.n_ctx,
        "window_nll": None,
        "time_ms": report.seconds_per_pass * report.chunks * 1000.0 if report.seconds_per_pass else None,
        "chunk_ppl": list(report.chunk_ppl),
        "protocol": "llama-perplexity",
        "protocol_note": "second half of each ctx window scored; not comparable with edgeq.runtime's perplexity",
        **(identity or {}),
    }


def _bandwidth(weight_bytes: int, decode_tokens_per_s: float, reference_gb_per_s: float | None) -> dict:
    achieved = weight_bytes * decode_tokens_per_s / 1e9
    return {
        "weight_bytes_per_token": weight_bytes,
        "achieved_decode_gb_per_s": achieved,
        "reference_gb_per_s": reference_gb_per_s,
        "roofline_fraction": achieved / reference_gb_per_s if reference_gb_per_s else None,
        "roofline_decode_tokens_per_s": reference_gb_per_s * 1e9 / weight_bytes if reference_gb_per_s else None,
        "roofline_reference": "profile memory_bandwidth_gb_per_s (theoretical peak; no probe runs without Python)",
    }


_NOT_AVAILABLE = {
    "import_time_ms": "no Python on the device",
    "load_time_ms": "llama-bench does not report its model load time",
    "generation.ttft_ms": "llama-bench times prompt processing and decoding as separate tests",
    "generation.latency_ms_p50": "llama-bench reports one total per repetition, not per-token latencies",
    "generation.greedy_identical": "llama-bench decodes random tokens, not a greedy continuation",
    "perplexity.window_nll": "llama-perplexity prints running estimates, not per-window NLLs",
    "energy": "no energy counters are read without Python on the device",
}


def native_result(
    manifest: Manifest,
    plan: Plan,
    bench: BenchReport,
    ppl: PerplexityReport | None,
    *,
    peak_rss_bytes: int | None = None,
    bandwidth_gb_per_s: float | None = None,
    versions: dict | None = None,
    eval_identity: dict | None = None,
    kernel: str | None = None,
) -> dict:
    """A result in the runtime's schema (see ``edgeq.runtime.__main__``) from the tools' parsed output."""
    from edgeq.runtime.__main__ import RESULT_SCHEMA, artifact_summary

    generation = _generation(plan, bench)
    tg = bench.find(0, plan.decode_tokens)
    not_available = dict(_NOT_AVAILABLE)
    if peak_rss_bytes is None:
        not_available["memory.peak_rss_mb"] = f"the device has no GNU time ({GNU_TIME} -v) to report it"
    if not bandwidth_gb_per_s:
        not_available["bandwidth.roofline_fraction"] = "the device profile names no memory_bandwidth_gb_per_s"
    if ppl is None:
        not_available["perplexity"] = "no eval text"
    build = (versions or {}).get(LLAMA_BENCH, {})
    return {
        "schema": RESULT_SCHEMA,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": "llama.cpp-native",
        "artifact": artifact_summary(manifest),
        "plan": plan.to_dict(),
        "import_time_ms": None,
        "load_time_ms": None,
        "generation": generation,
        "perplexity": _perplexity(ppl, eval_identity) if ppl else None,
        "memory": {
            "peak_rss_mb": peak_rss_bytes / _MIB if peak_rss_bytes is not None else None,
            "peak_rss_source": "GNU time -v: the llama-bench process, all its tests" if peak_rss_bytes else None,
        },
        "bandwidth": _bandwidth(manifest.weight_bytes, generation["decode_tokens_per_s"], bandwidth_gb_per_s),
        "energy": "not available",
        "energy_reason": _NOT_AVAILABLE["energy"],
        "environment": {
            "cpu_model": bench.cpu_info,
            "kernel": kernel,
            "backend": "llama.cpp (native tools)",
            "threads": tg.n_threads if tg else plan.threads,
            "execution_provider": tg.backend if tg else None,
            "runtime": {
                "llama_cpp_build_commit": bench.build_commit or build.get("build_commit"),
                "llama_cpp_build_number": bench.build_number or build.get("build_number"),
                "llama_cpp_version": build.get("version"),
                "compiler": build.get("compiler"),
                "target": build.get("target"),
                "system_info": ppl.system_info if ppl else None,
            },
        },
        "native": {
            "llama_bench": [asdict(t) for t in bench.tests],
            "llama_perplexity": asdict(ppl) if ppl else None,
            "versions": versions or {},
        },
        "not_available": not_available,
    }
