"""Architecture knowledge as data: where the decoder blocks are and which Linears they hold.

One ``Family`` per supported Hugging Face ``model_type``. The calibration driver, the quantizers and
the exporters read these tables instead of branching on model classes. Adding a family is adding a
row (and, for GGUF, a tensor-name table in ``edgeq.export.gguf``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgeq.errors import ModelError


@dataclass(frozen=True)
class Family:
    model_type: str
    blocks: str  # attribute path of the ModuleList of decoder blocks
    linears: tuple[str, ...]  # Linear paths inside a block, in execution order
    # (norm path, linears it feeds): the pairs AWQ folds scales across
    norm_feeds: tuple[tuple[str, tuple[str, ...]], ...]
    lm_head: str = "lm_head"
    embed: str = "model.embed_tokens"

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks}.{index}."

    def quantizable(self, name: str) -> bool:
        """True for a decoder-block Linear weight name such as ``model.layers.3.mlp.down_proj.weight``."""
        m = re.fullmatch(rf"{re.escape(self.blocks)}\.\d+\.(.+)\.weight", name)
        return bool(m) and m.group(1) in self.linears


_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_LLAMA_NORMS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "model.layers", _LLAMA_LINEARS, _LLAMA_NORMS),
    "mistral": Family("mistral", "model.layers", _LLAMA_LINEARS, _LLAMA_NORMS),
    "qwen2": Family("qwen2", "model.layers", _LLAMA_LINEARS, _LLAMA_NORMS),
    "phi3": Family(
        "phi3",
        "model.layers",
        ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
        (("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))),
    ),
}


def family_for(config: dict) -> Family:
    """The family of a Hugging Face config dict; a clear error names the supported ones."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ModelError(
            f"unsupported architecture model_type={model_type!r}; expected one of {sorted(FAMILIES)} "
            "(a Llama-, Mistral-, Qwen2- or Phi-3-style decoder)"
        )
    return FAMILIES[model_type]
