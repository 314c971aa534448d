"""Weights stored the way cuBLAS reads them fastest for skinny products: [out, in], as torch.nn.Linear keeps
them, through com.microsoft.FusedMatMul(transB=1) in place of MatMul.

An exported MatMul holds its weight as [in, out] (x @ W). On the CUDA EP ORT hands that to cuBLAS as a
non-transposed operand; a GEMV over it (a decode step, a batch of one) may run below the memory bandwidth
the same weight reaches in the transposed layout. `bench/gpu_suite.py` measures both layouts side by side.
"""
from __future__ import annotations

import collections

import numpy as np
import onnx
from onnx import helper, numpy_helper


def transpose_matmul_weights(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each MatMul whose second input is a 2-D initializer that nothing else reads into
    FusedMatMul(x, W.T, transB=1). The product is the same; returns how many."""
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    readers = collections.Counter(name for node in graph.node for name in node.input)
    rewritten = 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        tensor = weights.get(node.input[1])
        if tensor is None or len(tensor.dims) != 2 or readers[tensor.name] != 1:
            continue
        transposed = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(tensor).T), tensor.name)
        tensor.CopyFrom(transposed)
        node.op_type, node.domain = "FusedMatMul", "com.microsoft"
        node.attribute.extend([helper.make_attribute("transB", 1), helper.make_attribute("alpha", 1.0)])
        rewritten += 1
    if rewritten and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return rewritten
