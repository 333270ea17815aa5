"""Pack a run's integer codes into ONNX Runtime's ``MatMulNBits`` (com.microsoft) weight layout.

numpy only. The layout (ONNX Runtime contrib-op docs for ``com.microsoft.MatMulNBits``, checked
against a numpy reference on ORT 1.32 CPU, see ``/work/shared/reference.md``):

* logical weight ``W[N, K]`` (``nn.Linear.weight``), ``Y = A @ dequant(W).T``;
* ``B``: uint8 ``[N, ceil(K / bs), bs * bits / 8]``, K zero-padded, packed LSB first (4-bit: element
  ``2j`` in the low nibble, ``2j + 1`` in the high nibble);
* ``scales``: A's dtype (float32 here) ``[N, k_blocks]``;
* ``zero_points``: packed uint8 ``[N, ceil(k_blocks * bits / 8)]``, each row padded on its own;
  when absent the zero point is ``2**(bits - 1)``;
* ``W[n, k] = (q[n, k] - zp[n, k // bs]) * scale[n, k // bs]``,

which is exactly edgeq's contract (``edgeq.compress.quant``). Codes are never re-quantized: 2- and
3-bit codes sit unchanged in a 4-bit container and <= 8-bit codes in an 8-bit one, with their own
zeros, so the dequantized weights are bit-identical to the run's.

``block_size`` must be a power of two >= 16. A group length that is not one (96, per-channel 768)
is split into blocks of the largest power of two dividing it, with the group's scale and zero
replicated into each block; that too is exact. Blocks are capped at 256 because MLAS's optimized
n-bit GEMM kernels exist for block lengths 16..256 only (``GetQNBitGemmVariant`` in
onnxruntime/core/mlas/lib/qnbitgemm.cpp); larger blocks work through a slower fallback.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from edgeq.compress.quant import QuantizedWeight
from edgeq.errors import ExportError

CONTAINER_BITS = (2, 4, 8)
MIN_BLOCK = 16
MAX_FAST_BLOCK = 256


class PackedNBits(NamedTuple):
    """The initializers and block size of one ``MatMulNBits`` node (a plain 4-tuple)."""

    b: np.ndarray  # (N, k_blocks, bs * bits / 8) uint8
    scales: np.ndarray  # (N, k_blocks) float32
    zero_points: np.ndarray | None  # (N, ceil(k_blocks * bits / 8)) uint8; None: default 2**(bits-1)
    block_size: int


def block_size_for(group_len: int, n_groups: int) -> int:
    """The MatMulNBits block size that expresses groups of ``group_len`` exactly.

    The largest power of two in [16, 256] dividing the group; a single per-channel group whose
    length has no such divisor becomes one zero-padded block of the next power of two.
    """
    bs = MAX_FAST_BLOCK
    while bs >= MIN_BLOCK:
        if group_len % bs == 0:
            return bs
        bs //= 2
    if n_groups == 1:
        return max(MIN_BLOCK, 1 << (group_len - 1).bit_length())
    raise ExportError(
        f"group length {group_len} has no power-of-two divisor >= {MIN_BLOCK}; MatMulNBits needs "
        "blocks of 16, 32, 64, ... (re-compress with --group-size 32, 64 or 128)"
    )


def pack_lsb_first(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 ``values`` (..., L) with ``L % (8 // bits) == 0`` into bytes, element 0 in the low bits."""
    per_byte = 8 // bits
    if per_byte == 1:
        return np.ascontiguousarray(values, dtype=np.uint8)
    parts = values.reshape(*values.shape[:-1], -1, per_byte).astype(np.uint8)
    out = np.zeros(parts.shape[:-1], dtype=np.uint8)
    for j in range(per_byte):
        out |= parts[..., j] << np.uint8(bits * j)
    return out


def _pad_last(x: np.ndarray, length: int) -> np.ndarray:
    if x.shape[-1] == length:
        return x
    out = np.zeros((*x.shape[:-1], length), dtype=x.dtype)
    out[..., : x.shape[-1]] = x
    return out


def pack_matmul_nbits(qw: QuantizedWeight, bits: int) -> PackedNBits:
    """``MatMulNBits`` initializers for ``qw`` in a ``bits``-wide container (no re-quantization).

    Returns ``(B, scales, zero_points, block_size)``; ``zero_points`` is None when every zero equals
    the container's default ``2**(bits - 1)``.
    """
    if bits not in CONTAINER_BITS:
        raise ExportError(f"MatMulNBits bits={bits} is not supported; expected one of {CONTAINER_BITS}")
    if qw.scheme.bits > bits:
        raise ExportError(
            f"{qw.scheme.bits}-bit codes do not fit a {bits}-bit MatMulNBits container; "
            f"expected codes of <= {bits} bits (export with a wider precision, e.g. int8)"
        )
    n, k = qw.shape
    group_len = qw.scheme.group_len(k)
    n_groups = qw.scheme.groups(k)
    bs = block_size_for(group_len, n_groups)
    k_blocks = -(-k // bs)
    reps = max(group_len // bs, 1)  # blocks per group (1 for a padded single block)
    codes = _pad_last(qw.codes, k_blocks * bs).reshape(n, k_blocks, bs)  # (N, kb, bs)
    b = pack_lsb_first(codes, bits)  # (N, kb, bs * bits / 8)
    scales = np.repeat(qw.scales.astype(np.float32), reps, axis=1)  # (N, kb)
    zeros = np.repeat(qw.zeros, reps, axis=1)  # (N, kb)
    assert scales.shape == (n, k_blocks) and zeros.shape == (n, k_blocks), (scales.shape, k_blocks)
    zero_points = None
    if not np.all(zeros == (1 << (bits - 1))):
        per_byte = 8 // bits
        zero_points = pack_lsb_first(_pad_last(zeros, -(-k_blocks // per_byte) * per_byte), bits)
    return PackedNBits(np.ascontiguousarray(b), np.ascontiguousarray(scales), zero_points, bs)


def dequantize_packed(packed: PackedNBits, bits: int, k: int) -> np.ndarray:
    """float32 ``[N, K]`` weights of packed MatMulNBits initializers (the ORT formula, for tests)."""
    bs = packed.block_size
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    n, k_blocks, _ = packed.b.shape
    q = np.stack([(packed.b >> np.uint8(bits * j)) & mask for j in range(per_byte)], axis=-1)
    q = q.reshape(n, k_blocks, bs).astype(np.float32)
    if packed.zero_points is None:
        zp = np.full((n, k_blocks), float(1 << (bits - 1)), dtype=np.float32)
    else:
        zq = np.stack([(packed.zero_points >> np.uint8(bits * j)) & mask for j in range(per_byte)], -1)
        zp = zq.reshape(n, -1)[:, :k_blocks].astype(np.float32)
    w = (q - zp[..., None]) * packed.scales[..., None]
    return w.reshape(n, k_blocks * bs)[:, :k]
