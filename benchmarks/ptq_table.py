"""PTQ quality table on the bundled model: RTN vs GPTQ vs AWQ across bits, groups and sym/asym.

    python benchmarks/ptq_table.py [--seeds 0 1 2] [--n-samples 128] [--quick] [--json OUT]

For every scheme: the perplexity gap to fp (held-out stdlib text, non-overlapping 256-token windows)
of RTN (deterministic, one run) and of GPTQ and AWQ, each as mean ± spread (min..max) over
calibration seeds. Prints a Markdown table last and writes JSON (default benchmarks/ptq_table.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

SCHEMES = [  # (bits, group_size, sym)
    (2, 32, True),
    (3, 32, True),
    (3, 32, False),
    (4, 32, True),
    (4, 32, False),
    (4, 128, True),
    (4, -1, True),
    (4, -1, False),
    (8, 32, True),
]
QUICK = [(2, 32, True), (3, 32, True), (4, 128, True), (4, -1, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"])
    parser.add_argument("--quick", action="store_true", help="only the schemes the issue's claims are about")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("ptq_table.json"))
    args = parser.parse_args()

    from tokenizers import Tokenizer

    from edgeq.bundled import MODEL_DIR, heldout_text
    from edgeq.compress.eval import paired_gap, perplexity
    from edgeq.compress.model import load_torch_model
    from edgeq.compress.run import compress
    from edgeq.config import CompressConfig

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    ids = tok.encode(heldout_text(max_chars=args.eval_tokens * 6), add_special_tokens=False).ids[: args.eval_tokens + 1]
    fp = perplexity(load_torch_model(MODEL_DIR), ids)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits, group, sym in QUICK if args.quick else SCHEMES:
            row = {"bits": bits, "group_size": group, "sym": sym, "fp_ppl": fp.perplexity}
            for method in args.methods:
                seeds = [0] if method == "rtn" else args.seeds
                gaps, secs = [], []
                for seed in seeds:
                    cfg = CompressConfig(method=method, bits=bits, group_size=group, sym=sym, seed=seed,
                                         n_samples=args.n_samples)  # fmt: skip
                    t0 = time.time()
                    run = compress(MODEL_DIR, cfg, Path(tmp) / f"{method}-{bits}-{group}-{sym}-{seed}")
                    secs.append(time.time() - t0)
                    q = perplexity(load_torch_model(run), ids)
                    gaps.append(paired_gap(q, fp))
                row[method] = {
                    "gap_mean": statistics.mean(g["gap"] for g in gaps),
                    "gap_min": min(g["gap"] for g in gaps),
                    "gap_max": max(g["gap"] for g in gaps),
                    "gap_stderr": statistics.mean(g["gap_stderr"] for g in gaps),
                    "seeds": seeds,
                    "seconds_mean": statistics.mean(secs),
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}",
        "fp_ppl": fp.perplexity,
        "eval_tokens": fp.tokens,
        "n_samples": args.n_samples,
        "rows": rows,
    }
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(rows, args.methods))


def markdown(rows: list[dict], methods: list[str]) -> str:
    head = "| scheme | " + " | ".join(f"{m} gap (min..max)" for m in methods) + " | GPTQ vs RTN |"
    lines = [head, "|" + "---|" * (len(methods) + 2)]
    for r in rows:
        group = "pc" if r["group_size"] == -1 else f"g{r['group_size']}"
        label = f"w{r['bits']}{group} {'sym' if r['sym'] else 'asym'}"
        cells = []
        for m in methods:
            c = r[m]
            cells.append(f"{c['gap_mean']:+.3f} ({c['gap_min']:+.3f}..{c['gap_max']:+.3f})")
        vs = ""
        if "gptq" in r and "rtn" in r and r["rtn"]["gap_mean"] > 0:
            vs = f"{1 - r['gptq']['gap_mean'] / r['rtn']['gap_mean']:.0%} smaller"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {vs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
