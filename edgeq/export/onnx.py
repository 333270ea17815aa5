"""ONNX export with a KV cache, streaming: fp32/fp16 graphs, and int8/int4 ``MatMulNBits`` packed from codes.

The decoder graph is never written by hand, and the model's weights are never all in memory:

1. **Graph without weights.** optimum's exporter (task ``text-generation-with-past``; optimum-onnx
   0.1.0 with transformers 4.57.6 and torch 2.13, see reference.md) traces ``skeleton_model``: the
   run's architecture whose parameters are stride-0 scalars (no memory), exported with
   ``export_params=False``. Each parameter becomes a graph input named by its Hugging Face name. The
   layout is optimum's: inputs ``input_ids``, ``attention_mask``, ``position_ids``,
   ``past_key_values.{i}.key/value``; outputs ``logits``, ``present.{i}.key/value``; so
   ``ORTModelForCausalLM.from_pretrained(out_dir)`` loads the result.
2. **fp16** (``--precision fp16``, or ``--activations fp16`` for int4/int8): the weightless graph goes
   through onnxruntime's float16 converter; weights, activations and the KV cache become float16,
   ``logits`` stays float32, and the rotary angles (``position * inv_freq``) stay float32: in float16
   they are wrong by up to 0.5 rad at position 2000 (``rotary_nodes``; measured: relative logit error
   7e-2 at position 3000 converted naively, 3e-4 kept fp32).
3. **Weights, one tensor at a time** (``materialize``): each parameter input becomes an initializer
   read from the run dir and appended to ``model.onnx_data`` (``ExternalData``). A quantized Linear's
   ``Transpose -> MatMul`` becomes a com.microsoft ``MatMulNBits`` packed from the run's own codes
   (``edgeq.export.onnx_nbits``; never re-quantized, so with fp32 activations and
   ``accuracy_level=0`` the artifact computes the fake-quant model exactly). Float tensors that are
   exact in float16, and the run's float16 scales, are stored in float16 behind a ``Cast`` in quantized
   fp32 graphs (``compact``); onnxruntime folds the Casts when it creates the session.
   Peak memory is the largest tensor plus the graph, whatever the model's size.

``int8`` of an *unquantized* model is the exception: ``onnxruntime.quantization.quantize_dynamic``
(int8 weights, per tensor) on the decoder-block Linears, the standard baseline, and the only place
where quantization happens at export, because compression produced no codes. It works on the whole
model in memory.

Embeddings and ``lm_head`` follow the run: packed when the run quantized them, float otherwise; a
tied embedding is stored once (the lm_head reads ``Transpose(table)``, folded by onnxruntime).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeq.compress.mappings import family_for
from edgeq.errors import ExportError
from edgeq.export.onnx_nbits import pack_matmul_nbits
from edgeq.rundir import RunDir

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "int4")
CONTAINER_BITS = {"int4": 4, "int8": 8}
MS_DOMAIN = "com.microsoft"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
TASK = "text-generation-with-past"
# protobuf cannot serialize a message over 2 GiB; leave headroom for the graph itself.
EXTERNAL_DATA_BYTES = 2**31 - 2**26


# -- planning and refusals -----------------------------------------------------------------------
def plan_onnx(run: RunDir, precision: str) -> dict[str, int]:
    """HF tensor name -> MatMulNBits container bits for ``precision``; refuses what cannot be packed.

    Runs before any heavy work, so a bad request fails in milliseconds with the fix.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"ONNX precision {precision!r} is not supported; expected one of {list(PRECISIONS)}")
    if precision in ("fp32", "fp16") or (precision == "int8" and not run.is_quantized):
        return {}
    if not run.is_quantized:
        raise ExportError(
            f"{run.path} has no integer codes; run `edgeq compress {run.path} --bits 4 --out RUN` first, or export fp32"
        )
    bits = CONTAINER_BITS[precision]
    too_wide = [n for n in run.quantized_names() if run.scheme(n).bits > bits]  # type: ignore[union-attr]
    if too_wide:
        widest = max(run.scheme(n).bits for n in too_wide)  # type: ignore[union-attr]
        raise ExportError(
            f"{precision} export packs codes of <= {bits} bits; {len(too_wide)} tensors of {run.path} have "
            f"{widest}-bit codes (e.g. {too_wide[0]}); export int8, or re-compress with --bits 4"
        )
    return {name: bits for name in run.quantized_names()}


# -- graph export (no weights) --------------------------------------------------------------------
class _DropMessages(logging.Filter):
    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in record.getMessage()


def skeleton_model(run: RunDir):
    """The run's architecture as a float32 HF model whose parameters cost no memory.

    Every parameter is a distinct scalar broadcast to its shape (stride 0): the tracer needs real
    tensors to run the forward pass, but never their values, and the exporter is told not to write
    them. Distinct values are a second guard against merging equal-looking parameters into one input. A
    tied ``lm_head`` stays the embedding's parameter, so the graph reads one table for both.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgeq.compress.model import _materialize_buffers, check_supported

    check_supported(run.config)
    config = AutoConfig.from_pretrained(run.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for i, module in enumerate(model.modules()):
        for j, (name, param) in enumerate(list(module.named_parameters(recurse=False))):
            value = torch.full((), 1e-3 * (i + 1) + 1e-6 * (j + 1), dtype=torch.float32)
            setattr(module, name, torch.nn.Parameter(value.expand(param.shape), requires_grad=False))
    if config.tie_word_embeddings:
        model.tie_weights()
    model = _materialize_buffers(model, config)
    left = [name for name, b in model.named_buffers() if b.is_meta]
    if left:
        raise ExportError(
            f"buffers {left[:3]} of {run.architecture} could not be rebuilt off the meta device; report this"
        )
    return model.eval()


def export_graph(run: RunDir, work_dir: Path) -> onnx.ModelProto:
    """The decoder graph through optimum's exporter, without weights: parameters are graph inputs.

    The tracer runs ``skeleton_model`` (no weight memory) under ``torch.onnx.export(...,
    export_params=False, do_constant_folding=False)``: each parameter becomes a graph input named by
    its Hugging Face name (``model.layers.0.mlp.up_proj.weight``), read by the op that uses it
    (``Transpose -> MatMul`` for a Linear, ``Gather`` for the embedding, ``Mul`` for a norm).
    ``materialize`` turns those inputs into initializers one tensor at a time. Constant folding is
    off so that no folded copy of a parameter (a pre-transposed weight under a generated name)
    replaces its named input; onnxruntime folds the remaining constant subgraphs at session creation.
    """
    import torch
    from optimum.exporters.onnx import onnx_export_from_model
    from torch.onnx._internal.torchscript_exporter import utils as ts_utils

    model = skeleton_model(run)
    original, named_params = torch.onnx.export, ts_utils._get_named_param_dict

    def export_without_weights(*args, **kwargs):
        # keep_initializers_as_inputs also skips the exporter's initializer deduplication, which compares
        # every pair of same-shaped parameters by value: hours at 7B, and pointless for placeholders.
        kwargs.update(export_params=False, do_constant_folding=False, keep_initializers_as_inputs=True)
        return original(*args, **kwargs)

    def no_param_values(graph, params):
        # The exporter's ONNX shape inference serializes every parameter *value* it knows (a 7B model:
        # tens of GB through protobuf, for hours). Without values the parameters are plain graph
        # inputs whose types and shapes the trace recorded, which is all shape inference needs.
        return {}

    # optimum asks for accelerate to deduplicate tied weights; the skeleton shares the tied tensor already.
    optimum_log = logging.getLogger("optimum.exporters.onnx.base")
    quiet = _DropMessages("requires accelerate")
    optimum_log.addFilter(quiet)
    torch.onnx.export = export_without_weights  # optimum imports it at call time
    ts_utils._get_named_param_dict = no_param_values
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's tracer warns on every data-dependent branch
            onnx_export_from_model(model, work_dir, task=TASK, do_validation=False)
    finally:
        torch.onnx.export, ts_utils._get_named_param_dict = original, named_params
        optimum_log.removeFilter(quiet)
    path = work_dir / MODEL_FILE
    if not path.exists():
        raise ExportError(
            f"optimum wrote no {MODEL_FILE} for {run.architecture} (found "
            f"{sorted(p.name for p in work_dir.iterdir())}); expected a single decoder graph: "
            "check the optimum-onnx version (0.1.0 is tested)"
        )
    return onnx.load(str(path), load_external_data=False)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for inp in node.input:
            out.setdefault(inp, []).append(node)
    return out


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# -- weights, one tensor at a time ----------------------------------------------------------------
class ExternalData:
    """Appends tensors to one external data file and returns initializers that point into it.

    Each tensor's bytes are written as soon as it is converted, so the writer holds one tensor at a
    time, whatever the model's size. Offsets are aligned to ``ALIGN`` bytes; tensors smaller than
    ``INLINE_BYTES`` stay inside the graph (as ``onnx.save_model``'s ``size_threshold`` would).
    """

    ALIGN = 64
    INLINE_BYTES = 1024

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 -- closed by close(), called in export_onnx's finally
        self.bytes = 0

    def add(self, name: str, arr: np.ndarray) -> onnx.TensorProto:
        arr = np.ascontiguousarray(arr)
        if arr.nbytes < self.INLINE_BYTES:
            return numpy_helper.from_array(arr, name)
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
        tensor.dims.extend(arr.shape)
        pad = -self._f.tell() % self.ALIGN
        self._f.write(b"\0" * pad)
        offset = self._f.tell()
        self._f.write(memoryview(arr).cast("B"))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(arr.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.bytes += arr.nbytes
        return tensor

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


@dataclass
class _Uses:
    """How the graph reads one parameter input."""

    linear: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = field(default_factory=list)  # Transpose, MatMuls
    other: list[onnx.NodeProto] = field(default_factory=list)  # Gather, Mul, Add, ...


def _uses(name: str, consumers: dict[str, list[onnx.NodeProto]]) -> _Uses:
    uses = _Uses()
    for node in consumers.get(name, []):
        if node.op_type == "Transpose" and list(_attr(node, "perm", [1, 0])) == [1, 0]:
            mms = consumers.get(node.output[0], [])
            if mms and all(m.op_type == "MatMul" and list(m.input).index(node.output[0]) == 1 for m in mms):
                uses.linear.append((node, mms))
                continue
        uses.other.append(node)
    return uses


def _nbits_node(
    mm: onnx.NodeProto, base: str, inputs: list[str], shape: tuple[int, int], bits: int, block: int, level: int
) -> onnx.NodeProto:
    """The MatMulNBits node replacing MatMul ``mm`` (ORT contrib-op spec)."""
    n, k = shape
    return helper.make_node(
        "MatMulNBits",
        [mm.input[0], *inputs],
        list(mm.output),
        name=(mm.name or f"/{base}/MatMul") + "NBits",
        domain=MS_DOMAIN,
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=level,
    )


_TAGS = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16"}


@dataclass
class Materialized:
    labels: dict[str, str]  # HF name -> how the artifact computes with it
    matmuls: dict[str, list[str]]  # HF name -> names of the float MatMul nodes reading it
    weight_bytes: int


def materialize(
    model: onnx.ModelProto, run: RunDir, plan: dict[str, int], level: int, data: ExternalData, compact: bool
) -> Materialized:
    """Turn the graph's parameter inputs into initializers, one tensor at a time, from the run dir.

    * a quantized Linear (``plan``): its ``Transpose -> MatMul`` becomes ``MatMulNBits`` packed from
      the run's codes (``edgeq.export.onnx_nbits``); the op wants its scales in the activation type,
      and the run's are float16 by contract, so with ``compact`` they are stored in float16 behind a
      ``Cast`` (2 bytes per group instead of 4);
    * a float Linear: the weight is stored transposed (``[K, N]``) and the MatMul reads it directly;
    * a tied embedding (``Gather`` and the lm_head's ``Transpose -> MatMul``): stored once, ``[V, H]``;
      onnxruntime folds the constant Transpose at session creation;
    * anything else (norms, biases): stored as it is.

    Floats take the type the graph declares for the input (float32, or float16 after ``to_float16``).
    With ``compact`` (quantized exports in a float32 graph) a 2-D float tensor whose values are all
    exact in float16 -- the usual case, checkpoints are fp16/bf16 -- is stored in float16 behind a
    ``Cast`` to float32: half the bytes on disk, the same numbers (onnxruntime folds the Cast at
    session creation, so in memory it is float32 as before).
    """
    graph = model.graph
    consumers = _consumers(graph)
    run_names = set(run.names())
    user_inputs = {"input_ids", "attention_mask", "position_ids"}
    params = [i for i in graph.input if i.name not in user_inputs and not i.name.startswith("past_key_values.")]
    unknown = [i.name for i in params if i.name not in run_names]
    if unknown:
        raise ExportError(
            f"the exported graph reads {len(unknown)} parameters the run dir lacks (e.g. {unknown[0]!r}); "
            "expected every model parameter in the run: the run dir is incomplete"
        )
    read = {p.name for p in params}
    missing = [n for n in plan if n not in read]
    if missing:
        raise ExportError(f"quantized tensor {missing[0]!r} is not read by the exported graph; report this")
    replaced: dict[int, onnx.NodeProto | None] = {}  # id(node) -> replacement (None: drop)
    casts: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    labels: dict[str, str] = {}
    matmuls: dict[str, list[str]] = {}

    def store(name: str, arr: np.ndarray, elem: int) -> str:
        """Write ``arr`` as initializer ``name`` of type ``elem``; returns its label tag."""
        if elem == onnx.TensorProto.FLOAT16:
            inits.append(data.add(name, arr.astype(np.float16)))
            return "fp16"
        arr = arr.astype(np.float32, copy=False)
        if compact and arr.ndim == 2:
            half = arr.astype(np.float16)
            if np.array_equal(half.astype(np.float32), arr):
                inits.append(data.add(f"{name}.fp16", half))
                casts.append(helper.make_node("Cast", [f"{name}.fp16"], [name], name=f"/{name}/Cast", to=elem))
                return "fp32<-fp16"
        inits.append(data.add(name, arr))
        return "fp32"

    for param in params:
        name, elem = param.name, param.type.tensor_type.elem_type
        if elem not in _TAGS:
            raise ExportError(f"parameter {name!r} has ONNX type {elem} in the graph; expected float32 or float16")
        uses = _uses(name, consumers)
        ops: list[str] = []
        if name in plan and uses.linear:
            qw = run.quantized(name)
            packed = pack_matmul_nbits(qw, plan[name])
            base = name.removesuffix(".weight")
            inputs = [f"{base}.nbits_B", f"{base}.nbits_scales"]
            inits.append(data.add(inputs[0], packed.b))
            scales_tag = store(inputs[1], packed.scales, elem)
            if packed.zero_points is not None:
                inputs.append(f"{base}.nbits_zero_points")
                inits.append(data.add(inputs[-1], packed.zero_points))
            for transpose, mms in uses.linear:
                replaced[id(transpose)] = None
                for mm in mms:
                    replaced[id(mm)] = _nbits_node(mm, base, inputs, qw.shape, plan[name], packed.block_size, level)
            ops.append(f"MatMulNBits(bits={plan[name]},block={packed.block_size},scales={scales_tag})")
            del qw, packed
        elif uses.linear and not uses.other:
            tag = store(f"{name}.T", np.ascontiguousarray(run.tensor(name).T), elem)
            for transpose, mms in uses.linear:
                replaced[id(transpose)] = None
                for mm in mms:
                    mm.input[1] = f"{name}.T"
                    matmuls.setdefault(name, []).append(mm.name)
            ops.append(f"MatMul({tag})")
        if uses.other:
            tag = store(name, run.tensor(name), elem)
            ops += sorted({f"{node.op_type}({tag})" for node in uses.other})
            if uses.linear and name not in plan:  # tied: the lm_head reads Transpose(table)
                ops.append(f"MatMul({tag})")
                for _, mms in uses.linear:
                    matmuls.setdefault(name, []).extend(mm.name for mm in mms)
        labels[name] = "+".join(sorted(set(ops)))
    nodes = casts + [replaced.get(id(n), n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(n for n in nodes if n is not None)
    kept_inputs = [i for i in graph.input if i.name not in labels]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    graph.initializer.extend(inits)
    if plan and not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    n_packed = sum(1 for v in labels.values() if v.startswith("MatMulNBits"))
    log.info("materialized %d tensors (%d packed into MatMulNBits), %.1f MB", len(labels), n_packed, data.bytes / 1e6)
    return Materialized(labels, matmuls, data.bytes)


def quantize_dynamic_int8(
    model: onnx.ModelProto, run: RunDir, mat: Materialized, work_dir: Path
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """int8 baseline of an unquantized model: ``quantize_dynamic`` on the decoder-block MatMuls.

    Per-tensor int8 weights and dynamically quantized activations (``MatMulInteger``), the ORT docs'
    default dynamic scheme; lm_head and embeddings stay fp32 as in every other precision. This is the
    one export that is not streaming: ``quantize_dynamic`` works on a whole in-memory model.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    family = family_for(run.config)
    names = [n for n in mat.matmuls if family.quantizable(n)]
    nodes = [mm for n in names for mm in mat.matmuls[n]]
    if not nodes:
        raise ExportError(f"found no decoder-block MatMul of {run.path} to quantize; expected {family.linears}")
    src, dst = work_dir / "fp32.onnx", work_dir / "int8.onnx"
    onnx.save_model(model, str(src))
    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=nodes,
        weight_type=QuantType.QInt8,
        use_external_data_format=True,
    )
    log.info("quantize_dynamic: %d MatMuls to int8 (per tensor)", len(nodes))
    labels = {**mat.labels, **{n: "MatMulInteger(int8,per-tensor,dynamic)" for n in names}}
    return onnx.load(str(dst), load_external_data=True), labels


def rotary_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes computing RoPE's angles: every node upstream of a ``Cos`` / ``Sin``.

    The angle is ``position * inv_freq``; in float16 (11-bit mantissa) a position of 255 carries an
    absolute error up to 0.06 rad and of 2000 up to 0.5 rad, so fp16 exports keep this cone in
    float32 (Hugging Face's Llama computes it in float32 too, autocast off) and cast cos/sin after.
    """
    producer = {out: node for node in graph.node for out in node.output}
    stack = [node for node in graph.node if node.op_type in ("Cos", "Sin")]
    seen: dict[str, onnx.NodeProto] = {}
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen[node.name] = node
        stack += [producer[i] for i in node.input if i in producer]
    return list(seen)


def skip_fp16_round_trips(graph: onnx.GraphProto) -> int:
    """Rewire ``Cast(to=float16) -> Cast(to=float)`` pairs to one Cast from the source; returns how many.

    The converter gives every float tensor between two kept-fp32 nodes a float16 type, then casts it
    down and back up; inside the rotary cone that rounds the positions (exact in fp16 only up to 2048)
    and ``inv_freq``. Skipping the round trip only removes a rounding.
    """
    producer = {out: node for node in graph.node for out in node.output}
    to_type = {node.name: _attr(node, "to", None) for node in graph.node if node.op_type == "Cast"}
    rewired = 0
    for node in graph.node:
        src = producer.get(node.input[0]) if node.op_type == "Cast" else None
        if src is not None and src.op_type == "Cast" and to_type[node.name] == onnx.TensorProto.FLOAT:
            if to_type[src.name] == onnx.TensorProto.FLOAT16:
                node.input[0] = src.input[0]
                rewired += 1
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
    for node in dead:
        graph.node.remove(node)
    return rewired


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph in float16 with float32 ``logits``, by onnxruntime's float16 converter.

    ``keep_io_types=["logits"]`` keeps only the logits output float32 (a Cast after the lm_head), so
    the KV cache inputs/outputs are float16 like optimum's own fp16 exports and half the size. The
    rotary angles stay float32 (``rotary_nodes``). Constants outside fp16's range (the causal mask's
    float32 minimum) are clamped to +-65504.
    """
    from onnxruntime.transformers.onnx_model import OnnxModel

    for i, node in enumerate(model.graph.node):  # the block list works by node name
        node.name = node.name or f"/edgeq/{node.op_type}_{i}"
    keep = rotary_nodes(model.graph)
    wrapper = OnnxModel(model)  # ORT's entry point: type inference, conversion, redundant Casts removed
    wrapper.convert_float_to_float16(keep_io_types=["logits"], node_block_list=keep)
    skip_fp16_round_trips(wrapper.model.graph)
    wrapper.topological_sort()  # the converter appends its Casts at the end of the node list
    converted = wrapper.model
    n_fp32 = sum(1 for init in converted.graph.initializer if init.data_type == onnx.TensorProto.FLOAT)
    log.info("float16 graph: %d rotary nodes and %d initializers kept float32", len(keep), n_fp32)
    return converted


# -- saving, validation, entry point -------------------------------------------------------------
def save_model(model: onnx.ModelProto, path: Path) -> bool:
    """Write an in-memory ``model``; weights go to one external data file past protobuf's 2 GiB limit."""
    n_bytes = sum(
        int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize for t in model.graph.initializer
    )
    big = n_bytes > EXTERNAL_DATA_BYTES
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=big,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
    return big


#: onnxruntime loads every weight into memory; past this size the check runs in a child process so
#: that the exporter's own peak memory stays one tensor's worth (the child's is reported).
VALIDATE_IN_CHILD_BYTES = 1 << 30

_VALIDATE_CHILD = """
import sys, resource, onnxruntime as ort
o = ort.SessionOptions(); o.log_severity_level = 3
try:
    ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
except Exception as exc:
    print(str(exc).strip().splitlines()[0], file=sys.stderr); sys.exit(3)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def validate(path: Path, weight_bytes: int = 0) -> dict:
    """onnx.checker, then an onnxruntime session on CPU: every op must have a kernel.

    Returns ``{"session_peak_rss_bytes": N}`` when the session ran in a child process.
    """
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ExportError(f"the exported graph {path.name} fails onnx.checker ({first}); report this") from None
    if weight_bytes > VALIDATE_IN_CHILD_BYTES:
        proc = subprocess.run(
            [sys.executable, "-c", _VALIDATE_CHILD, str(path)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise ExportError(f"onnxruntime {ort.__version__} cannot load {path.name} ({first}); report this")
        return {"session_peak_rss_bytes": int(proc.stdout.strip().splitlines()[-1])}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types per failure (Fail, InvalidGraph, ...)
        first = str(exc).strip().splitlines()[0]
        raise ExportError(f"onnxruntime {ort.__version__} cannot load {path.name} ({first}); report this") from None
    return {}


def export_onnx(run: RunDir, precision: str, out_dir: Path, accuracy_level: int = 0, activations: str = "fp32") -> dict:
    """Write ``model.onnx`` (+ ``model.onnx_data``), config and tokenizer files for ``run`` into ``out_dir``.

    ``activations``: the graph's float type for ``int4`` / ``int8`` (``fp32``: exact against the
    fake-quant model; ``fp16``: half the KV cache and scales, like the ``fp16`` precision). ``out_dir``
    is an existing empty directory. Returns ``{"tensors": {hf_name: artifact type}, "io": {"inputs":
    [...], "outputs": [...]}, "opset": N, ...}``.
    """
    plan = plan_onnx(run, precision)
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ExportError(f"accuracy_level={accuracy_level} is not supported; expected 0 (exact fp32) .. 4 (int8)")
    if activations not in ("fp32", "fp16"):
        raise ExportError(f"activations={activations!r} is not supported; expected 'fp32' or 'fp16'")
    if activations == "fp16" and precision not in ("int4", "int8"):
        raise ExportError(
            f"--activations fp16 applies to int4/int8 exports; {precision} fixes its own activation type "
            "(use --precision fp16 for a float16 graph)"
        )
    dynamic = precision == "int8" and not plan
    if dynamic and activations == "fp16":
        raise ExportError(f"{run.path} has no integer codes: its int8 export (quantize_dynamic) is float32 only")
    half = precision == "fp16" or activations == "fp16"
    out_dir = Path(out_dir)
    work = out_dir / ".optimum-export"
    work.mkdir()
    t0 = time.perf_counter()
    data = ExternalData((work if dynamic else out_dir) / DATA_FILE)
    try:
        model = export_graph(run, work)
        t_graph = time.perf_counter() - t0
        if half:
            model = to_float16(model)
        mat = materialize(model, run, plan, accuracy_level, data, compact=bool(plan) and not half)
        data.close()
        labels = mat.labels
        if dynamic:
            model, labels = quantize_dynamic_int8(model, run, mat, work)
            save_model(model, out_dir / MODEL_FILE)
        else:
            onnx.save_model(model, str(out_dir / MODEL_FILE))
    finally:
        data.close()
        shutil.rmtree(work, ignore_errors=True)
    t_write = time.perf_counter() - t0 - t_graph
    checked = validate(out_dir / MODEL_FILE, mat.weight_bytes)
    run.copy_side_files(out_dir)
    opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), None)
    info = {
        "tensors": {name: labels[name] for name in run.names() if name in labels},
        "io": {"inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output]},
        "opset": opset,
        "precision": precision,
        "activations": "fp16" if half else "fp32",
        "accuracy_level": accuracy_level,
        "timings_s": {
            "graph": round(t_graph, 3),
            "weights": round(t_write, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
        **checked,
    }
    log.info("exported %s %s to %s in %.1fs", run.path.name, precision, out_dir, info["timings_s"]["total"])
    return info
