"""Where GPT-Neo's decode GEMVs lose bandwidth: each weight shape of a layer, alone, at M = 1 (and 32).

GPT-Neo 1.3B's step is 96 layer GEMMs that read 2.4 GB of fp16 weights; at batch 1 they ran at 2.7 TB/s of
the H200's 4.8 (BENCHMARKS.md). This times one layer's four shapes separately, each as 24 MatMuls over 24
distinct weights (as the 24 layers are: no weight stays in L2) in one ONNX graph, replayed from a CUDA
graph, so a figure includes the gap between kernels as the decoder sees it. Variants per shape:

- `[in,out]`: MatMul over W [K, N] (the static decoder's default layout);
- `[out,in]`: FusedMatMul(transB=1) over W [N, K] (bench/lab/weight_layout.py);
- `Gemm [out,in]`: ONNX Gemm(transB=1) over W [N, K] (ORT's Gemm kernel, not its MatMul);
- `split-k S`: the K axis in S slices, one batched MatMul [S, 1, K/S] x [S, K/S, N] then ReduceSum;
- `torch`: F.linear, CUDA graph: the same cuBLAS, with PyTorch's choice of call.

    python bench/lab/gemv_probe.py            # GPU host, after the wheel transfers; table + $OUT/gemv.json
                                          # each variant writes and loads 0.2-0.8 GB of weights: with
                                          # --rows 1 32 --split 2 4 it took 6 minutes on an H200
    python bench/lab/gemv_probe.py --device cpu --hidden 64 --copies 2   # logic check here
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
from common import table  # noqa: E402


def shapes(hidden: int) -> dict[str, tuple[int, int]]:
    return {"qkv": (hidden, 3 * hidden), "out": (hidden, hidden), "fc1": (hidden, 4 * hidden), "fc2": (4 * hidden, hidden)}


def graph(k: int, n: int, copies: int, variant: str, rows: int):
    """`copies` GEMVs of x [rows, K] against distinct weights, every result a graph output."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [rows, k])
    if variant.startswith("split-k"):
        s = int(variant.split()[-1])
        inits.append(numpy_helper.from_array(np.array([rows, s, k // s], np.int64), "xs"))
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "axis0"))
        nodes.append(helper.make_node("Reshape", ["x", "xs"], ["x3"]))
        nodes.append(helper.make_node("Transpose", ["x3"], ["xt"], perm=[1, 0, 2]))  # [S, rows, K/S]
    for i in range(copies):
        w = (rng.standard_normal((k, n)) * 0.02).astype(np.float16)
        if variant == "[out,in]":
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
            nodes.append(helper.make_node("FusedMatMul", ["x", f"w{i}"], [f"y{i}"], domain="com.microsoft", transB=1))
        elif variant == "Gemm [out,in]":
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
            nodes.append(helper.make_node("Gemm", ["x", f"w{i}"], [f"y{i}"], transB=1))
        elif variant.startswith("split-k"):
            inits.append(numpy_helper.from_array(w.reshape(s, k // s, n), f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["xt", f"w{i}"], [f"p{i}"]))  # [S, rows, N]
            nodes.append(helper.make_node("ReduceSum", [f"p{i}", "axis0"], [f"y{i}"], keepdims=0))
        else:
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT16, [rows, n]))
    model = helper.make_model(helper.make_graph(nodes, "gemv", [x], outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model


def time_ort(model, rows: int, k: int, device: str, reps: int) -> tuple[float, np.ndarray]:
    import onnx
    import onnxruntime as ort

    path = Path(os.environ.get("TMPDIR", "/tmp")) / "gemv_probe.onnx"
    onnx.save(model, path, save_as_external_data=True, location="gemv_probe.onnx.data")
    cuda = device == "cuda"
    eps = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"})] if cuda else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), providers=eps)
    dev = ("cuda", 0) if cuda else ("cpu", 0)
    x = ort.OrtValue.ortvalue_from_numpy(np.random.default_rng(1).standard_normal((rows, k)).astype(np.float16) * 0.5, *dev)
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", x)
    outs = []
    for o in session.get_outputs():
        value = ort.OrtValue.ortvalue_from_shape_and_type((rows, o.shape[1]), np.float16, *dev)
        binding.bind_ortvalue_output(o.name, value)
        outs.append(value)
    for _ in range(5):
        session.run_with_iobinding(binding)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        samples.append((time.perf_counter() - start) * 1e3)
    return float(np.median(samples)), outs[0].numpy()


def time_torch(k: int, n: int, rows: int, copies: int, device: str, reps: int) -> float:
    import torch

    gen = torch.Generator().manual_seed(0)
    ws = [(torch.randn(n, k, generator=gen) * 0.02).half().to(device) for _ in range(copies)]
    x = torch.randn(rows, k, generator=gen).half().to(device)

    def step():
        return [torch.nn.functional.linear(x, w) for w in ws]

    if device != "cuda":
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1e3
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return float(np.median(samples))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--copies", type=int, default=24)
    parser.add_argument("--rows", type=int, nargs="+", default=[1])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--split", type=int, nargs="*", default=[],
                        help="split-K variants (2 and 4 were slower on every shape on an H200)")
    args = parser.parse_args()
    if args.device == "cuda":
        import torch  # noqa: F401 - loads the CUDA libraries ONNX Runtime uses
    rows_out, result = [], []
    for name, (k, n) in shapes(args.hidden).items():
        mb = k * n * 2 / 1e6
        for rows in args.rows:
            variants = ["[in,out]", "[out,in]", "Gemm [out,in]", *(f"split-k {s}" for s in args.split)]
            ref = None
            for variant in variants:
                try:
                    ms, first = time_ort(graph(k, n, args.copies, variant, rows), rows, k, args.device, args.reps)
                    diff = 0.0 if ref is None else float(np.abs(first.astype(np.float32) - ref).max())
                    ref = first.astype(np.float32) if ref is None else ref
                except Exception as exc:  # noqa: BLE001 - a variant ORT refuses is reported, not fatal
                    print(f"{name} {variant}: {str(exc).splitlines()[0][:200]}", flush=True)
                    continue
                us = ms * 1e3 / args.copies
                result.append({"shape": name, "k": k, "n": n, "rows": rows, "variant": variant, "us": us,
                               "tb_s": mb / us, "max_abs_diff": diff})
            try:
                us = time_torch(k, n, rows, args.copies, args.device, args.reps) * 1e3 / args.copies
                result.append({"shape": name, "k": k, "n": n, "rows": rows, "variant": "torch", "us": us, "tb_s": mb / us})
            except Exception as exc:  # noqa: BLE001
                print(f"{name} torch: {exc}", flush=True)
    for r in result:
        rows_out.append((r["shape"], f"{r['k']}x{r['n']}", r["rows"], r["variant"], f"{r['us']:.2f}", f"{r['tb_s']:.2f}",
                         f"{r.get('max_abs_diff', float('nan')):.1e}"))
    out = Path(os.environ.get("OUT", "/tmp"))
    (out / "gemv.json").write_text(json.dumps(result, indent=1))
    print(table(rows_out, ("shape", "K x N", "rows", "variant", "us per GEMM", "TB/s of weights", "max diff vs [in,out]")))


if __name__ == "__main__":
    main()
