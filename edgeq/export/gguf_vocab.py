"""Tokenizer metadata for GGUF: what llama.cpp's tokenizers need to reproduce the HF tokenizer.

Two of llama.cpp's tokenizer models (``src/llama-vocab.cpp``) are written:

* ``gpt2`` — byte-level BPE (GPT-2, Llama-3, Qwen2 pre-tokenization): tokens in byte-level unicode
  form, types and merges, read from ``tokenizer.json``.
* ``llama`` — SentencePiece (Llama-2, Mistral, Phi-3 style): tokens with ``▁`` for spaces, scores and
  types. llama.cpp's SPM tokenizer (``llm_tokenizer_spm_session``) splits text into UTF-8 characters
  and repeatedly merges the adjacent pair whose concatenation is a token with the **highest score**
  (leftmost on ties), then spells characters that are no token as ``<0xXX>`` byte tokens. That is
  SentencePiece's own BPE encoding, so the scores must be the model's: they are read from
  ``tokenizer.model`` with ``sentencepiece`` (through gguf-py's ``SentencePieceVocab``). When only an
  SPM-style ``tokenizer.json`` exists (BPE with ``byte_fallback``, spaces as ``▁``), the scores are
  derived from its merge ranks: HF's BPE applies the lowest-ranked merge first, and its converter
  (``convert_slow_tokenizer.generate_merges``) orders merges by the merged piece's score, so
  ``score(t) = -(rank of the first merge producing t)`` makes llama.cpp choose the same merges.

Added tokens (``tokenizer.json`` ``added_tokens``) become CONTROL (special) or USER_DEFINED tokens;
special ids, ``add_bos`` / ``add_eos`` and the chat template come from the model dir's tokenizer
files. The vocabulary is padded with unused ``[PADi]`` tokens to the embedding's rows.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import gguf

from edgeq.errors import ExportError

log = logging.getLogger(__name__)

SPIECE_UNDERLINE = "\u2581"  # "▁", SentencePiece's escaped space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SCORE_ADDED = -1000.0  # score of added and padding tokens (never reached by merges of normal text)

# Byte-level BPE pre-tokenizers llama.cpp implements (src/llama-vocab.cpp), keyed by what HF's
# tokenizer.json says. "gpt-2" is ByteLevel(use_regex=True)'s own GPT-2 regex; the others are a Split
# regex followed by ByteLevel(use_regex=False). The names are llama.cpp's (llama_vocab::load: "gpt-2",
# "llama-bpe", "qwen2"). Equality of tokenizations is tested, not assumed.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PRE = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


@dataclass
class GgufVocab:
    """The ``tokenizer.ggml.*`` content of one model, for either tokenizer model."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]  # in id order
    types: list[int]  # gguf.TokenType per token
    special_ids: dict[str, int]  # bos / eos / unk / pad -> id
    add_bos: bool
    add_eos: bool = False
    chat_template: str | list | None = None
    merges: list[str] | None = None  # gpt2 only: "a b", in rank order
    scores: list[float] | None = None  # llama only
    add_space_prefix: bool | None = None  # llama only: prepend "▁" to text (SentencePiece's dummy prefix)
    remove_extra_whitespaces: bool | None = None  # llama only


BpeVocab = GgufVocab  # the byte-level BPE flavour (kept as a name for callers of read_bpe_vocab)


# -- shared helpers ----------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _special_ids(model_dir: Path, ids: dict[str, int], config: dict) -> dict[str, int]:
    """bos/eos/unk/pad ids from tokenizer_config.json, special_tokens_map.json, then config.json."""
    tok_cfg = _read_json(model_dir / "tokenizer_config.json")
    special_map = _read_json(model_dir / "special_tokens_map.json")
    out: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        content = _token_content(tok_cfg.get(f"{kind}_token")) or _token_content(special_map.get(f"{kind}_token"))
        if content is not None and content in ids:
            out[kind] = ids[content]
            continue
        value = config.get(f"{kind}_token_id")
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int):
            out[kind] = value
    return out


def _adds_bos(tok: dict, tok_cfg: dict, bos: str | None, default: bool = False) -> bool:
    if isinstance(tok_cfg.get("add_bos_token"), bool):
        return tok_cfg["add_bos_token"]
    post = tok.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing" and bos is not None:
        first = (post.get("single") or [{}])[0]
        return (first.get("SpecialToken") or {}).get("id") == bos
    return default


def _adds_eos(tok: dict, tok_cfg: dict, eos: str | None) -> bool:
    if isinstance(tok_cfg.get("add_eos_token"), bool):
        return tok_cfg["add_eos_token"]
    post = tok.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing" and eos is not None:
        last = (post.get("single") or [{}])[-1]
        return (last.get("SpecialToken") or {}).get("id") == eos
    return False


def _chat_template(model_dir: Path) -> str | list | None:
    template = _read_json(model_dir / "tokenizer_config.json").get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").exists():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def _check_ids_fit(max_id: int, n_vocab: int) -> None:
    if max_id >= n_vocab:
        raise ExportError(
            f"tokenizer has id {max_id} but the embedding has {n_vocab} rows; expected ids "
            "< vocab_size — resize the model's embeddings to the tokenizer"
        )


def _padded(n_vocab: int) -> tuple[list[str], list[int], list[float]]:
    """Token texts, types and scores of an all-padding vocabulary of ``n_vocab`` rows."""
    return [f"[PAD{i}]" for i in range(n_vocab)], [int(gguf.TokenType.UNUSED)] * n_vocab, [_SCORE_ADDED] * n_vocab


def _added_type(entry: dict) -> int:
    return int(gguf.TokenType.CONTROL if entry.get("special", False) else gguf.TokenType.USER_DEFINED)


# -- byte-level BPE ("gpt2") ---------------------------------------------------------------------
def _pre_type(tok: dict) -> str | None:
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    items = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(items) == 2:
        split, byte_level = items
        if split.get("type") == "Split" and byte_level.get("type") == "ByteLevel":
            if not byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space"):
                return SPLIT_PRE.get((split.get("pattern") or {}).get("Regex"))
    return None


def _is_bpe_json(tok: dict) -> bool:
    model = tok.get("model") or {}
    normalizer = (tok.get("normalizer") or {}).get("type")
    return model.get("type") == "BPE" and _pre_type(tok) is not None and normalizer in (None, "NFC")


def _unsupported(model_dir: Path, tok: dict | None) -> ExportError:
    if tok is None:
        what = "no tokenizer.json or tokenizer.model"
    else:
        model = tok.get("model") or {}
        what = f"tokenizer.json with model {model.get('type')}, pre-tokenizer {(tok.get('pre_tokenizer') or {}).get('type')}"
    return ExportError(
        "GGUF export needs a byte-level BPE tokenizer.json (GPT-2, Llama-3 or Qwen2 pre-tokenization) or a "
        f"SentencePiece tokenizer (tokenizer.model, or an SPM-style BPE tokenizer.json); got {what} in {model_dir} "
        "— copy the source model's tokenizer files into it, or export onnx"
    )


def read_bpe_vocab(model_dir: Path, n_vocab: int, config: dict) -> GgufVocab:
    """The byte-level BPE vocabulary of a model dir, padded with ``[PADi]`` (unused) to the embedding's rows."""
    tok = _read_json(model_dir / "tokenizer.json")
    if not _is_bpe_json(tok):
        raise _unsupported(model_dir, tok or None)
    ids: dict[str, int] = dict(tok["model"]["vocab"])
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    ids.update({t["content"]: i for i, t in added.items()})
    _check_ids_fit(max(ids.values()), n_vocab)
    tokens, types, _ = _padded(n_vocab)
    for text, i in ids.items():
        tokens[i] = text
        types[i] = _added_type(added[i]) if i in added else int(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    tok_cfg = _read_json(model_dir / "tokenizer_config.json")
    special_ids = _special_ids(model_dir, ids, config)
    bos = tokens[special_ids["bos"]] if "bos" in special_ids else None
    return GgufVocab(
        model="gpt2",
        pre=_pre_type(tok) or "",
        tokens=tokens,
        types=types,
        special_ids=special_ids,
        add_bos=_adds_bos(tok, tok_cfg, bos),
        chat_template=_chat_template(model_dir),
        merges=merges,
    )


# -- SentencePiece ("llama") ---------------------------------------------------------------------
def spm_json_prefix(tok: dict) -> bool | None:
    """For a Llama-style SentencePiece ``tokenizer.json`` (BPE with byte fallback, spaces as ``▁``):
    whether it prepends ``▁`` to the text (SentencePiece's ``add_dummy_prefix``); None for any other."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    norm, pre = tok.get("normalizer") or {}, tok.get("pre_tokenizer") or {}
    if not norm and pre.get("type") == "Metaspace":  # transformers' non-legacy Llama conversion
        if pre.get("replacement") != SPIECE_UNDERLINE or pre.get("split", True):
            return None
        return pre.get("prepend_scheme", "always") != "never"
    steps = norm.get("normalizers") if norm.get("type") == "Sequence" else [norm]
    if pre or not steps:
        return None
    prepend = steps[0].get("type") == "Prepend" and steps[0].get("prepend") == SPIECE_UNDERLINE
    rest = steps[1:] if prepend else steps
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE}
    return prepend if rest == [replace] else None  # the legacy conversion: Prepend("▁"), Replace(" ", "▁")


def _import_sentencepiece():
    try:
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:
        raise ExportError(
            f"reading tokenizer.model needs the sentencepiece package ({exc}); "
            "pip install 'edgeq[export]' (or pip install sentencepiece)"
        ) from None
    return sentencepiece, sentencepiece_model_pb2


def _spm_from_model_file(model_dir: Path, n_vocab: int) -> tuple[list[str], list[int], list[float], bool, bool]:
    """Tokens, types and scores of ``tokenizer.model`` (SentencePiece's own), plus its normalizer flags."""
    _, model_pb2 = _import_sentencepiece()
    proto = model_pb2.ModelProto()
    proto.ParseFromString((model_dir / "tokenizer.model").read_bytes())
    kind = model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
    if kind != "BPE":
        raise ExportError(
            f"tokenizer.model in {model_dir} is a SentencePiece {kind} model; llama.cpp's SPM tokenizer merges "
            "pieces by score (BPE) and would tokenize it differently; expected model_type BPE — export onnx instead"
        )
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        log.warning(
            "tokenizer.model normalizes text (%s); llama.cpp's SPM tokenizer and HF's Llama conversion do not",
            norm.name,
        )
    pieces = list(gguf.vocab.SentencePieceVocab(model_dir).all_tokens())  # pieces, then added_tokens.json
    _check_ids_fit(len(pieces) - 1, n_vocab)
    tokens, types, scores = _padded(n_vocab)
    for i, (text, score, kind) in enumerate(pieces):
        tokens[i], scores[i], types[i] = text.decode("utf-8"), float(score), int(kind)
        if i < len(proto.pieces) and proto.pieces[i].type == model_pb2.ModelProto.SentencePiece.USER_DEFINED:
            types[i] = int(gguf.TokenType.USER_DEFINED)  # matched whole in raw text, as SentencePiece does
    return tokens, types, scores, norm.add_dummy_prefix, norm.remove_extra_whitespaces


def merge_scores(vocab: dict[str, int], merges: list) -> dict[str, float]:
    """Scores that make a highest-score-first merger (llama.cpp's SPM) follow BPE merge ranks.

    ``score(t) = -rank`` of the first merge whose result is ``t``. Refuses when a multi-character
    token has no merge: HF's BPE can never produce it, but llama.cpp would merge into it.
    """
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    orphans = [t for t in vocab if len(t) > 1 and t not in scores and not _BYTE_TOKEN.fullmatch(t)]
    if orphans:
        raise ExportError(
            f"tokenizer.json has {len(orphans)} multi-character tokens no merge produces (e.g. {orphans[0]!r}); "
            "expected a SentencePiece-converted BPE — add the source model's tokenizer.model to the model dir"
        )
    return scores


def _spm_from_json(tok: dict, n_vocab: int) -> tuple[list[str], list[int], list[float]]:
    """Tokens, types and merge-rank scores of an SPM-style BPE ``tokenizer.json``."""
    ids: dict[str, int] = dict(tok["model"]["vocab"])
    _check_ids_fit(max(ids.values()), n_vocab)
    added = {t["content"] for t in tok.get("added_tokens", [])}
    scores_by_text = merge_scores({t: i for t, i in ids.items() if t not in added}, tok["model"].get("merges", []))
    tokens, types, scores = _padded(n_vocab)
    unk = tok["model"].get("unk_token")
    for text, i in ids.items():
        tokens[i], scores[i] = text, scores_by_text.get(text, 0.0)
        kind = gguf.TokenType.BYTE if _BYTE_TOKEN.fullmatch(text) else gguf.TokenType.NORMAL
        types[i] = int(gguf.TokenType.UNKNOWN if text == unk else kind)
    return tokens, types, scores


def _apply_added_tokens(tok: dict, tokens: list[str], types: list[int], scores: list[float]) -> None:
    """Overlay HF's added tokens: specials become CONTROL, the others USER_DEFINED (matched in raw text)."""
    keep = {int(gguf.TokenType.CONTROL), int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.BYTE)}
    for entry in tok.get("added_tokens", []):
        i, text = int(entry["id"]), entry["content"]
        _check_ids_fit(i, len(tokens))
        if tokens[i] == text and types[i] in keep:
            continue  # SentencePiece's own <unk>, <s>, </s> keep their types
        kind = _added_type(entry)
        if kind == gguf.TokenType.USER_DEFINED:
            text = text.replace(SPIECE_UNDERLINE, " ")  # llama.cpp matches user-defined tokens in raw text
        tokens[i], types[i], scores[i] = text, kind, _SCORE_ADDED


def read_spm_vocab(model_dir: Path, n_vocab: int, config: dict) -> GgufVocab:
    """The SentencePiece vocabulary of a model dir (``tokenizer.model`` preferred), padded to ``n_vocab``."""
    tok = _read_json(model_dir / "tokenizer.json")
    json_prefix = spm_json_prefix(tok) if tok else None
    remove_extra = False
    if (model_dir / "tokenizer.model").exists():
        tokens, types, scores, prefix, remove_extra = _spm_from_model_file(model_dir, n_vocab)
        if json_prefix is not None:  # HF's tokenizer is the reference: follow its whitespace handling
            if json_prefix != prefix or remove_extra:
                log.warning("tokenizer.model and tokenizer.json disagree on whitespace; following tokenizer.json")
            prefix, remove_extra = json_prefix, False
    elif json_prefix is not None:
        tokens, types, scores = _spm_from_json(tok, n_vocab)
        prefix = json_prefix
    else:
        raise _unsupported(model_dir, tok or None)
    _apply_added_tokens(tok, tokens, types, scores)
    special = gguf.SpecialVocab(model_dir, n_vocab=n_vocab, special_token_types=("bos", "eos", "unk", "pad"))
    tok_cfg = _read_json(model_dir / "tokenizer_config.json")
    special_ids = special.special_token_ids
    bos = tokens[special_ids["bos"]] if "bos" in special_ids else None
    eos = tokens[special_ids["eos"]] if "eos" in special_ids else None
    return GgufVocab(
        model="llama",
        pre="default",
        tokens=tokens,
        types=types,
        special_ids=dict(special_ids),
        add_bos=_adds_bos(tok, tok_cfg, bos, default=True),  # HF's LlamaTokenizer adds BOS by default
        add_eos=_adds_eos(tok, tok_cfg, eos),
        chat_template=special.chat_template,
        scores=scores,
        add_space_prefix=prefix,
        remove_extra_whitespaces=remove_extra,
    )


# -- either --------------------------------------------------------------------------------------
def read_vocab(model_dir: Path, n_vocab: int, config: dict) -> GgufVocab:
    """The model dir's tokenizer as llama.cpp needs it: byte-level BPE or SentencePiece."""
    tok = _read_json(model_dir / "tokenizer.json")
    if tok and _is_bpe_json(tok):
        return read_bpe_vocab(model_dir, n_vocab, config)
    return read_spm_vocab(model_dir, n_vocab, config)


def add_tokenizer(writer: gguf.GGUFWriter, vocab: GgufVocab) -> None:
    """``tokenizer.ggml.*`` keys (and the chat template) for llama.cpp's tokenizer model ``vocab.model``."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for kind, token_id in vocab.special_ids.items():
        adders[kind](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.remove_extra_whitespaces is not None:
        writer.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
