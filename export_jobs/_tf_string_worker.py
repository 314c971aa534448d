"""Child-process side of export_jobs.tf_export: one framework per process.

TensorFlow loaded in a process before the onnxruntime-extensions library corrupts
the extensions' string ops (StringRegexReplace returns its input, the SentencePiece
tokenizer segfaults), so every command below imports either TensorFlow or ONNX
Runtime, never both, and tf_export runs each in its own `python -m` process:

    tf-ops    SAVED_MODEL              -> JSON list of op types in serving_default
    tf-run    SAVED_MODEL BATCHES OUT  -> OUT.npz, one array per batch ("0", "1", ...)
    ort-run   ONNX BATCHES OUT         -> same, from ONNX Runtime + extensions
    ort-load  ONNX                     -> exit 0 if the session can be created
    tf-hash   STRINGS BUCKETS OUT      -> OUT.npy, tf.strings.to_hash_bucket_fast
    ort-hash  STRINGS BUCKETS OUT      -> OUT.npy, the extensions' StringToHashBucketFast

BATCHES and STRINGS are JSON files (a list of lists of str, a list of str).
"""
from __future__ import annotations

import json
import sys

import numpy as np

SIGNATURE = "serving_default"


def _serving_function(saved_model_dir: str):
    import tensorflow as tf

    try:
        import tensorflow_text  # noqa: F401  registers the SentencePiece ops
    except ImportError:
        pass
    return tf.saved_model.load(saved_model_dir).signatures[SIGNATURE]


def tf_ops(saved_model_dir: str) -> list[str]:
    graph_def = _serving_function(saved_model_dir).graph.as_graph_def()
    ops = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        ops.update(node.op for node in function.node_def)
    return sorted(ops)


def tf_run(saved_model_dir: str, batches: list[list[str]]) -> dict[str, np.ndarray]:
    import tensorflow as tf

    serve = _serving_function(saved_model_dir)
    return {str(i): serve(inputs=tf.constant(b, tf.string))["outputs"].numpy() for i, b in enumerate(batches)}


def _extensions_library_path() -> str:
    # On disk, like inference.string_encoder: importing onnxruntime_extensions imports torch.
    import importlib.machinery
    import importlib.util
    import os

    spec = importlib.util.find_spec("onnxruntime_extensions")
    for folder in spec.submodule_search_locations if spec else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "_extensions_pydll" + suffix)
            if os.path.isfile(path):
                return path
    raise ImportError("onnxruntime-extensions is not installed: pip install onnxruntime-extensions==0.14.0")


def _ort_session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.register_custom_ops_library(_extensions_library_path())
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def ort_run(onnx_path: str, batches: list[list[str]]) -> dict[str, np.ndarray]:
    session = _ort_session(onnx_path)
    name = session.get_inputs()[0].name
    return {str(i): session.run(None, {name: np.array(b, dtype=object)})[0] for i, b in enumerate(batches)}


def tf_hash(strings: list[str], num_buckets: int) -> np.ndarray:
    import tensorflow as tf

    return tf.strings.to_hash_bucket_fast(tf.constant(strings, tf.string), num_buckets).numpy()


def ort_hash(strings: list[str], num_buckets: int) -> np.ndarray:
    from onnx import TensorProto, helper

    node = helper.make_node("StringToHashBucketFast", ["text", "num_buckets"], ["bucket"],
                            domain="ai.onnx.contrib")
    graph = helper.make_graph(
        [node], "hash",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [None])],
        [helper.make_tensor_value_info("bucket", TensorProto.INT64, [None])],
        initializer=[helper.make_tensor("num_buckets", TensorProto.INT64, [1], [num_buckets])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.contrib", 1)])
    session = _ort_session(model.SerializeToString())
    return session.run(None, {"text": np.array(strings, dtype=object)})[0]


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "tf-ops":
        print(json.dumps(tf_ops(args[0])))
    elif command == "tf-run":
        np.savez(args[2], **tf_run(args[0], _read_json(args[1])))
    elif command == "ort-run":
        np.savez(args[2], **ort_run(args[0], _read_json(args[1])))
    elif command == "ort-load":
        _ort_session(args[0])
    elif command == "tf-hash":
        np.save(args[2], tf_hash(_read_json(args[0]), int(args[1])))
    elif command == "ort-hash":
        np.save(args[2], ort_hash(_read_json(args[0]), int(args[1])))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
