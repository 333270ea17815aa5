"""Greedy generation with an edgeq GGUF export: llama-cpp-python + numpy, nothing else.

    pip install llama-cpp-python numpy
    python python/run_llamacpp.py --prompt "def main():" --max-new-tokens 32

Reads the bundle's ``model/*.manifest.json`` (the exporter's contract: every file with its sha256),
checks the hashes, then decodes greedily: ``Llama.eval`` feeds the prompt (its last position is
flagged for logits), ``llama_get_logits_ith(ctx, -1)`` reads those logits, and each argmax token is
fed back one at a time. The tokenizer is the one inside the GGUF file (llama.cpp's own), with the BOS
token added only when the file says the model wants one. Prints the generated text; ``--json``
prints the prompt ids, generated ids and text as one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import llama_cpp
import numpy as np

HERE = Path(__file__).resolve().parent


def find_manifest(given: str | None) -> Path:
    """The manifest given, else the one in the bundle's ``model/`` folder."""
    if given:
        return Path(given)
    found = sorted((HERE.parent / "model").glob("*manifest.json"))
    if not found:
        sys.exit(f"error: no *.manifest.json in {HERE.parent / 'model'}; pass --manifest PATH")
    return found[0]


def verified_model(manifest_path: Path, verify: bool) -> tuple[Path, dict]:
    """The GGUF file the manifest names (size and sha256 checked) and the manifest's model facts."""
    manifest = json.loads(manifest_path.read_text())
    model = None
    for entry in manifest["files"]:
        path = manifest_path.parent / entry["path"]
        if verify:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                while block := fh.read(1 << 22):
                    digest.update(block)
            if digest.hexdigest() != entry["sha256"]:
                sys.exit(f"error: sha256 of {path} does not match the manifest; the artifact is corrupt")
        if entry["role"] == "model":
            model = path
    if model is None:
        sys.exit(f"error: {manifest_path} names no model file; re-export the artifact")
    return model, manifest.get("model", {})


def last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    """The logits of the last token ``Llama.eval`` fed (vocab,), float32."""
    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()


def generate(llm: llama_cpp.Llama, prompt_ids: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy decoding: the argmax token each step, until ``max_new_tokens`` or a stop id."""
    out: list[int] = []
    llm.eval(prompt_ids)
    logits = last_logits(llm)
    while len(out) < max_new_tokens:
        token = int(np.argmax(logits))
        out.append(token)
        if token in stop or len(out) == max_new_tokens:
            break
        llm.eval([token])
        logits = last_logits(llm)
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

    model_path, facts = verified_model(find_manifest(args.manifest), verify=not args.no_verify)
    n_ctx = int(facts.get("n_ctx") or 2048)
    llm = llama_cpp.Llama(str(model_path), n_ctx=n_ctx, n_threads=args.threads, logits_all=False, verbose=False)
    prompt_ids = llm.tokenize(args.prompt.encode("utf-8"), add_bos=True, special=False)
    stop = set() if args.ignore_eos else {llm.token_eos()}
    ids = generate(llm, prompt_ids, args.max_new_tokens, stop)
    text = llm.detokenize(ids).decode("utf-8", errors="replace")
    llm.close()
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, "ids": ids, "text": text}))
    else:
        print(args.prompt + text)


if __name__ == "__main__":
    main()
