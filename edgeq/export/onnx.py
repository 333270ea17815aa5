"""ONNX export with a KV cache: fp32/fp16 fake-quant graphs, and int8/int4 ``MatMulNBits`` packed from codes.

The decoder graph is never written by hand. The run's fake-quant float32 model
(``edgeq.compress.model.load_torch_model``: exactly what every export must reproduce) goes through
optimum's exporter with task ``text-generation-with-past`` (works with transformers 4.57.6 and
torch 2.13, see reference.md), which gives optimum's layout: inputs ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value``; outputs ``logits``,
``present.{i}.key/value``; ``ORTModelForCausalLM.from_pretrained(out_dir)`` loads the result.

The graph is then post-processed:

* ``int4`` / ``int8``: each quantized Linear's MatMul is found by *content*: its weight initializer
  (``[K, N]``, or ``[N, K]`` behind a Transpose) equals the run's fake-quant weights byte for byte,
  whatever the exporter named it. The MatMul becomes a com.microsoft ``MatMulNBits`` whose
  initializers are packed from the run's own codes (``edgeq.export.onnx_nbits``) and the float
  initializer is dropped. Codes are never re-quantized, so the artifact computes the fake-quant
  model exactly (with ``accuracy_level=0``: fp32 activations).
* ``fp16``: the fp32 fake-quant graph converted by onnxruntime's own converter
  (``onnxruntime.transformers.float16.convert_float_to_float16``): weights, activations and the
  KV cache (``past_key_values.*`` / ``present.*``) in float16, ``logits`` kept float32 (the converter
  inserts the Cast). The rotary angles (``position * inv_freq``) stay float32: in float16 they are
  wrong by up to 0.5 rad at position 2000 (``rotary_nodes``; measured: relative logit error 7e-2
  at position 3000 converted naively, 3e-4 kept fp32). Weights are the fake-quant values rounded
  once to fp16, so parity against the fp32 fake-quant model is ~2e-4 relative, not exact.
  On CPU, onnxruntime runs ops that lack a float16 kernel in float32 between inserted Casts
  (its ``InsertCastTransformer``); the numbers stay those of an fp16 graph where it matters: every
  tensor between ops is rounded to fp16.
* ``int8`` of an *unquantized* model: ``onnxruntime.quantization.quantize_dynamic`` (int8 weights,
  per tensor) on the decoder-block Linears -- the standard baseline, and the only place where
  quantization happens at export, because compression produced no codes.

Embeddings and ``lm_head`` stay fp32 in every precision but fp16; a tied embedding is stored once
(``tie_embedding``).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeq.compress.mappings import family_for
from edgeq.errors import ExportError
from edgeq.export.onnx_nbits import PackedNBits, pack_matmul_nbits
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


@dataclass
class LinearSite:
    """Where one weight lives in the exported graph."""

    init: str  # float initializer holding W.T [K, N] (or W [N, K] when ``transposed``)
    transposed: bool = False  # True: W [N, K] feeds the MatMul through a Transpose node
    names: list[str] = field(default_factory=list)  # HF tensor names with this exact content


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


# -- graph export -------------------------------------------------------------------------------
class _DropMessages(logging.Filter):
    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in record.getMessage()


def export_graph(run: RunDir, work_dir: Path) -> onnx.ModelProto:
    """The run's fake-quant float32 model through optimum's exporter, loaded back as a ModelProto."""
    from optimum.exporters.onnx import onnx_export_from_model

    from edgeq.compress.model import load_torch_model

    model = load_torch_model(run.path)
    # optimum asks for accelerate to deduplicate tied weights; tie_embedding does that job here.
    optimum_log = logging.getLogger("optimum.exporters.onnx.base")
    quiet = _DropMessages("requires accelerate")
    optimum_log.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's tracer warns on every data-dependent branch
            onnx_export_from_model(model, work_dir, task=TASK, do_validation=False)
    finally:
        optimum_log.removeFilter(quiet)
    # The fp32 torch model is as large as the graph's initializers: free it before loading the graph
    # back, so the two never sit in memory together (1.1B params: peak RSS 13.1 -> 9.0 GiB).
    del model
    gc.collect()
    path = work_dir / MODEL_FILE
    if not path.exists():
        raise ExportError(
            f"optimum wrote no {MODEL_FILE} for {run.architecture} (found "
            f"{sorted(p.name for p in work_dir.iterdir())}); expected a single decoder graph: "
            "check the optimum-onnx version (0.1.0 is tested)"
        )
    return onnx.load(str(path), load_external_data=True)


def _digest(arr: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(arr).tobytes(), digest_size=16).hexdigest()


def _weight_digests(run: RunDir) -> dict[str, tuple[tuple[int, int], str, str]]:
    """HF name -> ((N, K), digest of W [N, K], digest of W.T [K, N]) for every 2-D tensor (fp32)."""
    out = {}
    for name in run.names():
        if len(run.shape(name)) != 2:
            continue
        w = run.tensor(name)  # (N, K) float32; dequantized codes for quantized tensors
        out[name] = (tuple(w.shape), _digest(w), _digest(w.T))
    return out


def locate_weights(graph: onnx.GraphProto, run: RunDir) -> list[LinearSite]:
    """The float initializers equal (byte for byte) to a run tensor ``W`` or ``W.T``, with their names.

    A name may have several sites: a tied embedding is both the Gather's ``[V, H]`` table and the
    lm_head MatMul's ``[H, V]`` weight.
    """
    digests = _weight_digests(run)
    shapes = {s for s, _, _ in digests.values()} | {s[::-1] for s, _, _ in digests.values()}
    index: dict[tuple[tuple[int, ...], str], list[str]] = {}  # (dims, digest) -> initializer names
    for init in graph.initializer:
        dims = tuple(init.dims)
        if init.data_type == onnx.TensorProto.FLOAT and dims in shapes:
            index.setdefault((dims, _digest(numpy_helper.to_array(init))), []).append(init.name)
    by_init: dict[str, LinearSite] = {}
    for name, (shape, d_nk, d_kn) in digests.items():
        for key, transposed in (((shape[::-1], d_kn), False), ((shape, d_nk), True)):
            for init_name in index.get(key, []):
                by_init.setdefault(init_name, LinearSite(init_name, transposed)).names.append(name)
    return list(by_init.values())


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for inp in node.input:
            out.setdefault(inp, []).append(node)
    return out


def _matmuls_of(
    site: LinearSite, consumers: dict[str, list[onnx.NodeProto]]
) -> list[tuple[onnx.NodeProto, onnx.NodeProto | None]]:
    """(MatMul, Transpose or None) pairs whose B input is the site's weight."""
    pairs = []
    for node in consumers.get(site.init, []):
        if not site.transposed and node.op_type == "MatMul" and node.input[1] == site.init:
            pairs.append((node, None))
        elif site.transposed and node.op_type == "Transpose" and list(_attr(node, "perm", [1, 0])) == [1, 0]:
            pairs += [
                (m, node)
                for m in consumers.get(node.output[0], [])
                if m.op_type == "MatMul" and m.input[1] == node.output[0]
            ]
    return pairs


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# -- post-processing ----------------------------------------------------------------------------
def _nbits_node(
    mm: onnx.NodeProto, name: str, packed: PackedNBits, shape: tuple[int, int], bits: int, level: int
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The MatMulNBits node replacing MatMul ``mm`` plus its new initializers (ORT contrib-op spec)."""
    n, k = shape
    base = name.removesuffix(".weight")
    inits = [
        numpy_helper.from_array(packed.b, f"{base}.nbits_B"),
        numpy_helper.from_array(packed.scales, f"{base}.nbits_scales"),
    ]
    inputs = [mm.input[0], inits[0].name, inits[1].name]
    if packed.zero_points is not None:
        inits.append(numpy_helper.from_array(packed.zero_points, f"{base}.nbits_zero_points"))
        inputs.append(inits[-1].name)
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        list(mm.output),
        name=(mm.name or f"/{base}/MatMul") + "NBits",
        domain=MS_DOMAIN,
        K=k,
        N=n,
        bits=bits,
        block_size=packed.block_size,
        accuracy_level=level,
    )
    return node, inits


def pack_into_graph(
    model: onnx.ModelProto, run: RunDir, plan: dict[str, int], sites: list[LinearSite], level: int
) -> dict[str, str]:
    """Replace each planned Linear's MatMul by MatMulNBits packed from its codes; returns labels."""
    graph = model.graph
    consumers = _consumers(graph)
    replaced: dict[str, onnx.NodeProto] = {}  # MatMul output name -> MatMulNBits node
    new_inits: list[onnx.TensorProto] = []
    candidates: set[str] = set()  # float initializers / Transpose outputs that may now be dead
    labels: dict[str, str] = {}
    for site in sites:
        planned = [n for n in site.names if n in plan]  # identical contents share one initializer
        pairs = _matmuls_of(site, consumers) if planned else []
        if not pairs:
            continue
        name = planned[0]
        qw = run.quantized(name)
        packed = pack_matmul_nbits(qw, plan[name])
        for mm, transpose in pairs:
            node, inits = _nbits_node(mm, name, packed, qw.shape, plan[name], level)
            replaced[mm.output[0]] = node
            if transpose is not None:
                candidates.add(transpose.output[0])
        new_inits += inits
        candidates.add(site.init)
        label = f"MatMulNBits(bits={plan[name]},block={packed.block_size})"
        labels.update({other: label for other in planned})
    missing = [n for n in plan if n not in labels]
    if missing:
        raise ExportError(
            f"{len(missing)} quantized tensors (e.g. {missing[0]}) feed no MatMul through a float initializer "
            "equal to their fake-quant weights in the exported graph; expected one MatMul weight per Linear: "
            "the exporter changed its layout (optimum-onnx 0.1.0 is tested)"
        )
    nodes = [replaced.get(node.output[0], node) if node.op_type == "MatMul" else node for node in graph.node]
    _replace_nodes_and_prune(graph, nodes, candidates)
    graph.initializer.extend(new_inits)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    log.info("packed %d Linears into MatMulNBits (%s)", len(labels), sorted(set(labels.values())))
    return labels


def _replace_nodes_and_prune(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], candidates: set[str]) -> None:
    """Install ``nodes``; drop the candidate Transposes and initializers nothing reads any more."""
    used = {i for node in nodes for i in node.input}
    nodes = [
        n for n in nodes if not (n.op_type == "Transpose" and n.output[0] in candidates and n.output[0] not in used)
    ]
    used = {i for node in nodes for i in node.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name not in candidates or init.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)


def quantize_dynamic_int8(
    model: onnx.ModelProto, run: RunDir, sites: list[LinearSite], work_dir: Path
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """int8 baseline of an unquantized model: ``quantize_dynamic`` on the decoder-block MatMuls.

    Per-tensor int8 weights and dynamically quantized activations (``MatMulInteger``), the ORT docs'
    default dynamic scheme; lm_head and embeddings stay fp32 as in every other precision.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    family = family_for(run.config)
    consumers = _consumers(model.graph)
    nodes: list[str] = []
    labels: dict[str, str] = {}
    for site in sites:
        names = [n for n in site.names if family.quantizable(n)]
        pairs = _matmuls_of(site, consumers) if names else []
        nodes += [mm.name for mm, _ in pairs if mm.name]
        labels.update({n: "MatMulInteger(int8,per-tensor,dynamic)" for n in names if pairs})
    if not nodes:
        raise ExportError(f"found no decoder-block MatMul of {run.path} to quantize; expected {family.linears}")
    src, dst = work_dir / "fp32.onnx", work_dir / "int8.onnx"
    big = save_model(model, src)
    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=nodes,
        weight_type=QuantType.QInt8,
        use_external_data_format=big,
    )
    log.info("quantize_dynamic: %d MatMuls to int8 (per tensor)", len(nodes))
    return onnx.load(str(dst), load_external_data=True), labels


def fp_labels(graph: onnx.GraphProto, sites: list[LinearSite]) -> dict[str, str]:
    """'Gather(fp32)' / 'MatMul(fp32)' for the float weights still in the graph (tied: both)."""
    consumers = _consumers(graph)
    ops: dict[str, set[str]] = {}
    for site in sites:
        for node in consumers.get(site.init, []):
            op = node.op_type
            if op == "Transpose":
                op = "+".join(sorted({c.op_type for c in consumers.get(node.output[0], [])}))
            for name in site.names:
                ops.setdefault(name, set()).add(f"{op}(fp32)")
    return {name: "+".join(sorted(found)) for name, found in ops.items()}


def tie_embedding(graph: onnx.GraphProto, sites: list[LinearSite]) -> int:
    """Store a tied embedding once: the lm_head MatMul reads ``Transpose(embedding)``.

    The exporter writes the table twice (``[V, H]`` for Gather, ``[H, V]`` for the lm_head MatMul);
    optimum removes the copy this same way, but only when ``accelerate`` is installed
    (``optimum.onnx.transformations_utils._deduplicate_gather_matmul``). onnxruntime folds the
    constant Transpose at session creation, so the computation is unchanged and the file shrinks by
    the table's size. Returns the bytes saved.
    """
    consumers = _consumers(graph)
    gather = {
        n: s
        for s in sites
        if s.transposed
        for n in s.names
        if {c.op_type for c in consumers.get(s.init, [])} == {"Gather"}
    }
    inits = {i.name: i for i in graph.initializer}
    saved, drop, nodes = 0, set(), list(graph.node)
    for site in sites:
        ref = next((gather[n] for n in site.names if n in gather), None)
        if site.transposed or ref is None or site.init == ref.init or site.init not in consumers:
            continue
        out = f"{ref.init}_transposed"
        first = min(i for i, node in enumerate(nodes) if site.init in node.input)
        nodes.insert(
            first, helper.make_node("Transpose", [ref.init], [out], name=f"/{ref.init}/Transpose", perm=[1, 0])
        )
        for node in nodes:
            for j, name in enumerate(node.input):
                if name == site.init:
                    node.input[j] = out
        drop.add(site.init)
        saved += len(inits[site.init].raw_data)
    if drop:
        _replace_nodes_and_prune(graph, nodes, drop)
        log.info("tied embedding: lm_head reads Transpose(%s); %.1f MB saved", sorted(drop), saved / 1e6)
    return saved


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
    """Write ``model``; weights go to one external data file only past protobuf's 2 GiB limit."""
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


def validate(path: Path) -> None:
    """onnx.checker, then an onnxruntime session on CPU: every op must have a kernel."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ExportError(f"the exported graph {path.name} fails onnx.checker ({first}); report this") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types per failure (Fail, InvalidGraph, ...)
        first = str(exc).strip().splitlines()[0]
        raise ExportError(f"onnxruntime {ort.__version__} cannot load {path.name} ({first}); report this") from None


def export_onnx(run: RunDir, precision: str, out_dir: Path, accuracy_level: int = 0) -> dict:
    """Write ``model.onnx`` + config + tokenizer files for ``run`` at ``precision`` into ``out_dir``.

    ``out_dir`` is an existing empty directory. Returns ``{"tensors": {hf_name: artifact type},
    "io": {"inputs": [...], "outputs": [...]}, "opset": N, ...}``.
    """
    plan = plan_onnx(run, precision)
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ExportError(f"accuracy_level={accuracy_level} is not supported; expected 0 (exact fp32) .. 4 (int8)")
    out_dir = Path(out_dir)
    work = out_dir / ".optimum-export"
    work.mkdir()
    t0 = time.perf_counter()
    try:
        model = export_graph(run, work)
        t_graph = time.perf_counter() - t0
        sites = locate_weights(model.graph, run)
        labels: dict[str, str] = {}
        if plan:
            labels = pack_into_graph(model, run, plan, sites, accuracy_level)
        elif precision == "int8":
            model, labels = quantize_dynamic_int8(model, run, sites, work)
        tie_embedding(model.graph, sites)
        labels = {**fp_labels(model.graph, sites), **labels}
        if precision == "fp16":
            model = to_float16(model)
            labels = {name: label.replace("(fp32)", "(fp16)") for name, label in labels.items()}
        save_model(model, out_dir / MODEL_FILE)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    validate(out_dir / MODEL_FILE)
    for f in run.side_files():
        shutil.copy2(f, out_dir / f.name)
    opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), None)
    info = {
        "tensors": {name: labels[name] for name in run.names() if name in labels},
        "io": {"inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output]},
        "opset": opset,
        "precision": precision,
        "accuracy_level": accuracy_level,
        "timings_s": {"graph": round(t_graph, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    log.info("exported %s %s to %s in %.1fs", run.path.name, precision, out_dir, info["timings_s"]["total"])
    return info
