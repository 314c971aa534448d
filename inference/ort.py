"""ONNX Runtime session set-up shared by every model kind: which execution providers, which options."""
from __future__ import annotations

import os
from typing import Sequence

import onnxruntime as ort

# ONNX Runtime reads this when it tunes a GEMM shape: time candidates as CUDA graph replays, as our sessions run.
# Deployments set it in their runtime_env (serve_app.app); a process may set it itself before its first session.
GEMM_REPLAY_TUNING_ENV = {"ORT_CUDA_GEMM_GRAPH_REPLAY_TUNING": "1"}


def providers(use_gpu: bool) -> list[str]:
    """CUDA EP when the replica was given a GPU and this ONNX Runtime build has it; else CPU."""
    if use_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


AUTO_CPU_THREADS = 4  # the most threads a CPU encoder replica takes unless configured


def encoder_threads(threads: int | None, use_gpu: bool) -> int:
    """Intra-op threads of an encoder replica's session: as configured; else 1 beside a GPU (the CPU only feeds
    it), and on a CPU replica this host's cores up to AUTO_CPU_THREADS. Its sessions do not spin, so a replica
    that shares the cores with the HTTP path takes them only while it runs (BENCHMARKS.md, "Small CPU hosts")."""
    if threads:
        return threads
    return 1 if use_gpu else min(os.cpu_count() or 1, AUTO_CPU_THREADS)


def session_options(threads: int | None = None, eps: Sequence[str] = (), *,
                    gemm_auto_tune: bool = True, spin: bool = True) -> ort.SessionOptions:
    """Options for a session over `eps` (as `providers` returns them).

    gemm_auto_tune: on the CUDA EP, ONNX Runtime times its GEMM kernels per shape (cuBLAS, its small-N GEMV,
    TensorRT-LLM's tinygemm2) and keeps the fastest (BENCHMARKS.md, "Lab experiments"); CPU sessions
    get nothing they would not use. spin=False: idle intra-op threads sleep instead of spinning, leaving the
    cores to the HTTP path that shares them (BENCHMARKS.md, "Small CPU hosts")."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = max(1, threads or os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if eps and eps[0] == "CUDAExecutionProvider" and gemm_auto_tune:
        opts.add_session_config_entry("ep.cuda.enable_gemm_auto_tune", "1")
    return opts
