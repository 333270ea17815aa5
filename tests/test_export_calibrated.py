"""Codes from GPTQ and AWQ runs flow unchanged through both exporters (parity against the run)."""

from __future__ import annotations

import pytest

from edgeq.api import export
from edgeq.config import ExportConfig
from edgeq.runtime.backends.llamacpp import has_blas_backend

# the default llama-cpp-python build's CPU kernels round activations to int8 for q8_0/q4_0 weights
# (see test_export_gguf.py); a build with a BLAS backend computes the parity prompt in f32 (below)
GGUF_TOL = 1e-2
ONNX_TOL = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("bits,gguf_type", [(4, "q4_0"), (8, "q8_0")])
def test_calibrated_runs_export_exactly(tmp_path, make_run, method, bits, gguf_type):
    run = make_run(method=method, bits=bits, group_size=32, sym=True, n_samples=32)
    onnx = export(run, ExportConfig("onnx", "int4" if bits == 4 else "int8", parity_tokens=128), tmp_path / "onnx")
    gguf = export(run, ExportConfig("gguf", gguf_type, parity_tokens=128), tmp_path / f"m.{gguf_type}.gguf")
    for man, tol in ((onnx, ONNX_TOL), (gguf, GGUF_TOL)):
        fq = man.parity["fake_quant"]
        assert fq["rel_error"] <= tol, (man.format, fq)
        assert fq["top1_agreement"] >= 0.98, (man.format, fq)
        assert man.scheme["method"] == method
        # the artifact is further from the source than from its own run: it carries the run's codes
        assert man.parity["source"]["kl"] > fq["kl"]
    assert set(onnx.scheme["tensors"]) == set(gguf.scheme["tensors"])


@pytest.mark.slow
@pytest.mark.skipif(
    not has_blas_backend(),
    reason="llama-cpp-python was built without a BLAS backend (no libggml-blas): its int8-activation kernels "
    "cannot show GGUF q8_0/q4_0 exactness to 1e-3; install the BLAS build with .ci/llama_blas_wheel (DEVELOPERS.md)",
)
@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("bits,gguf_type", [(4, "q4_0"), (8, "q8_0")])
def test_calibrated_gguf_parity_within_1e3_on_a_blas_build(tmp_path, make_run, method, bits, gguf_type):
    """Issue 5's bound for GPTQ/AWQ runs: the manifest's parity runs llama.cpp with the plain layout and an
    f32 KV cache, which a BLAS build computes in f32: the artifact equals the run's fake-quant model."""
    run = make_run(method=method, bits=bits, group_size=32, sym=True, n_samples=32)
    man = export(run, ExportConfig("gguf", gguf_type, parity_tokens=128), tmp_path / f"m.{gguf_type}.gguf")
    fq = man.parity["fake_quant"]
    assert man.parity["llama_cpp"]["blas"] is True and man.parity["llama_cpp"]["repack"] is False
    assert fq["rel_error"] <= 1e-3 and fq["top1_agreement"] == 1.0, fq
