"""GPTQ wall time and peak memory on a 7B-shaped Llama (random weights built from a config).

    python benchmarks/gptq_scale.py                # 7B shape, 128 x 2048 calibration tokens, CUDA
    python benchmarks/gptq_scale.py --scaled-down  # a small shape on CPU, to keep the script working

Goal (issue 3): 4-bit g128 GPTQ of the 7B shape in <= 4 min and <= 24 GB GPU memory on one H200, with
the layer-sequential driver keeping only the current block on the GPU. Prints a table last and writes
JSON (default benchmarks/gptq_scale.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

SHAPES = {
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),  # fmt: skip
    "small": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
    ),  # fmt: skip
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scaled-down", action="store_true", help="small shape, 16 x 256 tokens, CPU")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("gptq_scale.json"))
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeq.compress import gptq
    from edgeq.compress.calibration import sequential_quantize
    from edgeq.compress.mappings import FAMILIES
    from edgeq.compress.quant import QuantScheme

    small = args.scaled_down
    device = torch.device("cpu" if small or not torch.cuda.is_available() else "cuda")
    samples = args.samples or (16 if small else 128)
    seq_len = args.seq_len or (256 if small else 2048)
    shape = SHAPES["small" if small else "7b"]
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, max_position_embeddings=max(seq_len, 2048), tie_word_embeddings=False)
    t0 = time.time()
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    build_s = time.time() - t0
    ids = torch.randint(0, cfg.vocab_size, (samples, seq_len))
    family = FAMILIES["llama"]
    scheme = QuantScheme(4, 128, True)
    method = gptq.make_block_method(family, lambda name: scheme if family.quantizable(name) else None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    results, _, _ = sequential_quantize(model, family, ids, method, device, batch_size=8 if small else 4)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall_s = time.time() - t0
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    params = sum(p.numel() for p in model.parameters())
    row = {
        "shape": "small" if small else "7b",
        "params": params,
        "quantized_tensors": len(results),
        "calibration_tokens": samples * seq_len,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "build_s": build_s,
        "gptq_wall_s": wall_s,
        "peak_gpu_gb": peak_gb,
        "scheme": scheme.label,
    }
    args.json.write_text(json.dumps(row, indent=1) + "\n")
    print("| shape | params | calib tokens | device | GPTQ wall s | peak GPU GB |")
    print("|---|---|---|---|---|---|")
    peak = "-" if peak_gb is None else f"{peak_gb:.1f}"
    print(f"| {row['shape']} | {params / 1e9:.2f}B | {row['calibration_tokens']} | {row['device']} | "
          f"{wall_s:.1f} | {peak} |")  # fmt: skip


if __name__ == "__main__":
    main()
