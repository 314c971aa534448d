"""ONNX Runtime inference shared by the export gates and the serving replicas: encoder sessions and their
CUDA-graph buckets, the decode loops (dynamic, static, continuous) with one set of sampling and finish rules,
incremental detokenizing and chat templates. numpy, onnxruntime (+extensions), tokenizers and jinja2 only."""
