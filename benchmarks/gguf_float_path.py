"""GGUF q8_0 / q4_0 logits in llama.cpp against the run's fake-quant model, per llama.cpp build and layout.

    python benchmarks/gguf_float_path.py [--tokens 96 256] [--json OUT]

llama.cpp's CPU kernels for q8_0 / q4_0 weights round the activations to int8 blocks, which costs ~4e-3
relative logit error on the bundled model whatever the artifact. A llama-cpp-python built with a BLAS
backend (``CMAKE_ARGS="-DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS" pip install llama-cpp-python``, with
libopenblas-dev) instead dequantizes the weights and multiplies in f32 for prompt batches of 32 tokens
or more -- but only weights in the plain layout: by default q4_0 is repacked into interleaved CPU
layouts (llama.cpp's "extra buffer types") that the BLAS backend cannot read. This script exports the
bundled model (RTN w4g32 / w8g32) to q4_0 / q8_0 and measures prefill logits with the installed build,
repacking on and off (edgeq's ``repack`` provider option), f32 KV cache. Prints a table last; writes
JSON (default benchmarks/gguf_float_path.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[96, 256])
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("gguf_float_path.json"))
    args = parser.parse_args()

    import llama_cpp
    import torch
    from tokenizers import Tokenizer

    from edgeq.bundled import MODEL_DIR, heldout_text
    from edgeq.compress.model import load_torch_model
    from edgeq.compress.run import compress
    from edgeq.config import CompressConfig
    from edgeq.export.gguf import export_gguf
    from edgeq.export.manifest import Manifest, file_entry
    from edgeq.rundir import RunDir
    from edgeq.runtime.backends.base import BackendOptions
    from edgeq.runtime.backends.llamacpp import LlamaCppBackend

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    ids = tok.encode(heldout_text(max_chars=max(args.tokens) * 8), add_special_tokens=False).ids
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits, gguf_type in ((4, "q4_0"), (8, "q8_0")):
            run = compress(MODEL_DIR, CompressConfig(bits=bits, group_size=32, sym=True), Path(tmp) / f"w{bits}")
            out = Path(tmp) / f"m.{gguf_type}.gguf"
            export_gguf(RunDir.open(run), gguf_type, out)
            man = Manifest(format="gguf", variant=gguf_type, files=[file_entry(out.parent, out, role="model")],
                           model={}, scheme={}, source={}, tokenizer={"kind": "gguf"})  # fmt: skip
            man.save(out.with_name(f"{gguf_type}.manifest.json"))
            model = load_torch_model(run)
            for repack in (True, False):
                opts = {"type_k": "f32", "type_v": "f32", "repack": repack, "n_batch": 512, "n_ubatch": 512}
                backend = LlamaCppBackend(man, BackendOptions(provider_options=opts))
                backend.load()
                try:
                    for n in args.tokens:
                        backend.reset()
                        got = backend.forward(ids[:n])
                        with torch.no_grad():
                            ref = model(torch.tensor([ids[:n]])).logits[0].numpy()
                        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                        rows.append({"type": gguf_type, "repack": repack, "tokens": n, "rel_error": rel,
                                     "top1": float(np.mean(got.argmax(-1) == ref.argmax(-1)))})  # fmt: skip
                finally:
                    backend.close()
    payload = {"llama_cpp_python": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode(),
               "rows": rows}  # fmt: skip
    args.json.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"llama-cpp-python {llama_cpp.__version__}")
    print("| type | repack | prefill tokens | rel. error vs fake-quant | top-1 agreement |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['type']} | {r['repack']} | {r['tokens']} | {r['rel_error']:.2e} | {r['top1']:.3f} |")


if __name__ == "__main__":
    main()
