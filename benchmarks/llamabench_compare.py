"""Decode speed: edgeq's harness vs llama.cpp's llama-bench vs bare decode loops, same model, same threads.

    python benchmarks/llamabench_compare.py [--threads 1] [--rounds 7] [--repeat 5] [--bin-dir DIR]

The model is the bundled one, RTN 4-bit g32 sym, exported to GGUF q4_0 and ONNX int4 (``MatMulNBits``).
Each configuration runs in a fresh process, ``repeat`` timed generations after one warmup, and reports
the mean decode tokens/s over them (the harness's definition):

* ``harness gguf`` / ``harness onnx``: ``python -m edgeq.runtime`` through ``edgeq.devices.local``, as
  ``edgeq bench`` runs it (RSS sampler, bandwidth probe, per-token timing): a greedy continuation of
  ``prompt_tokens`` of the built-in prompt;
* ``bare gguf``: the same llama.cpp calls from llama-cpp-python (``llama_decode`` on a one-token batch,
  argmax over the logits), with the same context settings, and nothing else in the loop;
* ``bare onnx``: the same onnxruntime I/O-binding KV-cache loop as the backend, inline;
* ``llama-bench``: ``llama-bench -p 0 -n N -t T -fa off`` (decode from an empty cache, as the issue asks)
  and ``-n N -d P`` (after P cached tokens, as the harness decodes); ``-fa off`` because the harness's
  llama.cpp context runs without flash attention (llama-bench's default is auto). llama-bench decodes
  random tokens and reads no logits back: the floor a Python loop cannot reach.

The configurations run interleaved, ``rounds`` times (rotating the order each round), so that the load of
a shared machine falls on all of them alike; ratios are taken within a round and summarized by their
median (and min/max) across rounds. The harness's roofline fraction (decode bandwidth over its probed
copy bandwidth) is recorded as it reports it.

Process-level runs last seconds each, and a shared 2-core machine's load swings by 2-4x over that
time, far more than the 2% to be resolved. The harness overhead is therefore measured in one process
per format (``paired``): the harness's timed generation (``measure_generation`` with the RSS sampler
running, as in a bench) and the bare loop on the *same loaded model*, alternating generation by
generation ``pairs`` times. Overhead = 1 - median(harness / bare) of those pairs, with a
distribution-free 95% interval of the median; the bare loop is timed by wall clock over the whole loop,
the harness sums its per-token latencies. The CPU-time ratio (process time per whole generation,
prefill included) is reported beside it: preemption by other jobs does not move it.

Writes ``benchmarks/llamabench_compare.json`` and prints a table last. ``--bare SPEC`` is the internal
entry point of the bare loops' processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
N_CTX = 256  # the bundled model's context, the harness's default n_ctx
sys.path.insert(0, str(ROOT))


# -- the bare loops (run in their own process) ----------------------------------------------------------


def _prompt_ids(ids: list[int], n: int) -> list[int]:
    return (ids * (n // len(ids) + 1))[:n]


def gguf_loop(lib, ctx, n_vocab: int, prompt: list[int], n: int):
    """A greedy generation over a llama.cpp context: the C calls the harness's backend makes, nothing more."""
    import numpy as np

    p = len(prompt)
    batch = lib.llama_batch_init(512, 0, 1)
    for i in range(512):
        batch.seq_id[i][0] = 0
        batch.n_seq_id[i] = 1
        batch.logits[i] = 1

    def generation() -> tuple[float, list[int]]:
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        for i, t in enumerate(prompt):
            batch.token[i], batch.pos[i] = t, i
        batch.n_tokens = p
        assert lib.llama_decode(ctx, batch) == 0
        tok = int(np.argmax(np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(p, n_vocab))[-1]))
        ids = [tok]
        batch.n_tokens = 1
        t0 = time.perf_counter()
        for i in range(n):
            batch.token[0], batch.pos[0] = tok, p + i
            lib.llama_decode(ctx, batch)
            tok = int(np.argmax(np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(n_vocab,))))
            ids.append(tok)
        return n / (time.perf_counter() - t0), ids

    return generation


def onnx_loop(sess, prompt: list[int], n: int, n_kv_heads: int, head_dim: int):
    """A greedy generation over an onnxruntime session: the backend's I/O-binding cache loop, inline."""
    import numpy as np
    import onnxruntime as ort

    p = len(prompt)
    pasts = sorted((i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")),
                   key=lambda s: (int(s.split(".")[1]), s.endswith("value")))  # fmt: skip
    presents = [s.replace("past_key_values", "present") for s in pasts]
    prompt_ids = np.asarray([prompt], dtype=np.int64)  # (1, P)
    mask, pos = np.ones((1, N_CTX), dtype=np.int64), np.arange(N_CTX, dtype=np.int64)[None, :]
    empty = np.zeros((1, n_kv_heads, 0, head_dim), dtype=np.float32)
    binding, one = sess.io_binding(), np.zeros((1, 1), dtype=np.int64)

    def step(ids, start: int, cache: list):
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask[:, : start + ids.shape[1]])
        binding.bind_cpu_input("position_ids", pos[:, start : start + ids.shape[1]])
        for name, value in zip(pasts, cache, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in presents:
            binding.bind_output(name, "cpu")
        sess.run_with_iobinding(binding)
        out = binding.get_outputs()
        return out[0].numpy()[0, -1], out[1:]

    def generation() -> tuple[float, list[int]]:
        logits, cache = step(prompt_ids, 0, [ort.OrtValue.ortvalue_from_numpy(empty) for _ in pasts])
        tok = int(np.argmax(logits))
        ids = [tok]
        t0 = time.perf_counter()
        for i in range(n):
            one[0, 0] = tok
            logits, cache = step(one, p + i, cache)
            tok = int(np.argmax(logits))
            ids.append(tok)
        return n / (time.perf_counter() - t0), ids

    return generation


def bare_gguf(spec: dict) -> dict:
    """Its own process: llama-cpp-python loads the GGUF with the harness's context settings."""
    import llama_cpp as lib

    from edgeq.runtime.__main__ import BUILTIN_PROMPT

    threads = spec["threads"]
    llm = lib.Llama(spec["model"], n_ctx=N_CTX, n_batch=512, n_threads=threads, n_threads_batch=threads,
                    flash_attn=False, logits_all=False, verbose=False)  # fmt: skip
    ids = list(llm.tokenize(BUILTIN_PROMPT.encode(), add_bos=False, special=False))
    prompt = _prompt_ids(ids, spec["prompt_tokens"])
    return _timed(gguf_loop(lib, llm.ctx, llm.n_vocab(), prompt, spec["decode_tokens"]), spec["repeat"])


def bare_onnx(spec: dict) -> dict:
    """Its own process: an onnxruntime session with the backend's session options."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from edgeq.runtime.__main__ import BUILTIN_PROMPT

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = spec["threads"]
    sess = ort.InferenceSession(spec["model"], so, providers=["CPUExecutionProvider"])
    ids = Tokenizer.from_file(spec["tokenizer"]).encode(BUILTIN_PROMPT, add_special_tokens=False).ids
    prompt = _prompt_ids(list(ids), spec["prompt_tokens"])
    loop = onnx_loop(sess, prompt, spec["decode_tokens"], spec["n_kv_heads"], spec["head_dim"])
    return _timed(loop, spec["repeat"])


def paired(spec: dict) -> dict:
    """Harness and bare loop in one process on one loaded backend, alternating generation by generation.

    The harness arm is what ``edgeq.runtime`` times: ``measure_generation`` over the backend, with an
    RSS sampler running for the whole process as in a bench (it sleeps inside timed regions). The bare
    arm drives the same loaded model (the backend's llama.cpp context / onnxruntime session) with the
    loops above, the sampler kept asleep meanwhile (as if there were none). Alternating ABBA..., each
    generation a fraction of a second, puts a shared machine's load on both arms alike.
    """
    from edgeq.export.manifest import load_manifest
    from edgeq.runtime.__main__ import BUILTIN_PROMPT, tokens_of
    from edgeq.runtime.backends import BackendOptions, open_backend
    from edgeq.runtime.metrics import RssSampler, measure_generation, paused_sampling

    man = load_manifest(spec["manifest"])
    backend = open_backend(man, BackendOptions(threads=spec["threads"]))
    prompt = tokens_of(backend, BUILTIN_PROMPT, spec["prompt_tokens"], cycle=True)
    n = spec["decode_tokens"]
    if man.format == "gguf":  # the backend's own context (private attributes: a benchmark may look inside)
        bare = gguf_loop(backend._lib, backend._llm.ctx, backend.vocab_size, prompt, n)
    else:
        bare = onnx_loop(backend._session, prompt, n, man.model["n_kv_heads"], man.model["head_dim"])

    def harness() -> tuple[float, list[int]]:
        timing = measure_generation(backend, prompt, n)
        return timing.decode_tokens_per_s, timing.generated_ids

    def bare_alone() -> tuple[float, list[int]]:
        with paused_sampling():
            return bare()

    sampler = RssSampler(5.0).start()
    harness(), bare_alone()  # warmup
    out: dict = {"harness": [], "bare": [], "harness_cpu_s": [], "bare_cpu_s": [], "same_tokens": True}
    for i in range(spec["pairs"]):
        arms = [("harness", harness), ("bare", bare_alone)]
        for name, fn in arms if i % 2 == 0 else arms[::-1]:
            cpu0 = time.process_time()
            tps, ids = fn()
            out[f"{name}_cpu_s"].append(time.process_time() - cpu0)  # all threads, the whole generation
            out[name].append(tps)
            out.setdefault(f"{name}_ids", ids)
            out["same_tokens"] &= ids == out[f"{name}_ids"]
    out["same_tokens"] &= out.pop("harness_ids") == out.pop("bare_ids")
    out["ratios"] = [h / b for h, b in zip(out["harness"], out["bare"], strict=True)]
    # CPU seconds per generation, bare over harness: a speed ratio that preemption by other jobs cannot move
    out["cpu_ratios"] = [b / h for h, b in zip(out["harness_cpu_s"], out["bare_cpu_s"], strict=True)]
    sampler.stop()
    out["rss_samples"] = sampler.samples
    backend.close()
    return out


def _timed(generation, repeat: int) -> dict:
    generation()  # warmup, as the harness's plan (warmup=1)
    runs = [generation() for _ in range(repeat)]
    tps = [r[0] for r in runs]
    return {"decode_tokens_per_s": statistics.fmean(tps), "runs": tps, "generated_ids": runs[0][1]}


# -- the configurations (parent process) ----------------------------------------------------------------


def build_artifacts(work: Path) -> dict[str, Path]:
    """RTN w4g32 sym of the bundled model -> GGUF q4_0 and ONNX int4 (reused when ``work`` holds them)."""
    from edgeq.api import compress, export
    from edgeq.bundled import MODEL_DIR
    from edgeq.config import CompressConfig, ExportConfig

    gguf, onnx = work / "w4g32.q4_0.manifest.json", work / "w4g32.onnx-int4" / "manifest.json"
    if not (gguf.exists() and onnx.exists()):
        run = compress(MODEL_DIR, CompressConfig(bits=4, group_size=32, sym=True), work / "w4g32")
        export(run, ExportConfig("gguf", "q4_0", parity=False), work / "w4g32.q4_0.gguf")
        export(run, ExportConfig("onnx", "int4", parity=False), work / "w4g32.onnx-int4")
    return {"gguf": gguf, "onnx": onnx}


def run_harness(manifest: Path, args) -> dict:
    from edgeq.devices.local import bench_local
    from edgeq.runtime.plan import Plan

    plan = Plan(prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, repeat=args.repeat, warmup=1,
                threads=args.threads, eval_text=None, bandwidth_probe=True)  # fmt: skip
    result = bench_local(manifest, plan, timeout_s=600)
    gen, bw = result["generation"], result["bandwidth"]
    return {
        "decode_tokens_per_s": gen["decode_tokens_per_s"],
        "runs": gen["spread"]["decode_tokens_per_s"],
        "generated_ids": gen["generated_ids"],
        "roofline_fraction": bw.get("roofline_fraction"),
        "probe_gb_per_s": bw.get("probe_gb_per_s"),
        "achieved_decode_gb_per_s": bw.get("achieved_decode_gb_per_s"),
        "weights_fit_in_llc": bw.get("weights_fit_in_llc"),
        "threads": result["environment"].get("threads"),
    }


def _child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--bare", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=600, stdin=subprocess.DEVNULL)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['kind']} child failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_paired(manifest: Path, args) -> dict:
    spec = {"kind": "paired", "manifest": str(manifest), "threads": args.threads, "pairs": args.pairs,
            "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens}  # fmt: skip
    return _child(spec)


def run_bare(kind: str, manifest: Path, args) -> dict:
    from edgeq.export.manifest import load_manifest

    man = load_manifest(manifest, verify=False)
    spec = {"kind": kind, "model": str(man.file("model")), "threads": args.threads, "repeat": args.repeat,
            "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
            "n_kv_heads": man.model.get("n_kv_heads"), "head_dim": man.model.get("head_dim")}  # fmt: skip
    if kind == "onnx":
        spec["tokenizer"] = str(man.file("tokenizer"))
    return _child(spec)


def run_llama_bench(gguf_manifest: Path, args, depth: int) -> dict:
    from edgeq.export.manifest import load_manifest
    from edgeq.runtime.backends.native import parse_llama_bench

    model = str(load_manifest(gguf_manifest, verify=False).file("model"))
    argv = [str(Path(args.bin_dir) / "llama-bench"), "-m", model, "-p", "0", "-n", str(args.decode_tokens),
            "-t", str(args.threads), "-r", str(args.repeat), "-fa", "off", "-o", "json"]  # fmt: skip
    if depth:
        argv += ["-d", str(depth)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed: {proc.stderr.strip()[-500:]}")
    test = parse_llama_bench(proc.stdout, "json").find(0, args.decode_tokens, depth)
    return {"decode_tokens_per_s": test.tokens_per_s, "runs": list(test.samples_tokens_per_s), "argv": argv}


# -- summary -----------------------------------------------------------------------------------------------


def median_ci(values: list[float]) -> tuple[float, float]:
    """A distribution-free ~95% confidence interval of the median (order statistics n/2 -+ 0.98 sqrt(n))."""
    x, n = sorted(values), len(values)
    half = 0.98 * n**0.5
    return x[max(0, int(n / 2 - half))], x[min(n - 1, int(n / 2 + half))]


def summary(values: list[float], keep: bool = True) -> dict:
    """Median, min, max, spread and a 95% interval of the median; the values too when ``keep``."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "spread_pct": 100 * (max(values) - min(values)) / med,
            "ci95": median_ci(values), "n": len(values), **({"values": values} if keep else {})}  # fmt: skip


RATIOS = {  # name: (numerator, denominator)
    "harness/bare gguf": ("harness gguf", "bare gguf"),
    "harness/bare onnx": ("harness onnx", "bare onnx"),
    "harness gguf / llama-bench tg": ("harness gguf", "llama-bench tg"),
    "harness gguf / llama-bench tg@d": ("harness gguf", "llama-bench tg@d"),
    "harness onnx / llama-bench tg": ("harness onnx", "llama-bench tg"),
    "harness onnx / llama-bench tg@d": ("harness onnx", "llama-bench tg@d"),
    "bare gguf / llama-bench tg@d": ("bare gguf", "llama-bench tg@d"),
}


def machine() -> dict:
    from edgeq.runtime.__main__ import cpu_model

    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "os": platform.platform(),
            "python": platform.python_version(), "load_average_at_start": list(os.getloadavg())}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pairs", type=int, default=300, help="alternating harness/bare generations per format")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--bin-dir", default=os.environ.get("EDGEQ_LLAMA_BIN_DIR", "/work/llama-tools/build/bin"))
    parser.add_argument("--work", type=Path, default=None, help="artifact dir (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=HERE / "llamabench_compare.json")
    parser.add_argument("--bare", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare:
        spec = json.loads(args.bare)
        entry = {"gguf": bare_gguf, "onnx": bare_onnx, "paired": paired}[spec["kind"]]
        print(json.dumps(entry(spec)))
        return 0
    if not (Path(args.bin_dir) / "llama-bench").is_file():
        print(f"error: no llama-bench in {args.bin_dir}; build llama.cpp's tools (tests/data/native/README.txt)")
        return 2
    with tempfile.TemporaryDirectory(prefix="edgeq-llamabench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        arts = build_artifacts(work)
        configs = {
            "harness gguf": lambda: run_harness(arts["gguf"], args),
            "bare gguf": lambda: run_bare("gguf", arts["gguf"], args),
            "llama-bench tg": lambda: run_llama_bench(arts["gguf"], args, 0),
            "llama-bench tg@d": lambda: run_llama_bench(arts["gguf"], args, args.prompt_tokens),
            "harness onnx": lambda: run_harness(arts["onnx"], args),
            "bare onnx": lambda: run_bare("onnx", arts["onnx"], args),
        }
        out = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k != "bare"}, "rounds": []}
        out["settings"]["out"] = str(args.out)
        out["settings"]["work"] = str(work)
        names = list(configs)
        t_start = time.time()
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            runs = {name: configs[name]() for name in order}
            out["rounds"].append({"order": order, "runs": runs})
            line = ", ".join(f"{k} {v['decode_tokens_per_s']:.0f}" for k, v in runs.items())
            print(f"round {r + 1}/{args.rounds}: {line}", file=sys.stderr, flush=True)
        out["paired"] = {fmt: run_paired(arts[fmt], args) for fmt in ("gguf", "onnx")}
        out["wall_time_s"] = time.time() - t_start
    finish(out, args)
    return 0


def finish(out: dict, args) -> None:
    rounds = out["rounds"]
    speeds = {name: summary([r["runs"][name]["decode_tokens_per_s"] for r in rounds]) for name in rounds[0]["runs"]}
    ratios = {name: summary([r["runs"][a]["decode_tokens_per_s"] / r["runs"][b]["decode_tokens_per_s"] for r in rounds])
              for name, (a, b) in RATIOS.items()}  # fmt: skip
    roofline = {
        k: summary([r["runs"][k]["roofline_fraction"] for r in rounds]) for k in ("harness gguf", "harness onnx")
    }
    same_tokens = {
        fmt: all(
            r["runs"][f"harness {fmt}"]["generated_ids"] == r["runs"][f"bare {fmt}"]["generated_ids"] for r in rounds
        )
        for fmt in ("gguf", "onnx")
    }
    paired = {fmt: {"harness/bare": summary(p["ratios"], False), "harness": summary(p["harness"], False),
                    "bare": summary(p["bare"], False), "harness/bare cpu": summary(p["cpu_ratios"], False),
                    "same_tokens": p["same_tokens"]} for fmt, p in out["paired"].items()}  # fmt: skip
    overhead = {fmt: 1 - paired[fmt]["harness/bare"]["median"] for fmt in paired}
    overhead_cpu = {fmt: 1 - paired[fmt]["harness/bare cpu"]["median"] for fmt in paired}
    out.update(speeds=speeds, ratios=ratios, roofline_fraction=roofline, same_tokens=same_tokens,
               paired_summary=paired, harness_overhead=overhead, harness_overhead_cpu=overhead_cpu,
               overhead_within_2pct={k: v <= 0.02 for k, v in overhead.items()})  # fmt: skip
    for r in rounds:  # the token ids were compared above; the file keeps the verdict, not the ids
        for run in r["runs"].values():
            run.pop("generated_ids", None)
    out["machine"].setdefault("load_average_at_end", list(os.getloadavg()))
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"\nthreads {args.threads}, prompt {args.prompt_tokens}, decode {args.decode_tokens}, "
          f"{args.repeat} generations per run, {len(rounds)} rounds; {out['machine']['cpu']}")  # fmt: skip
    print(f"{'configuration':34s} {'median tok/s':>12s} {'min':>8s} {'max':>8s}")
    for name, s in speeds.items():
        print(f"{name:34s} {s['median']:12.0f} {s['min']:8.0f} {s['max']:8.0f}")
    print(f"{'ratio (paired per round)':34s} {'median':>12s} {'min':>8s} {'max':>8s}")
    for name, s in ratios.items():
        print(f"{name:34s} {s['median']:12.3f} {s['min']:8.3f} {s['max']:8.3f}")
    for k, s in roofline.items():
        print(f"roofline fraction ({k}): median {s['median']:.3f} (min {s['min']:.3f}, max {s['max']:.3f})")
    print(
        f"in-process, alternating ({args.pairs} pairs): {'median':>8s} {'95% CI of median':>18s} {'min':>8s} {'max':>8s}"
    )
    for fmt, p in paired.items():
        for key in ("harness", "bare", "harness/bare", "harness/bare cpu"):
            s, (lo, hi) = p[key], p[key]["ci95"]
            print(f"  {fmt} {key:29s} {s['median']:12.3f}  [{lo:7.3f}, {hi:7.3f}] {s['min']:8.3f} {s['max']:8.3f}")
    for fmt in ("gguf", "onnx"):
        verdict = "ok" if overhead[fmt] <= 0.02 else "OVER 2%"
        print(f"harness overhead {fmt} (in-process, paired): {100 * overhead[fmt]:+.2f}% wall clock ({verdict}), "
              f"{100 * overhead_cpu[fmt]:+.2f}% CPU time per generation; "
              f"same greedy tokens: {same_tokens[fmt] and paired[fmt]['same_tokens']}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
