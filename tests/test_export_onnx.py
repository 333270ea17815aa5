"""ONNX export and the onnxruntime backend, against real onnxruntime (no mocks).

* ``MatMulNBits`` packed from RTN codes equals numpy ``A @ dequantize(W).T`` (one-node graphs);
* exports of the bundled model (fp32, int8, int4) run through ``OnnxRuntimeBackend`` reproduce the
  run's fake-quant torch model (relative logit error <= 1e-4), prefill + single-token decode
  (KV cache) and greedy decoding token for token;
* the int4 file holds ~K*N/2 bytes per Linear and no fp32 copy of the quantized weights;
* optimum's ``ORTModelForCausalLM`` loads the fp32 export and generates what HF generates;
* refusals are one-line ``ExportError`` s that name the fix.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeq.bundled import heldout_text
from edgeq.compress.model import load_torch_model, model_summary
from edgeq.compress.quant import QuantizedWeight, QuantScheme
from edgeq.compress.rtn import rtn_quantize
from edgeq.errors import BackendError, ExportError
from edgeq.export.manifest import Manifest, file_entry, load_manifest
from edgeq.export.onnx import export_onnx
from edgeq.export.onnx_nbits import dequantize_packed, pack_matmul_nbits
from edgeq.rundir import RunDir
from edgeq.runtime.backends import open_backend
from edgeq.runtime.backends.base import BackendOptions
from edgeq.runtime.backends.onnxruntime import OnnxRuntimeBackend

REL_TOL = 1e-4
N_TOKENS = 128
N_PREFILL = 96
GREEDY_STEPS = 32

# (precision, run kwargs for make_run or None for the source model dir)
EXACT_CASES = {
    "fp32-source": ("fp32", None),
    "int8-w8g32": ("int8", {"bits": 8, "group_size": 32, "sym": True}),
    "int4-w4g32": ("int4", {"bits": 4, "group_size": 32, "sym": True}),
    "int4-w4g128a": ("int4", {"bits": 4, "group_size": 128, "sym": False}),
    # 3-bit codes in the 4-bit container; per-channel K=256/768 -> blocks of 256, scales replicated
    "int4-w3pc-asym": ("int4", {"bits": 3, "group_size": -1, "sym": False}),
}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


# -- MatMulNBits packing vs a numpy dequantize -----------------------------------------------------
def random_qw(n: int, k: int, bits: int, group_size: int, sym: bool, seed: int = 0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    scheme = QuantScheme(bits, group_size, sym)
    codes, scales, zeros = rtn_quantize(w, scheme)
    return QuantizedWeight(codes.numpy(), scales.numpy(), zeros.numpy(), scheme)


def run_matmul_nbits(a: np.ndarray, qw: QuantizedWeight, container: int) -> tuple[np.ndarray, int]:
    """Y of a one-node MatMulNBits graph in onnxruntime (CPU, accuracy_level 0), and its block size."""
    n, k = qw.shape
    b, scales, zero_points, block_size = pack_matmul_nbits(qw, container)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "zero_points"))
    node = helper.make_node(
        "MatMulNBits",
        ["A", *[i.name for i in inits]],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=container,
        block_size=block_size,
        accuracy_level=0,
    )
    graph = helper.make_graph(
        [node],
        "nbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": a})[0], block_size


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("code_bits,container", [(4, 4), (8, 8), (2, 4), (3, 4), (4, 8)])
def test_matmul_nbits_matches_numpy(code_bits, container, sym, group_size):
    qw = random_qw(48, 768, code_bits, group_size, sym)
    a = np.random.default_rng(1).standard_normal((5, 768)).astype(np.float32)
    y, block_size = run_matmul_nbits(a, qw, container)
    w = qw.dequantize()
    assert rel_err(y, a.astype(np.float64) @ w.T.astype(np.float64)) <= 1e-5
    assert block_size == (256 if group_size == -1 else group_size)  # per-channel K=768: 256 x 3
    packed = pack_matmul_nbits(qw, container)
    assert np.array_equal(dequantize_packed(packed, container, 768), w)  # bit-exact layout


def test_matmul_nbits_padded_single_block():
    """Per-channel K=72 (no power-of-two divisor >= 16): one zero-padded block of 128."""
    qw = random_qw(16, 72, 4, -1, False)
    a = np.random.default_rng(2).standard_normal((3, 72)).astype(np.float32)
    y, block_size = run_matmul_nbits(a, qw, 4)
    assert block_size == 128
    assert rel_err(y, a.astype(np.float64) @ qw.dequantize().T.astype(np.float64)) <= 1e-5


def test_pack_layout_is_lsb_first():
    codes = np.tile(np.arange(16, dtype=np.uint8), (2, 2))  # (2, 32)
    qw = QuantizedWeight(codes, np.ones((2, 1), np.float16), np.full((2, 1), 8, np.uint8), QuantScheme(4, 32, True))
    b, scales, zero_points, block_size = pack_matmul_nbits(qw, 4)
    assert b.shape == (2, 1, 16) and block_size == 32 and zero_points is None  # zero 8 is the default
    assert b[0, 0, :8].tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    assert scales.dtype == np.float32 and scales.shape == (2, 1)


def test_pack_refuses_codes_wider_than_container():
    with pytest.raises(ExportError, match="do not fit a 4-bit"):
        pack_matmul_nbits(random_qw(8, 64, 8, 32, True), 4)


# -- whole-model exports ---------------------------------------------------------------------------
def write_manifest(root: Path, precision: str) -> Manifest:
    """A minimal manifest naming model.onnx and tokenizer.json (what the runtime reads)."""
    config = json.loads((root / "config.json").read_text())
    man = Manifest(
        format="onnx",
        variant=precision,
        files=[file_entry(root, root / "model.onnx", "model"), file_entry(root, root / "tokenizer.json", "tokenizer")],
        model=model_summary(config),
        scheme={},
        source={},
        tokenizer={"kind": "hf-tokenizers", "file": "tokenizer.json"},
    )
    man.save(root / "manifest.json")
    return man


@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_run, bundled_dir):
    """``exported(case)`` -> (run dir, export dir, info, seconds); each case exported once per module."""
    cache: dict[str, tuple[Path, Path, dict, float]] = {}
    cases = {**EXACT_CASES, "int8-dynamic-source": ("int8", None)}

    def _get(case: str):
        if case not in cache:
            precision, run_kwargs = cases[case]
            src = make_run(**run_kwargs) if run_kwargs else bundled_dir
            out = tmp_path_factory.mktemp(f"onnx-{case}")
            t0 = time.perf_counter()
            info = export_onnx(RunDir.open(src), precision, out)
            cache[case] = (src, out, info, time.perf_counter() - t0)
            write_manifest(out, precision)
        return cache[case]

    return _get


@pytest.fixture(scope="module")
def torch_model():
    cache: dict[Path, torch.nn.Module] = {}

    def _get(path: Path):
        if path not in cache:
            cache[path] = load_torch_model(path)
        return cache[path]

    return _get


@pytest.fixture(scope="module")
def text_ids(bundled_dir) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundled_dir / "tokenizer.json"))
    ids = tok.encode(heldout_text(20000), add_special_tokens=False).ids
    assert len(ids) >= N_TOKENS
    return ids[:N_TOKENS]


def backend_for(export_dir: Path, **options) -> OnnxRuntimeBackend:
    backend = OnnxRuntimeBackend(load_manifest(export_dir), BackendOptions(**options))
    backend.load()
    return backend


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_export_matches_fake_quant_model(case, exported, torch_model, text_ids):
    src, out, info, seconds = exported(case)
    backend = backend_for(out, threads=2)
    logits = [backend.forward(text_ids[:N_PREFILL])]
    assert backend.n_past == N_PREFILL
    logits += [backend.forward([t]) for t in text_ids[N_PREFILL:]]  # single-token decode steps
    got = np.concatenate(logits)
    with torch.no_grad():
        ref = torch_model(src)(torch.tensor([text_ids])).logits[0].numpy()
    assert got.shape == ref.shape == (N_TOKENS, backend.vocab_size) and got.dtype == np.float32
    err = rel_err(got, ref)
    print(f"{case}: rel err {err:.2e}, export {seconds:.1f}s")
    assert err <= REL_TOL, f"{case}: relative logit error {err:.2e} > {REL_TOL}"
    backend.reset()
    assert backend.n_past == 0
    assert rel_err(backend.forward(text_ids[:8]), ref[:8]) <= REL_TOL  # reset really empties the cache
    backend.close()


@pytest.mark.parametrize("case", ["fp32-source", "int4-w4g32", "int4-w4g128a"])
def test_greedy_decoding_matches_torch(case, exported, torch_model, text_ids):
    src, out, _, _ = exported(case)
    model = torch_model(src)
    prompt = text_ids[:32]
    expected, ids = [], torch.tensor([prompt])
    with torch.no_grad():
        step = model(ids, use_cache=True)
        for _ in range(GREEDY_STEPS):
            nxt = int(step.logits[0, -1].argmax())
            expected.append(nxt)
            step = model(torch.tensor([[nxt]]), past_key_values=step.past_key_values, use_cache=True)
    backend = backend_for(out)
    got, logits = [], backend.forward(prompt)
    for _ in range(GREEDY_STEPS):
        got.append(int(logits[-1].argmax()))
        logits = backend.forward([got[-1]])
    assert got == expected


def test_int4_holds_packed_codes_and_no_fp32_copy(exported):
    src, out, info, _ = exported("int4-w4g32")
    _, fp32_out, _, _ = exported("fp32-source")
    run = RunDir.open(src)
    model = onnx.load(str(out / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(run.quantized_names())
    packed_params = 0
    for node in nbits:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n = attrs["K"], attrs["N"]
        assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 0
        b = inits[node.input[1]]
        assert b.data_type == TensorProto.UINT8 and len(b.raw_data) == k * n // 2
        packed_params += k * n
    float_digests = {
        hashlib.sha1(numpy_helper.to_array(i).astype(np.float32).tobytes()).hexdigest()
        for i in model.graph.initializer
        if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
    }
    for name in run.quantized_names():
        w = run.tensor(name)
        for arr in (w, np.ascontiguousarray(w.T)):
            assert hashlib.sha1(arr.tobytes()).hexdigest() not in float_digests, f"float copy of {name} remains"

    def size(d: Path) -> int:
        return sum(p.stat().st_size for p in d.glob("model.onnx*"))

    saved = size(fp32_out) - size(out)
    # 4 bytes -> 0.5 byte + a 2-byte scale per 32 (3.4375 saved per packed weight): the run's scales are
    # float16 by contract, stored so behind a Cast; the tied fp16-exact table is stored in float16 too
    embed_values = int(np.prod(run.shape("model.embed_tokens.weight")))
    assert saved >= 3.42 * packed_params + 1.9 * embed_values
    assert all(info["tensors"][n] == "MatMulNBits(bits=4,block=32,scales=fp32<-fp16)" for n in run.quantized_names())
    # the bundled checkpoint is fp16, so the embedding is stored in fp16 behind a Cast: exact, half the bytes
    assert info["tensors"]["model.embed_tokens.weight"] == "Gather(fp32<-fp16)+MatMul(fp32<-fp16)"
    assert all("fp32" in v for k, v in info["tensors"].items() if "layers" not in k)
    casts = [n for n in model.graph.node if n.op_type == "Cast" and n.output[0] == "model.embed_tokens.weight"]
    assert len(casts) == 1 and inits[casts[0].input[0]].data_type == TensorProto.FLOAT16


def test_export_info_and_files(exported):
    _, out, info, _ = exported("int4-w4g128a")
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "generation_config.json"} <= names
    assert not any(p.name.startswith(".") for p in out.iterdir())  # the exporter's work dir is gone
    n_layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    assert info["io"]["inputs"] == ["input_ids", "attention_mask", "position_ids", *past]
    assert info["io"]["outputs"] == ["logits", *[p.replace("past_key_values", "present") for p in past]]
    assert info["opset"] >= 17
    assert set(info["tensors"].values()) >= {"MatMulNBits(bits=4,block=128,scales=fp32<-fp16)"}


def test_int8_dynamic_baseline_of_unquantized_model(exported, torch_model, text_ids):
    src, out, info, _ = exported("int8-dynamic-source")
    layer_types = {v for k, v in info["tensors"].items() if ".layers." in k and "norm" not in k}
    assert layer_types == {"MatMulInteger(int8,per-tensor,dynamic)"}
    backend = backend_for(out)
    got = backend.forward(text_ids[:64])
    with torch.no_grad():
        ref = torch_model(src)(torch.tensor([text_ids[:64]])).logits[0].numpy()
    err = rel_err(got, ref)
    assert 0 < err < 0.05, f"int8 dynamic rel err {err:.2e}"  # re-quantized: close, not exact


def test_optimum_generate_matches_hf(exported, torch_model, text_ids):
    from optimum.onnxruntime import ORTModelForCausalLM

    src, out, _, _ = exported("fp32-source")
    prompt = torch.tensor([text_ids[:24]])
    kwargs = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 16, "do_sample": False, "pad_token_id": 0}
    ort_out = ORTModelForCausalLM.from_pretrained(out).generate(prompt, **kwargs)
    hf_out = torch_model(src).generate(prompt, **kwargs)
    assert ort_out.shape[1] == prompt.shape[1] + 16
    assert ort_out.tolist() == hf_out.tolist()


# -- the backend's contract ------------------------------------------------------------------------
def test_backend_tokenize_info_and_limits(exported, bundled_dir):
    from tokenizers import Tokenizer

    _, out, _, _ = exported("int4-w4g32")
    backend = open_backend(load_manifest(out), BackendOptions(threads=1, n_ctx=16))
    text = "def main():\n    return 42\n"
    assert (
        backend.tokenize(text)
        == Tokenizer.from_file(str(bundled_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    )
    info = backend.info()
    assert info["providers"] == ["CPUExecutionProvider"] and info["intra_op_num_threads"] == 1
    assert info["onnxruntime_version"] == ort.__version__
    assert backend.forward([]).shape == (0, backend.vocab_size)
    backend.forward(list(range(10)))
    with pytest.raises(BackendError, match="exceeds n_ctx=16"):
        backend.forward(list(range(7)))
    assert backend.n_past == 10
    backend.close()


def test_backend_refuses_missing_provider(exported):
    _, out, _, _ = exported("int4-w4g32")
    backend = OnnxRuntimeBackend(load_manifest(out), BackendOptions(providers=("NoSuchExecutionProvider",)))
    with pytest.raises(BackendError, match="NoSuchExecutionProvider.*CPUExecutionProvider"):
        backend.load()


# -- refusals --------------------------------------------------------------------------------------
def test_int4_refuses_8bit_run(make_run, tmp_path):
    run = RunDir.open(make_run(bits=8, group_size=32, sym=True))
    with pytest.raises(ExportError, match=r"8-bit codes.*export int8, or re-compress with --bits 4"):
        export_onnx(run, "int4", tmp_path)
    assert not any(tmp_path.iterdir())


def test_int4_refuses_unquantized_model(bundled_dir, tmp_path):
    with pytest.raises(ExportError, match=r"has no integer codes; run `edgeq compress .* --bits 4"):
        export_onnx(RunDir.open(bundled_dir), "int4", tmp_path)
    with pytest.raises(ExportError, match="expected one of"):
        export_onnx(RunDir.open(bundled_dir), "int3", tmp_path)
    assert not any(tmp_path.iterdir())
