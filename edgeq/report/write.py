"""Reports from runtime results: a terminal table, Markdown, JSON, CSV and a Pareto plot.

Results are the runtime's JSON (``python -m edgeq.runtime``) with a ``label``. ``summarize`` flattens
each into the row every output shares, so a column means the same thing in all of them.
"""

from __future__ import annotations

import csv
import json
import logging
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


def format_table(results: list[dict], markdown: bool = False) -> str:
    rows = [summarize(r) for r in results]
    header = [c[0] for c in COLUMNS]
    body = [[_cell(fmt, row[key]) for _, key, fmt in COLUMNS] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]

    def fmt_row(cells):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([fmt_row(header), fmt_row(["-" * w for w in widths])] + [fmt_row(r) for r in body])


def environment_line(results: list[dict]) -> str:
    env = results[0].get("environment", {}) if results else {}
    cpu = env.get("cpu_model", "?")
    return (
        f"{cpu}, {env.get('logical_cores', '?')} logical cores, {env.get('os', '?')}, python {env.get('python', '?')}"
    )


def pareto_plot(rows: list[dict], path: Path) -> Path | None:
    """Size vs perplexity, marker area proportional to decode tokens/s."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no plot written (pip install 'edgeq[report]')")
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
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(results: list[dict], out: Path) -> dict[str, Path]:
    """Write report.md, results.json, results.csv and pareto.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [summarize(r) for r in results]
    paths = {"json": out / "results.json", "csv": out / "results.csv", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    with open(paths["csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["label"])
        writer.writeheader()
        writer.writerows(rows)
    md = ["# edgeq report", "", f"Machine: {environment_line(results)}", "", format_table(results, markdown=True), ""]
    plot = pareto_plot(rows, out / "pareto.png")
    if plot:
        paths["plot"] = plot
        md += ["![size vs perplexity](pareto.png)", ""]
    paths["markdown"].write_text("\n".join(md))
    return paths
