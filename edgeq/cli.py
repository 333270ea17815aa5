"""The ``edgeq`` command line: a thin layer over ``edgeq.api``.

Heavy imports (torch, transformers, onnx, llama.cpp) happen inside command bodies so that
``edgeq --help`` and every ``--help`` answer fast. User errors (``EdgeqError``) print one line,
``error: ...``, and exit with code 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from edgeq import __version__
from edgeq.compress.distill.config import DistillConfig
from edgeq.errors import EdgeqError

_DISTILL = DistillConfig()  # the distill command's defaults (a torch-free dataclass)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeq")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def cli(verbose: bool) -> None:
    """Compress a language model, export it exactly to GGUF/ONNX, and measure it on a device."""
    _setup_logging(verbose)


@cli.command()
@click.argument("model")
@click.option("--method", type=click.Choice(["rtn", "gptq", "awq"]), default="rtn", show_default=True)
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default="4", show_default=True)
@click.option("--group-size", type=int, default=32, show_default=True, help="Weights per scale; -1 = per channel.")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric (fixed zero) or asymmetric codes.")
@click.option(
    "--override", "overrides", multiple=True, metavar="PATTERN=SPEC", help="Per-tensor scheme, e.g. down_proj=8:g32."
)
@click.option("--clip-search", is_flag=True, help="RTN: search a per-group clipping ratio (AWQ always does).")
@click.option(
    "--calib", default=None, help="Calibration text: .txt, .jsonl (field 'text') or a folder. Default: stdlib."
)
@click.option("--n-samples", type=int, default=128, show_default=True, help="Calibration sequences.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per calibration sequence.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--damp", type=float, default=0.01, show_default=True, help="GPTQ dampening (fraction of mean diag H).")
@click.option("--act-order/--no-act-order", default=True, show_default=True, help="GPTQ column order (static groups).")
@click.option("--resume", is_flag=True, help="Continue an interrupted calibrated run from its last finished block.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Run dir to write.")
def compress(model, method, bits, group_size, sym, overrides, clip_search, calib, n_samples, seq_len, seed, damp,
             act_order, resume, device, out) -> None:  # fmt: skip
    """Quantize MODEL (a model dir or hub id) into a run dir of integer codes, scales and zeros."""
    from edgeq.api import compress as do_compress
    from edgeq.config import CompressConfig

    cfg = CompressConfig(
        method=method,
        bits=int(bits),
        group_size=group_size,
        sym=sym,
        overrides=tuple(overrides),
        clip_search=clip_search,
        device=device,
        seed=seed,
        calib=calib,
        n_samples=n_samples,
        seq_len=seq_len,
        damp=damp,
        act_order=act_order,
    )
    _refuse_foreign_dir(out, "run.json")
    path = do_compress(model, cfg, out, resume=resume)
    click.echo(f"wrote run dir {path} ({cfg.method} {cfg.scheme.label})")


@cli.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Default: held-out stdlib.")
@click.option("--reference", type=click.Path(path_type=Path), help="Unquantized model (default: the run's source).")
@click.option("--ctx", type=int, default=256, show_default=True, help="Tokens per perplexity window.")
@click.option("--max-tokens", type=int, default=32768, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the result here too.")
def eval_cmd(model, text, reference, ctx, max_tokens, device, json_out) -> None:
    """Perplexity of MODEL (model dir or run dir) and KL / top-1 agreement against the unquantized model."""
    from edgeq.compress.evaluate import evaluate

    result = evaluate(model, text, reference, ctx, max_tokens, device)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1) + "\n")
    line = f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens"
    if "reference" in result:
        ref = result["reference"]
        line += (f"; reference {ref['perplexity']:.3f} (gap {ref['gap']:+.3f} ± {ref['gap_stderr']:.3f}),"
                 f" KL {ref['kl']:.4f}, top-1 {ref['top1_agreement']:.3f}")  # fmt: skip
    click.echo(line)


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--teacher", default=None, help="Teacher model dir (default: the run's source model).")
@click.option("--loss", default=_DISTILL.loss, show_default=True, help="mse[+sw][+kl|+cakld|+tsld].")
@click.option("--saliency", is_flag=True, help="Saliency-aware schedule: weights -> outputs -> mixed with L_reg.")
@click.option("--fisher/--no-fisher", default=_DISTILL.fisher, show_default=True,
              help="Weight the block MSE by the teacher's squared output gradients (BRECQ's diagonal Fisher).")  # fmt: skip
@click.option("--train", default=",".join(_DISTILL.train), show_default=True,
              help="Parameter groups: scales, weights (codes move), adapter (merged into codes), norms.")  # fmt: skip
@click.option("--steps", type=int, default=_DISTILL.steps, show_default=True, help="Training steps per block.")
@click.option("--window", type=int, default=_DISTILL.window, show_default=True,
              help="Blocks reconstructed together (cross-block); 1: plain block-wise.")  # fmt: skip
@click.option("--e2e-steps", type=int, default=_DISTILL.e2e_steps, show_default=True, help="End-to-end KD steps (logit losses).")  # fmt: skip
@click.option("--lr", type=float, default=_DISTILL.lr, show_default=True, help="Learning rate of scales and adapters.")
@click.option("--lr-norms", type=float, default=_DISTILL.lr_norms, show_default=True, help="Learning rate of the norm weights.")  # fmt: skip
@click.option("--adapter-rank", type=int, default=_DISTILL.adapter_rank, show_default=True, help="Rank of the adapter (--train adapter).")  # fmt: skip
@click.option("--sw-weight", type=float, default=_DISTILL.sw_weight, show_default=True)
@click.option("--batch-size", type=int, default=_DISTILL.batch_size, show_default=True, help="Global batch (split over processes).")  # fmt: skip
@click.option("--calib", default=None, help="Calibration text (.txt, .jsonl, folder). Default: stdlib.")
@click.option("--n-samples", type=int, default=_DISTILL.n_samples, show_default=True)
@click.option("--seq-len", type=int, default=_DISTILL.seq_len, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT.state/ (last finished block / e2e checkpoint).")
@click.option("--checkpoint-every", type=int, default=_DISTILL.checkpoint_every, show_default=True, help="End-to-end steps per checkpoint.")  # fmt: skip
@click.option("--nproc", type=click.IntRange(1), default=1, show_default=True,
              help="Processes: >1 relaunches this command under torchrun (data parallel, gloo on CPU).")  # fmt: skip
@click.option("--fsdp", is_flag=True, help="Shard the end-to-end student with FSDP (needs --nproc > 1 / torchrun).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Run dir to write.")
def distill(run_dir, teacher, loss, saliency, fisher, train, steps, window, e2e_steps, lr, lr_norms, adapter_rank, sw_weight, batch_size,
            calib, n_samples, seq_len, seed, device, resume, checkpoint_every, nproc, fsdp, out) -> None:  # fmt: skip
    """Recover a quantized RUN_DIR's accuracy by block-wise reconstruction (+ end-to-end KD).

    Data parallel: `--nproc N`, or launch it yourself with `torchrun --nproc-per-node N -m edgeq distill ...`.
    """
    cfg = DistillConfig(
        loss=loss, sw_weight=sw_weight, train=tuple(t.strip() for t in train.split(",") if t.strip()), steps=steps,
        window=window, e2e_steps=e2e_steps, lr=lr, lr_norms=lr_norms, adapter_rank=adapter_rank, batch_size=batch_size, saliency=saliency, fisher=fisher, calib=calib,
        n_samples=n_samples,
        seq_len=seq_len, seed=seed, device=device, fsdp=fsdp, checkpoint_every=checkpoint_every,
    )  # fmt: skip
    _refuse_foreign_dir(out, "run.json")
    if nproc > 1:
        from edgeq.compress.distill.launch import relaunch

        sys.exit(relaunch(nproc, run_dir, cfg, out, teacher, resume))
    from edgeq.compress.distill.launch import launched_rank
    from edgeq.compress.distill.run import distill as do_distill

    path = do_distill(run_dir, cfg, out, teacher, resume=resume)
    if launched_rank() == 0:
        click.echo(f"wrote run dir {path} (distilled with {loss}; loss curves in {path / 'loss_curves.png'})")


def _refuse_foreign_dir(out: Path, marker: str) -> None:
    from edgeq.errors import ConfigError

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).exists())):
        raise ConfigError(f"--out {str(out)!r} exists and is not an edgeq output; choose a new path or remove it")


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["gguf", "onnx"]), required=True)
@click.option("--type", "gguf_type", type=click.Choice(["f32", "f16", "q8_0", "q4_0", "q4_1"]), help="GGUF type.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]), help="ONNX precision.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help=".gguf file or ONNX dir.")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=0, show_default=True, help="MatMulNBits.")
@click.option(
    "--activations",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="ONNX int4/int8: the graph's float type (fp32 is exact; fp16 halves KV cache and scales).",
)
@click.option("--parity-tokens", type=int, default=256, show_default=True)
@click.option("--no-parity", is_flag=True, help="Skip the parity measurement.")
@click.option(
    "--bundle",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[DIR]",
    help="Also write an integration bundle (artifact, tokenizer, manifest, Python/C++/Android examples) "
    "at DIR, or beside the artifact (OUT.bundle) when no DIR follows.",
)
def export(
    source, fmt, gguf_type, precision, out, accuracy_level, activations, parity_tokens, no_parity, bundle
) -> None:
    """Export a run dir (or model dir) SOURCE to GGUF or ONNX with a manifest and parity report."""
    from edgeq.api import export as do_export
    from edgeq.config import ExportConfig
    from edgeq.errors import ConfigError

    kind = gguf_type if fmt == "gguf" else precision
    if kind is None or (fmt == "gguf" and precision) or (fmt == "onnx" and gguf_type):
        want = "--type {f32,f16,q8_0,q4_0,q4_1}" if fmt == "gguf" else "--precision {fp32,fp16,int8,int4}"
        raise ConfigError(f"--format {fmt} needs {want}")
    cfg = ExportConfig(
        fmt, kind, not no_parity, parity_tokens, accuracy_level, activations, bundle is not None, bundle or None
    )
    man = do_export(source, cfg, out)
    line = f"wrote {fmt} {kind} -> {out} (manifest {man.path.name}"
    if man.parity:
        fq = man.parity["fake_quant"]
        line += f"; vs fake-quant: rel_error {fq['rel_error']:.2e}, top-1 {fq['top1_agreement']:.3f}"
    click.echo(line + ")")
    if bundle is not None:
        from edgeq.export.bundle import default_bundle_dir

        click.echo(f"wrote bundle {bundle or default_bundle_dir(out)}")


@cli.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Perplexity text.")
@click.option("--json", "json_out", required=True, type=click.Path(path_type=Path), help="Result JSON to write.")
@click.option("--repeat", type=int, default=3, show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--prompt-tokens", type=int, default=64, show_default=True)
@click.option("--decode-tokens", type=int, default=64, show_default=True)
@click.option("--eval-tokens", type=int, default=4096, show_default=True)
@click.option(
    "--device",
    "--profile",
    "device",
    default="local",
    show_default=True,
    metavar="PROFILE",
    help="Profile name (local, raspberry-pi-5, jetson-orin-nano, jetson-agx-orin, android-phone) or .toml file.",
)
@click.option("--host", help="ssh: [user@]address of the device (overrides the profile's).")
@click.option("--port", type=click.IntRange(1, 65535), help="ssh: port.")
@click.option("--identity", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="ssh: private key.")
@click.option(
    "--known-hosts",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="ssh: known_hosts file to check the host key against (default: yours; checking stays on).",
)
@click.option("--serial", help="adb: device serial (default: the only connected device).")
@click.option(
    "--results-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Remote: per-artifact results kept for resuming (default: beside --json, NAME.results).",
)
@click.option("--fresh", is_flag=True, help="Remote: measure again what --results-dir already holds.")
@click.option(
    "--emulate",
    is_flag=True,
    help="Run here under the --device profile's RAM (memory cap) and cores (pinned, threads = cores).",
)
@click.option("--mem-cap", metavar="SIZE", help="Cap the local run's memory, e.g. 512M, 4G (binary units).")
@click.option("--cores", metavar="N", help="Pin the local run to N cores (threads = N).")
def bench(artifacts, eval_text, json_out, repeat, threads, prompt_tokens, decode_tokens, eval_tokens, device, host,
          port, identity, known_hosts, serial, results_dir, fresh, emulate, mem_cap, cores) -> None:  # fmt: skip
    """Measure ARTIFACTS (manifests, ONNX dirs or .gguf files) on this machine or a device (--device).

    With --emulate (or --mem-cap / --cores) the run stays here, capped; an artifact that runs out of
    memory is a row marked "does not fit" with the numbers, and the command still exits 0.
    """
    from edgeq.api import bench as do_bench
    from edgeq.config import BenchConfig
    from edgeq.report.write import format_table

    caps = None
    if emulate or mem_cap is not None or cores is not None:
        from edgeq.devices.caps import caps_for
        from edgeq.devices.profile import load_profile
        from edgeq.errors import ConfigError

        remote_given = [n for n, v in (("--host", host), ("--port", port), ("--identity", identity),
                        ("--known-hosts", known_hosts), ("--serial", serial), ("--results-dir", results_dir),
                        ("--fresh", fresh)) if v]  # fmt: skip
        if remote_given:
            raise ConfigError(
                f"{', '.join(remote_given)}: for remote runs; --emulate/--mem-cap/--cores run here: drop them"
            )
        caps = caps_for(load_profile(device), emulate=emulate, mem_cap=mem_cap, cores=cores)

    cfg = BenchConfig(
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
        repeat=repeat,
        threads=threads,
        eval_tokens=eval_tokens,
        eval_text=str(eval_text) if eval_text else None,
    )
    remote = {"host": host, "port": port, "identity": identity, "known_hosts": known_hosts, "serial": serial}
    if device != "local" and caps is None:
        remote["results_dir"] = results_dir or json_out.with_name(json_out.stem + ".results")
        remote["resume"] = not fresh
    results = do_bench(list(artifacts), cfg, device=device, caps=caps, **remote)
    for art, res in zip(artifacts, results, strict=True):
        res.setdefault("label", str(art))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    payload = results[0] if len(results) == 1 else results
    json_out.write_text(json.dumps(payload, indent=1) + "\n")
    click.echo(format_table(results))
    for res in results:
        if res.get("status", "ok") != "ok":
            click.echo(f"{res['label']}: {res.get('message') or res['status']}")


@cli.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Overrides the recipe's out.")
def run_cmd(recipe, out) -> None:
    """Run the stages a RECIPE.yaml names (compress, export, bench, report)."""
    from edgeq.recipe import load_recipe

    _run_and_print(load_recipe(recipe), out)


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("edgeq-demo"), show_default=True)
def demo(out) -> None:
    """Bundled model -> RTN int8/int4 -> GGUF + ONNX -> measured here -> table, report.md, pareto.png."""
    from edgeq.recipe import builtin_recipe, load_recipe

    _run_and_print(load_recipe(builtin_recipe("demo")), out)


def _run_and_print(recipe, out) -> None:
    from edgeq.pipeline import run_recipe
    from edgeq.report.write import format_table

    result = run_recipe(recipe, out, progress=lambda msg: click.echo(f"-- {msg}", err=True))
    if result.bench:
        click.echo(format_table(list(result.bench.values())))
    for kind, path in result.report.items():
        click.echo(f"{kind}: {path}")
    if not result.bench:
        for label, path in result.artifacts.items():
            click.echo(f"{label}: {path}")


@cli.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path))
def report(results, out) -> None:
    """Tables (Markdown, JSON, CSV) and plots from runtime RESULTS JSON files."""
    from edgeq.api import report as do_report

    loaded = []
    for path in results:
        data = json.loads(path.read_text())
        loaded.extend(data if isinstance(data, list) else [data])
    for kind, path in do_report(loaded, out).items():
        click.echo(f"{kind}: {path}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except EdgeqError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
