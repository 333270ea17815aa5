"""The quantization contract and RTN: ranges, exact dequantization, gguf-compatible codes, schemes."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from edgeq.compress.quant import QuantizedWeight, QuantScheme, SchemeOverride, resolve_scheme
from edgeq.compress.rtn import _grouped, clip_search, rtn_quantize
from edgeq.errors import ConfigError


def _qw(w: torch.Tensor, scheme: QuantScheme, clip=1.0) -> QuantizedWeight:
    codes, scales, zeros = rtn_quantize(w, scheme, clip)
    return QuantizedWeight(codes.numpy(), scales.numpy(), zeros.numpy(), scheme)


def _sqnr_db(w: np.ndarray, wq: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(w**2) / np.sum((w - wq) ** 2)))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_codes_in_range_and_error_shrinks_with_bits(bits, group_size, sym):
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(64, 256)
    scheme = QuantScheme(bits, group_size, sym)
    qw = _qw(w, scheme)
    qw.check()
    assert qw.codes.max() <= scheme.maxq
    assert qw.scales.shape == (64, scheme.groups(256))
    sqnr = _sqnr_db(w.numpy(), qw.dequantize())
    # ~6 dB per bit; generous floors that still fail on a broken quantizer
    assert sqnr > {2: 3.0, 3: 9.0, 4: 15.0, 8: 38.0}[bits], sqnr


def test_dequantize_matches_formula():
    scheme = QuantScheme(4, 32, False)
    qw = _qw(torch.randn(8, 64), scheme)
    g = np.arange(64) // 32
    expect = (qw.codes.astype(np.float32) - qw.zeros[:, g]) * qw.scales[:, g].astype(np.float32)
    np.testing.assert_array_equal(qw.dequantize(), expect)


@pytest.mark.parametrize("bits,qtype", [(8, gguf.GGMLQuantizationType.Q8_0), (4, gguf.GGMLQuantizationType.Q4_0)])
def test_sym_rtn_reproduces_gguf_reference_quantizer(bits, qtype):
    """edgeq's symmetric RTN picks exactly the codes llama.cpp's reference quantizer picks."""
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((32, 256)) * rng.uniform(0.01, 2, (32, 1))).astype(np.float16).astype(np.float32)
    ours = _qw(torch.from_numpy(w), QuantScheme(bits, 32, True)).dequantize()
    theirs = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
    np.testing.assert_array_equal(ours, theirs)


def test_clip_search_never_increases_weight_error():
    torch.manual_seed(0)
    w = torch.randn(32, 128) * torch.rand(32, 1)
    w[0, 5] = 12.0  # an outlier that clipping should tame for its group
    scheme = QuantScheme(3, 32, False)
    clip = clip_search(_grouped(w, scheme), scheme)
    base = np.sum((_qw(w, scheme).dequantize() - w.numpy()) ** 2)
    clipped = np.sum((_qw(w, scheme, clip).dequantize() - w.numpy()) ** 2)
    assert clipped <= base
    assert float(clip.min()) < 1.0


def test_scheme_validation_messages():
    with pytest.raises(ConfigError, match="bits=5"):
        QuantScheme(5, 32)
    with pytest.raises(ConfigError, match="group_size=20"):
        QuantScheme(4, 20)
    with pytest.raises(ConfigError, match="does not divide"):
        QuantScheme(4, 128).groups(96)


def test_overrides_last_match_wins_and_fp():
    default = QuantScheme(4, 32, True)
    ovs = (
        SchemeOverride.parse("mlp=8:g64", default),
        SchemeOverride.parse("down_proj=fp", default),
        SchemeOverride.parse(r"layers\.0\..*q_proj=3:gpc:asym", default),
    )
    assert resolve_scheme("model.layers.1.mlp.up_proj.weight", default, ovs) == QuantScheme(8, 64, True)
    assert resolve_scheme("model.layers.1.mlp.down_proj.weight", default, ovs) is None
    assert resolve_scheme("model.layers.0.self_attn.q_proj.weight", default, ovs) == QuantScheme(3, -1, False)
    assert resolve_scheme("model.layers.1.self_attn.q_proj.weight", default, ovs) == default
    with pytest.raises(ConfigError, match="malformed"):
        SchemeOverride.parse("mlp=eight", default)
