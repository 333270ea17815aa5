"""GGUF export: a run's integer codes packed into llama.cpp blocks, with model and tokenizer metadata.

numpy + ``gguf`` only (no torch). The exporter never re-quantizes: each quantized tensor's codes,
fp16 scales and integer zeros (``edgeq.compress.quant``) are *packed* into GGUF blocks of 32
(``ggml/src/ggml-common.h``: ``block_q8_0``, ``block_q4_0``, ``block_q4_1``; ``ggml docs/gguf.md``):

* ``q8_0`` = fp16 ``d`` + 32 int8 ``q``,   ``x = d*q``        <- ``q = code - zero``, ``d = scale``;
* ``q4_0`` = fp16 ``d`` + 16 nibble bytes, ``x = d*(q - 8)``  <- ``q = code - zero + 8``;
* ``q4_1`` = fp16 ``d``, fp16 ``m`` + 16 nibble bytes, ``x = d*q + m`` <- ``q = code``,
  ``m = -d*zero`` (exact up to the fp16 rounding of ``m``).

A group's scale is replicated over each of its 32-blocks, so any group size that is a multiple of 32
(or per-channel with ``K % 32 == 0``) packs exactly. A scheme fits a block type when every possible
``code - zero`` fits the block's integer range: ``q8_0`` [-128, 127] holds symmetric codes of <= 8
bits and asymmetric ones of <= 7 bits; ``q4_0`` [-8, 7] holds symmetric <= 4-bit and asymmetric
<= 3-bit codes; ``q4_1`` holds any <= 4-bit codes. The run's own scheme must fit the requested type;
tensors compressed with a per-tensor override take the requested type if they fit, else ``q8_0``.

Nibble order within a block (element ``j`` in the low nibble of byte ``j``, element ``j + 16`` in
the high nibble) and the Q/K row permutation for llama.cpp's RoPE layout follow llama.cpp's
``gguf-py/gguf/quants.py`` and ``convert_hf_to_gguf.py`` (``LlamaModel.permute``); Qwen2 and Phi-3 use
the NEOX RoPE layout in llama.cpp and are not permuted. Phi-3's fused projections keep their HF row
order: ``qkv_proj`` -> ``attn_qkv`` (llama.cpp's ``build_qkv`` views rows [q; k; v]) and
``gate_up_proj`` -> ``ffn_up`` (its SWIGLU is ``silu(first half) * second half``, HF's
``up * act(gate)`` with ``gate, up = chunk(2)``), so fused tensors pack from the run's codes like any
other. Tensors are written one at a time through ``GGUFWriter``'s header / tensor-info / data API, so
the exporter holds one converted tensor at a time. Tokenizer metadata: ``edgeq.export.gguf_vocab``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edgeq.compress.quant import QuantizedWeight, QuantScheme
from edgeq.errors import ExportError
from edgeq.export.gguf_vocab import SPLIT_PRE as SPLIT_PRE  # re-exported: tokenizer metadata lives there
from edgeq.export.gguf_vocab import GgufVocab as GgufVocab
from edgeq.export.gguf_vocab import add_tokenizer as add_tokenizer
from edgeq.export.gguf_vocab import read_bpe_vocab as read_bpe_vocab
from edgeq.export.gguf_vocab import read_vocab
from edgeq.rundir import RunDir

log = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
BLOCK_TYPES = ("q8_0", "q4_0", "q4_1")
QK = 32  # elements per block of q8_0 / q4_0 / q4_1 (QK8_0 = QK4_0 = QK4_1 in ggml-common.h)
_QTYPE = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
}
_FILE_TYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
}
# the signed range of the stored integer ``code - zero`` (q4_0 stores it offset by 8)
_INT_RANGE = {"q8_0": (-128, 127), "q4_0": (-8, 7)}


@dataclass(frozen=True)
class ArchSpec:
    """How a Hugging Face ``model_type`` maps to a llama.cpp architecture."""

    gguf_arch: str  # general.architecture and the prefix of its keys
    permute_qk: bool  # llama.cpp's converter permutes Q/K rows (NORM RoPE) for llama, not qwen2/phi3 (NEOX)


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", True),
    "mistral": ArchSpec("llama", True),
    "qwen2": ArchSpec("qwen2", False),
    "phi3": ArchSpec("phi3", False),
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_NOT_EXPORTED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; llama.cpp computes them
_BLOCK_NAMES = {  # llama.cpp's tensor names (gguf-py constants.TENSOR_NAMES) per HF module in a block
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv",  # phi3: fused rows [q; k; v], split by llama.cpp's build_qkv
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate_up_proj": "ffn_up",  # phi3: fused rows [gate; up], llama.cpp's SWIGLU takes silu(first half)
}


def arch_spec(run: RunDir) -> ArchSpec:
    """The llama.cpp architecture of a run; a clear error for model types GGUF export lacks."""
    spec = ARCHS.get(run.model_type)
    if spec is None:
        raise ExportError(
            f"GGUF export supports model_type in {sorted(ARCHS)}; got {run.model_type!r} — export onnx instead"
        )
    return spec


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a Hugging Face tensor name, e.g. ``blk.3.attn_q.weight``."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        module, suffix = ".".join(parts[3:-1]), parts[-1]
        if module in _BLOCK_NAMES and suffix in ("weight", "bias"):
            return f"blk.{parts[2]}.{_BLOCK_NAMES[module]}.{suffix}"
    raise ExportError(
        f"tensor {hf_name!r} has no llama.cpp name; expected a Llama/Mistral/Qwen2/Phi-3 checkpoint's tensors "
        "— export onnx instead"
    )


# -- which type each tensor gets ---------------------------------------------------------------
def _code_range(scheme: QuantScheme) -> tuple[int, int]:
    """Smallest and largest possible ``code - zero`` under ``scheme``."""
    if scheme.sym:
        return -scheme.sym_zero, scheme.maxq - scheme.sym_zero
    return -scheme.maxq, scheme.maxq


def fits(scheme: QuantScheme, in_features: int, gguf_type: str) -> bool:
    """True when codes of ``scheme`` pack exactly into ``gguf_type`` blocks for rows of ``in_features``."""
    if gguf_type not in BLOCK_TYPES:
        return False
    if scheme.group_len(in_features) % QK or in_features % QK:
        return False
    if gguf_type == "q4_1":
        return scheme.bits <= 4
    lo, hi = _code_range(scheme)
    type_lo, type_hi = _INT_RANGE[gguf_type]
    return type_lo <= lo and hi <= type_hi


def _needs(gguf_type: str) -> str:
    holds = {
        "q8_0": "symmetric <=8-bit (or asymmetric <=7-bit) codes",
        "q4_0": "symmetric <=4-bit (or asymmetric <=3-bit) codes",
        "q4_1": "<=4-bit codes",
    }[gguf_type]
    return f"{gguf_type} needs {holds} in groups of a multiple of {QK}"


def _fix(scheme: QuantScheme, in_features: int, gguf_type: str) -> str:
    """The compress flags that would make ``scheme`` fit ``gguf_type``, and the type it fits now."""
    grouped_ok = not (scheme.group_len(in_features) % QK or in_features % QK)
    flags = [] if grouped_ok else [f"--group-size {QK}"]
    if scheme.bits > 4 and gguf_type != "q8_0":
        flags.append("--bits 4")
    if gguf_type == "q4_0" and not scheme.sym and scheme.bits > 3:
        flags.append("--sym")
    alternatives = [t for t in ("q4_1", "q8_0") if t != gguf_type and fits(scheme, in_features, t)]
    return f"compress with {' '.join(flags) or '--bits 4 --sym'}, or export {(alternatives or ['f16'])[0]}"


def _refuse(run: RunDir, name: str, scheme: QuantScheme, gguf_type: str) -> ExportError:
    k = run.shape(name)[1]
    return ExportError(
        f"{_needs(gguf_type)}; got {scheme.label} for {name} of {run.path.name} — {_fix(scheme, k, gguf_type)}"
    )


def _float_type(ndim: int, gguf_type: str) -> str:
    """Type of an unquantized tensor: 1-D (norms, biases) F32; matrices F16 unless f32 was asked."""
    if ndim == 1 or gguf_type == "f32":
        return "f32"
    return "f16"


def check_gguf_compat(run: RunDir, gguf_type: str) -> dict[str, str]:
    """The GGUF type (``q4_0``, ``f16``, ...) of every tensor of ``run`` exported as ``gguf_type``.

    Raises ExportError, before any work, when the run cannot be packed exactly (see module docstring).
    """
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"GGUF type {gguf_type!r} is not supported; expected one of {list(GGUF_TYPES)}")
    check_rope(run)
    quantized = set(run.quantized_names())
    if gguf_type in BLOCK_TYPES and not quantized:
        raise ExportError(
            f"{run.path} has no integer codes; run `edgeq compress MODEL --bits 4 --group-size 32` first, or export f16"
        )
    default = QuantScheme.from_dict(run.meta["scheme"]) if run.meta.get("scheme") else None
    types: dict[str, str] = {}
    for name in run.names():
        if name.endswith(_NOT_EXPORTED):
            continue
        gguf_name(name)  # every tensor must have a llama.cpp name
        if name not in quantized or gguf_type not in BLOCK_TYPES:
            types[name] = _float_type(len(run.shape(name)), gguf_type)
            continue
        scheme = run.scheme(name)
        assert scheme is not None
        k = run.shape(name)[1]
        if fits(scheme, k, gguf_type):
            types[name] = gguf_type
        elif scheme != default and fits(scheme, k, "q8_0"):
            log.info("%s (%s) does not fit %s; packing it as q8_0", name, scheme.label, gguf_type)
            types[name] = "q8_0"
        else:
            raise _refuse(run, name, scheme, gguf_type)
    return types


# -- block packing -----------------------------------------------------------------------------
def _per_block(values: np.ndarray, qw: QuantizedWeight) -> np.ndarray:
    """Per-group values (N, G) replicated to one per 32-block (N, K/32)."""
    n, k = qw.shape
    return np.repeat(values, qw.scheme.group_len(k) // QK, axis=1)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(N, nb, 32) uint8 in [0, 15] -> (N, nb, 16): element j low nibble, element j + 16 high nibble."""
    return q[..., : QK // 2] | (q[..., QK // 2 :] << np.uint8(4))


def _offset_codes(qw: QuantizedWeight, offset: int) -> np.ndarray:
    """``code - zero + offset`` as int16 (N, K/32, 32)."""
    n, k = qw.shape
    gl = qw.scheme.group_len(k)
    q = qw.codes.reshape(n, k // gl, gl).astype(np.int16) - qw.zeros[..., None].astype(np.int16)
    return (q + offset).reshape(n, k // QK, QK)


def pack_q8_0(qw: QuantizedWeight) -> np.ndarray:
    """``block_q8_0`` rows (N, K/32*34) uint8: fp16 d = scale, int8 q = code - zero."""
    n, k = qw.shape
    assert fits(qw.scheme, k, "q8_0"), (qw.scheme, k)  # check_gguf_compat chose the type
    nb = k // QK
    out = np.empty((n, nb, 2 + QK), np.uint8)
    out[..., :2] = _per_block(qw.scales, qw).view(np.uint8).reshape(n, nb, 2)
    out[..., 2:] = _offset_codes(qw, 0).astype(np.int8).view(np.uint8)
    return out.reshape(n, nb * (2 + QK))


def pack_q4_0(qw: QuantizedWeight) -> np.ndarray:
    """``block_q4_0`` rows (N, K/32*18) uint8: fp16 d = scale, nibbles q = code - zero + 8."""
    n, k = qw.shape
    assert fits(qw.scheme, k, "q4_0"), (qw.scheme, k)  # check_gguf_compat chose the type
    nb = k // QK
    out = np.empty((n, nb, 2 + QK // 2), np.uint8)
    out[..., :2] = _per_block(qw.scales, qw).view(np.uint8).reshape(n, nb, 2)
    out[..., 2:] = _nibbles(_offset_codes(qw, 8).astype(np.uint8))
    return out.reshape(n, nb * (2 + QK // 2))


def pack_q4_1(qw: QuantizedWeight) -> np.ndarray:
    """``block_q4_1`` rows (N, K/32*20) uint8: fp16 d = scale, fp16 m = -d*zero, nibbles q = code."""
    n, k = qw.shape
    assert fits(qw.scheme, k, "q4_1"), (qw.scheme, k)  # check_gguf_compat chose the type
    nb = k // QK
    d = _per_block(qw.scales, qw)
    # "+ 0.0" turns the -0.0 of a zero point 0 into +0.0 (same value, canonical bytes)
    m = (-(d.astype(np.float32) * _per_block(qw.zeros, qw).astype(np.float32)) + 0.0).astype(np.float16)
    out = np.empty((n, nb, 4 + QK // 2), np.uint8)
    out[..., :2] = d.view(np.uint8).reshape(n, nb, 2)
    out[..., 2:4] = m.view(np.uint8).reshape(n, nb, 2)
    out[..., 4:] = _nibbles(qw.codes.reshape(n, nb, QK))
    return out.reshape(n, nb * (4 + QK // 2))


PACKERS = {"q8_0": pack_q8_0, "q4_0": pack_q4_0, "q4_1": pack_q4_1}


def rope_row_order(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order of a Q/K projection for llama.cpp's RoPE: ``new = old[order]``.

    HF rotates the two halves of each head (``rotate_half``); ggml's default RoPE rotates adjacent
    pairs. llama.cpp's converter (``convert_hf_to_gguf.py``, ``LlamaModel.permute``) reshapes the rows
    to ``(n_head, 2, rows/n_head/2)`` and swaps the last two axes; so do we, on row indices, so that
    codes, scales and zeros move together.
    """
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, 2, half).swapaxes(1, 2).reshape(-1)


def _row_order(run: RunDir, name: str) -> np.ndarray | None:
    if not arch_spec(run).permute_qk:
        return None
    cfg = run.config
    heads = cfg["num_attention_heads"]
    if ".self_attn.q_proj." in name:
        return rope_row_order(run.shape(name)[0], heads)
    if ".self_attn.k_proj." in name:
        return rope_row_order(run.shape(name)[0], cfg.get("num_key_value_heads", heads))
    return None


# -- model metadata ----------------------------------------------------------------------------
def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def rope_dims(cfg: dict) -> int:
    """Rotated dimensions per head: HF rotates the first ``head_dim * partial_rotary_factor`` (Phi-3
    rotate_half on ``q[..., :rotary_dim]``), which llama.cpp's NEOX RoPE does with ``n_rot`` of them."""
    return int(_head_dim(cfg) * float(cfg.get("partial_rotary_factor", 1.0)))


def _rope_kind(cfg: dict) -> str | None:
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    return "longrope" if kind == "su" else kind  # "su" is transformers' old name of Phi-3's longrope


def _check_longrope(run: RunDir) -> None:
    cfg, arch = run.config, arch_spec(run).gguf_arch
    if arch != "phi3":
        raise ExportError(f"longrope rope_scaling is supported for phi3 only; got it on {arch} — export onnx instead")
    half = rope_dims(cfg) // 2
    scaling = cfg["rope_scaling"]
    for key in ("short_factor", "long_factor"):
        value = scaling.get(key)
        if not (isinstance(value, list) and len(value) == half and all(isinstance(v, (int, float)) for v in value)):
            raise ExportError(
                f"longrope rope_scaling needs {key} as {half} numbers (rotary dims / 2); got {str(value)[:60]} "
                "— fix config.json, or export onnx"
            )
    log.info(
        "longrope: llama.cpp uses the long factors when n_ctx > %s (HF: when the sequence is longer)",
        cfg.get("original_max_position_embeddings", cfg["max_position_embeddings"]),
    )


def check_rope(run: RunDir) -> None:
    """Refuse RoPE settings llama.cpp would compute differently from the torch model (before any work)."""
    cfg, spec = run.config, arch_spec(run)
    scaling = cfg.get("rope_scaling") or {}
    kind = _rope_kind(cfg)
    n_rot = rope_dims(cfg)
    if n_rot != _head_dim(cfg) and (spec.permute_qk or n_rot % 2 or n_rot <= 0):
        raise ExportError(
            f"partial_rotary_factor={cfg.get('partial_rotary_factor')} ({n_rot} of {_head_dim(cfg)} head dims) is not "
            f"supported for {spec.gguf_arch}; expected an even rotary width on a NEOX-RoPE arch — export onnx instead"
        )
    if kind == "longrope":
        _check_longrope(run)
    elif kind not in (None, "default", "linear"):
        raise ExportError(
            f"rope_scaling type {kind!r} of {run.path.name} is not supported by edgeq's GGUF export; expected none, "
            "'linear' or (phi3) 'longrope' — export onnx instead"
        )
    if kind == "linear" and not isinstance(scaling.get("factor"), (int, float)):
        raise ExportError(f"rope_scaling 'linear' needs a numeric factor; got {scaling!r} — fix config.json")


def longrope_attn_factor(cfg: dict) -> float:
    """The cos/sin scale of HF's longrope (``_compute_longrope_parameters``): sqrt(1 + ln s / ln L0)."""
    scaling = cfg["rope_scaling"]
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = cfg.get("original_max_position_embeddings")
    factor = cfg["max_position_embeddings"] / original if original else float(scaling.get("factor", 1.0))
    original = original or cfg["max_position_embeddings"]
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_factor_tensors(run: RunDir) -> dict[str, np.ndarray]:
    """phi3 longrope: per-frequency divisors of theta (llama.cpp's ``rope_factors_long/short``, F32)."""
    if _rope_kind(run.config) != "longrope":
        return {}
    scaling = run.config["rope_scaling"]
    return {
        "rope_factors_long.weight": np.asarray(scaling["long_factor"], dtype=np.float32),
        "rope_factors_short.weight": np.asarray(scaling["short_factor"], dtype=np.float32),
    }


def _add_rope_scaling(writer: gguf.GGUFWriter, config: dict) -> None:
    scaling = config.get("rope_scaling") or {}
    kind = _rope_kind(config)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if kind == "longrope":
        writer.add_rope_scaling_attn_factors(longrope_attn_factor(config))
    if "original_max_position_embeddings" in config:  # phi3: n_ctx_orig of llama.cpp's RoPE
        writer.add_rope_scaling_orig_ctx_len(int(config["original_max_position_embeddings"]))


# llama.cpp (llama_vocab::impl::load) sets token attributes by general.name: a name containing "phi3" or
# "phi-3" makes it look these tokens up with unordered_map::at, and the load fails when one is missing.
_PHI3_NAME_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def model_name(run: RunDir, tokens: list[str] | None = None) -> str | None:
    """``general.name``: the dir's name, or None where llama.cpp's Phi-3 name hook would fail to load it."""
    name = run.path.name
    if tokens is not None and ("phi3" in name.lower() or "phi-3" in name.lower()):
        missing = [t for t in _PHI3_NAME_TOKENS if t not in set(tokens)]
        if missing:
            log.warning("not writing general.name %r: llama.cpp would look up Phi-3 tokens %s it lacks", name, missing)
            return None
    return name


def add_model_metadata(
    writer: gguf.GGUFWriter, run: RunDir, n_vocab: int, file_type: str, tokens: list[str] | None = None
) -> None:
    """Architecture keys (``{arch}.context_length`` ...) that llama.cpp's llama/qwen2/phi3 loaders read."""
    cfg = run.config
    heads = cfg["num_attention_heads"]
    head_dim = _head_dim(cfg)
    writer.add_type("model")
    name = model_name(run, tokens)
    if name is not None:
        writer.add_name(name)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads", heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(rope_dims(cfg))
    writer.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(n_vocab)
    _add_rope_scaling(writer, cfg)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if window and window < cfg["max_position_embeddings"]:
        log.warning("sliding_window=%d is ignored by llama.cpp's %s graph", window, arch_spec(run).gguf_arch)
    writer.add_file_type(int(_FILE_TYPE[file_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def dominant_type(run: RunDir, types: dict[str, str], gguf_type: str) -> str:
    """The type holding most decoder-block weights (``general.file_type``)."""
    counts: dict[str, int] = {}
    quantized = set(run.quantized_names())
    for name, t in types.items():
        if name in quantized or (gguf_type not in BLOCK_TYPES and name.startswith("model.layers.")):
            counts[t] = counts.get(t, 0) + int(np.prod(run.shape(name)))
    return max(counts, key=counts.__getitem__) if counts else gguf_type


# -- writing -----------------------------------------------------------------------------------
def _order_key(gguf_tensor: str) -> tuple[int, str]:
    if gguf_tensor.startswith("blk."):
        return 1 + int(gguf_tensor.split(".")[1]), gguf_tensor
    return (0 if gguf_tensor.startswith("token_embd") else 1 << 30), gguf_tensor


def _info_shape(shape: tuple[int, ...], gtype: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape as GGUFWriter wants it, numpy dtype of the data, nbytes) of one tensor."""
    if gtype in BLOCK_TYPES:
        block, type_size = gguf.GGML_QUANT_SIZES[_QTYPE[gtype]]
        byte_shape = (*shape[:-1], shape[-1] // block * type_size)
        return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))
    dtype = np.dtype(np.float32 if gtype == "f32" else np.float16)
    return shape, dtype, int(np.prod(shape)) * dtype.itemsize


def tensor_data(run: RunDir, name: str, gtype: str) -> np.ndarray:
    """The bytes of one tensor as written: packed blocks, or F16/F32 values (rows permuted for RoPE)."""
    order = _row_order(run, name)
    if gtype in BLOCK_TYPES:
        qw = run.quantized(name)
        if order is not None:
            qw = QuantizedWeight(qw.codes[order], qw.scales[order], qw.zeros[order], qw.scheme)
        return PACKERS[gtype](qw)
    # unquantized tensors are written as read (no second copy when already in the target dtype)
    w = run.tensor(name) if run.scheme(name) else run.fp_tensor(name)
    if order is not None:
        w = w[order]
    return np.ascontiguousarray(w, dtype=np.float32 if gtype == "f32" else np.float16)


def export_gguf(run: RunDir, gguf_type: str, out_file: Path) -> dict:
    """Write ``run`` as a complete GGUF file at ``out_file`` (the caller makes it atomic).

    Returns ``{"tensor_types": {hf_name: type}, "gguf_names": {hf_name: gguf_name},
    "extra_tensors": [gguf_name, ...]}`` (extras: tensors made from the config, e.g. phi3 rope factors).
    """
    types = check_gguf_compat(run, gguf_type)
    spec = arch_spec(run)
    n_vocab = run.shape("model.embed_tokens.weight")[0]
    vocab = read_vocab(run.path, n_vocab, run.config)
    names = {name: gguf_name(name) for name in types}
    order = sorted(types, key=lambda n: _order_key(names[n]))
    extras = rope_factor_tensors(run)
    writer = gguf.GGUFWriter(Path(out_file), spec.gguf_arch)
    try:
        add_model_metadata(writer, run, n_vocab, dominant_type(run, types, gguf_type), vocab.tokens)
        add_tokenizer(writer, vocab)
        for name in order:
            shape, dtype, nbytes = _info_shape(run.shape(name), types[name])
            writer.add_tensor_info(names[name], shape, dtype, nbytes, raw_dtype=_QTYPE[types[name]])
        for gname, data in extras.items():
            writer.add_tensor_info(gname, data.shape, data.dtype, data.nbytes, raw_dtype=_QTYPE["f32"])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name in order:  # one converted tensor in memory at a time
            writer.write_tensor_data(tensor_data(run, name, types[name]))
        for data in extras.values():
            writer.write_tensor_data(data)
    finally:
        writer.close()
    log.info("wrote %s (%s, %d tensors)", out_file, gguf_type, len(types) + len(extras))
    return {"tensor_types": types, "gguf_names": names, "extra_tensors": list(extras)}
