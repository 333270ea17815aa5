"""Greedy generation with an edgeq ONNX export: onnxruntime + tokenizers + numpy, nothing else.

    pip install onnxruntime tokenizers numpy
    python python/run_onnxruntime.py --prompt "def main():" --max-new-tokens 32

Reads ``model/manifest.json`` (the exporter's contract: every file with its sha256), checks the
hashes, then runs the decoder graph with its KV cache: the first call feeds the whole prompt, each
later call one token, and the ``present.*`` outputs come back as the next ``past_key_values.*``
inputs. The cache dtype (float32, or float16 for fp16 exports) is read from the graph's inputs.
Prints the generated text; ``--json`` prints the prompt ids, generated ids and text as one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent
DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def find_manifest(given: str | None) -> Path:
    """The manifest given, else the one in the bundle's ``model/`` folder."""
    if given:
        return Path(given)
    found = sorted((HERE.parent / "model").glob("*manifest.json"))
    if not found:
        sys.exit(f"error: no manifest.json in {HERE.parent / 'model'}; pass --manifest PATH")
    return found[0]


def verified_files(manifest_path: Path, verify: bool) -> dict[str, Path]:
    """role -> path for every file the manifest names, after checking size and sha256."""
    manifest = json.loads(manifest_path.read_text())
    files = {}
    for entry in manifest["files"]:
        path = manifest_path.parent / entry["path"]
        if verify:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                while block := fh.read(1 << 22):
                    digest.update(block)
            if digest.hexdigest() != entry["sha256"]:
                sys.exit(f"error: sha256 of {path} does not match the manifest; the artifact is corrupt")
        files.setdefault(entry["role"], path)
    return files


def eos_ids(files: dict[str, Path]) -> set[int]:
    """End-of-sequence ids from the exported config.json (an int or a list)."""
    config = json.loads(files["config"].read_text()) if "config" in files else {}
    eos = config.get("eos_token_id")
    return set(eos) if isinstance(eos, list) else {eos} if isinstance(eos, int) else set()


class Decoder:
    """One sequence over an optimum-layout decoder graph with a KV cache."""

    def __init__(self, model_path: Path, threads: int | None) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past: dict[str, np.ndarray] = {}
        for name, info in inputs.items():
            if name.startswith("past_key_values."):
                _, n_kv, _, head_dim = info.shape  # (batch, kv heads, past length, head dim)
                self.past[name] = np.zeros((1, n_kv, 0, head_dim), dtype=DTYPES[info.type])
        self.n_past = 0

    def step(self, ids: list[int]) -> np.ndarray:
        """Feed ``ids``; the logits of the last one (vocab,), float32."""
        n = len(ids)
        feed = {"input_ids": np.array([ids], dtype=np.int64), **self.past}
        if "attention_mask" in self.input_names:
            feed["attention_mask"] = np.ones((1, self.n_past + n), dtype=np.int64)
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.arange(self.n_past, self.n_past + n, dtype=np.int64)[None, :]
        outputs = dict(zip(self.output_names, self.session.run(None, feed), strict=True))
        self.past = {name: outputs[name.replace("past_key_values.", "present.")] for name in self.past}
        self.n_past += n
        return outputs["logits"][0, -1].astype(np.float32)


def generate(decoder: Decoder, prompt_ids: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy decoding: the argmax token each step, until ``max_new_tokens`` or a stop id."""
    out: list[int] = []
    logits = decoder.step(prompt_ids)
    while len(out) < max_new_tokens:
        token = int(np.argmax(logits))
        out.append(token)
        if token in stop or len(out) == max_new_tokens:
            break
        logits = decoder.step([token])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="The quick brown fox")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--manifest", default=None, help="Default: the manifest in ../model/")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true", help="Always generate --max-new-tokens tokens.")
    parser.add_argument("--no-verify", action="store_true", help="Skip the sha256 check of the artifact.")
    parser.add_argument("--json", action="store_true", help="Print one JSON line with ids and text.")
    args = parser.parse_args()

    files = verified_files(find_manifest(args.manifest), verify=not args.no_verify)
    tokenizer = Tokenizer.from_file(str(files["tokenizer"]))
    prompt_ids = tokenizer.encode(args.prompt).ids
    decoder = Decoder(files["model"], args.threads)
    stop = set() if args.ignore_eos else eos_ids(files)
    ids = generate(decoder, prompt_ids, args.max_new_tokens, stop)
    text = tokenizer.decode(ids)
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, "ids": ids, "text": text}))
    else:
        print(args.prompt + text)


if __name__ == "__main__":
    main()
