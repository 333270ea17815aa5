"""llama.cpp's native tools: parsers on real captured output, the argv, the result, and real runs.

The fixtures in ``tests/data/native`` are unedited output of llama-bench / llama-perplexity (commands and
build in its README.txt); the expected values below were read off those files. The end-to-end tests run
the real binaries from ``EDGEQ_LLAMA_BIN_DIR`` (default ``/work/llama-tools/build/bin``) through the
local transport and skip, saying why, when they are not there.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from edgeq.devices.local import EDGEQ_SOURCE_ROOT, LocalTransport
from edgeq.devices.profile import load_profile, profile_from_dict
from edgeq.devices.remote import bench_on_device, bench_remote
from edgeq.errors import ArtifactError, BackendError, ConfigError, DeviceError
from edgeq.export.manifest import FileEntry, Manifest, load_manifest
from edgeq.runtime.backends.native import (
    GNU_TIME,
    NativeTools,
    TruncatedOutput,
    measure_native,
    native_result,
    parse_llama_bench,
    parse_llama_perplexity,
    parse_peak_rss,
    parse_version,
)
from edgeq.runtime.plan import Plan

DATA = Path(__file__).parent / "data" / "native"
BIN_DIR = Path(os.environ.get("EDGEQ_LLAMA_BIN_DIR", "/work/llama-tools/build/bin"))
HAVE_TOOLS = all(
    (BIN_DIR / t).is_file() and os.access(BIN_DIR / t, os.X_OK) for t in ("llama-bench", "llama-perplexity")
)
needs_tools = pytest.mark.skipif(
    not HAVE_TOOLS,
    reason=f"llama-bench/llama-perplexity not found in {BIN_DIR}; build them (see tests/data/native/README.txt) "
    "and set EDGEQ_LLAMA_BIN_DIR",
)
MIB = 2**20


def fixture(name: str) -> str:
    return (DATA / name).read_text()


# -- llama-bench -------------------------------------------------------------------------------------------


def test_llama_bench_markdown_table():
    report = parse_llama_bench(fixture("llama-bench.md"))
    assert report.output_format == "md" and (report.build_commit, report.build_number) == ("0c1e570", 1)
    pp, tg = report.tests
    assert (pp.name, pp.n_prompt, pp.n_gen, pp.tokens_per_s, pp.tokens_per_s_stddev) == (
        "pp64",
        64,
        0,
        19883.84,
        11875.72,
    )
    assert (tg.name, tg.n_prompt, tg.n_gen, tg.tokens_per_s, tg.tokens_per_s_stddev) == ("tg32", 0, 32, 2995.23, 585.43)
    assert (tg.n_threads, tg.model_type, tg.backend) == (2, "llama ?B Q4_0", "CPU")
    # the table rounds: "3.63 MiB", "4.07 M"
    assert tg.model_size_bytes == round(3.63 * MIB) and tg.model_n_params == 4_070_000
    assert tg.samples_tokens_per_s == () and report.find(0, 32) is tg and report.find(0, 64) is None


def test_llama_bench_markdown_with_depth_and_extra_columns():
    report = parse_llama_bench(fixture("llama-bench-depth.md"))
    names = [t.name for t in report.tests]
    assert names == ["pp64", "tg32", "pp64+tg32", "pp64 @ d32", "tg32 @ d32", "pp64+tg32 @ d32"]
    deep = report.find(0, 32, 32)
    assert (deep.n_depth, deep.tokens_per_s, deep.tokens_per_s_stddev, deep.n_threads) == (32, 2694.37, 23.13, 1)
    both = report.find(64, 32)
    assert (both.tokens_per_s, both.tokens_per_s_stddev) == (5282.27, 3.08)
    assert all(t.extra == {"type_k": "q8_0"} for t in report.tests)


def test_llama_bench_json_keeps_the_samples():
    report = parse_llama_bench(fixture("llama-bench.json"))
    assert report.output_format == "json" and report.cpu_info == "AMD EPYC"
    assert (report.build_commit, report.build_number) == ("0c1e570", 1)
    pp, tg = report.find(64, 0), report.find(0, 32)
    assert (pp.tokens_per_s, pp.tokens_per_s_stddev) == (11633.860361, 14838.236706)
    assert pp.samples_tokens_per_s == (155.315, 28389.3, 6356.99)
    assert tg.tokens_per_s == 819.495176 and tg.samples_tokens_per_s == (127.702, 2313.28, 17.5082)
    assert len(tg.samples_ns) == 3 and all(isinstance(ns, int) and ns > 0 for ns in tg.samples_ns)
    assert (tg.model_size_bytes, tg.model_n_params, tg.n_threads) == (3802112, 4065536, 2)  # exact here
    assert tg.extra["type_k"] == "f16" and tg.extra["model_filename"] == "w4g32.q4_0.gguf"
    # llama-bench's avg_ts is the mean of its per-repetition samples
    assert math.isclose(sum(pp.samples_tokens_per_s) / 3, pp.tokens_per_s, rel_tol=1e-5)


def test_llama_bench_jsonl_and_csv():
    jsonl = parse_llama_bench(fixture("llama-bench.jsonl"))
    assert jsonl.output_format == "jsonl" and [t.name for t in jsonl.tests] == ["pp64", "tg32"]
    assert jsonl.find(0, 32).tokens_per_s == 5480.700732
    assert jsonl.find(0, 32).samples_tokens_per_s == (5915.57, 5980.89, 4545.64)
    table = parse_llama_bench(fixture("llama-bench.csv"))
    assert table.output_format == "csv" and table.cpu_info == "AMD EPYC"
    assert [(t.name, t.n_threads) for t in table.tests] == [("pp64", 1), ("tg32", 1), ("pp64", 2), ("tg32", 2)]
    assert (table.tests[1].tokens_per_s, table.tests[1].tokens_per_s_stddev) == (4252.850718, 97.869255)
    assert table.tests[3].tokens_per_s == 5309.806283 and table.tests[3].model_size_bytes == 3802112


@pytest.mark.parametrize(
    "name, fmt", [("llama-bench.md", "md"), ("llama-bench.json", "json"), ("llama-bench.csv", "csv")]
)
def test_llama_bench_format_detection_matches_the_explicit_format(name, fmt):
    assert parse_llama_bench(fixture(name)) == parse_llama_bench(fixture(name), fmt)


@pytest.mark.parametrize(
    "text, message",
    [
        (fixture("llama-bench-missing-model.stdout"), r"invalid JSON.*first line '\['"),
        ("llama_bench: error: failed to load model 'm.gguf'\n", "not a table, JSON or CSV"),
        (fixture("llama-bench.md").replace("            tg32 |", ""), "a table row has a different number"),
        (fixture("llama-bench.md").replace("2995.23 ± 585.43", "2995.23 +- 585.43"), "unreadable test 'tg32'"),
        (fixture("llama-bench.json").replace('"avg_ts"', '"avg"'), "a test has no 'avg_ts' field"),
        ("[]", "no test rows"),
    ],
)
def test_unparseable_llama_bench_output_is_one_line(text, message):
    with pytest.raises(BackendError, match=message) as info:
        parse_llama_bench(text)
    assert "\n" not in str(info.value) and "expected its markdown table" in str(info.value)


def test_unknown_llama_bench_format_is_refused():
    with pytest.raises(BackendError, match=r"format 'sql' is not parsed; expected one of"):
        parse_llama_bench(fixture("llama-bench.md"), "sql")


def test_version_and_gnu_time():
    assert parse_version(fixture("llama-bench-version.txt")) == {
        "version": "0.5.0-dev",
        "build_number": 1,
        "build_commit": "0c1e570",
        "compiler": "GNU 12.2.0",
        "target": "Linux x86_64",
    }
    with pytest.raises(BackendError, match="cannot parse the tool's --version output"):
        parse_version("usage: llama-bench [options]\n")
    assert parse_peak_rss(fixture("time-v-llama-bench.stderr")) == 23124 * 1024
    assert parse_peak_rss(fixture("llama-bench-missing-model.stderr")) is None


# -- llama-perplexity --------------------------------------------------------------------------------------


def test_llama_perplexity_output():
    report = parse_llama_perplexity(fixture("llama-perplexity.txt"))
    assert (report.ppl, report.ppl_stderr) == (37.459, 4.72314)
    assert report.chunk_ppl == (18.8492, 27.4694, 32.7244, 37.459) and report.chunk_ppl[-1] == report.ppl
    assert (report.chunks, report.n_ctx, report.batch_size, report.n_seq, report.n_threads) == (4, 256, 256, 1, 2)
    assert (report.seconds_per_pass, report.tokenization_ms) == (0.08, 8.758)
    assert report.system_info.startswith("n_threads = 2 (n_threads_batch = 2) / 2 | CPU : SSE3 = 1")
    assert report.scored_tokens == 4 * 127  # second half of each 256-token chunk, less its last token


def test_llama_perplexity_truncated_output_is_its_own_error():
    with pytest.raises(TruncatedOutput, match=r"ended before its final estimate \(3 of 4 chunks printed\)"):
        parse_llama_perplexity(fixture("llama-perplexity-truncated.txt"))


@pytest.mark.parametrize(
    "name, message",
    [
        ("llama-perplexity-short-text.txt", r"needs at least 512 tokens for ctx=256; the eval text has 114: give"),
        ("llama-perplexity-missing-model.txt", r"could not load the model \(.*missing\.gguf.*\); expected a GGUF"),
    ],
)
def test_llama_perplexity_failures(name, message):
    with pytest.raises(BackendError, match=message) as info:
        parse_llama_perplexity(fixture(name))
    assert not isinstance(info.value, TruncatedOutput) and "\n" not in str(info.value)


def test_output_that_is_not_llama_perplexity():
    with pytest.raises(BackendError, match="no 'Final estimate: PPL' line") as info:
        parse_llama_perplexity(fixture("llama-bench.md"))
    assert not isinstance(info.value, TruncatedOutput)


# -- argv, profile ------------------------------------------------------------------------------------------


def test_argv_lists_keep_every_word_whole():
    tools = NativeTools("/data/local/tmp/llama.cpp/bin")
    plan = Plan(prompt_tokens=16, decode_tokens=8, repeat=5, threads=4, warmup=0, eval_tokens=1024, ctx=256)
    model = "a0/m $(touch x) 'q'.gguf"
    argv = tools.bench_argv(model, plan)
    assert argv[:3] == ["env", "LD_LIBRARY_PATH=/data/local/tmp/llama.cpp/bin:/data/local/tmp/llama.cpp/lib",
                        "/data/local/tmp/llama.cpp/bin/llama-bench"]  # fmt: skip
    assert argv[3:] == ["-m", model, "-p", "16", "-n", "8", "-r", "5", "-o", "json", "-t", "4", "--no-warmup"]
    ppl = tools.perplexity_argv(model, "eval.txt", plan)
    assert ppl[2].endswith("/llama-perplexity") and ppl[3:] == [
        "-m", model, "-f", "eval.txt", "-c", "256", "-b", "256", "--chunks", "4", "-t", "4",
    ]  # fmt: skip
    timed = NativeTools(tools.bin_dir, "/usr/bin/time").bench_argv(model, Plan(threads=None))
    assert timed[:3] == ["/usr/bin/time", "-v", "env"] and "-t" not in timed and "--no-warmup" not in timed
    with pytest.raises(DeviceError, match=r"llama_bin_dir='bin' is invalid; expected the absolute device path"):
        NativeTools("bin")


def test_profile_key_for_the_binaries(tmp_path):
    profile = profile_from_dict(
        {"transport": "adb", "has_python": False, "llama_bin_dir": "/data/local/tmp/llama.cpp/bin"}, "t", "phone"
    )
    assert profile.llama_bin_dir == "/data/local/tmp/llama.cpp/bin"
    with pytest.raises(ConfigError, match=r"llama_bin_dir='llama/bin' is invalid; expected an absolute device path"):
        profile_from_dict({"transport": "adb", "llama_bin_dir": "llama/bin"}, "t", "phone")
    with pytest.raises(DeviceError, match=r"has no Python \(has_python = false\).*set llama_bin_dir") as info:
        bench_on_device(load_profile("android-phone"), [], Plan(), tmp_path)
    assert "\n" not in str(info.value)


def test_native_module_imports_no_torch():
    code = (
        "import json, sys; import edgeq.runtime.backends.native\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(EDGEQ_SOURCE_ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


class ReplayTransport:
    """Plays back recorded real outputs of llama-perplexity, one per run (the tool's lost-lines race cannot
    be triggered on demand, so the retry is tested on the captured outputs of both outcomes)."""

    name = "replay"

    def __init__(self, *outputs: tuple[int, str]) -> None:
        self.outputs, self.argvs = list(outputs), []

    def run(self, argv, timeout=None):
        from edgeq.devices.transport import RunResult

        self.argvs.append(list(argv))
        rc, text = self.outputs.pop(0)
        return RunResult(rc, "", text)


def test_llama_perplexity_is_rerun_when_its_last_lines_are_lost():
    from edgeq.runtime.backends.native import _run_perplexity

    truncated, complete = fixture("llama-perplexity-truncated.txt"), fixture("llama-perplexity.txt")
    tools, plan = NativeTools("/bin"), Plan(eval_tokens=1024, ctx=256)
    replay = ReplayTransport((0, truncated), (0, complete))
    argv, report, attempts = _run_perplexity(replay, tools, "m.gguf", "eval.txt", plan, "dev", None, 4)
    assert (report.ppl, attempts, len(replay.argvs)) == (37.459, 2, 2) and argv == replay.argvs[0]
    with pytest.raises(TruncatedOutput, match=r"3 of 4 chunks printed.*\[3 attempts on dev\]"):
        _run_perplexity(ReplayTransport(*[(0, truncated)] * 3), tools, "m.gguf", "e.txt", plan, "dev", None, 3)
    crashed = ReplayTransport((-9, truncated), (0, complete))  # killed: not retried
    with pytest.raises(BackendError, match=r"llama-perplexity failed on dev \(exit -9\)") as info:
        _run_perplexity(crashed, tools, "m.gguf", "e.txt", plan, "dev", None, 4)
    assert not isinstance(info.value, TruncatedOutput) and len(crashed.argvs) == 1


# -- the result ---------------------------------------------------------------------------------------------


def _manifest(tmp_path: Path, weight_bytes: int = 3931936) -> Manifest:
    entry = FileEntry(path="w4g32.q4_0.gguf", sha256="0" * 64, bytes=weight_bytes, role="model")
    man = Manifest(
        "gguf", "q4_0", [entry], {"n_ctx": 256}, {"method": "rtn"}, {}, {}, path=tmp_path / "m.manifest.json"
    )
    return man


def test_result_from_the_captured_output(tmp_path):
    bench = parse_llama_bench(fixture("llama-bench.json"))
    ppl = parse_llama_perplexity(fixture("llama-perplexity.txt"))
    plan = Plan(prompt_tokens=64, decode_tokens=32, repeat=3, threads=2, eval_tokens=1024, ctx=256)
    versions = {"llama-bench": parse_version(fixture("llama-bench-version.txt"))}
    result = native_result(_manifest(tmp_path), plan, bench, ppl, bandwidth_gb_per_s=51.2, versions=versions)
    assert result["schema"] == "edgeq.result/1" and result["backend"] == "llama.cpp-native"
    gen = result["generation"]
    assert (gen["prompt_tokens"], gen["decode_tokens"], gen["repeat"]) == (64, 32, 3)
    assert (gen["prompt_tokens_per_s"], gen["decode_tokens_per_s"]) == (11633.860361, 819.495176)
    pp_ns = bench.find(64, 0).samples_ns
    assert math.isclose(gen["prefill_ms"], sum(pp_ns) / 3 / 1e6)
    assert math.isclose(gen["latency_ms_mean"], sum(bench.find(0, 32).samples_ns) / 96 / 1e6)
    assert gen["spread"]["decode_tokens_per_s"]["min"] == 17.5082 and gen["ttft_ms"] is None
    assert result["perplexity"]["ppl"] == 37.459 and result["perplexity"]["protocol"] == "llama-perplexity"
    assert result["perplexity"]["tokens"] == 508 and result["perplexity"]["windows"] == 4
    bw = result["bandwidth"]
    assert math.isclose(bw["roofline_fraction"], 3931936 * 819.495176 / 1e9 / 51.2)
    assert result["memory"]["peak_rss_mb"] is None and "memory.peak_rss_mb" in result["not_available"]
    for key in ("generation.ttft_ms", "load_time_ms", "energy"):
        assert key in result["not_available"]
    env = result["environment"]
    assert (env["cpu_model"], env["threads"], env["runtime"]["llama_cpp_build_commit"]) == ("AMD EPYC", 2, "0c1e570")
    json.dumps(result, allow_nan=False)  # plain JSON: no NaN, no objects


def test_result_refuses_output_without_the_planned_tests(tmp_path):
    bench = parse_llama_bench(fixture("llama-bench.json"))
    with pytest.raises(BackendError, match=r"no pp64 and tg64 tests \(it has \['pp64', 'tg32'\]\)"):
        native_result(_manifest(tmp_path), Plan(prompt_tokens=64, decode_tokens=64), bench, None)


def test_missing_binaries_are_a_clear_device_error(tmp_path):
    with LocalTransport() as transport:
        with pytest.raises(DeviceError, match=r"/nonexistent/bin/llama-bench is missing or not executable on local"):
            measure_native(
                transport, _manifest(tmp_path), "a0/m.manifest.json", Plan(), NativeTools("/nonexistent/bin")
            )


# -- the real binaries ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf(make_run, tmp_path_factory) -> Path:
    """The manifest of a GGUF q4_0 of the bundled model (RTN w4g32 sym)."""
    from edgeq.api import export
    from edgeq.config import ExportConfig

    root = tmp_path_factory.mktemp("native")
    man = export(make_run(bits=4, group_size=32, sym=True), ExportConfig("gguf", "q4_0", parity=False), root / "m.gguf")
    return man.path


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    from edgeq.bundled import heldout_text

    path = tmp_path_factory.mktemp("eval") / "heldout.txt"
    path.write_text(heldout_text(max_chars=20_000))
    return path


SMALL = Plan(prompt_tokens=16, decode_tokens=8, repeat=2, threads=1, eval_tokens=512, ctx=128, bandwidth_probe=False)


@needs_tools
def test_real_tools_through_the_local_transport_and_resume(gguf, eval_text, tmp_path):
    transport, tools = LocalTransport(), NativeTools(str(BIN_DIR))
    kwargs = {"eval_text": eval_text, "native": tools, "device": {"memory_bandwidth_gb_per_s": 20.0}, "timeout_s": 300}
    (result,) = bench_remote(transport, [gguf], SMALL, tmp_path / "results", **kwargs)
    gen = result["generation"]
    assert (gen["prompt_tokens"], gen["decode_tokens"], gen["repeat"]) == (16, 8, 2)
    assert gen["decode_tokens_per_s"] > 0 and gen["prompt_tokens_per_s"] > 0 and gen["ttft_ms"] is None
    assert len(gen["spread"]["decode_tokens_per_s"]) == 4 and result["environment"]["threads"] == 1
    ppl = result["perplexity"]
    assert (ppl["windows"], ppl["ctx"], ppl["tokens"]) == (4, 128, 4 * 63) and 1 < ppl["ppl"] < 4096
    assert ppl["ppl_stderr"] > 0 and ppl["eval_text_sha256"] and 1 <= result["native"]["perplexity_attempts"] <= 4
    assert result["artifact"]["verified_on_device"]["verified"] is True
    assert result["bandwidth"]["roofline_fraction"] > 0
    if Path(GNU_TIME).exists():
        assert result["memory"]["peak_rss_mb"] > 1
    assert result["environment"]["runtime"]["llama_cpp_build_commit"]
    assert result["artifact"]["path"] == str(load_manifest(gguf, verify=False).path.resolve())
    assert not Path(transport.workdir).exists()  # the device's work dir and what was pushed there are gone
    again = bench_remote(LocalTransport(), [gguf], SMALL, tmp_path / "results", **kwargs)
    assert again[0]["created_utc"] == result["created_utc"] and again[0]["resume_key"] == result["resume_key"]


@needs_tools
def test_real_tools_through_a_shell_with_a_hostile_file_name(gguf, tmp_path):
    """What ssh/adb do with an argv (one string, each word shlex-quoted for the device's sh)."""
    hostile = tmp_path / "m $(touch PWNED) `touch PWNED2` 'q' \"d\";.gguf"
    hostile.symlink_to(load_manifest(gguf, verify=False).file("model"))
    subprocess.run(["sh", "-c", f": {hostile.name}"], cwd=tmp_path, check=False, timeout=30)
    assert (tmp_path / "PWNED").exists(), "the name must be live shell code for this test to mean anything"
    (tmp_path / "PWNED").unlink()
    (tmp_path / "PWNED2").unlink()
    argv = NativeTools(str(BIN_DIR)).bench_argv(str(hostile), Plan(prompt_tokens=8, decode_tokens=4, repeat=1))
    command = f"cd {shlex.quote(str(tmp_path))} && exec {shlex.join(argv)}"  # as SshTransport.run builds it
    proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = parse_llama_bench(proc.stdout, "json")
    assert [t.name for t in report.tests] == ["pp8", "tg4"] and report.tests[0].extra["model_filename"] == str(hostile)
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "PWNED2").exists()


@needs_tools
def test_real_tools_refuse_a_corrupted_push_and_a_missing_model(gguf, tmp_path):
    with LocalTransport() as transport:
        man = load_manifest(gguf, verify=False)
        transport.push(man.path, "a0/" + man.path.name)
        (Path(transport.workdir) / "a0" / man.files[0].path).write_bytes(b"GGUF garbage")
        with pytest.raises(ArtifactError, match=r"on the device has sha256 [0-9a-f]{64}, the manifest says"):
            measure_native(transport, man, "a0/" + man.path.name, SMALL, NativeTools(str(BIN_DIR)))
        (Path(transport.workdir) / "a0" / man.files[0].path).unlink()
        with pytest.raises(BackendError, match=r"llama-bench failed on local \(exit 1\): .*failed to load model"):
            measure_native(  # sha256sum fails on the missing file (not verified), then llama-bench cannot load it
                transport, man, "a0/" + man.path.name, SMALL, NativeTools(str(BIN_DIR))
            )


@needs_tools
def test_cli_bench_with_a_profile_without_python(gguf, eval_text, tmp_path):
    profile = tmp_path / "native.toml"
    profile.write_text(f'transport = "local"\nhas_python = false\nllama_bin_dir = "{BIN_DIR}"\n')
    out = tmp_path / "bench.json"
    args = [str(gguf), "--device", str(profile), "--json", str(out), "--eval-text", str(eval_text), "--threads", "1"]
    args += ["--repeat", "1", "--prompt-tokens", "8", "--decode-tokens", "8", "--eval-tokens", "512"]
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(EDGEQ_SOURCE_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "edgeq.cli", "bench", *args], capture_output=True, text=True, timeout=300, env=env,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["backend"] == "llama.cpp-native" and result["device"]["name"] == "native"
    assert result["generation"]["decode_tokens_per_s"] > 0 and result["perplexity"]["ppl"] > 1
    assert "gguf/q4_0" in proc.stdout  # the table row
    missing = tmp_path / "missing.toml"
    missing.write_text('transport = "local"\nhas_python = false\nllama_bin_dir = "/nonexistent/llama"\n')
    args[2] = str(missing)
    proc = subprocess.run(
        [sys.executable, "-m", "edgeq.cli", "bench", *args], capture_output=True, text=True, timeout=120, env=env,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: /nonexistent/llama/llama-bench is missing or not executable on local")
