"""How much of the PTQ perplexity gap each distillation recipe recovers on the bundled model.

    python benchmarks/distill_table.py [--bits 2 3] [--variants mse mse+sw ...] [--json OUT]

Start: GPTQ (seed 0, 64 calibration sequences) at ``bits`` g32. Each variant retrains that run
(``edgeq.compress.distill``: block-wise, scales trained, 400 steps per block) and is scored on the
first 16,384 held-out tokens. Recovered = (ppl_ptq - ppl_after) / (ppl_ptq - ppl_fp). Prints a
Markdown table last and writes JSON (default benchmarks/distill_table.json).
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
    "mse+sw, saliency": dict(loss="mse+sw", saliency=True),
    "mse+sw+kl": dict(loss="mse+sw+kl"),
    "mse+sw+cakld": dict(loss="mse+sw+cakld"),
    "mse+sw+tsld": dict(loss="mse+sw+tsld"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--eval-tokens", type=int, default=16384)
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
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            ptq_dir = compress(MODEL_DIR, CompressConfig(method="gptq", bits=bits, group_size=32, n_samples=64),
                               Path(tmp) / f"gptq{bits}")  # fmt: skip
            ptq = perplexity(load_torch_model(ptq_dir), ids).perplexity
            for name in args.variants:
                t0 = time.time()
                cfg = DistillConfig(n_samples=64, **VARIANTS[name])
                out = distill(ptq_dir, cfg, Path(tmp) / f"d{bits}-{len(rows)}")
                after = perplexity(load_torch_model(out), ids).perplexity
                row = {"bits": bits, "variant": name, "fp": fp, "ptq": ptq, "after": after,
                       "recovered": (ptq - after) / (ptq - fp), "seconds": time.time() - t0}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print("| start | variant | ppl PTQ | ppl after | recovered |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| GPTQ w{r['bits']}g32 | {r['variant']} | {r['ptq']:.3f} | {r['after']:.3f} | {r['recovered']:.0%} |")


if __name__ == "__main__":
    main()
