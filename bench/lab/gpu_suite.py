"""The GPU suite in one command (one GPU host, under 10 minutes): prints tables, writes JSON to $OUT.

(a) bert-base shapes + mean pooling, batch 1 x 6 and 64 x 128: torch eager fp32 / fp16 /
    torch.compile(reduce-overhead) fp16 vs ONNX Runtime CUDA fp32, fused fp16 (both IO binding),
    fused fp16 + CUDA graphs, fused fp16 in packing mode (padding removed by RemovePadding, or by the
    caller so that a CUDA graph captures it; Attention or MultiHeadAttention), ORT's GEMM auto-tune,
    TensorRT EP if it loads; parity of each vs torch fp32.
(b) GPT-Neo 1.3B shapes, random weights, fp16: transformers generate() vs our ONNX decode loops
    at batch 1 and 32, ms/token: the dynamic-cache graph (inference.decode_dynamic) and the
    static-cache GQA graph (inference.decode_static), with and without CUDA graphs.
(c) GPT-Neo local attention on this EP: tiny model, prompts past the window, greedy vs transformers.

Each section is guarded: a failure prints its error and the suite goes on.

    python bench/lab/gpu_suite.py [--sections window embed gptneo] [--max-length 2048] [--tiny --device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402  (before onnxruntime: it puts the CUDA libraries where ORT finds them)
import onnxruntime as ort  # noqa: E402

from common import table  # noqa: E402

ort.set_default_logger_severity(3)  # errors only: the TensorRT probe's load failure is reported in the table

RESULTS: dict = {}
FPA_BLOCK = 128  # ORT's fpA_intB weight-only kernels take blocks of 64 or 128
# How ORT's CUDA MatMul picks its kernel for the decoder's small-M GEMMs: (row label, session config, env).
# "tune": per shape, the fastest of cuBLAS, ORT's small-N GEMV and tinygemm2, timed in graph-replay mode.
GEMM_MODES = {
    "cublas": ("", {}, {}),
    "tune": (", GEMM auto-tune", {"ep.cuda.enable_gemm_auto_tune": "1"}, {"ORT_CUDA_GEMM_GRAPH_REPLAY_TUNING": "1"}),
    "smalln": (", small-N GEMV", {}, {"ORT_ENABLE_SMALL_N_GEMV": "1"}),
}



def _transpose_file(path: Path, info) -> None:
    """Rewrite an exported static decoder in place with [out, in] projection weights."""
    import onnx

    from export_jobs.decoder_export import save_graph
    from weight_layout import transpose_matmul_weights

    proto = onnx.load(str(path))
    info.fused_operators["FusedMatMul"] = transpose_matmul_weights(proto)
    save_graph(proto, path, info.external_data)


def greedy_runner(session):
    """fn(prompts, n) -> each prompt's n greedy tokens through a static-cache session (EOS ignored)."""
    from inference.decode_static import generate_all_static
    from inference.sampling import SamplingParams

    return lambda prompts, n: generate_all_static(session, prompts, SamplingParams(max_tokens=n, temperature=0),
                                                  stop_ids=())


def gemm_session(mode: str, build):
    """build(session_options) with the GEMM mode's session config and environment (read as kernels are made)."""
    _, config, env = GEMM_MODES[mode]
    options = ort.SessionOptions()
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    os.environ.update(env)
    try:
        return build(options)
    finally:
        for key in env:
            os.environ.pop(key, None)


def emit(args) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_suite.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(runners: dict, device: str, rounds: int, per_round: int, warmup: int = 5) -> dict:
    """Median ms per call over interleaved rounds (every variant sees the same conditions)."""
    samples = {name: [] for name in runners}
    for fn in runners.values():
        for _ in range(warmup):
            fn()
        sync(device)
    for _ in range(rounds):
        for name, fn in runners.items():
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                sync(device)
                samples[name].append((time.perf_counter() - start) * 1000)
    return {name: {"p50_ms": statistics.median(s), "min_ms": min(s)} for name, s in samples.items()}


def parity(reference: np.ndarray, actual) -> dict:
    a, b = reference.astype(np.float64), np.asarray(actual, np.float64)
    cos = np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"max_abs_diff": float(np.max(np.abs(a - b))), "min_cosine": float(np.min(cos))}


def providers(device: str, **cuda_options) -> list:
    if device == "cuda":
        return [("CUDAExecutionProvider", {"device_id": 0, **cuda_options}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# --- (a) embeddings ------------------------------------------------------------------------


class MeanPooled(torch.nn.Module):
    """What a torch user runs: the model with its own 2-D mask handling, then mean pooling."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed_inputs(batch: int, length: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(batch, length), dtype=np.int64)
    lengths = np.full(batch, length) if batch == 1 else rng.integers(length // 2, length + 1, size=batch)
    lengths[0] = length
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


class OrtBound:
    """An ORT session run through IO binding: inputs and output live in fixed device buffers."""

    def __init__(self, path: Path, feeds: dict[str, np.ndarray], dim: int, device: str, keep: int | None = None,
                 gemm: str = "cublas", **cuda_options):
        self.keep = keep  # rows of the result that are real (a statically packed batch has a spare last row)

        def build(opts):
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            return ort.InferenceSession(str(path), opts, providers=providers(device, **cuda_options))

        self.session = gemm_session(gemm, build)
        where = "cuda" if device == "cuda" else "cpu"
        self.inputs = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), where, 0)
                       for name, value in feeds.items()}
        batch = next(iter(feeds.values())).shape[0]
        self.output = ort.OrtValue.ortvalue_from_shape_and_type((batch, dim), np.float32, where, 0)
        self.binding = self.session.io_binding()
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        self.binding.bind_ortvalue_output(self.session.get_outputs()[0].name, self.output)

    def __call__(self):
        self.session.run_with_iobinding(self.binding)

    def result(self) -> np.ndarray:
        self()
        return self.output.numpy()[:self.keep]


def export_bert(model, directory: Path) -> tuple[Path, Path, dict]:
    """fp32 export (our exporter, on CPU) and the fused fp16 speed option of it."""
    from contract.config import SpeedOption
    from export_jobs.optimize import apply_speed_option
    from export_jobs.specs import BertSpec
    from export_jobs.torch_export import SentenceEncoder, example_inputs, export_module
    from weight_layout import transpose_matmul_weights

    spec = BertSpec()
    module = SentenceEncoder(model, spec.inputs, "mean", False).eval()
    fp32 = directory / "bert.fp32.onnx"
    start = time.perf_counter()
    export_module(module, spec, example_inputs(spec.inputs, model.config.vocab_size), module.output_names, fp32, 18)
    exported = time.perf_counter() - start
    fp16 = directory / "bert.fp16.onnx"
    figures = apply_speed_option(fp32, fp16, SpeedOption.fp16, model.config)
    figures["export_s"] = round(exported, 1)
    try:
        from packing import to_packing_mode, to_static_packing

        packed = directory / "bert.fp16.packed.onnx"
        figures["packing"] = to_packing_mode(fp16, packed)["after"]
        # the caller packs (no RemovePadding): capturable in a CUDA graph
        to_static_packing(packed, directory / "bert.fp16.static.onnx")
    except Exception as exc:  # noqa: BLE001 - the suite reports it and goes on
        figures["packing_error"] = f"{type(exc).__name__}: {exc}"
    try:  # MultiHeadAttention fusion: packed, it is PackedMultiHeadAttention (ORT's flash-attention kernel)
        from export_jobs.optimize import fuse

        mha = directory / "bert.fp16.mha.onnx"
        fuse(fp32, mha, model.config, fp16=True, use_gpu=True, multi_head=True)
        to_packing_mode(mha, directory / "bert.fp16.mha.packed.onnx")
        to_static_packing(directory / "bert.fp16.mha.packed.onnx", directory / "bert.fp16.static.mha.onnx")
        # the Q/K/V bias moved out of attention (exact): flash attention reads the projections in place
        from attention_bias import move_attention_bias
        from weight_layout import transpose_matmul_weights

        proto = onnx.load(str(directory / "bert.fp16.static.mha.onnx"))
        transposed = onnx.ModelProto()
        transposed.CopyFrom(proto)  # one read of the file for both rewrites
        figures["bert.fp16.static.mha FusedMatMul"] = transpose_matmul_weights(transposed)
        onnx.save(transposed, str(directory / "bert.fp16.static.mha.t.onnx"))
        figures["attention bias moved"] = move_attention_bias(proto)
        onnx.save(proto, str(directory / "bert.fp16.static.mha.nobias.onnx"))
        figures["bert.fp16.static.mha.nobias FusedMatMul"] = transpose_matmul_weights(proto)
        onnx.save(proto, str(directory / "bert.fp16.static.mha.nobias.t.onnx"))
    except Exception as exc:  # noqa: BLE001
        figures["mha_packing_error"] = f"{type(exc).__name__}: {exc}"
    for path in (fp16, directory / "bert.fp16.packed.onnx", directory / "bert.fp16.static.onnx"):
        # the same graphs over [out, in] weights
        if path.exists():
            proto = onnx.load(str(path))
            figures[f"{path.stem} FusedMatMul"] = transpose_matmul_weights(proto)
            onnx.save(proto, str(path.with_name(path.stem + ".t.onnx")))
    return fp32, fp16, figures


def section_embeddings(args) -> None:
    from transformers import BertConfig, BertModel

    device, dev = args.device, torch.device(args.device)
    config = (BertConfig(vocab_size=2000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128) if args.tiny else BertConfig())
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False).eval()
    shapes = [(1, 6), (4, 16)] if args.tiny else [(1, 6), (64, 128)]
    tmp = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    fp32_path, fp16_path, figures = export_bert(model, tmp)
    RESULTS["embeddings"] = {"config": "tiny" if args.tiny else "bert-base", "optimizer": figures, "shapes": {}}
    print(f"[embed] exported in {figures['export_s']} s; fused operators {figures['fusions']}; "
          f"packing {figures.get('packing') or figures.get('packing_error')}", flush=True)

    fp32_torch = MeanPooled(model).to(dev)
    fp16_torch = MeanPooled(BertModel(config, add_pooling_layer=False).eval()).to(dev)
    fp16_torch.model.load_state_dict(model.state_dict())
    fp16_torch = fp16_torch.half()
    compiled = torch.compile(fp16_torch, mode="reduce-overhead", dynamic=False) if not args.no_compile else None
    dim = config.hidden_size
    for batch, length in shapes:
        key = f"{batch}x{length}"
        feeds = embed_inputs(batch, length, config.vocab_size, seed=batch)
        tensors = {k: torch.from_numpy(v).to(dev) for k, v in feeds.items()}
        runners, outputs, notes = {}, {}, {}
        with torch.inference_mode():
            reference = fp32_torch(**tensors).float().cpu().numpy()
        runners["torch eager fp32"] = lambda: fp32_torch(**tensors)
        runners["torch eager fp16"] = lambda: fp16_torch(**tensors)
        outputs["torch eager fp32"] = reference
        with torch.inference_mode():
            outputs["torch eager fp16"] = fp16_torch(**tensors).float().cpu().numpy()
        if compiled is not None:
            try:
                start = time.perf_counter()
                with torch.inference_mode():
                    for _ in range(3):
                        out = compiled(**tensors)
                    sync(device)
                    outputs["torch.compile fp16"] = out.float().cpu().numpy()
                notes["torch.compile fp16"] = f"compiled+warm in {time.perf_counter() - start:.0f} s"
                runners["torch.compile fp16"] = lambda: compiled(**tensors)
            except Exception as exc:  # noqa: BLE001 - report and go on
                notes["torch.compile fp16"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        sessions = {"ORT CUDA fp32 + IO binding": (fp32_path, {}),
                    "ORT fused fp16 + IO binding": (fp16_path, {})}
        if device == "cuda":
            sessions["ORT fused fp16 + CUDA graph"] = (fp16_path, {"enable_cuda_graph": True})
            # Measured and left out (session 2): pinning ORT's attention kernel (sdpa_kernel 4 / 2 / 16) gained
            # nothing at batch 1 and lost about 25 % at 64 x 128.
            sessions["ORT fused fp16 + CUDA graph, [out,in] weights"] = (
                fp16_path.with_name("bert.fp16.t.onnx"), {"enable_cuda_graph": True})
            for suffix, label in (("", ""), (".t", ", [out,in] weights")):
                packed = fp16_path.with_name(f"bert.fp16.packed{suffix}.onnx")
                if packed.exists():  # padding removed before the first layer: GEMMs see real tokens only
                    sessions[f"ORT fused fp16 packed + IO binding{label}"] = (packed, {})
                static = fp16_path.with_name(f"bert.fp16.static{suffix}.onnx")
                if static.exists():  # packed by the caller, token count bucketed: one captured graph per bucket
                    sessions[f"ORT fused fp16 packed + CUDA graph{label}"] = (static, {"enable_cuda_graph": True})
            # ORT's GEMM auto-tune (cuBLAS, small-N GEMV, tinygemm2 timed per shape): bert's layer GEMMs at M = 6
            # run at about 0.8 TB/s of weights in cuBLAS (session 10 profile)
            sessions["ORT fused fp16 + CUDA graph, GEMM auto-tune"] = (
                fp16_path, {"enable_cuda_graph": True, "gemm": "tune"})
            sessions["ORT fused fp16 + IO binding, GEMM auto-tune"] = (fp16_path, {"gemm": "tune"})  # profiled
            static = fp16_path.with_name("bert.fp16.static.onnx")
            if static.exists():
                sessions["ORT fused fp16 packed + CUDA graph, GEMM auto-tune"] = (
                    static, {"enable_cuda_graph": True, "gemm": "tune"})
            for stem, bias in (("mha", ""), ("mha.nobias", ", bias moved")):
                for suffix, label in (("", ""), (".t", ", [out,in] weights")):
                    static = fp16_path.with_name(f"bert.fp16.static.{stem}{suffix}.onnx")
                    if static.exists():
                        sessions[f"ORT fused fp16 packed + CUDA graph, MultiHeadAttention{bias}{label}"] = (
                            static, {"enable_cuda_graph": True})
            mha = fp16_path.with_name("bert.fp16.mha.packed.onnx")
            if mha.exists():
                sessions["ORT fused fp16 packed + IO binding, MultiHeadAttention"] = (mha, {})
        for name, (path, options) in sessions.items():
            try:
                if ".static" in path.name:
                    from packing import static_packing_feeds

                    packed_feeds = static_packing_feeds(feeds)
                    notes[name] = f"{packed_feeds['packing_token_index'].size} packed tokens; "
                    bound = OrtBound(path, packed_feeds, dim, device, keep=batch, **options)
                else:
                    bound = OrtBound(path, feeds, dim, device, **options)
                outputs[name] = bound.result()  # with a CUDA graph: the first run captures it
                runners[name] = bound
                notes[name] = notes.get(name, "") + "providers " + ",".join(
                    p.replace("ExecutionProvider", "") for p in bound.session.get_providers())
            except Exception as exc:  # noqa: BLE001
                notes[name] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        if device == "cuda":
            name = "ORT TensorRT EP fp16"
            if "TensorrtExecutionProvider" not in ort.get_available_providers():
                notes[name] = "unavailable: not in this onnxruntime build"
            else:
                try:
                    trt = ort.InferenceSession(str(fp32_path), providers=[
                        ("TensorrtExecutionProvider", {"trt_fp16_enable": True})])
                    if trt.get_providers()[0] != "TensorrtExecutionProvider":
                        raise RuntimeError(f"listed, but the session fell back to {trt.get_providers()} "
                                           "(TensorRT's own libraries, libnvinfer, are not installed)")
                    outputs[name] = trt.run(None, feeds)[0]
                    runners[name] = lambda: trt.run(None, feeds)
                except Exception as exc:  # noqa: BLE001
                    notes[name] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        with torch.inference_mode():
            many = batch * length >= 4096
            timed = time_interleaved(runners, device, rounds=args.rounds,
                                     per_round=max(5, args.per_round // (4 if many else 1)))
        rows, record = [], {}
        eager_ms = timed["torch eager fp32"]["p50_ms"]
        compile_ms = timed.get("torch.compile fp16", {}).get("p50_ms")
        for name in list(outputs) + [n for n in notes if n not in outputs]:
            t = timed.get(name)
            p = parity(reference, outputs[name]) if name in outputs else {}
            record[name] = {**(t or {}), **p, "note": notes.get(name, "")}
            rows.append((name, f"{t['p50_ms']:.3f}" if t else "-",
                         f"{eager_ms / t['p50_ms']:.1f}x" if t else "-",
                         f"{compile_ms / t['p50_ms']:.2f}x" if t and compile_ms else "-",
                         f"{p['max_abs_diff']:.1e}" if p else "-", f"{p['min_cosine']:.6f}" if p else "-",
                         notes.get(name, "")))
        if args.profile and device == "cuda":
            record["kernels"] = {name: kernel_profile(runners[name], 10, name) for name in runners
                                 if name.startswith("ORT fused fp16") and "CUDA graph" not in name}
        RESULTS["embeddings"]["shapes"][key] = record
        print(f"\n(a) {RESULTS['embeddings']['config']} + mean pooling, batch {batch} x {length} tokens, "
              f"{device}; median ms per call ({args.rounds} interleaved rounds)")
        print(table(rows, ("variant", "p50 ms", "vs eager fp32", "vs compile fp16", "max abs diff",
                           "min cosine", "note")), flush=True)
        emit(args)


# --- (b) GPT-Neo decode -------------------------------------------------------------------


def section_gptneo(args) -> None:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from export_jobs.decoder_export import export_decoder
    from export_jobs.decoder_validate import static_logits_along
    from export_jobs.static_decoder import export_static_decoder
    from inference.decode_dynamic import DecoderSession, generate_all
    from inference.sampling import SamplingParams
    from inference.decode_static import StaticDecoderSession

    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    if args.tiny:
        config = GPTNeoConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, window_size=8,
                              attention_types=[[["global", "local"], 1]], max_position_embeddings=512)
    else:
        config = GPTNeoConfig(vocab_size=50257, hidden_size=2048, num_layers=24, num_heads=16, window_size=256,
                              attention_types=[[["global", "local"], 12]], max_position_embeddings=2048)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        model = GPTNeoForCausalLM(config).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    print(f"[gptneo] {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, {dtype}, built in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    prompt_len, new = 8, args.new_tokens
    rng = np.random.default_rng(0)
    record = {"dtype": str(dtype), "prompt_tokens": prompt_len, "new_tokens": new, "rows": {}}
    RESULTS["gptneo"] = record

    def hf_ms_per_token(batch: int) -> tuple[float, list[int]]:
        ids = torch.from_numpy(rng.integers(10, config.vocab_size, (batch, prompt_len))).to(device)
        mask = torch.ones_like(ids)

        def run(n):
            sync(device)
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False)
            sync(device)
            return time.perf_counter() - t0, out

        run(4)  # warm-up
        long = statistics.median(run(new)[0] for _ in range(2))
        short = statistics.median(run(1)[0] for _ in range(3))
        _, out = run(new)
        return (long - short) / (new - 1) * 1000, out[0, prompt_len:].tolist(), ids.cpu().numpy()

    variants: dict = {}  # name -> fn(prompts, n) -> tokens per row
    static_sessions: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="gptneo-"))
    wanted = set(args.decoders)
    if "dynamic" in wanted:
        try:
            start = time.perf_counter()
            info = export_decoder(model, tmp / "dynamic" / "model.onnx")
            record["export_s"] = round(time.perf_counter() - start, 1)
            dynamic = DecoderSession(tmp / "dynamic" / "model.onnx", info, providers=providers(device))
            variants["ONNX decode loop (IO binding)"] = lambda prompts, n: generate_all(
                dynamic, prompts, SamplingParams(max_tokens=n, temperature=0), stop_ids=())
            print(f"[gptneo] exported ({info.exporter}, {info.dtype}) in {record['export_s']} s", flush=True)
        except Exception as exc:  # noqa: BLE001
            record["onnx_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            traceback.print_exc()
    for layout, folder, label in ((False, "static", ""), (True, "static_t", ", [out,in] weights")):
        timed = folder in wanted  # the int8/int4 copies need the static graph exported, not timed
        if not timed and not (folder == "static" and any(w.startswith("int") for w in wanted)):
            continue
        try:
            start = time.perf_counter()
            info_static = export_static_decoder(model, tmp / folder / "model.onnx", max_length=args.max_length)
            if layout:  # projections as FusedMatMul over [out, in] weights (weight_layout.py)
                _transpose_file(tmp / folder / "model.onnx", info_static)
            record[f"{folder}_export_s"] = round(time.perf_counter() - start, 1)
            print(f"[gptneo] static-cache GQA graph{label} exported in {record[f'{folder}_export_s']} s; "
                  f"{info_static.fused_operators}", flush=True)
            # measured and left out: ORT_ENABLE_XQA=0 (ORT's other decode attention kernel), 1.75 vs 1.71 ms/token
            for gemm in args.gemm:
                for name, graph in ((f"static cache + GQA + CUDA graph{label}", True), (f"static cache + GQA{label}", False)):
                    if not timed or (graph and device != "cuda") or (gemm != "cublas" and device != "cuda"):
                        continue
                    name = f"ONNX {name}{GEMM_MODES[gemm][0]}"
                    session = gemm_session(gemm, lambda options: StaticDecoderSession(
                        tmp / folder / "model.onnx", providers=providers(device), session_options=options,
                        cuda_graph=graph, max_batch=32))
                    static_sessions[name] = session
                    variants[name] = greedy_runner(session)
        except Exception as exc:  # noqa: BLE001
            record[f"{folder}_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            traceback.print_exc()
    if "fp16_served" in wanted:  # what `optimize: fp16` serves: the fp32 export, gated, converted to float16
        try:
            import copy

            from export_jobs.static_decoder import save_float16

            start = time.perf_counter()
            export_static_decoder(copy.deepcopy(model).float(), tmp / "fp32" / "model.onnx", max_length=args.max_length)
            save_float16(tmp / "fp32" / "model.onnx", tmp / "served" / "model.onnx")
            record["fp16_served_export_s"] = round(time.perf_counter() - start, 1)
            name = f"ONNX static cache + GQA{' + CUDA graph' if device == 'cuda' else ''}, optimize: fp16 (fp32 export converted)"
            session = StaticDecoderSession(tmp / "served" / "model.onnx", providers=providers(device),
                                           cuda_graph=device == "cuda", max_batch=32)
            static_sessions[name] = session
            variants[name] = greedy_runner(session)
        except Exception as exc:  # noqa: BLE001
            record["fp16_served_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            traceback.print_exc()
    quantized = [(bits, block, fast) for bits in (8, 4) for block, fast, tag in ((32, False, ""), (FPA_BLOCK, True, "_fpaintb"))
                 if f"int{bits}{tag}" in wanted]
    for bits, block, fast in quantized:  # the int8 / int4 decoder options: the static graph's weights as MatMulNBits
        if not (tmp / "static" / "model.onnx").exists():
            continue
        key = f"int{bits}{'_fpaintb' if fast else ''}"
        try:
            from export_jobs.weight_only import quantize_weight_only

            path = tmp / "static" / f"model.{key}.onnx"
            built = quantize_weight_only(tmp / "static" / "model.onnx", path, bits, block_size=block)
            record[key] = built
            print(f"[gptneo] {key} weight-only, block {block}: {built['MatMulNBits']} MatMulNBits, "
                  f"{built['bytes'] / 1e9:.2f} GB (fp16 {built['source_bytes'] / 1e9:.2f}) in {built['seconds']} s",
                  flush=True)
            graph = device == "cuda"
            name = (f"ONNX static cache + GQA{' + CUDA graph' if graph else ''}, int{bits} weights"
                    f"{f', block {block}, fpA_intB kernels' if fast else ''}")
            options = ort.SessionOptions()
            if fast:  # ORT's TensorRT-LLM weight-only GEMV/GEMM (fp16, block 64/128): the env var before 1.32,
                options.add_session_config_entry("ep.cuda.fpa_intb_gemm", "1")  # this key after
                os.environ["ORT_FPA_INTB_GEMM"] = "1"
            try:
                start = time.perf_counter()
                session = StaticDecoderSession(path, providers=providers(device), session_options=options,
                                               cuda_graph=graph, max_batch=32)
                record[f"{key}_session_s"] = round(time.perf_counter() - start, 1)
            finally:
                os.environ.pop("ORT_FPA_INTB_GEMM", None)
            static_sessions[name] = session
            variants[name] = greedy_runner(session)
        except Exception as exc:  # noqa: BLE001
            record[f"{key}_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            traceback.print_exc()

    def teacher_forced(session, prompt: list[int], tokens: list[int], reference: np.ndarray) -> dict:
        """Static graph fed the same tokens as the reference: max |logits diff| and top-1 agreement per step."""
        got = static_logits_along(session, prompt, tokens)
        ref = reference[len(prompt) - 1:len(prompt) - 1 + len(tokens)]
        agree = int(np.sum(got.argmax(-1) == ref.argmax(-1)))
        return {"max_abs_diff": float(np.max(np.abs(got - ref))), "top1_agree": f"{agree}/{len(tokens)}"}

    def onnx_ms_per_token(fn, prompts) -> tuple[float, list[int]]:
        prompts = [list(map(int, p)) for p in prompts]

        def run(n):
            t0 = time.perf_counter()
            out = fn(prompts, n)
            return time.perf_counter() - t0, out

        run(4)  # warm-up (captures the CUDA graphs)
        long = statistics.median(run(new)[0] for _ in range(3))
        short = statistics.median(run(1)[0] for _ in range(5))
        _, out = run(new)
        return (long - short) / (new - 1) * 1000, out

    names = ["transformers generate()", *variants]
    for batch in (1, 32):
        row = {}
        try:
            with torch.inference_mode():
                row["transformers generate()"], hf_tokens, prompts = hf_ms_per_token(batch)
        except Exception as exc:  # noqa: BLE001
            row["transformers generate() error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            prompts = rng.integers(10, config.vocab_size, (batch, prompt_len))
            hf_tokens = None
        for name, fn in variants.items():
            try:
                row[name], tokens = onnx_ms_per_token(fn, prompts)
                if hf_tokens is not None:
                    same = next((i for i, (a, b) in enumerate(zip(hf_tokens, tokens[0])) if a != b), len(hf_tokens))
                    row[f"{name} greedy agree row 0"] = f"{same}/{len(hf_tokens)}"
            except Exception as exc:  # noqa: BLE001
                row[f"{name} error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                traceback.print_exc()
        record["rows"][batch] = row
        emit(args)
        if batch == 1 and hf_tokens is not None:
            # logits parity along transformers' own greedy sequence: fp16 noise vs a real difference
            import copy

            full = torch.tensor([list(map(int, prompts[0])) + list(hf_tokens)], device=device)
            with torch.inference_mode():
                ref16 = model(full).logits[0].float().cpu().numpy()
                model32 = copy.deepcopy(model).float()
                ref32 = model32(full).logits[0].float().cpu().numpy()
                del model32
            n = len(hf_tokens)
            parity = {"transformers fp16 vs fp32": {
                "max_abs_diff": float(np.max(np.abs(ref16 - ref32)[prompt_len - 1:prompt_len - 1 + n])),
                "top1_agree": f"{int(np.sum(ref16[prompt_len - 1:-1].argmax(-1) == ref32[prompt_len - 1:-1].argmax(-1)))}/{n}"}}
            for name, session in static_sessions.items():
                try:
                    parity[f"{name} vs fp32"] = teacher_forced(session, list(map(int, prompts[0])), list(hf_tokens), ref32)
                except Exception as exc:  # noqa: BLE001
                    parity[f"{name} vs fp32"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            record["teacher_forced"] = parity
    rows = []
    b1_hf = record["rows"][1].get("transformers generate()")
    for name in names:
        b1, b32 = record["rows"][1].get(name), record["rows"][32].get(name)
        rows.append((name, f"{b1:.2f}" if b1 else "-", f"{b1_hf / b1:.1f}x" if b1 and b1_hf else "-",
                     f"{b32:.2f}" if b32 else "-", f"{b32 / b1:.2f}" if b1 and b32 else "-",
                     record["rows"][1].get(f"{name} greedy agree row 0", "-")))
    print(f"\n(b) GPT-Neo {'tiny' if args.tiny else '1.3B shapes'}, random weights, {dtype}, prompt {prompt_len}, "
          f"{new} new tokens; ms per decode step = (t[{new}] - t[1]) / {new - 1}; static cache sized per request: "
          f"{max(256, 1 << (prompt_len + new - 1).bit_length())} slots of {args.max_length}")
    print(table(rows, ("decoder", "batch 1 ms/token", "vs generate()", "batch 32 ms/step", "batch32/batch1",
                       "greedy = HF (batch 1)")), flush=True)
    for batch, row in record["rows"].items():
        for k, v in row.items():
            if k.endswith("error"):
                print(f"  batch {batch} {k}: {v}")
    if args.users and (tmp / "static" / "model.onnx").exists():
        try:
            from concurrent_generation import concurrent_generation

            record["concurrent"] = {length: concurrent_generation(tmp / "static" / "model.onnx", providers(device),
                                                                  config.vocab_size, args.users, length, new)
                                    for length in args.users_prompt_lens}
        except Exception as exc:  # noqa: BLE001
            record["concurrent_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            traceback.print_exc()
    if args.profile and device == "cuda":
        try:
            record["kernels"] = profile_decode(static_sessions)
        except Exception as exc:  # noqa: BLE001
            record["kernels"] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
    if "teacher_forced" in record:
        print(f"  logits along transformers' greedy sequence (batch 1, {new} steps, vs transformers fp32):")
        print(table([(k, f"{v.get('max_abs_diff', float('nan')):.3g}", v.get("top1_agree", v.get("error", "")))
                     for k, v in record["teacher_forced"].items()], ("logits of", "max abs diff", "top-1 = fp32")))
    for key in record:
        if key.endswith("_error"):
            print(f"  {key}: {record[key]}")


def kernel_profile(fn, steps: int, show: str = "") -> dict:
    """CUPTI kernel times of `steps` calls of fn (ORT's kernels too): ms per call, kernels per call, top 10."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / steps / 1000
    count = sum(e.count for e in events) / steps
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:10]
    rows = [(e.key[:90], f"{e.self_device_time_total / steps / 1000:.3f}", f"{e.count / steps:.0f}") for e in top]
    print(f"  {show or getattr(fn, '__name__', 'run')}: GPU kernel time {total:.3f} ms per call, {count:.0f} kernels; top:")
    print(table(rows, ("kernel", "ms per call", "launches per call")), flush=True)
    return {"gpu_ms": total, "kernels": count,
            "all": [{"kernel": e.key[:160], "ms": e.self_device_time_total / steps / 1000, "count": e.count / steps}
                    for e in sorted(events, key=lambda e: -e.self_device_time_total)]}


def profile_decode(static_sessions: dict, steps: int = 20) -> dict:
    """GPU kernel time of each uncaptured static decode step (CUPTI sees ORT's kernels too), top kernels;
    and the time of captured-graph replays alone, the device feeding itself."""
    out = {}
    for name, session in static_sessions.items():
        if session.cuda_graph:
            bucket = session.bucket(1, 8 + 200 + 1)
            session.prefill(bucket, [[11, 12, 13, 14, 15, 16, 17, 18]], 0)
            start = time.perf_counter()
            for _ in range(200):  # no copies, no reads
                session.decode(bucket)
            out[name] = {"replay_ms_per_step": (time.perf_counter() - start) / 200 * 1000}
            print(f"  {name}: graph replays alone (200 steps, no token reads) {out[name]['replay_ms_per_step']:.3f} ms/step")
            continue
        bucket = session.bucket(1, 8 + 2 * steps + 4)
        state = {"lengths": session.prefill(bucket, [[11, 12, 13, 14, 15, 16, 17, 18]], 0)}

        def step():
            session.decode(bucket, None, int(state["lengths"].max()) + 1)
            state["lengths"] = state["lengths"] + 1

        out[name] = kernel_profile(step, steps, name)
    return out


def section_window(args) -> None:
    """GPT-Neo local attention on this EP: tiny fp16/fp32 model, prompts past the window, greedy vs transformers."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from export_jobs.decoder_validate import default_prompts, transformers_greedy
    from export_jobs.static_decoder import export_static_decoder
    from inference.sampling import SamplingParams
    from inference.decode_static import StaticDecoderSession, generate_all_static

    config = GPTNeoConfig(vocab_size=1000, hidden_size=256, num_layers=4, num_heads=2, window_size=8,
                          attention_types=[[["global", "local"], 2]], max_position_embeddings=512,
                          eos_token_id=None, bos_token_id=None)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    prompts = default_prompts(model)
    expected = [transformers_greedy(model, [p], 32, 0)[0] for p in prompts]
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    tmp = Path(tempfile.mkdtemp(prefix="window-"))
    export_static_decoder(model.to(args.device).to(dtype), tmp / "model.onnx", max_length=128)
    rows, record = [], {}
    for graph in ((True, False) if args.device == "cuda" else (False,)):
        session = StaticDecoderSession(tmp / "model.onnx", providers=providers(args.device), cuda_graph=graph,
                                       max_batch=4)
        got = generate_all_static(session, prompts, SamplingParams(max_tokens=32, temperature=0))
        agree = [next((i for i, (a, b) in enumerate(zip(e, g)) if a != b), len(e)) for e, g in zip(expected, got)]
        record[f"cuda_graph={graph}"] = agree
        rows.append((f"static GQA {dtype}, cuda graph {graph}", str([len(p) for p in prompts]), f"{agree}/32"))
    RESULTS["gptneo_window"] = record
    print("\n(c) GPT-Neo local attention (window 8), right-padded batch of 2, 32 greedy tokens vs transformers fp32")
    print(table(rows, ("variant", "prompt lengths", "tokens equal")), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny configs: checks the script's logic fast")
    parser.add_argument("--sections", nargs="+", default=["window", "embed", "gptneo"])
    parser.add_argument("--max-length", type=int, default=2048, help="static KV cache slots (GPT-Neo's context)")
    parser.add_argument("--profile", action="store_true",
                        help="GPU kernel breakdown of a static decode step and of the 64 x 128 embedding runs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--users", type=int, default=32,
                        help="concurrent GPT-Neo requests: own buckets vs continuous batching (0: skip)")
    parser.add_argument("--users-prompt-lens", type=int, nargs="+", default=[8, 128],
                        help="prompt lengths of the concurrent requests, one table each")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--decoders", nargs="+", default=["dynamic", "static", "static_t", "fp16_served", "int8", "int4"],
                        choices=("dynamic", "static", "static_t", "fp16_served", "int8", "int4", "int8_fpaintb",
                                 "int4_fpaintb"),
                        help="GPT-Neo graphs to export and time (int8/int4 quantize the static one; _fpaintb: "
                             f"block {FPA_BLOCK}, run by ORT's fpA_intB kernels)")
    parser.add_argument("--gemm", nargs="+", default=["cublas"], choices=tuple(GEMM_MODES),
                        help="ORT CUDA MatMul kernel choice for the static decoders (tune: ORT's GEMM auto-tune)")
    args = parser.parse_args()
    import transformers

    RESULTS["env"] = {"torch": torch.__version__, "onnxruntime": ort.__version__,
                      "transformers": transformers.__version__, "device": args.device,
                      "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
                      "ort_providers": ort.get_available_providers(), "argv": sys.argv[1:]}
    print(json.dumps(RESULTS["env"]), flush=True)
    sections = {"embed": section_embeddings, "gptneo": section_gptneo, "window": section_window}
    for name in args.sections:
        start = time.perf_counter()
        try:
            sections[name](args)
        except Exception as exc:  # noqa: BLE001 - one section's failure must not stop the others
            RESULTS.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            print(f"\n[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
        print(f"[{name}] {time.perf_counter() - start:.0f} s", flush=True)
        emit(args)


if __name__ == "__main__":
    main()
