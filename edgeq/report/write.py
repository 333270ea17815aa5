"""Reports from runtime results: a terminal table, Markdown, JSON, CSV, a Pareto plot and a latency plot.

Results are the runtime's JSON (``python -m edgeq.runtime``) with a ``label``. ``summarize`` flattens
each into the row every output shares, so a column means the same thing in all of them. A result of a
capped (emulated) run that ran out of memory has ``status: "does not fit"`` and no measurements: its
row shows the status, and the Markdown lists its numbers (cap, weights, peak RSS reached).

``latency.png`` is the distribution of per-token decode latencies of each result (the runtime keeps
every timed decode step in ``generation.runs[].decode_latency_ms``, ``repeat x decode_tokens`` values):
one empirical CDF per result on a log axis, so tails (p99) are read as easily as the median.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

#: (column, key in the summary row, format) in display order
COLUMNS = (
    ("artifact", "label", "{}"),
    ("format", "format", "{}"),
    ("size MB", "size_mb", "{:.2f}"),
    ("ppl", "perplexity", "{:.3f}"),
    ("load ms", "load_time_ms", "{:.0f}"),
    ("TTFT ms", "ttft_ms", "{:.1f}"),
    ("prefill tok/s", "prompt_tokens_per_s", "{:.0f}"),
    ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
    ("p50 ms", "latency_ms_p50", "{:.2f}"),
    ("p99 ms", "latency_ms_p99", "{:.2f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ("roofline", "roofline_fraction", "{:.0%}"),
)
STATUS_COLUMN = ("status", "status", "{}")


def _get(data: dict, *path, default=None):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


def summarize(result: dict) -> dict:
    """One flat row of the headline numbers of a runtime result."""
    gen = result.get("generation", {})
    artifact = result.get("artifact", {})
    size = artifact.get("weight_bytes")
    return {
        "label": result.get("label", artifact.get("path", "?")),
        "status": result.get("status", "ok"),
        "format": f"{artifact.get('format', '?')}/{artifact.get('variant', '?')}",
        "size_mb": size / 1e6 if size else None,
        "perplexity": _get(result, "perplexity", "ppl"),
        "load_time_ms": result.get("load_time_ms"),
        "ttft_ms": gen.get("ttft_ms"),
        "prompt_tokens_per_s": gen.get("prompt_tokens_per_s"),
        "decode_tokens_per_s": gen.get("decode_tokens_per_s"),
        "latency_ms_p50": gen.get("latency_ms_p50"),
        "latency_ms_p99": gen.get("latency_ms_p99"),
        "peak_rss_mb": _get(result, "memory", "peak_rss_mb"),
        "roofline_fraction": _get(result, "bandwidth", "roofline_fraction"),
    }


def _cell(fmt: str, value) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _columns(results: list[dict]) -> tuple:
    """The table's columns: a status column only when a result is capped or did not run to the end."""
    capped = any("caps" in r or r.get("status", "ok") != "ok" for r in results)
    return (*COLUMNS[:2], STATUS_COLUMN, *COLUMNS[2:]) if capped else COLUMNS


def format_table(results: list[dict], markdown: bool = False) -> str:
    rows = [summarize(r) for r in results]
    columns = _columns(results)
    header = [c[0] for c in columns]
    body = [[_cell(fmt, row[key]) for _, key, fmt in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]

    def fmt_row(cells):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([fmt_row(header), fmt_row(["-" * w for w in widths])] + [fmt_row(r) for r in body])


def environment_line(results: list[dict]) -> str:
    env = next((r["environment"] for r in results if isinstance(r.get("environment"), dict)), {})
    cpu = env.get("cpu_model", "?")
    return (
        f"{cpu}, {env.get('logical_cores', '?')} logical cores, {env.get('os', '?')}, python {env.get('python', '?')}"
    )


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no plot written (pip install 'edgeq[report]')")
        return None
    return plt


def pareto_plot(rows: list[dict], path: Path) -> Path | None:
    """Size vs perplexity, marker area proportional to decode tokens/s."""
    plt = _pyplot()
    if plt is None:
        return None
    pts = [r for r in rows if r["size_mb"] and r["perplexity"]]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    speeds = [r["decode_tokens_per_s"] or 0.0 for r in pts]
    top = max(speeds) or 1.0
    for r, s in zip(pts, speeds, strict=True):
        marker = "o" if r["format"].startswith("gguf") else "s"
        ax.scatter(r["size_mb"], r["perplexity"], s=40 + 400 * s / top, marker=marker, alpha=0.6)
        ax.annotate(f"{r['label']}\n{s:.0f} tok/s", (r["size_mb"], r["perplexity"]), fontsize=7,
                    xytext=(6, 4), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("artifact size (MB)")
    ax.set_ylabel("perplexity (held-out text)")
    ax.set_title("size vs perplexity (marker area: decode tokens/s; o GGUF, s ONNX)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        _atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path


def decode_latencies_ms(result: dict) -> list[float]:
    """Every timed per-token decode latency of a result (all repetitions pooled), in ms."""
    runs = _get(result, "generation", "runs", default=None) or []
    return [float(ms) for run in runs if isinstance(run, dict) for ms in run.get("decode_latency_ms") or []]


def latency_figure(results: list[dict]):
    """The latency-distribution figure: one empirical CDF line per result that has latencies; or None."""
    import numpy as np

    plt = _pyplot()
    series = [(r.get("label", _get(r, "artifact", "path", default="?")), decode_latencies_ms(r)) for r in results]
    series = [(label, sorted(x)) for label, x in series if x]
    if plt is None or not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, x in series:
        y = [(i + 1) / len(x) for i in range(len(x))]
        p50, p99 = np.percentile(x, [50, 99])  # as the runtime computes latency_ms_p50/p99
        ax.step(x, y, where="post", label=f"{label} (p50 {p50:.2f}, p99 {p99:.2f} ms, n={len(x)})")
    ax.set_xscale("log")
    ax.set_xlabel("per-token decode latency (ms, log scale)")
    ax.set_ylabel("fraction of decode steps <= x")
    ax.set_ylim(0, 1.02)
    ax.set_title("decode latency distribution (empirical CDF, all timed tokens)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def latency_plot(results: list[dict], path: Path) -> Path | None:
    """Write ``latency_figure`` to ``path``; None when no result has per-token latencies."""
    fig = latency_figure(results)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    try:
        _atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path


def does_not_fit_lines(results: list[dict]) -> list[str]:
    """Markdown bullets for the results that ran out of memory under a cap, with their numbers."""
    lines = []
    for r in results:
        if r.get("status", "ok") == "ok":
            continue
        label = r.get("label", _get(r, "artifact", "path", default="?"))
        lines.append(f"- **{label}**: {r.get('message') or r.get('status')}")
    return lines


def _atomic(path: Path, write) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path`` (same suffix), then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the report private
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["label"])
        writer.writeheader()
        writer.writerows(rows)


def write_report(results: list[dict], out: Path) -> dict[str, Path]:
    """Write report.md, results.json, results.csv, pareto.png and latency.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [summarize(r) for r in results]
    paths = {"json": out / "results.json", "csv": out / "results.csv", "markdown": out / "report.md"}
    _atomic(paths["json"], lambda tmp: tmp.write_text(json.dumps(results, indent=1) + "\n"))
    _atomic(paths["csv"], lambda tmp: _write_csv(tmp, rows))
    md = ["# edgeq report", "", f"Machine: {environment_line(results)}", "", format_table(results, markdown=True), ""]
    unfit = does_not_fit_lines(results)
    if unfit:
        md += ["## Did not run to the end", "", *unfit, ""]
    plot = pareto_plot([r for r in rows if r["status"] == "ok"], out / "pareto.png")
    if plot:
        paths["plot"] = plot
        md += ["![size vs perplexity](pareto.png)", ""]
    latency = latency_plot(results, out / "latency.png")
    if latency:
        paths["latency_plot"] = latency
        md += ["![decode latency distribution](latency.png)", ""]
    _atomic(paths["markdown"], lambda tmp: tmp.write_text("\n".join(md)))
    return paths
