"""GGUF export of SentencePiece (Llama-2 style) tokenizers: llama.cpp's "llama" tokenizer against HF's.

A SentencePiece model is trained here (seeded, ~1 s) on stdlib source plus a few multilingual lines,
wrapped the way Llama checkpoints ship it (``LlamaTokenizerFast`` from ``tokenizer.model``, saved
with ``save_pretrained`` into a tiny random Llama dir), compressed (RTN w4g32) and exported. Real
llama.cpp (llama-cpp-python, ``vocab_only``) tokenizes; HF and sentencepiece itself are the references.
"""

from __future__ import annotations

import ctypes
import io
import json
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgeq.errors import ExportError
from edgeq.export.gguf import export_gguf
from edgeq.export.gguf_vocab import merge_scores
from edgeq.rundir import RunDir

llama_cpp = pytest.importorskip("llama_cpp")
spm = pytest.importorskip("sentencepiece")

# Latin accents, Cyrillic, CJK, emoji (incl. ZWJ-free modifiers and flags), digits, Python with
# indentation, tabs and trailing spaces; lines starting with whitespace test the dummy prefix.
SAMPLE = (
    "Hello, world! It's 2024; we're testing 123456789 tokens and 3.14159 apples.\n"
    "Grüße aus München: Äpfel, Öl und Übermaß — schön, oder? Ça coûte 5 €, naïve café.\n"
    "Привет, мир! Съешь же ещё этих мягких французских булок.\n"
    "中文分词测试：你好，世界。机器学习很有趣！日本語のテキスト。\n"
    "Emoji 🚀🔥👍🏽 and flags 🇩🇪🇯🇵.\n"
    "def foo(x, y=2):\n    if x:\n\treturn x ** y  # tab\n    return None\n\n\n"
    "class A:\n\t\tpass   \n   trailing  \t spaces\n"
)
TEXTS = (SAMPLE, *SAMPLE.splitlines(keepends=True), "x", " leading space", "\u00a0nbsp and ZWJ 👨‍👩‍👧")
MULTILINGUAL_TRAIN = (
    "Grüße aus München: Äpfel, Öl und Übermaß — schön.",
    "Привет, мир! Как дела? Это текст на русском языке.",
    "你好，世界。机器学习很有趣！",
    "café naïve résumé à la carte",
)
CHAT_TEMPLATE = "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
N_VOCAB = 1536  # the embedding has more rows than the 1500 pieces + 2 added tokens: padding is tested


def _train_spm(path: Path, model_type: str) -> Path:
    """A Llama-like SentencePiece model: BPE with byte fallback, identity normalization, dummy prefix."""
    from edgeq.bundled import read_text, split_files

    lines = [line for p in split_files()[0][:60] for line in read_text(p).splitlines() if line.strip()]
    lines += list(MULTILINGUAL_TRAIN) * 20
    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type=model_type,
        vocab_size=1500,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
    )
    path.write_bytes(model.getvalue())
    return path


def _model_dir(root: Path, sp_model: Path, legacy: bool) -> Path:
    """A tiny random Llama with the trained tokenizer saved as Llama checkpoints ship it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=N_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    out = root / f"spm_llama_legacy{int(legacy)}"
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok = LlamaTokenizerFast(vocab_file=str(sp_model), legacy=legacy, add_prefix_space=True, from_slow=True)
    tok.add_tokens(["<|user|>"])  # a plain added token: USER_DEFINED
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})  # CONTROL
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    assert (out / "tokenizer.model").exists()
    return out


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return _train_spm(tmp_path_factory.mktemp("spm") / "bpe.model", "bpe")


@pytest.fixture(scope="module")
def spm_dirs(tmp_path_factory, sp_model) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("spm_models")
    return {legacy: _model_dir(root, sp_model, legacy) for legacy in (True, False)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_run, spm_dirs):
    """``exported(legacy, drop_model_file)`` -> (gguf path, model dir); RTN w4g32 runs exported q4_0."""
    root = tmp_path_factory.mktemp("spm_gguf")
    cache: dict = {}

    def _export(legacy: bool, json_only: bool = False) -> tuple[Path, Path]:
        if (legacy, json_only) not in cache:
            run_dir = make_run(model=spm_dirs[legacy], bits=4, group_size=32, sym=True)
            if json_only:  # the same run without tokenizer.model: scores come from tokenizer.json's merges
                copy = root / f"run_json_only{int(legacy)}"
                shutil.copytree(run_dir, copy)
                (copy / "tokenizer.model").unlink()
                run_dir = copy
            out = root / f"spm{int(legacy)}{int(json_only)}.q4_0.gguf"
            export_gguf(RunDir.open(run_dir), "q4_0", out)
            cache[legacy, json_only] = (out, spm_dirs[legacy])
        return cache[legacy, json_only]

    return _export


def _llama(path: Path):
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def _hf(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _detokenize(llm, ids: list[int]) -> str:
    """llama.cpp's own detokenizer (removes the dummy-prefix space and, with remove_special, BOS)."""
    buf = ctypes.create_string_buffer(1 << 16)
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, len(buf), True, False)
    assert n >= 0, n
    return buf.raw[:n].decode("utf-8")


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


# -- tokenization ------------------------------------------------------------------------------
@pytest.mark.parametrize("json_only", [False, True], ids=["tokenizer.model", "tokenizer.json-only"])
def test_tokenization_matches_hf_and_sentencepiece(exported, sp_model, json_only):
    """Legacy Llama tokenizer.json (Prepend + Replace): llama.cpp == HF == sentencepiece, with and without
    BOS, and both detokenizers give the text back. The tokenizer.json-only export derives its scores
    from merge ranks and must tokenize identically."""
    path, model_dir = exported(True, json_only)
    llm, hf = _llama(path), _hf(model_dir)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    try:
        for text in TEXTS:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            assert ids == hf.encode(text, add_special_tokens=False), repr(text)
            assert ids == sp.encode(text), repr(text)
            with_bos = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            assert with_bos == hf.encode(text) == [1, *ids], repr(text)
            assert _detokenize(llm, ids) == text == hf.decode(ids), repr(text)
            # after BOS, llama.cpp's detokenizer keeps the dummy-prefix space; llama-cpp-python strips it
            assert llm.detokenize(with_bos).decode("utf-8") == text, repr(text)
        sample_ids = llm.tokenize(SAMPLE.encode("utf-8"), add_bos=False, special=False)
        assert sum(sp.is_byte(i) for i in sample_ids) > 10  # emoji and rare CJK go through byte fallback
    finally:
        llm.close()


def test_non_legacy_tokenizer_differs_from_hf_only_where_hf_loses_the_text(exported, sp_model):
    """transformers' non-legacy Llama conversion (Metaspace prepend_scheme="first") adds no "▁" before
    text that already starts with a space, so HF then disagrees with sentencepiece and cannot decode
    its own ids back to the text. llama.cpp follows sentencepiece everywhere, and HF wherever HF is right."""
    path, model_dir = exported(False)
    llm, hf = _llama(path), _hf(model_dir)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    differing = []
    try:
        for text in TEXTS:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            assert ids == sp.encode(text), repr(text)
            assert _detokenize(llm, ids) == text, repr(text)
            hf_ids = hf.encode(text, add_special_tokens=False)
            if hf_ids != ids:
                differing.append(text)
                assert text.startswith(" "), repr(text)
                assert hf.decode(hf_ids) != text, repr(text)  # HF's own round trip fails there
    finally:
        llm.close()
    assert differing  # the quirk is real on this sample (else the legacy test above covers it all)


# -- metadata read back ------------------------------------------------------------------------
def test_reader_reads_spm_tokenizer_keys(exported, sp_model):
    path, _ = exported(True)
    reader = gguf.GGUFReader(path)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    scores = np.asarray(_field(reader, "tokenizer.ggml.scores"), dtype=np.float32)
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.pre") == "default"
    assert len(tokens) == len(types) == len(scores) == N_VOCAB
    base = sp.vocab_size()
    assert tokens[:base] == [sp.id_to_piece(i) for i in range(base)]
    np.testing.assert_array_equal(scores[:base], np.array([sp.get_score(i) for i in range(base)], np.float32))
    T = gguf.TokenType
    assert types[0] == T.UNKNOWN and types[1] == types[2] == T.CONTROL
    assert [i for i in range(base) if types[i] == T.BYTE] == [i for i in range(base) if sp.is_byte(i)]
    assert sum(types[i] == T.BYTE for i in range(base)) == 256
    assert (tokens[base], types[base]) == ("<|user|>", T.USER_DEFINED)
    assert (tokens[base + 1], types[base + 1]) == ("<|end|>", T.CONTROL)
    assert all(t == T.UNUSED for t in types[base + 2 :]) and tokens[-1] == f"[PAD{N_VOCAB - 1}]"
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert _field(reader, "tokenizer.ggml.unknown_token_id") == 0
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert _field(reader, "tokenizer.ggml.add_eos_token") is False
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is True
    assert _field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    assert _field(reader, "general.architecture") == "llama"
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "output.weight", "blk.1.ffn_down.weight"}


def test_json_only_scores_follow_merge_ranks(exported, sp_model):
    """Without tokenizer.model the scores are -rank of the first merge producing each token: a different
    scale from SentencePiece's, but the same order over the merged pieces (which is all llama.cpp uses)."""
    path, _ = exported(True, json_only=True)
    reader = gguf.GGUFReader(path)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = np.asarray(_field(reader, "tokenizer.ggml.scores"))
    merged = [i for i in range(sp.vocab_size()) if len(tokens[i]) > 1 and not sp.is_byte(i) and not sp.is_control(i)]
    merged = [i for i in merged if not sp.is_unknown(i)]
    assert len(merged) > 1000
    sp_scores = np.array([sp.get_score(i) for i in merged])
    assert not np.array_equal(scores[merged], sp_scores)
    assert np.array_equal(np.argsort(-scores[merged], kind="stable"), np.argsort(-sp_scores, kind="stable"))


def test_spm_logits_match_torch(exported, make_run, spm_dirs):
    """The SentencePiece metadata does not disturb the model: f32 logits equal the fake-quant torch model."""
    from test_export_gguf import EXACT_TOL, _backend, _rel, _save_manifest, _torch_logits

    run_dir = make_run(model=spm_dirs[True], bits=4, group_size=32, sym=True)
    run = RunDir.open(run_dir)
    out = exported(True)[0].with_name("spm_f32.gguf")
    result = export_gguf(run, "f32", out)
    ids = _hf(spm_dirs[True]).encode(SAMPLE)[:48]
    backend = _backend(_save_manifest(out, run, "f32", result["tensor_types"]), type_k="f32", type_v="f32")
    try:
        rel = _rel(backend.forward(ids), _torch_logits(run_dir, ids))
    finally:
        backend.close()
    assert rel <= EXACT_TOL, rel


# -- refusals ----------------------------------------------------------------------------------
def test_unigram_tokenizer_model_is_refused(tmp_path, sp_model):
    """llama.cpp's "llama" tokenizer merges by score; a unigram model's Viterbi segmentation differs
    (measured: 10 of 15 sample lines tokenized differently), so export refuses rather than mis-tokenize."""
    unigram = _train_spm(tmp_path / "unigram.model", "unigram")
    model_dir = _model_dir(tmp_path, unigram, legacy=True)
    with pytest.raises(ExportError, match=r"SentencePiece UNIGRAM model.*expected model_type BPE.*export onnx"):
        export_gguf(RunDir.open(model_dir), "f16", tmp_path / "x.gguf")
    (model_dir / "tokenizer.model").unlink()  # a Unigram tokenizer.json alone is not SPM-style BPE either
    with pytest.raises(ExportError, match=r"got tokenizer.json with model Unigram"):
        export_gguf(RunDir.open(model_dir), "f16", tmp_path / "x.gguf")


def test_missing_sentencepiece_is_an_export_error(spm_dirs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes `import sentencepiece` raise ImportError
    with pytest.raises(ExportError, match=r"needs the sentencepiece package.*pip install 'edgeq\[export\]'"):
        export_gguf(RunDir.open(spm_dirs[True]), "f16", tmp_path / "x.gguf")


def test_json_only_with_unreachable_token_is_refused(tmp_path, spm_dirs):
    model_dir = tmp_path / "orphan"
    shutil.copytree(spm_dirs[True], model_dir)
    (model_dir / "tokenizer.model").unlink()
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok["model"]["vocab"]["qqqzzz"] = N_VOCAB - 1  # a piece no merge produces
    (model_dir / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    with pytest.raises(
        ExportError, match=r"1 multi-character tokens no merge produces \(e.g. 'qqqzzz'\).*tokenizer.model"
    ):
        export_gguf(RunDir.open(model_dir), "f16", tmp_path / "x.gguf")


def test_merge_scores_prefer_the_first_merge():
    scores = merge_scores({"a": 0, "b": 1, "ab": 2, "abb": 3}, ["a b", ["ab", "b"], "a bb"])
    assert scores == {"ab": 0.0, "abb": -1.0}


# -- checkpoints that ship only tokenizer.model ----------------------------------------------------
def test_tokenizer_model_only_checkpoint_compresses_and_exports(tmp_path, spm_dirs):
    """Older Llama/Mistral repos ship SentencePiece's tokenizer.model and no tokenizer.json. Compression
    writes the fast tokenizer transformers converts from it into the run dir, so calibration, parity,
    the ONNX artifact (whose device runtime tokenizes with tokenizer.json) and GGUF all work, and every
    one of them tokenizes as HF does."""
    from tokenizers import Tokenizer

    import edgeq
    from edgeq.config import CompressConfig, ExportConfig
    from edgeq.export.manifest import load_manifest
    from edgeq.runtime.backends import open_backend
    from edgeq.runtime.backends.base import BackendOptions

    model_dir = tmp_path / "spm_only"
    shutil.copytree(spm_dirs[True], model_dir)
    (model_dir / "tokenizer.json").unlink()
    hf = _hf(spm_dirs[True])

    def same_as_hf(encode) -> None:
        for text in TEXTS:
            assert encode(text) == hf.encode(text, add_special_tokens=False), repr(text)

    src_gguf = edgeq.export(model_dir, ExportConfig(format="gguf", type="f16", parity_tokens=64), tmp_path / "src.gguf")
    assert src_gguf.tokenizer == {"kind": "hf-tokenizers", "model": "BPE", "file": "tokenizer.json",
                                  "converted_from": "tokenizer.model"}  # fmt: skip
    assert src_gguf.parity["source"]["rel_error"] < 1e-2  # parity tokenized the held-out text
    assert not (model_dir / "tokenizer.json").exists()  # the user's model dir is left as it was

    run_dir = edgeq.compress(model_dir, CompressConfig(method="gptq", bits=4, group_size=32, n_samples=4,
                                                       seq_len=64), tmp_path / "run")  # fmt: skip
    same_as_hf(lambda t: Tokenizer.from_file(str(run_dir / "tokenizer.json")).encode(t, add_special_tokens=False).ids)
    assert (run_dir / "tokenizer.model").exists()

    man = edgeq.export(run_dir, ExportConfig(format="onnx", type="int4", parity_tokens=64), tmp_path / "onnx")
    assert man.parity["fake_quant"]["rel_error"] <= 1e-4
    backend = open_backend(load_manifest(tmp_path / "onnx"), BackendOptions(threads=1))
    same_as_hf(backend.tokenize)
    backend.close()

    gguf_man = edgeq.export(run_dir, ExportConfig(format="gguf", type="q4_0", parity_tokens=64), tmp_path / "m.gguf")
    llm = _llama(tmp_path / "m.gguf")
    same_as_hf(lambda t: llm.tokenize(t.encode(), add_bos=False, special=True))
    assert gguf_man.tokenizer["kind"] == "hf-tokenizers"


def test_model_dir_without_tokenizer_is_refused(tmp_path, spm_dirs):
    from edgeq.errors import ModelError

    model_dir = tmp_path / "no_tok"
    shutil.copytree(spm_dirs[True], model_dir)
    (model_dir / "tokenizer.json").unlink()
    (model_dir / "tokenizer.model").unlink()
    with pytest.raises(ModelError, match=r"has no tokenizer.json or tokenizer.model; expected"):
        RunDir.open(model_dir).tokenizer()
