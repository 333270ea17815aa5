"""Export peak memory and artifact size at scale: a Llama-shaped model with random weights -> GGUF and ONNX.

    python benchmarks/export_scale.py --shape 1b              # TinyLlama-1.1B shape
    python benchmarks/export_scale.py --shape 7b --onnx no    # Llama-2-7B shape, GGUF only
    python benchmarks/export_scale.py --shape small           # seconds; keeps the script working

Stages, each in its own child process so that its peak memory is its own:

1. ``model``: random fp16 weights written shard by shard (numpy + ``safetensors.numpy.save_file``,
   one shard of <= ``--shard-mb`` in memory at a time) with ``model.safetensors.index.json``, a Llama
   config.json and the bundled byte-level BPE tokenizer (its ids fit any vocab; GGUF pads the rest);
2. ``compress``: RTN w4g32 through ``edgeq.api.compress`` (streams tensors in, but see the report);
3. ``gguf``: ``edgeq export --type q4_0`` (no parity), 4. ``onnx``: ``--precision int4`` (no parity),
5. ``onnx16``: ``--precision int4 --activations fp16`` (float16 scales, KV cache and float tensors).

Memory of each stage: ``VmHWM`` of the child (``/proc/self/status``, read by the child at its end:
its peak resident set, *including file-backed pages* of memory-mapped inputs, which the kernel can
drop under pressure) and the peaks of ``RssAnon`` / ``RssFile`` sampled by the parent every 50 ms
(``RssAnon`` is what the process really needs). Goal (issue 5): export peak < 3 GB + the largest
tensor (fp32 bytes).

Size: the artifact vs the *ideal* ``bits x params``: every quantized weight at its code bits plus an
fp16 scale per group (and its zero when asymmetric), every other tensor at fp16 (goal: within 3%);
and vs the *layout* bytes of the tensors as the format stores them (per the exporter's labels: e.g.
fp32 norms in ONNX, fp16 scales), which isolates the writer's own overhead (metadata, tokenizer, protobuf).

Both exporters stream (one tensor in memory at a time). The ONNX export ends with an onnxruntime
session on the artifact (every op must have a kernel); past 1 GiB of weights that check runs in a
child process of the exporter, and its peak (``session_peak_rss_bytes``: the artifact loaded, which
is a *load* cost, not an export cost) is reported separately.
Prints a table last and writes JSON (default ``benchmarks/export_scale_<shape>.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("export_scale")

SHAPES: dict[str, dict[str, int]] = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),  # Llama-2-7B
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),  # TinyLlama-1.1B
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000),
}  # fmt: skip
GIB = 1 << 30
STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


# -- the model --------------------------------------------------------------------------------------
def tensor_shapes(shape: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama tensor names and shapes, in checkpoint order."""
    h, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.self_attn.q_proj.weight", (h, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, h)),
                (f"{p}.mlp.gate_proj.weight", (inter, h)), (f"{p}.mlp.up_proj.weight", (inter, h)),
                (f"{p}.mlp.down_proj.weight", (h, inter)),
                (f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]  # fmt: skip
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def random_tensor(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """fp16 N(0, 0.02) weights (ones for norms), generated in row blocks to bound the fp32 temporary."""
    if len(shape) == 1:
        return np.ones(shape, dtype=np.float16)
    out = np.empty(shape, dtype=np.float16)
    step = max(1, (64 << 20) // (4 * shape[1]))
    for r in range(0, shape[0], step):
        block = rng.standard_normal((min(step, shape[0] - r), shape[1]), dtype=np.float32)
        out[r : r + step] = block * np.float32(0.02)
    return out


def write_model(shape_name: str, out: Path, shard_mb: int) -> dict:
    """The random model dir, shard by shard; returns {params, largest_tensor_fp32_bytes, shards}."""
    from safetensors.numpy import save_file

    from edgeq.bundled import MODEL_DIR

    shape = SHAPES[shape_name]
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shard: dict[str, np.ndarray] = {}
    weight_map: dict[str, str] = {}
    shards = 0

    def flush() -> None:
        nonlocal shards
        shards += 1
        save_file(shard, str(out / f"model-{shards:05d}.safetensors"), metadata={"format": "pt"})
        shard.clear()

    for name, dims in tensor_shapes(shape):
        if shard and sum(a.nbytes for a in shard.values()) + int(np.prod(dims)) * 2 > shard_mb << 20:
            flush()
        shard[name] = random_tensor(rng, dims)
        weight_map[name] = f"model-{shards + 1:05d}.safetensors"
    flush()
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float16",
              "head_dim": shape["hidden_size"] // shape["num_attention_heads"], **shape}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(MODEL_DIR / f, out / f)
    dims = [d for _, d in tensor_shapes(shape)]
    return {
        "params": int(sum(np.prod(d) for d in dims)),
        "largest_tensor_fp32_bytes": int(max(np.prod(d) for d in dims)) * 4,
        "shards": shards,
    }


# -- the stages, run in child processes ---------------------------------------------------------------
def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The memory fields of /proc/PID/status in bytes (Linux)."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                out[key] = int(value.split()[0]) * 1024  # "kB"
    return out


def child_stage(stage: str, work: Path, shape_name: str, shard_mb: int) -> dict:
    """One stage in this (child) process; returns its result plus the RSS after imports."""
    from edgeq.config import CompressConfig, ExportConfig

    if stage == "model":
        return write_model(shape_name, work / "model", shard_mb)
    if stage == "compress":
        import torch  # noqa: F401  (imported before the baseline: its ~250 MB are not the stage's)

        from edgeq.api import compress

        base = proc_status()["VmRSS"]
        compress(work / "model", CompressConfig(bits=4, group_size=32, sym=True), work / "run")
        return {"baseline_rss_bytes": base}
    from edgeq.export.api import export

    if stage.startswith("onnx"):
        import optimum.exporters.onnx  # noqa: F401
        import torch  # noqa: F401
    base = proc_status()["VmRSS"]
    if stage == "gguf":
        man = export(work / "run", ExportConfig("gguf", "q4_0", parity=False), work / "model.q4_0.gguf")
    else:
        activations = "fp16" if stage == "onnx16" else "fp32"
        cfg = ExportConfig("onnx", "int4", parity=False, activations=activations)
        man = export(work / "run", cfg, work / f"{stage}-int4")
    out = {"baseline_rss_bytes": base, "artifact_bytes": man.weight_bytes, "types": man.scheme["artifact_types"]}
    onnx_info = man.extra.get("onnx", {})
    if "session_peak_rss_bytes" in onnx_info:
        out["session_peak_rss_bytes"] = onnx_info["session_peak_rss_bytes"]
    if "timings_s" in onnx_info:
        out["timings_s"] = onnx_info["timings_s"]
    return out


def run_child(stage: str, args: argparse.Namespace, mem_cap_bytes: int) -> dict:
    """Run one stage in a child process, sampling its memory; kill it past the cap or the timeout."""
    cmd = [sys.executable, __file__, "--child", stage, "--shape", args.shape, "--work", str(args.work),
           "--shard-mb", str(args.shard_mb)]  # fmt: skip
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peaks = dict.fromkeys(("RssAnon", "RssFile", "VmRSS"), 0)
    killed = None
    while child.poll() is None:
        try:
            status = proc_status(child.pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        for key in peaks:
            peaks[key] = max(peaks[key], status.get(key, 0))
        elapsed = time.perf_counter() - t0
        if status.get("RssAnon", 0) > mem_cap_bytes or elapsed > args.timeout:
            killed = f"RssAnon {status.get('RssAnon', 0) / GIB:.1f} GiB > cap" if elapsed <= args.timeout else "timeout"
            child.kill()  # the child this function started
            break
        time.sleep(0.05)
    stdout, _ = child.communicate()
    result: dict = {"stage": stage, "seconds": round(time.perf_counter() - t0, 1), "returncode": child.returncode}
    result.update({f"peak_{k.lower()}_bytes": v for k, v in peaks.items()})
    if killed:
        result["skipped"] = f"killed: {killed}"
    lines = [ln for ln in (stdout or "").splitlines() if ln.startswith("{")]
    if child.returncode == 0 and lines:
        result.update(json.loads(lines[-1]))
    elif not killed:
        result["skipped"] = f"child failed with exit code {child.returncode} (see its stderr above)"
    return result


def child_main(args: argparse.Namespace) -> None:
    out = child_stage(args.child, args.work, args.shape, args.shard_mb)
    out["vmhwm_bytes"] = proc_status()["VmHWM"]  # this process's peak resident set
    print(json.dumps(out))


# -- sizes -----------------------------------------------------------------------------------------
def ideal_bytes(run_dir: Path) -> int:
    """bits x params: codes at their bits + an fp16 scale (and a zero if asym) per group; the rest fp16."""
    from edgeq.rundir import RunDir

    run = RunDir.open(run_dir)
    total = 0.0
    for name in run.names():
        n_params = int(np.prod(run.shape(name)))
        scheme = run.scheme(name)
        if scheme is None:
            total += 2 * n_params
            continue
        n, k = run.shape(name)
        groups = n * scheme.groups(k)
        total += n_params * scheme.bits / 8 + groups * 2 + (0 if scheme.sym else groups * scheme.bits / 8)
    return int(total)


def layout_bytes(run_dir: Path, fmt: str, types: dict[str, str], scale_bytes: int = 4) -> int:
    """The bytes of the tensors as the artifact stores them (GGUF block types; ONNX labels)."""
    import re

    from edgeq.rundir import RunDir

    run = RunDir.open(run_dir)
    per_32 = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
    total = 0
    for name in run.names():
        dims = run.shape(name)
        n_params, label = int(np.prod(dims)), types.get(name, "f32" if fmt == "gguf" else "fp32")
        if label in per_32:
            total += n_params // 32 * per_32[label]
        elif (m := re.match(r"MatMulNBits\(bits=(\d+),block=(\d+)(?:,scales=([^)]*))?\)", label)) is not None:
            bits, block = int(m[1]), int(m[2])
            per_scale = 2 if m[3] and "fp16" in m[3] else scale_bytes  # fp16, or fp16 behind a Cast to fp32
            blocks = -(-dims[1] // block)
            zp = 0 if run.scheme(name).sym else dims[0] * -(-blocks * bits // 8)  # type: ignore[union-attr]
            total += dims[0] * blocks * (block * bits // 8 + per_scale) + zp  # packed codes + scales
        else:
            total += n_params * (2 if label in ("f16",) or "fp16" in label else 4)  # incl. fp32<-fp16
    return total


# -- report ----------------------------------------------------------------------------------------
def summarize(results: list[dict], model: dict, ideal: int, work: Path) -> None:
    """Add goal checks and size ratios to the export results, in place."""
    budget = 3 * GIB + model["largest_tensor_fp32_bytes"]
    for res in results:
        if res["stage"] not in ("gguf", "onnx", "onnx16") or "skipped" in res:
            continue
        res["rss_budget_bytes"] = budget
        res["peak_ok_vmhwm"] = res["vmhwm_bytes"] < budget
        res["peak_ok_anon"] = res["peak_rssanon_bytes"] < budget
        res["ideal_bytes"] = ideal
        res["size_ratio_ideal"] = round(res["artifact_bytes"] / ideal, 4)
        fmt = "gguf" if res["stage"] == "gguf" else "onnx"
        res["layout_bytes"] = layout_bytes(work / "run", fmt, res.pop("types"), 2 if res["stage"] == "onnx16" else 4)
        res["size_ratio_layout"] = round(res["artifact_bytes"] / res["layout_bytes"], 4)
        res["size_ok"] = res["size_ratio_ideal"] <= 1.03


def table(results: list[dict]) -> str:
    head = "| stage | s | VmHWM GiB | peak RssAnon GiB | peak RssFile GiB | artifact MiB | x ideal | x layout | check session GiB |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['stage']} | {r['seconds']} | skipped: {r['skipped']} ||||||")
            continue
        gib = [f"{r.get(k, 0) / GIB:.2f}" for k in ("vmhwm_bytes", "peak_rssanon_bytes", "peak_rssfile_bytes")]
        size = ["", "", ""]
        if "size_ratio_ideal" in r:
            size = [
                f"{r['artifact_bytes'] / 2**20:.0f}",
                f"{r['size_ratio_ideal']:.3f}",
                f"{r['size_ratio_layout']:.4f}",
            ]
        session = f"{r['session_peak_rss_bytes'] / GIB:.2f}" if "session_peak_rss_bytes" in r else ""
        lines.append(f"| {r['stage']} | {r['seconds']} | {' | '.join(gib)} | {' | '.join(size)} | {session} |")
    return "\n".join(lines)


def onnx_skip_reason(mode: str) -> str | None:
    """Why ONNX is not attempted (None: attempt it)."""
    return "--onnx no" if mode == "no" else None


def run_stages(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """model (unless reused), compress (unless reused), gguf, onnx; each in a child process."""
    cap = int(0.85 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    results: list[dict] = []
    info_path = args.work / "model_info.json"
    if not (args.reuse and info_path.exists()):
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
        results.append(run_child("model", args, cap))
        if "skipped" in results[-1]:
            return results, {}
        info = {k: results[-1][k] for k in ("params", "largest_tensor_fp32_bytes", "shards")}
        info_path.write_text(json.dumps(info))
    model = json.loads(info_path.read_text())
    if not (args.reuse and (args.work / "run" / "run.json").exists()):
        shutil.rmtree(args.work / "run", ignore_errors=True)
        results.append(run_child("compress", args, cap))
    for stage in ("gguf", "onnx", "onnx16"):
        shutil.rmtree(args.work / f"{stage}-int4", ignore_errors=True)
        (args.work / "model.q4_0.gguf").unlink(missing_ok=True)
        reason = onnx_skip_reason(args.onnx) if stage.startswith("onnx") else None
        if reason:
            results.append({"stage": stage, "seconds": 0, "skipped": reason})
            continue
        log.info("stage %s ...", stage)
        results.append(run_child(stage, args, cap))
    return results, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder (default /tmp/edgeq-export-SHAPE).")
    parser.add_argument("--shard-mb", type=int, default=1024, help="Largest safetensors shard of the random model.")
    parser.add_argument("--onnx", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds per stage before it is killed.")
    parser.add_argument("--reuse", action="store_true", help="Keep an existing model/run in --work.")
    parser.add_argument("--keep", action="store_true", help="Keep --work afterwards (default: removed).")
    parser.add_argument("--json", type=Path, default=None, help="Default benchmarks/export_scale_SHAPE.json.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work or Path(f"/tmp/edgeq-export-{args.shape}")
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        return child_main(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results, model = run_stages(args)
    if model:
        summarize(results, model, ideal_bytes(args.work / "run"), args.work)
    payload = {"shape": args.shape, "config": SHAPES[args.shape], "model": model, "stages": results,
               "machine": {"cpus": os.cpu_count(), "ram_bytes": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")}}  # fmt: skip
    out = args.json or Path(__file__).with_name(f"export_scale_{args.shape}.json")
    out.write_text(json.dumps(payload, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    print(f"{args.shape}: {model.get('params', 0) / 1e9:.2f} B params, largest tensor "
          f"{model.get('largest_tensor_fp32_bytes', 0) / GIB:.2f} GiB fp32; export budget 3 GiB + that; JSON: {out}")  # fmt: skip
    print(table(results))


if __name__ == "__main__":
    main()
