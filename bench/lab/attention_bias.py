"""Take the Q/K/V bias out of fused MultiHeadAttention nodes, exactly, so ORT's packed flash attention reads the
projections in place.

With a bias input, ORT's (Packed)MultiHeadAttention first copies Q, K and V into a workspace to add it: on
bert-base at 64 x 128 that copy was 0.18 ms of a 2.96 ms call (BENCHMARKS.md, session 10). Without one, its
flash and memory-efficient kernels read the three projections where they are. The bias is moved, not dropped:

- K's bias adds q . b_k to every score of a query, the same for every key: softmax removes it.
- V's bias adds b_v to every output row, since each row of attention weights sums to 1. Through the output
  projection that is b_v @ W_o, added to the bias after it (SkipLayerNormalization's, or the Add's).
- Q's bias changes the scores (b_q . k differs per key): it becomes an Add after Q's projection.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

# the first four inputs of both: query, key, value, bias (packing mode keeps them; convert to packing mode
# first, its tool wants a MatMul right before the first attention's query)
ATTENTION = ("MultiHeadAttention", "PackedMultiHeadAttention")


def move_attention_bias(model: onnx.ModelProto) -> int:
    """Rewrite every (Packed)MultiHeadAttention with separate Q, K, V and a constant bias whose output goes through one
    MatMul into a SkipLayerNormalization or Add with a constant bias. Returns how many were rewritten; the
    others are left as they are."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    rewritten, replaced = 0, set()
    for node in list(graph.node):
        if node.op_type not in ATTENTION or len(node.input) < 4:
            continue
        query, key, value, bias = node.input[:4]
        if not (query and key and value) or bias not in inits:
            continue
        after = _output_bias(node, consumers, inits)
        if after is None:
            continue
        weight, target, index = after
        b = numpy_helper.to_array(inits[bias]).astype(np.float32)
        w_out = numpy_helper.to_array(inits[weight]).astype(np.float32)
        hidden = (b.size - w_out.shape[0]) // 2  # Q and K share a size; V's is the output projection's input
        b_q, b_v = b[:hidden], b[2 * hidden:]
        old = numpy_helper.to_array(inits[target.input[index]])
        folded = (old.astype(np.float32) + b_v @ w_out).astype(old.dtype)
        # new names: optimizers share one initializer between equal tensors (all-zero biases)
        out_bias = _add_initializer(graph, inits, f"{node.name}_out_bias_with_v", folded)
        q_bias = _add_initializer(graph, inits, f"{node.name}_q_bias", b_q.astype(old.dtype))
        biased = f"{node.name}_q_biased"
        add = onnx.helper.make_node("Add", [query, q_bias], [biased], name=f"{node.name}_q_bias_add")
        graph.node.insert(list(graph.node).index(node), add)
        replaced.update((bias, target.input[index]))
        target.input[index] = out_bias
        node.input[0], node.input[3] = biased, ""
        rewritten += 1
    used = {name for n in graph.node for name in n.input}
    for tensor in [t for t in graph.initializer if t.name in replaced and t.name not in used]:
        graph.initializer.remove(tensor)
    return rewritten


def _output_bias(node, consumers, inits):
    """(output projection weight, the node holding the bias after it, that input's index), or None."""
    users = consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[1] not in inits:
        return None
    project = users[0]
    after = consumers.get(project.output[0], [])
    if len(after) != 1:
        return None
    target = after[0]
    if target.op_type == "SkipLayerNormalization" and len(target.input) > 4 and target.input[4] in inits:
        return project.input[1], target, 4
    if target.op_type == "Add":
        other = 1 if target.input[0] == project.output[0] else 0
        if target.input[other] in inits:
            return project.input[1], target, other
    return None


def _add_initializer(graph, inits, name: str, array: np.ndarray) -> str:
    while name in inits:
        name += "_"
    tensor = numpy_helper.from_array(array, name)
    graph.initializer.append(tensor)
    inits[name] = tensor
    return name
