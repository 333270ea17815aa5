"""GGUF export of Phi-3 (llama.cpp arch "phi3"): fused qkv / gate_up, NEOX RoPE, partial rotary, longrope.

Tiny Phi-3 models are built from configs (seeded) with the bundled tokenizer and compressed with RTN
through the shared ``make_run`` fixture. Real llama.cpp (llama-cpp-python) runs the GGUF files; the
reference is the run's fake-quant torch model (``load_torch_model``), as in test_export_gguf.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_export_gguf import EXACT_TOL, INT8_ACT_TOL, _backend, _rel, _save_manifest, _torch_logits

from edgeq.errors import ExportError
from edgeq.export.gguf import check_gguf_compat, export_gguf, longrope_attn_factor
from edgeq.rundir import RunDir
from edgeq.runtime.backends.base import BackendOptions
from edgeq.runtime.backends.llamacpp import LlamaCppBackend

pytest.importorskip("llama_cpp")

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
RANDOM_TOL = 3e-2  # q8_0 / q4_0 on random weights: llama.cpp's int8 activations (see test_export_gguf.py)


def _phi3_dir(root: Path, bundled_dir: Path, name: str, **overrides) -> Path:
    """A 2-layer random Phi-3 (hidden 256, GQA 8/2 heads) with the bundled tokenizer and a chat template."""
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config

    torch.manual_seed(0)
    kwargs = dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        original_max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(Phi3Config(**{**kwargs, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # norms too, so that a misplaced one shows
    out = root / name
    model.save_pretrained(out, safe_serialization=True)
    _copy_tokenizer(bundled_dir, out)
    return out


def _copy_tokenizer(bundled_dir: Path, out: Path) -> None:
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled_dir / f, out / f)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg))


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory, bundled_dir) -> Path:
    return _phi3_dir(tmp_path_factory.mktemp("phi3"), bundled_dir, "tiny_phi3")


@pytest.fixture(scope="module")
def trained_phi3_dir(tmp_path_factory, bundled_dir) -> Path:
    """The bundled (trained) Llama's weights as a Phi-3: q/k/v and gate/up fused into Phi-3's tensors.

    Phi-3 and Llama compute the same function (HF rotate_half RoPE, RMSNorm, SwiGLU) given these weights,
    and a trained model's peaked logits make greedy decoding a fair check under int8 activations.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import Phi3Config, Phi3ForCausalLM

    src = json.loads((bundled_dir / "config.json").read_text())
    cfg = Phi3Config(
        vocab_size=src["vocab_size"],
        hidden_size=src["hidden_size"],
        intermediate_size=src["intermediate_size"],
        num_hidden_layers=src["num_hidden_layers"],
        num_attention_heads=src["num_attention_heads"],
        num_key_value_heads=src["num_key_value_heads"],
        max_position_embeddings=src["max_position_embeddings"],
        original_max_position_embeddings=src["max_position_embeddings"],
        rope_theta=src["rope_theta"],
        rms_norm_eps=src["rms_norm_eps"],
        tie_word_embeddings=src["tie_word_embeddings"],
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    state = {k: v.float() for k, v in load_file(bundled_dir / "model.safetensors").items()}
    fused = {}
    for key, value in state.items():
        if ".self_attn.q_proj." in key:
            k, v = (state[key.replace("q_proj", n)] for n in ("k_proj", "v_proj"))
            fused[key.replace("q_proj", "qkv_proj")] = torch.cat([value, k, v])
        elif ".mlp.gate_proj." in key:
            fused[key.replace("gate_proj", "gate_up_proj")] = torch.cat([value, state[key.replace("gate", "up")]])
        elif not any(s in key for s in (".k_proj.", ".v_proj.", ".up_proj.")):
            fused[key] = value
    model = Phi3ForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(fused, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    out = tmp_path_factory.mktemp("phi3_trained") / "bundled_as_phi3"
    model.save_pretrained(out, safe_serialization=True)
    _copy_tokenizer(bundled_dir, out)
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """``export(run_dir, gguf_type)`` -> (gguf path, result, manifest), cached per module."""
    root = tmp_path_factory.mktemp("phi3_gguf")
    cache: dict = {}

    def _export(run_dir: Path, gguf_type: str):
        if (run_dir, gguf_type) not in cache:
            run = RunDir.open(run_dir)
            out = root / f"m{len(cache)}.{gguf_type}.gguf"
            result = export_gguf(run, gguf_type, out)
            cache[run_dir, gguf_type] = (out, result, _save_manifest(out, run, gguf_type, result["tensor_types"]))
        return cache[run_dir, gguf_type]

    return _export


def _greedy_torch(run_dir: Path, prompt: list[int], steps: int = 32) -> list[int]:
    import torch

    from edgeq.compress.model import load_torch_model

    model = load_torch_model(run_dir)
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        greedy = [int(out.logits[0, -1].argmax())]
        for _ in range(steps - 1):
            out = model(torch.tensor([greedy[-1:]]), past_key_values=out.past_key_values, use_cache=True)
            greedy.append(int(out.logits[0, -1].argmax()))
    return greedy


def _llamacpp(man, ids: list[int], prompt: list[int], kv: str, steps: int = 32) -> tuple[np.ndarray, list[int]]:
    """(logits of ``ids``, greedy continuation of ``prompt``) from llama.cpp."""
    backend = _backend(man, type_k=kv, type_v=kv)
    try:
        logits = backend.forward(ids)
        backend.reset()
        got = [int(backend.forward(prompt)[-1].argmax())]
        for _ in range(steps - 1):
            got.append(int(backend.forward([got[-1]])[0].argmax()))
    finally:
        backend.close()
    return logits, got


@pytest.fixture(scope="module")
def held_out_ids(bundled_dir) -> list[int]:
    from transformers import AutoTokenizer

    from edgeq.bundled import heldout_text

    return AutoTokenizer.from_pretrained(bundled_dir).encode(heldout_text(20000), add_special_tokens=False)[:96]


# -- layout and metadata -----------------------------------------------------------------------
@pytest.mark.parametrize("gguf_type, bits", [("q8_0", 8), ("q4_0", 4)])
def test_fused_tensors_pack_the_runs_codes(make_run, phi3_dir, export, gguf_type, bits):
    """attn_qkv / ffn_up hold the run's fused qkv_proj / gate_up_proj exactly, rows in HF order."""
    run_dir = make_run(model=phi3_dir, bits=bits, group_size=32, sym=True)
    path, result, _ = export(run_dir, gguf_type)
    run, tensors = RunDir.open(run_dir), {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert result["gguf_names"]["model.layers.1.self_attn.qkv_proj.weight"] == "blk.1.attn_qkv.weight"
    assert result["gguf_names"]["model.layers.1.mlp.gate_up_proj.weight"] == "blk.1.ffn_up.weight"
    for name in run.quantized_names():
        t = tensors[result["gguf_names"][name]]
        assert t.tensor_type == gguf.GGMLQuantizationType[gguf_type.upper()], name
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        np.testing.assert_array_equal(got, run.tensor(name), err_msg=name)


def test_reader_reads_phi3_metadata(make_run, phi3_dir, export):
    run_dir = make_run(model=phi3_dir, bits=4, group_size=32, sym=True)
    path, result, _ = export(run_dir, "q4_0")
    reader = gguf.GGUFReader(path)
    cfg = RunDir.open(run_dir).config
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(result["gguf_names"].values()) and result["extra_tensors"] == []
    assert not any(".attn_q." in n or ".ffn_gate." in n for n in tensors)
    assert tuple(int(x) for x in reversed(tensors["blk.0.attn_qkv.weight"].shape)) == (256 + 2 * 2 * 32, 256)
    assert tuple(int(x) for x in reversed(tensors["blk.0.ffn_up.weight"].shape)) == (2 * 512, 256)

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "phi3"
    assert field("phi3.block_count") == 2
    assert field("phi3.context_length") == cfg["max_position_embeddings"]
    assert field("phi3.embedding_length") == 256 and field("phi3.feed_forward_length") == 512
    assert field("phi3.attention.head_count") == 8 and field("phi3.attention.head_count_kv") == 2
    assert field("phi3.rope.dimension_count") == 32
    assert field("phi3.rope.scaling.original_context_length") == cfg["original_max_position_embeddings"]
    assert field("general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.chat_template") == CHAT_TEMPLATE
    assert "phi3.rope.scaling.attn_factor" not in reader.fields


# -- llama.cpp against the fake-quant torch model ----------------------------------------------
def test_phi3_f32_logits_and_greedy_match_torch(make_run, phi3_dir, export, held_out_ids):
    run_dir = make_run(model=phi3_dir, bits=4, group_size=32, sym=True)
    _, _, man = export(run_dir, "f32")
    ids, prompt = held_out_ids[:64], held_out_ids[:48]
    logits, got = _llamacpp(man, ids, prompt, kv="f32")
    rel = _rel(logits, _torch_logits(run_dir, ids))
    print(f"phi3 f32: llama.cpp vs torch relative error {rel:.2e}")
    assert rel <= EXACT_TOL, rel
    assert got == _greedy_torch(run_dir, prompt)


@pytest.mark.parametrize("gguf_type, bits", [("q8_0", 8), ("q4_0", 4)])
def test_phi3_quantized_logits_match_torch(make_run, phi3_dir, export, held_out_ids, gguf_type, bits):
    """Random weights: llama.cpp's int8 activations cost ~1.7e-2 (measured), as for random Llama/Qwen2."""
    run_dir = make_run(model=phi3_dir, bits=bits, group_size=32, sym=True)
    _, _, man = export(run_dir, gguf_type)
    ids = held_out_ids[:64]
    backend = _backend(man, type_k="f32", type_v="f32")
    try:
        rel = _rel(backend.forward(ids), _torch_logits(run_dir, ids))
    finally:
        backend.close()
    print(f"phi3 {gguf_type} (random): llama.cpp vs torch relative error {rel:.2e}")
    assert rel <= RANDOM_TOL, rel


@pytest.mark.parametrize("gguf_type, bits", [("q8_0", 8), ("q4_0", 4)])
def test_trained_phi3_quantized_logits_and_greedy(
    make_run, trained_phi3_dir, bundled_dir, export, held_out_ids, gguf_type, bits
):
    """The bundled model as a Phi-3, RTN w8g32 / w4g32: logits within the tolerance of the bundled Llama's
    q8_0 / q4_0 tests and 32 greedy tokens identical to the fake-quant torch model."""
    ids, prompt = held_out_ids, held_out_ids[:64]
    assert _rel(_torch_logits(trained_phi3_dir, ids), _torch_logits(bundled_dir, ids)) < 1e-5  # same function
    run_dir = make_run(model=trained_phi3_dir, bits=bits, group_size=32, sym=True)
    _, _, man = export(run_dir, gguf_type)
    logits, got = _llamacpp(man, ids, prompt, kv="f16")
    rel = _rel(logits, _torch_logits(run_dir, ids))
    print(f"phi3 {gguf_type} (trained): llama.cpp vs torch relative error {rel:.2e}")
    assert rel <= INT8_ACT_TOL, rel
    assert got == _greedy_torch(run_dir, prompt)


def test_partial_rotary_matches_torch(tmp_path, bundled_dir, export):
    """partial_rotary_factor: HF rotates q[..., :rotary_dim]; llama.cpp's NEOX RoPE with n_rot does the same."""
    model_dir = _phi3_dir(tmp_path, bundled_dir, "phi3_partial", partial_rotary_factor=0.5)
    path, _, man = export(model_dir, "f32")
    reader = gguf.GGUFReader(path)
    assert reader.fields["phi3.rope.dimension_count"].contents() == 16
    # "phi3" in the dir name would make llama.cpp look up </s> etc., which the bundled vocab lacks
    assert "general.name" not in reader.fields
    ids = list(range(1, 200, 3))
    backend = _backend(man, type_k="f32", type_v="f32")
    try:
        rel = _rel(backend.forward(ids), _torch_logits(model_dir, ids))
    finally:
        backend.close()
    assert rel <= EXACT_TOL, rel


def test_longrope_matches_torch_where_llamacpp_picks_the_same_factors(tmp_path, bundled_dir, export):
    """longrope: short factors while the sequence fits original_max_position_embeddings (256), long ones
    beyond, scaled by sqrt(1 + ln(s)/ln(256)). llama.cpp chooses by context size (n_ctx > 256 -> long),
    HF by sequence length: they agree for n_ctx=256 and for sequences longer than 256 — and only there."""
    import torch

    gen = torch.Generator().manual_seed(1)
    short, long = (1 + torch.rand(16, generator=gen)).tolist(), (1 + 4 * torch.rand(16, generator=gen)).tolist()
    scaling = {"type": "longrope", "short_factor": short, "long_factor": long}
    model_dir = _phi3_dir(tmp_path, bundled_dir, "phi3_longrope", max_position_embeddings=2048, rope_scaling=scaling)
    path, result, man = export(model_dir, "f32")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert result["extra_tensors"] == ["rope_factors_long.weight", "rope_factors_short.weight"]
    np.testing.assert_array_equal(tensors["rope_factors_long.weight"], np.float32(long))
    np.testing.assert_array_equal(tensors["rope_factors_short.weight"], np.float32(short))
    attn = float(reader.fields["phi3.rope.scaling.attn_factor"].contents())
    assert attn == pytest.approx(np.sqrt(1 + np.log(8) / np.log(256)), rel=1e-6)
    assert attn == pytest.approx(longrope_attn_factor(RunDir.open(model_dir).config), rel=1e-6)
    ids = list(range(1, 4000, 7))
    for n_ctx, n, same in ((256, 256, True), (512, 300, True), (512, 64, False)):
        options = BackendOptions(threads=2, n_ctx=n_ctx, provider_options={"type_k": "f32", "type_v": "f32"})
        backend = LlamaCppBackend(man, options)
        backend.load()
        try:
            rel = _rel(backend.forward(ids[:n]), _torch_logits(model_dir, ids[:n]))
        finally:
            backend.close()
        assert (rel <= EXACT_TOL) if same else (rel > 1e-2), (n_ctx, n, rel)


# -- refusals ----------------------------------------------------------------------------------
def _with_config(tmp_path: Path, model_dir: Path, **changes) -> RunDir:
    out = tmp_path / "changed"
    shutil.copytree(model_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return RunDir.open(out)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 16}}, r"needs long_factor as 16 numbers"),
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}}, "as 16 numbers"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, r"rope_scaling type 'yarn' .*export onnx"),
        ({"partial_rotary_factor": 0.3}, r"partial_rotary_factor=0.3 \(9 of 32 head dims\).*even rotary width"),
    ],
)
def test_refusals_name_the_fix(tmp_path, phi3_dir, changes, message):
    with pytest.raises(ExportError, match=message):
        check_gguf_compat(_with_config(tmp_path, phi3_dir, **changes), "f16")


def test_longrope_is_refused_for_llama(tmp_path, tiny_random_dir):
    scaling = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}
    with pytest.raises(ExportError, match="longrope rope_scaling is supported for phi3 only"):
        check_gguf_compat(_with_config(tmp_path, tiny_random_dir, rope_scaling=scaling), "f16")
