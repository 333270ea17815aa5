"""QATLinear: the trainable stand-in keeps the codes/scales/zeros contract and can be trained."""

from __future__ import annotations

import pytest
import torch

from edgeq.compress.distill.qat import QATLinear
from edgeq.compress.distill.trainer import DistillConfig
from edgeq.compress.gptq import dequantize_torch
from edgeq.compress.quant import QuantScheme
from edgeq.compress.rtn import rtn_quantize
from edgeq.errors import ConfigError

SCHEME = QuantScheme(3, 32, False)


def _layer(seed=0, scheme=SCHEME, rank=0):
    torch.manual_seed(seed)
    w = torch.randn(16, 64) * 0.1
    codes, scales, zeros = rtn_quantize(w, scheme)
    return w, QATLinear(dequantize_torch(codes, scales, zeros), codes, scales, zeros, scheme, rank=rank), codes


def test_untrained_layer_is_the_ptq_layer_and_exports_its_codes():
    w, qat, codes = _layer()
    x = torch.randn(5, 64)
    wq = dequantize_torch(qat.codes, qat.scales.detach().half(), qat.zeros.to(torch.uint8))
    torch.testing.assert_close(qat(x), x @ wq.T, rtol=1e-5, atol=1e-6)
    for groups in [("scales",), ("scales", "weights")]:
        qat.set_trainable(groups)
        c, s, z = qat.export()
        assert torch.equal(c, codes) and s.dtype == torch.float16


def test_training_scales_reduces_output_error():
    w, qat, _ = _layer(seed=1)
    x = torch.randn(256, 64) * torch.linspace(0.2, 3, 64)
    y = x @ w.T
    err0 = float(((qat(x) - y) ** 2).mean())
    qat.set_trainable(("scales",))
    opt = torch.optim.Adam([qat.scales], lr=1e-3)
    for _ in range(100):
        loss = ((qat(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    codes, scales, zeros = qat.export()
    err1 = float(((x @ dequantize_torch(codes, scales, zeros).T - y) ** 2).mean())
    assert err1 < 0.97 * err0, (err0, err1)  # fixed codes: scales alone recover a few percent (measured 6%)


def test_adapter_is_merged_into_codes_the_student_computes_with():
    w, qat, codes = _layer(seed=2, rank=4)
    x = torch.randn(5, 64)
    before = qat(x).detach()
    qat.set_trainable(("adapter",))
    assert not qat.scales.requires_grad and qat.lora_b.requires_grad
    c, s, z = qat.export()
    assert torch.equal(c, codes)  # B = 0: the PTQ codes
    with torch.no_grad():
        qat.lora_b.fill_(0.05)  # a large adapter update must move codes
    c, s, z = qat.export()
    assert not torch.equal(c, codes) and int(c.max()) <= 7
    # the student computes with exactly the exported codes (the adapter is inside the rounding) ...
    torch.testing.assert_close(qat(x), x @ dequantize_torch(c, s, z).T, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(qat(x), before)
    # ... and the adapter still receives gradients through the straight-through rounding
    qat(x).pow(2).sum().backward()
    assert qat.lora_b.grad is not None and float(qat.lora_b.grad.abs().sum()) > 0


def test_adapter_distillation_trains_and_exports(make_run, tmp_path):
    """``--train scales,adapter`` through the block-wise trainer: codes move, the run dir is valid."""
    import numpy as np

    from edgeq.compress.distill.run import distill
    from edgeq.rundir import RunDir

    run = make_run(method="gptq", bits=2, group_size=32, sym=True, n_samples=32)
    cfg = DistillConfig(loss="mse", train=("scales", "adapter"), adapter_rank=4, lr=3e-3, steps=15, n_samples=8)
    out = RunDir.open(distill(run, cfg, tmp_path / "adapter"))
    assert out.meta["distill"]["adapter_rank"] == 4
    src = RunDir.open(run)
    moved = sum(int(np.sum(out.quantized(n).codes != src.quantized(n).codes)) for n in out.quantized_names())
    assert moved > 0
    assert all(out.quantized(n).codes.max() <= 3 for n in out.quantized_names())


def test_distill_config_validation():
    assert DistillConfig(loss="mse+sw+cakld").terms == frozenset({"mse", "sw", "cakld"})
    for bad in ("sw", "mse+kl+tsld", "mse+foo"):
        with pytest.raises(ConfigError, match="--loss"):
            DistillConfig(loss=bad)
    with pytest.raises(ConfigError, match="--train"):
        DistillConfig(train=("codes",))
    with pytest.raises(ConfigError, match="window=0 must be at least 1"):
        DistillConfig(window=0)


@pytest.mark.slow
def test_blockwise_distillation_reduces_the_2bit_gap(make_run, bundled_dir, tmp_path):
    """Block-wise MSE+SW on a 2-bit GPTQ run moves perplexity towards fp, and training each block together
    with the next one (window 2, the default) gets closer than block by block (window 1) at the same
    steps (short runs here; the recovered fraction of longer runs is recorded by
    benchmarks/distill_table.py)."""
    from tokenizers import Tokenizer

    from edgeq.bundled import heldout_text
    from edgeq.compress.distill.run import distill
    from edgeq.compress.eval import perplexity
    from edgeq.compress.model import load_torch_model
    from edgeq.rundir import RunDir

    run = make_run(method="gptq", bits=2, group_size=32, sym=True, n_samples=32)
    outs = {w: distill(run, DistillConfig(loss="mse+sw", steps=100, n_samples=32, window=w), tmp_path / f"w{w}")
            for w in (1, 2)}  # fmt: skip
    tok = Tokenizer.from_file(str(bundled_dir / "tokenizer.json"))
    ids = tok.encode(heldout_text(max_chars=60000), add_special_tokens=False).ids[:8193]
    fp, ptq, single, window = (perplexity(load_torch_model(p), ids).perplexity
                               for p in (bundled_dir, run, outs[1], outs[2]))  # fmt: skip
    assert fp < window < single < ptq, (fp, window, single, ptq)
    out = outs[2]
    assert (out / "loss_curves.png").stat().st_size > 0
    d = RunDir.open(out)
    assert d.meta["method"] == "gptq+distill" and d.quantized(d.quantized_names()[0]).codes.max() <= 3
    assert d.meta["distill"]["window"] == 2


def test_norms_group_trains_the_block_norms_and_writes_them(make_run, tmp_path):
    """``--train scales,norms``: the blocks' RMSNorm weights move and the run dir carries them (float32)."""
    import numpy as np

    from edgeq.compress.distill.run import distill
    from edgeq.rundir import RunDir

    run = make_run(method="gptq", bits=2, group_size=32, sym=True, n_samples=32)
    cfg = DistillConfig(loss="mse", train=("scales", "norms"), steps=10, n_samples=8)
    out, src = RunDir.open(distill(run, cfg, tmp_path / "norms")), RunDir.open(run)
    norms = [n for n in out.fp_names() if "layernorm" in n]
    assert len(norms) == 8  # input_layernorm + post_attention_layernorm in each of 4 blocks
    for name in norms:
        assert out.fp_dtype(name) == np.float32
        assert not np.array_equal(out.fp_tensor(name), src.fp_tensor(name)), name
    assert np.array_equal(out.fp_tensor("model.norm.weight"), src.fp_tensor("model.norm.weight"))  # not in a block


def test_output_fisher_is_the_squared_gradient_at_the_block_output(bundled_dir):
    """BRECQ's weights: per element, (d LM loss / d block output)² per calibration batch, normalized to
    mean 1 -- checked against the gradient of a zero perturbation added to that block's output."""
    from edgeq.compress.distill.dist import DistContext
    from edgeq.compress.distill.trainer import output_fisher
    from edgeq.compress.mappings import family_for
    from edgeq.compress.model import load_torch_model

    model = load_torch_model(bundled_dir)
    family = family_for(model.config.to_dict())
    ids = torch.randint(5, 4000, (4, 48), generator=torch.Generator().manual_seed(0))
    weights = output_fisher(model, family, 2, ids, 2, DistContext())
    assert [tuple(w.shape) for w in weights] == [(2, 48, 256), (2, 48, 256)]
    ref = []
    block = model.model.layers[2]

    def add(delta):
        return lambda m, a, out: (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta

    for i in (0, 2):
        delta = torch.zeros(2, 48, 256, requires_grad=True)
        handle = block.register_forward_hook(add(delta))
        try:
            x = ids[i : i + 2]
            (g,) = torch.autograd.grad(model(x, labels=x).loss, delta)
        finally:
            handle.remove()
        ref.append(g**2)
    mean = torch.stack([r.mean() for r in ref]).mean()
    for w, r in zip(weights, ref, strict=True):
        torch.testing.assert_close(w, r / mean, rtol=1e-4, atol=1e-6)
    assert float(torch.cat([w.reshape(-1) for w in weights]).mean()) == pytest.approx(1.0, rel=1e-5)
    assert not any(p.requires_grad for p in model.parameters())  # the teacher stays frozen


@pytest.mark.slow
def test_default_distillation_recovers_a_quarter_of_the_2bit_gap(bundled_dir, tmp_path):
    """Issue 4's threshold on one seed, at full settings: GPTQ w2g32 (64 calibration sequences, seed 0)
    distilled with ``DistillConfig``'s defaults recovers >= 25% of the perplexity gap to fp on 16,384
    held-out tokens (measured 29.6%; block by block, window 1, the same start recovers 26.1%; the
    three-seed means are in benchmarks/RESULTS.md). One thread, as the benchmark ran: GPTQ's start
    depends on the thread count."""
    import torch
    from tokenizers import Tokenizer

    from edgeq.bundled import heldout_text
    from edgeq.compress.distill.run import distill
    from edgeq.compress.eval import perplexity
    from edgeq.compress.model import load_torch_model
    from edgeq.compress.run import compress
    from edgeq.config import CompressConfig

    tok = Tokenizer.from_file(str(bundled_dir / "tokenizer.json"))
    ids = tok.encode(heldout_text(max_chars=16384 * 6), add_special_tokens=False).ids[: 16384 + 1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = CompressConfig(method="gptq", bits=2, group_size=32, n_samples=64, seed=0)
        ptq_dir = compress(bundled_dir, cfg, tmp_path / "gptq")
        out = distill(ptq_dir, DistillConfig(seed=0), tmp_path / "distilled")
        fp, ptq, after = (perplexity(load_torch_model(p), ids).perplexity for p in (bundled_dir, ptq_dir, out))
    finally:
        torch.set_num_threads(threads)
    recovered = (ptq - after) / (ptq - fp)
    assert recovered >= 0.25, (fp, ptq, after, recovered)
