"""How much of the PTQ perplexity gap each distillation recipe recovers on the bundled model.

    python benchmarks/distill_table.py [--bits 2 3] [--variants mse mse+sw ...] [--seeds 0 1] [--json OUT]

Start, per seed s: GPTQ (calibration seed s, 64 sequences) at ``bits`` g32. Each variant retrains that
run (``edgeq.compress.distill`` with DistillConfig's defaults -- block-wise in windows of 2 blocks,
scales and norms trained, 128 calibration sequences -- unless ``--train`` / ``--n-samples`` say
otherwise; ``--steps`` per block, seed s; the KD variants add ``--e2e-steps`` end-to-end steps) and
is scored on the first 16,384 held-out tokens.
Recovered = (ppl_ptq - ppl_after) / (ppl_ptq - ppl_fp). Prints a Markdown table (mean and range over
the seeds) last and writes JSON (default benchmarks/distill_table.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "mse": dict(loss="mse"),
    "mse+sw": dict(loss="mse+sw"),
    "mse+sw, window 1": dict(loss="mse+sw", window=1),
    "mse+sw, window 3": dict(loss="mse+sw", window=3),
    "mse+sw, saliency": dict(loss="mse+sw", saliency=True),
    "mse+sw, fisher": dict(loss="mse+sw", fisher=True),
    "mse+sw+kl": dict(loss="mse+sw+kl"),
    "mse+sw+cakld": dict(loss="mse+sw+cakld"),
    "mse+sw+tsld": dict(loss="mse+sw+tsld"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=400, help="Block-wise steps per block.")
    parser.add_argument("--e2e-steps", type=int, default=100, help="End-to-end KD steps (kl/cakld/tsld variants).")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--train", default=None, help="Parameter groups (default: DistillConfig's, scales,norms).")
    parser.add_argument("--n-samples", type=int, default=None, help="Distillation samples (default: DistillConfig's).")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("distill_table.json"))
    args = parser.parse_args()

    from tokenizers import Tokenizer

    from edgeq.bundled import MODEL_DIR, heldout_text
    from edgeq.compress.distill.run import distill
    from edgeq.compress.distill.trainer import DistillConfig
    from edgeq.compress.eval import perplexity
    from edgeq.compress.model import load_torch_model
    from edgeq.compress.run import compress
    from edgeq.config import CompressConfig

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    ids = tok.encode(heldout_text(max_chars=args.eval_tokens * 6), add_special_tokens=False).ids[: args.eval_tokens + 1]
    fp = perplexity(load_torch_model(MODEL_DIR), ids).perplexity
    extra: dict = {}
    if args.train:
        extra["train"] = tuple(args.train.split(","))
    if args.n_samples:
        extra["n_samples"] = args.n_samples
    defaults = DistillConfig(**extra)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            for seed in args.seeds:
                cfg = CompressConfig(method="gptq", bits=bits, group_size=32, n_samples=64, seed=seed)
                ptq_dir = compress(MODEL_DIR, cfg, Path(tmp) / f"gptq{bits}-s{seed}")
                ptq = perplexity(load_torch_model(ptq_dir), ids).perplexity
                for name in args.variants:
                    t0 = time.time()
                    dcfg = DistillConfig(seed=seed, steps=args.steps, e2e_steps=args.e2e_steps, **VARIANTS[name],
                                         **extra)  # fmt: skip
                    out = distill(ptq_dir, dcfg, Path(tmp) / f"d{bits}-{len(rows)}")
                    after = perplexity(load_torch_model(out), ids).perplexity
                    row = {"bits": bits, "seed": seed, "variant": name, "fp": fp, "ptq": ptq, "after": after,
                           "recovered": (ptq - after) / (ptq - fp), "seconds": time.time() - t0}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    payload = {"steps": args.steps, "e2e_steps": args.e2e_steps, "seeds": args.seeds, "train": list(defaults.train),
               "n_samples": defaults.n_samples, "rows": rows}  # fmt: skip
    args.json.write_text(json.dumps(payload, indent=1) + "\n")
    print(
        f"| start | variant | ppl PTQ (mean) | ppl after (mean) | recovered: mean (min..max) over seeds {args.seeds} |"
    )
    print("|---|---|---|---|---|")
    for bits in args.bits:
        for name in args.variants:
            sel = [r for r in rows if r["bits"] == bits and r["variant"] == name]
            rec = [r["recovered"] for r in sel]
            ptq_m = sum(r["ptq"] for r in sel) / len(sel)
            after_m = sum(r["after"] for r in sel) / len(sel)
            print(f"| GPTQ w{bits}g32 | {name} | {ptq_m:.3f} | {after_m:.3f} | "
                  f"{sum(rec) / len(rec):.1%} ({min(rec):.1%}..{max(rec):.1%}) |")  # fmt: skip


if __name__ == "__main__":
    main()
