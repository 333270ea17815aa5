"""GGUF export and the llama.cpp backend, against references: gguf.quants, the fake-quant torch model, HF.

Real llama.cpp (llama-cpp-python), no mocks. Block bytes are compared bit for bit with
``gguf.quants.quantize`` (edgeq's RTN conventions mirror ggml's reference quantizers), dequantized
tensors with the run's own dequantization, and llama.cpp's logits with the run's fake-quant torch model.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgeq.compress.quant import QuantizedWeight, QuantScheme
from edgeq.errors import BackendError, ExportError
from edgeq.export.gguf import (
    SPLIT_PRE,
    check_gguf_compat,
    export_gguf,
    fits,
    pack_q4_0,
    pack_q4_1,
    pack_q8_0,
    rope_row_order,
)
from edgeq.export.manifest import Manifest, file_entry
from edgeq.rundir import RunDir
from edgeq.runtime.backends.base import BackendOptions
from edgeq.runtime.backends.llamacpp import LlamaCppBackend, has_blas_backend

pytest.importorskip("llama_cpp")

SAMPLE = (
    "Hello, world! It's 2024; we're testing 123456789 tokens and 3.14159 apples.\n"
    "Grüße aus München: Äpfel, Öl und Übermaß — schön, oder?\n"
    "中文分词测试：你好，世界。机器学习很有趣！\n"
    "Emoji 🚀🔥👍🏽 and flags 🇩🇪🇯🇵.\n"
    "def foo(x, y=2):\n    if x:\n\treturn x ** y  # tab\n    return None\n\n\n"
    "class A:\n\t\tpass   \n   trailing  \t spaces\n"
)
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
# ||llama.cpp - torch|| / ||torch|| of the logits. With F32 weights and an F32 KV cache llama.cpp computes
# what torch computes (measured 3e-7 on the bundled model). Its CPU kernels for q8_0 / q4_0 weights
# quantize the activations to q8_0 blocks first (vec_dot_type = q8_0), which alone costs 3.5-3.8e-3 on
# the bundled model (a torch simulation of that activation rounding gives the same 3.5e-3); the packed
# weights themselves are checked bit for bit against gguf.quants above.
EXACT_TOL = 1e-5
INT8_ACT_TOL = 1e-2


# -- helpers -----------------------------------------------------------------------------------
def _save_manifest(gguf_file: Path, run: RunDir, gguf_type: str, types: dict) -> Manifest:
    from edgeq.compress.model import model_summary

    man = Manifest(
        format="gguf",
        variant=gguf_type,
        files=[file_entry(gguf_file.parent, gguf_file, role="model")],
        model=model_summary(run.config),
        scheme={"tensor_types": types},
        source={"path": str(run.path)},
        tokenizer={"kind": "gguf"},
    )
    man.save(gguf_file.with_name(gguf_file.stem + ".manifest.json"))
    return man


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """``export(run_dir, gguf_type)`` -> (gguf path, result, manifest), cached per module."""
    root = tmp_path_factory.mktemp("gguf")
    cache: dict = {}

    def _export(run_dir: Path, gguf_type: str):
        key = (str(run_dir), gguf_type)
        if key not in cache:
            run = RunDir.open(run_dir)
            out = root / f"m{len(cache)}.{gguf_type}.gguf"
            result = export_gguf(run, gguf_type, out)
            cache[key] = (out, result, _save_manifest(out, run, gguf_type, result["tensor_types"]))
        return cache[key]

    return _export


def _backend(man: Manifest, **provider_options) -> LlamaCppBackend:
    backend = LlamaCppBackend(man, BackendOptions(threads=2, provider_options=provider_options))
    backend.load()
    return backend


def _row_order(run: RunDir, name: str) -> np.ndarray | slice:
    cfg = run.config
    if run.model_type == "qwen2":
        return slice(None)
    if "q_proj" in name:
        return rope_row_order(run.shape(name)[0], cfg["num_attention_heads"])
    if "k_proj" in name:
        return rope_row_order(run.shape(name)[0], cfg["num_key_value_heads"])
    return slice(None)


def _tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def token_ids(bundled_dir) -> list[int]:
    from transformers import AutoTokenizer

    from edgeq.bundled import heldout_text

    tok = AutoTokenizer.from_pretrained(bundled_dir)
    return tok.encode(heldout_text(20000), add_special_tokens=False)[:96]


def _torch_logits(run_dir: Path, ids: list[int]) -> np.ndarray:
    import torch

    from edgeq.compress.model import load_torch_model

    model = load_torch_model(run_dir)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- exact packing -----------------------------------------------------------------------------
@pytest.mark.parametrize("gguf_type, bits", [("q8_0", 8), ("q4_0", 4)])
def test_block_bytes_equal_gguf_quants(make_run, bundled_dir, export, gguf_type, bits):
    run_dir = make_run(bits=bits, group_size=32, sym=True)
    path, result, _ = export(run_dir, gguf_type)
    run, source, tensors = RunDir.open(run_dir), RunDir.open(bundled_dir), _tensors(path)
    for name in run.quantized_names():
        w = np.asarray(source.fp_tensor(name), dtype=np.float32)[_row_order(run, name)]
        expected = gguf.quants.quantize(w, tensors[result["gguf_names"][name]].tensor_type)
        got = np.asarray(tensors[result["gguf_names"][name]].data)
        assert got.tobytes() == expected.tobytes(), name


@pytest.mark.parametrize(
    "scheme, gguf_type",
    [
        (dict(bits=4, group_size=32, sym=True), "q4_0"),
        (dict(bits=8, group_size=32, sym=True), "q8_0"),
        (dict(bits=4, group_size=128, sym=True), "q4_0"),  # one scale replicated over 4 blocks
        (dict(bits=4, group_size=32, sym=True), "q8_0"),  # 4-bit codes widened to int8
        (dict(bits=4, group_size=32, sym=False), "q4_1"),
    ],
)
def test_dequantized_tensors_equal_run(make_run, export, scheme, gguf_type):
    run_dir = make_run(**scheme)
    path, result, _ = export(run_dir, gguf_type)
    run, tensors = RunDir.open(run_dir), _tensors(path)
    for name in run.quantized_names():
        t = tensors[result["gguf_names"][name]]
        assert t.tensor_type == gguf.GGMLQuantizationType[gguf_type.upper()], name
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        expected = run.tensor(name)[_row_order(run, name)]
        if gguf_type != "q4_1":
            np.testing.assert_array_equal(got, expected, err_msg=name)
            continue
        qw = run.quantized(name)
        dz = np.repeat(qw.scales.astype(np.float32) * qw.zeros, 32, axis=1)[_row_order(run, name)]
        bound = np.abs(dz) * 2.0**-11 + 2.0**-24 + 1e-6 * np.abs(expected)  # fp16 rounding of m = -d*zero
        assert np.all(np.abs(got - expected) <= bound), name


@pytest.mark.parametrize(
    "bits, sym, gguf_type", [(2, True, "q4_0"), (3, True, "q4_0"), (3, False, "q4_0"), (4, False, "q8_0")]
)
def test_packers_hold_other_code_ranges_exactly(bits, sym, gguf_type):
    rng = np.random.default_rng(0)
    scheme = QuantScheme(bits, 64, sym)
    codes = rng.integers(0, 2**bits, size=(8, 128), dtype=np.uint8)
    zeros = np.full((8, 2), scheme.sym_zero, np.uint8) if sym else rng.integers(0, 2**bits, (8, 2), dtype=np.uint8)
    qw = QuantizedWeight(codes, rng.uniform(1e-3, 1e-1, (8, 2)).astype(np.float16), zeros, scheme)
    assert fits(scheme, 128, gguf_type)
    packed = {"q4_0": pack_q4_0, "q8_0": pack_q8_0}[gguf_type](qw)
    got = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[gguf_type.upper()])
    np.testing.assert_array_equal(got, qw.dequantize())
    q41 = gguf.quants.dequantize(pack_q4_1(qw), gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_allclose(q41, qw.dequantize(), rtol=0, atol=float(np.abs(qw.dequantize()).max()) * 2e-3)


# -- reading back ------------------------------------------------------------------------------
@pytest.mark.parametrize("gguf_type", ["q4_0", "f16", "f32"])
def test_reader_reads_names_shapes_types_metadata(make_run, export, gguf_type):
    run_dir = make_run(bits=4, group_size=32, sym=True)
    path, result, _ = export(run_dir, gguf_type)
    run, cfg = RunDir.open(run_dir), RunDir.open(run_dir).config
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(result["gguf_names"].values())
    for name, gname in result["gguf_names"].items():
        t = tensors[gname]
        assert tuple(int(x) for x in reversed(t.shape)) == run.shape(name), name
        assert t.tensor_type.name.lower() == result["tensor_types"][name], name
    norm = "blk.0.attn_norm.weight"
    assert tensors[norm].tensor_type == gguf.GGMLQuantizationType.F32
    embd = gguf.GGMLQuantizationType.F32 if gguf_type == "f32" else gguf.GGMLQuantizationType.F16
    assert tensors["token_embd.weight"].tensor_type == embd
    assert ("output.weight" in tensors) == (not cfg.get("tie_word_embeddings", False))

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == cfg["num_hidden_layers"]
    assert field("llama.embedding_length") == cfg["hidden_size"]
    assert field("llama.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert field("llama.context_length") == cfg["max_position_embeddings"]
    assert field("llama.vocab_size") == cfg["vocab_size"]
    assert field("general.quantization_version") == 2
    assert field("general.file_type") == int(
        gguf.LlamaFileType[{"q4_0": "MOSTLY_Q4_0", "f16": "MOSTLY_F16", "f32": "ALL_F32"}[gguf_type]]
    )
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert len(field("tokenizer.ggml.tokens")) == cfg["vocab_size"]
    assert field("tokenizer.ggml.bos_token_id") == cfg["bos_token_id"]
    assert field("tokenizer.ggml.add_bos_token") is False
    assert "tokenizer.chat_template" not in reader.fields  # the bundled tokenizer has none


def test_unquantized_model_dir_exports_f16(bundled_dir, export, token_ids):
    path, result, man = export(bundled_dir, "f16")
    assert set(result["tensor_types"].values()) == {"f16", "f32"}
    backend = _backend(man, type_k="f32", type_v="f32")
    try:
        rel = _rel(backend.forward(token_ids), _torch_logits(bundled_dir, token_ids))
    finally:
        backend.close()
    print(f"f16 (unquantized source): llama.cpp vs torch relative error {rel:.2e}")
    assert rel < 1e-3, rel  # f16 weights are the source's own values; activations go through fp16


# -- llama.cpp against the fake-quant torch model ----------------------------------------------
@pytest.mark.parametrize(
    "gguf_type, bits, tol, kv",
    [("q8_0", 8, INT8_ACT_TOL, "f16"), ("q4_0", 4, INT8_ACT_TOL, "f16"), ("f32", 4, EXACT_TOL, "f32")],
)
def test_llamacpp_logits_and_greedy_match_torch(make_run, export, token_ids, gguf_type, bits, tol, kv):
    """Logits of the bundled model's held-out tokens, and 32 greedy steps, against the fake-quant model."""
    import torch

    from edgeq.compress.model import load_torch_model

    run_dir = make_run(bits=bits, group_size=32, sym=True)
    _, _, man = export(run_dir, gguf_type)
    model, prompt = load_torch_model(run_dir), token_ids[:64]
    with torch.no_grad():
        ref = model(torch.tensor([token_ids])).logits[0].numpy()
        out = model(torch.tensor([prompt]), use_cache=True)
        greedy = [int(out.logits[0, -1].argmax())]
        for _ in range(31):  # torch's own greedy loop over its KV cache
            out = model(torch.tensor([greedy[-1:]]), past_key_values=out.past_key_values, use_cache=True)
            greedy.append(int(out.logits[0, -1].argmax()))
    backend = _backend(man, type_k=kv, type_v=kv)
    try:
        rel = _rel(backend.forward(token_ids), ref)
        backend.reset()
        got = [int(backend.forward(prompt)[-1].argmax())]
        for _ in range(31):
            got.append(int(backend.forward([got[-1]])[0].argmax()))
        assert backend.n_past == 64 + 31
    finally:
        backend.close()
    print(f"{gguf_type}: llama.cpp vs torch relative error {rel:.2e}")
    assert got == greedy
    assert rel <= tol, rel


@pytest.mark.parametrize("gguf_type, bits", [("q8_0", 8), ("q4_0", 4)])
def test_llamacpp_matches_torch_under_its_activation_rounding(make_run, export, token_ids, gguf_type, bits):
    """With llama.cpp's own activation rounding simulated in torch, the artifact reproduces the run's
    fake-quant model to about 1e-3 (measured 0.8e-3 q4_0, 1.1e-3 q8_0): most of the 3.6e-3 of the plain
    comparison is llama.cpp's int8 activations.

    What remains is the floor of int8-activation arithmetic itself, not a property of the artifact: a
    last-bit difference anywhere (rope, norm, summation order) flips some roundings to int8, and the
    flips cascade through the layers. The same simulation evaluated in float32 and in float64 -- two
    exact evaluations of the same model -- differ by as much (measured 1.1e-3 q8_0, 1.3e-3 q4_0), so no
    implementation with int8 activations can match the fake-quant model to 1e-3; llama.cpp sits within
    that floor.
    """
    import torch

    from edgeq.compress.model import load_torch_model
    from edgeq.export.parity import simulate_llamacpp_activations

    run_dir = make_run(bits=bits, group_size=32, sym=True)
    _, result, man = export(run_dir, gguf_type)
    refs = {}
    for dtype in (torch.float32, torch.float64):
        model = load_torch_model(run_dir).to(dtype)  # (n_ubatch 16 below: the int8 kernels on any build)
        assert simulate_llamacpp_activations(model, result["tensor_types"]) == 28 + 1  # 7 Linears x 4 + lm_head
        with torch.no_grad():
            refs[dtype] = model(torch.tensor([token_ids])).logits[0].double().numpy()
    backend = _backend(man, type_k="f32", type_v="f32", n_batch=16, n_ubatch=16)
    try:
        rel = _rel(backend.forward(token_ids), refs[torch.float32])
    finally:
        backend.close()
    floor = _rel(refs[torch.float32], refs[torch.float64])
    print(f"{gguf_type}: llama.cpp vs torch with simulated activation rounding {rel:.2e}; f32 vs f64 {floor:.2e}")
    assert floor >= 3e-4, floor  # the rounding cascade: plain fake-quant f32 vs f64 differ by 2e-7
    assert rel <= min(2e-3, 2 * floor), (rel, floor)


def test_backend_prefill_decode_reset_consistent(make_run, export, token_ids):
    _, _, man = export(make_run(bits=4, group_size=32, sym=True), "q4_0")
    backend = _backend(man, n_batch=16)  # several decode calls per prefill
    try:
        ids = token_ids[:40]
        prefill = backend.forward(ids)
        assert prefill.shape == (40, backend.vocab_size) and prefill.dtype == np.float32
        backend.reset()
        assert backend.n_past == 0
        again = backend.forward(ids[:20])
        stepwise = np.stack([backend.forward([i])[0] for i in ids[20:]])
        assert _rel(np.concatenate([again, stepwise]), prefill) < 1e-4
        backend.reset()
        np.testing.assert_allclose(backend.forward(ids[:8]), prefill[:8], rtol=0, atol=1e-4)
        with pytest.raises(BackendError, match="exceeds n_ctx"):
            backend.forward([0] * backend.n_ctx)
        info = backend.info()
        import psutil

        physical = psutil.cpu_count(logical=False) or psutil.cpu_count()
        assert info["backend"] == "llama.cpp" and info["threads"] == physical and "llama_cpp_python" in info
    finally:
        backend.close()


def test_missing_llama_cpp_is_a_backend_error(make_run, export, monkeypatch):
    _, _, man = export(make_run(bits=4, group_size=32, sym=True), "q4_0")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError
    with pytest.raises(BackendError, match=r"pip install 'edgeq\[llama\]'"):
        LlamaCppBackend(man, BackendOptions()).load()


def test_tokenization_matches_hf(bundled_dir, make_run, export):
    from transformers import AutoTokenizer

    _, _, man = export(make_run(bits=4, group_size=32, sym=True), "q4_0")
    backend = _backend(man)
    try:
        hf = AutoTokenizer.from_pretrained(bundled_dir)
        for text in (SAMPLE, *SAMPLE.splitlines(keepends=True)):
            assert backend.tokenize(text) == hf.encode(text, add_special_tokens=False), repr(text)
    finally:
        backend.close()


# -- other architectures and pre-tokenizers ----------------------------------------------------
def _tiny_model(root: Path, bundled_dir: Path, model_type: str, pre_regex: str | None) -> Path:
    """A 2-layer random model of ``model_type`` with the bundled tokenizer (optionally re-pre-tokenized)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[model_type]
    cfg = cls(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=model_type == "qwen2",
        bos_token_id=0,
        eos_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # biases and norms too, so that they matter
    out = root / f"tiny_{model_type}"
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled_dir / f, out / f)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    if pre_regex is not None:
        tok = json.loads((out / "tokenizer.json").read_text())
        tok["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pre_regex}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        }
        (out / "tokenizer.json").write_text(json.dumps(tok))
    return out


@pytest.mark.parametrize("model_type, pre", [("qwen2", "qwen2"), ("llama", "llama-bpe")])
def test_other_architectures_and_pretokenizers(tmp_path, bundled_dir, make_run, export, model_type, pre):
    """Qwen2 (q/k/v biases, no Q/K permutation), an untied Llama, and the Split pre-tokenizers.

    The layout is checked exactly through an f32 export of the run (rel. error ~1e-7 measured); the
    q4_0 file of these random models only loosely, since llama.cpp's int8 activations cost ~1e-2
    on random weights (3e-4 on the trained bundled model).
    """
    from transformers import AutoTokenizer

    regex = next(r for r, name in SPLIT_PRE.items() if name == pre)
    model_dir = _tiny_model(tmp_path, bundled_dir, model_type, regex)
    run_dir = make_run(model=model_dir, bits=4, group_size=32, sym=True)
    ids = list(range(1, 60, 3))
    ref = _torch_logits(run_dir, ids)
    for gguf_type, tol in (("f32", EXACT_TOL), ("q4_0", 3e-2)):
        path, result, man = export(run_dir, gguf_type)
        reader = gguf.GGUFReader(path)
        assert reader.fields["general.architecture"].contents() == ("qwen2" if model_type == "qwen2" else "llama")
        assert reader.fields["tokenizer.ggml.pre"].contents() == pre
        assert reader.fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE
        assert ("blk.0.attn_q.bias" in result["gguf_names"].values()) == (model_type == "qwen2")
        assert ("output.weight" in result["gguf_names"].values()) == (model_type == "llama")
        backend = _backend(man, type_k="f32", type_v="f32")
        try:
            rel = _rel(backend.forward(ids), ref)
            assert rel <= tol, (gguf_type, rel)
        finally:
            backend.close()
    backend = _backend(man)
    try:
        hf = AutoTokenizer.from_pretrained(model_dir)
        for text in (SAMPLE, *SAMPLE.splitlines(keepends=True)):
            assert backend.tokenize(text) == hf.encode(text, add_special_tokens=False), repr(text)
    finally:
        backend.close()


# -- choices and refusals ----------------------------------------------------------------------
def test_mixed_precision_run_packs_overrides_as_q8_0(make_run):
    run = RunDir.open(make_run(bits=4, group_size=32, sym=True, overrides=("down_proj=8",)))
    types = check_gguf_compat(run, "q4_0")
    for name in run.quantized_names():
        assert types[name] == ("q8_0" if "down_proj" in name else "q4_0"), name


@pytest.mark.parametrize(
    "scheme, gguf_type, message",
    [
        (
            dict(bits=4, group_size=16, sym=True),
            "q4_0",
            r"got w4g16 for .*compress with --group-size 32, or export f16",
        ),
        (dict(bits=4, group_size=32, sym=False), "q4_0", r"got w4g32a .*compress with --sym, or export q4_1"),
        (dict(bits=8, group_size=32, sym=True), "q4_0", r"got w8g32 .*compress with --bits 4, or export q8_0"),
        (dict(bits=8, group_size=32, sym=True), "q4_1", r"q4_1 needs <=4-bit codes.*export q8_0"),
        (dict(bits=4, group_size=16, sym=True), "q8_0", r"multiple of 32; got w4g16"),
    ],
)
def test_refusals_name_the_fix(make_run, scheme, gguf_type, message):
    run = RunDir.open(make_run(**scheme))
    with pytest.raises(ExportError, match=message):
        check_gguf_compat(run, gguf_type)


def test_unquantized_dir_refuses_block_types(bundled_dir):
    with pytest.raises(ExportError, match=r"has no integer codes; run `edgeq compress .*` first, or export f16"):
        check_gguf_compat(RunDir.open(bundled_dir), "q4_0")
    with pytest.raises(ExportError, match="expected one of"):
        check_gguf_compat(RunDir.open(bundled_dir), "q5_0")


def test_non_bpe_tokenizer_is_refused(tmp_path, bundled_dir):
    model_dir = tmp_path / "spm"
    shutil.copytree(bundled_dir, model_dir)
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="byte-level BPE tokenizer.json.*SentencePiece"):
        export_gguf(RunDir.open(model_dir), "f16", tmp_path / "x.gguf")


def test_manifest_parity_separates_llamacpp_arithmetic_from_the_artifact(make_run, tmp_path):
    """Every GGUF manifest with block types reports the artifact against the fake-quant model twice: plain
    (plain layout, f32 KV cache: 4.2e-3 on these 256 tokens with the default build's int8 activations,
    ~1e-7 on a BLAS build) and with llama.cpp's activation rounding simulated (1.7e-3, within that
    arithmetic's own floor, micro-batches under 32 tokens on any build): either shows the codes are exact."""
    from edgeq.api import export
    from edgeq.config import ExportConfig

    man = export(
        make_run(bits=4, group_size=32, sym=True), ExportConfig(format="gguf", type="q4_0"), tmp_path / "m.gguf"
    )
    plain, sim = man.parity["fake_quant"], man.parity["fake_quant_llamacpp_arithmetic"]
    print(f"manifest parity: plain {plain['rel_error']:.2e}, llama.cpp arithmetic simulated {sim['rel_error']:.2e}")
    # 256 tokens here (96 in the test above): the rounding cascade grows along the sequence (1.7e-3 measured)
    assert sim["rel_error"] <= 3e-3
    assert man.parity["llama_cpp"]["repack"] is False and man.parity["llama_cpp"]["type_k"] == "f32"
    if man.parity["llama_cpp"]["blas"]:  # the prompt computed in f32 from the stored blocks: exact
        assert plain["rel_error"] <= 1e-5, plain
    else:  # the int8-activation kernels: the simulation accounts for most of the difference
        assert sim["rel_error"] <= 0.5 * plain["rel_error"], (plain, sim)
    assert sim["top1_agreement"] >= 0.99 and "floor" in sim["note"]
    f32 = export(
        make_run(bits=4, group_size=32, sym=True), ExportConfig(format="gguf", type="f32"), tmp_path / "f.gguf"
    )
    assert "fake_quant_llamacpp_arithmetic" not in f32.parity  # nothing to simulate: f32 matmuls


def test_repack_option_is_applied_and_reported(make_run, export, token_ids):
    _, _, man = export(make_run(bits=4, group_size=32, sym=True), "q4_0")
    logits = {}
    for repack, given in ((True, True), (False, "false")):  # a plan may carry the option as a string
        backend = _backend(man, type_k="f32", type_v="f32", repack=given)
        try:
            assert backend.info()["repack"] is repack
            logits[repack] = backend.forward(token_ids)
        finally:
            backend.close()
    # the same int8-activation kernels in either layout on the default build; exact f32 on a BLAS build
    assert _rel(logits[False], logits[True]) < 1e-2


@pytest.mark.skipif(
    not has_blas_backend(),
    reason="llama-cpp-python was built without a BLAS backend (no libggml-blas); install the BLAS build with "
    ".ci/llama_blas_wheel (needs libopenblas-dev; DEVELOPERS.md) to run this check",
)
@pytest.mark.parametrize("gguf_type, bits", [("q8_0", 8), ("q4_0", 4)])
def test_blas_build_computes_block_types_exactly(make_run, export, token_ids, gguf_type, bits):
    """With a BLAS backend llama.cpp dequantizes q8_0 / q4_0 weights into f32 matmuls for prompt batches
    (>= 32 tokens) -- for weights in the plain layout, hence ``repack=False``: then the artifact's logits
    equal the fake-quant model's (measured 3.5e-7), the exactness the int8-activation kernels hide."""
    run_dir = make_run(bits=bits, group_size=32, sym=True)
    _, _, man = export(run_dir, gguf_type)
    backend = _backend(man, type_k="f32", type_v="f32", repack=False)
    try:
        rel = _rel(backend.forward(token_ids), _torch_logits(run_dir, token_ids))
    finally:
        backend.close()
    print(f"{gguf_type} on a BLAS build, plain layout: llama.cpp vs fake-quant {rel:.2e}")
    assert rel <= 1e-5, rel
