"""Block-wise distillation step time and peak memory on a 1B-class Llama shape (random weights).

    python benchmarks/distill_scale.py                # TinyLlama-1.1B block shape, CUDA (the GPU sessions)
    python benchmarks/distill_scale.py --scaled-down  # a small shape on CPU, to keep the script working

What it runs is the trainer users run (``edgeq.compress.distill.trainer.blockwise``: teacher block
outputs, student blocks with ``QATLinear`` layers, MSE + sliced Wasserstein, Adam on scales and norms,
one window of ``--window`` blocks on the device at a time), on ``--blocks`` decoder blocks of the 1.1B
shape (hidden 2048, FFN 5632, 32 heads / 4 KV heads, vocab 32000) whose weights are random and
RTN-quantized to w2g32 here. Every block has the same shape, so the time of the whole 22-block model
scales with its block trainings (window i trains min(window, blocks - i) blocks), and its peak device
memory is the peak of one full window. Reports the median step time of full-width windows (the first
``--warmup`` steps of each window left out), the wall time per block training, tokens per second and
the peak device memory (``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS). Prints a
table last and writes JSON (default benchmarks/distill_scale.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
               vocab_size=32000),  # TinyLlama-1.1B
    "small": dict(hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2,
                  vocab_size=4096),
}  # fmt: skip
FULL_DEPTH = {"1b": 22, "small": 4}


def block_trainings(blocks: int, window: int) -> int:
    """How many times blocks are trained in all: window i of a ``blocks``-deep model trains min(window, blocks - i)."""
    return sum(min(window, blocks - i) for i in range(blocks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scaled-down", action="store_true", help="small shape, few samples, CPU")
    parser.add_argument("--blocks", type=int, default=None, help="Decoder blocks to train (default window + 1).")
    parser.add_argument("--window", type=int, default=None, help="Blocks trained together (default DistillConfig's).")
    parser.add_argument("--samples", type=int, default=None, help="Calibration sequences (default 64; 8 small).")
    parser.add_argument("--seq-len", type=int, default=None, help="Tokens per sequence (default 2048; 128 small).")
    parser.add_argument("--batch-size", type=int, default=None, help="Sequences per step (default 4; 2 small).")
    parser.add_argument("--steps", type=int, default=None, help="Steps per block (default 50; 6 small).")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("distill_scale.json"))
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeq.compress.distill.dist import DistContext
    from edgeq.compress.distill.trainer import DistillConfig, blockwise
    from edgeq.compress.mappings import FAMILIES
    from edgeq.compress.quant import QuantScheme
    from edgeq.compress.rtn import rtn_quantize

    small = args.scaled_down
    shape_name = "small" if small else "1b"
    device = torch.device("cpu" if small or not torch.cuda.is_available() else "cuda")
    window = args.window or DistillConfig().window
    blocks = args.blocks or window + 1
    samples = args.samples or (8 if small else 64)
    seq_len = args.seq_len or (128 if small else 2048)
    batch = args.batch_size or (2 if small else 4)
    steps = args.steps or (6 if small else 50)
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape_name], num_hidden_layers=blocks, max_position_embeddings=max(seq_len, 2048),
                      tie_word_embeddings=False)  # fmt: skip
    teacher = LlamaForCausalLM(cfg).eval()
    student = LlamaForCausalLM(cfg).eval()
    student.load_state_dict(teacher.state_dict())
    family = FAMILIES["llama"]
    scheme = QuantScheme(2, 32, True)
    quantized = {}
    for name, param in teacher.named_parameters():
        if family.quantizable(name):
            quantized[name] = (*rtn_quantize(param.detach().float(), scheme), scheme)
    ids = torch.randint(0, cfg.vocab_size, (samples, seq_len))
    dcfg = DistillConfig(loss="mse+sw", steps=steps, batch_size=batch, n_samples=samples, seq_len=seq_len,
                         window=window)  # fmt: skip
    ctx = DistContext(device=device)

    step_times: list[float] = []
    original = torch.optim.Adam.step

    def timed_step(self, *a, **k):  # the optimizer step closes each training step: time step to step
        out = original(self, *a, **k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter())
        return out

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    torch.optim.Adam.step = timed_step
    try:
        blockwise(teacher, student, family, ids, quantized, dcfg, ctx)
    finally:
        torch.optim.Adam.step = original
    wall = time.perf_counter() - t0
    per_window = [step_times[i * steps : (i + 1) * steps] for i in range(blocks)]
    full_width = [times for i, times in enumerate(per_window) if blocks - i >= window]
    deltas = [
        b - a for times in full_width for a, b in zip(times[args.warmup : -1], times[args.warmup + 1 :], strict=True)
    ]
    step_s = statistics.median(deltas) if deltas else float("nan")
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
    row = {
        "shape": shape_name,
        "blocks": blocks,
        "full_depth": FULL_DEPTH[shape_name],
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "samples": samples,
        "seq_len": seq_len,
        "batch_size": batch,
        "window": window,
        "steps_per_block": steps,
        "median_step_s": step_s,
        "tokens_per_s": batch * seq_len / step_s,
        "wall_s": wall,
        "est_full_model_s": wall / block_trainings(blocks, window) * block_trainings(FULL_DEPTH[shape_name], window),
        "peak_bytes": peak,
        "peak_kind": peak_kind,
        "scheme": scheme.label,
        "torch": torch.__version__,
    }
    args.json.write_text(json.dumps(row, indent=1) + "\n")
    print(
        "| shape | window | device | batch x seq | step s (median) | tokens/s | wall s / block training | est. full model s "
        "| peak GB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {shape_name} x{blocks} | {window} | {row['device']} | {batch} x {seq_len} | {step_s:.3f} | "
          f"{row['tokens_per_s']:.0f} | {wall / block_trainings(blocks, window):.1f} | {row['est_full_model_s']:.0f} | "
          f"{peak / 1e9:.2f} ({peak_kind}) |")  # fmt: skip


if __name__ == "__main__":
    main()
