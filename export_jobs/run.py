"""Ray fan-out: one task per model, a GPU each where the cluster has GPUs; the driver writes the manifest."""
from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, TextIO

import ray

from contract import manifest
from contract.config import ModelConfig, ProjectConfig

from .job import export_one, is_current


@dataclass(frozen=True)
class ExportResult:
    id: str
    status: str  # ok | failed | skipped
    seconds: float = 0.0
    node_id: str = ""
    host: str = ""
    gpus: tuple[str, ...] = ()  # the GPU ids Ray gave the task on its node (CUDA_VISIBLE_DEVICES)
    started: float = 0.0
    finished: float = 0.0
    error: str = ""
    entry: dict[str, Any] | None = None

    @property
    def max_abs_diff(self) -> float | None:
        return self.entry["parity"]["max_abs_diff"] if self.entry else None


# Set in each export task's process before anything loads: torch sets torch.onnx's log level when imported
# (its "torchvision is not installed" lines), and tqdm reads TQDM_ at import (transformers' GGUF loader's bar).
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
             "TORCH_LOGS": "-onnx", "TQDM_DISABLE": "1"}


def _quiet() -> None:
    """Exporters are chatty (tracer warnings, optimizer INFO logs); the summary says what matters."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript", "transformers", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _export_task(cfg_json: dict, root: str) -> ExportResult:
    _quiet()
    cfg = ModelConfig.model_validate(cfg_json)
    started = time.time()
    context = ray.get_runtime_context()
    where = {"node_id": context.get_node_id(), "host": socket.gethostname(), "started": started,
             "gpus": tuple(context.get_accelerator_ids().get("GPU", ()))}
    try:
        entry = export_one(cfg, root)
    except Exception as exc:  # reported in the summary; the manifest keeps the previous entry
        return ExportResult(cfg.id, "failed", time.time() - started, error=f"{type(exc).__name__}: {exc}",
                            finished=time.time(), **where)
    return ExportResult(cfg.id, "ok", time.time() - started, entry=entry.model_dump(mode="json"),
                        finished=time.time(), **where)


# max_calls=1: each export gets a fresh worker process (frees torch memory; never reuses a process
# that imported TensorFlow for ONNX Runtime work). max_retries=0: a failed export is reported, not hidden.
export_task = ray.remote(max_calls=1, max_retries=0, runtime_env={"env_vars": QUIET_ENV})(_export_task)


PROGRESS_EVERY_S = 15.0


def _gpus_per_task() -> float:
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def export_models(config: ProjectConfig, *, only: Iterable[str] | None = None, force: bool = False,
                  num_gpus: float | None = None, out: TextIO | None = sys.stderr) -> list[ExportResult]:
    """Export every configured model (or ``only`` those ids) in parallel; commit the ones that pass.

    ``num_gpus`` per task: None asks for 1 when the live cluster has GPUs; set it (e.g. 1) on an
    autoscaling cluster whose GPU workers may be scaled to zero, so the tasks trigger a scale-up."""
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    root = str(Path(config.artifacts).resolve())
    wanted = set(only) if only is not None else None
    results, pending = [], {}
    num_gpus = _gpus_per_task() if num_gpus is None else num_gpus
    for cfg in config.models:
        if wanted is not None and cfg.id not in wanted:
            continue
        if not force and is_current(cfg, root):
            results.append(ExportResult(cfg.id, "skipped"))
            continue
        ref = export_task.options(num_gpus=num_gpus, name=f"export:{cfg.id}").remote(cfg.model_dump(mode="json"), root)
        pending[ref] = cfg.id
    total = len(pending)
    _say(out, f"exporting {total} model(s) into {root} ({'1 GPU' if num_gpus else 'CPU'} per task)")
    started = time.monotonic()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_EVERY_S)
        if not done:  # progress: who is still running, and for how long
            _say(out, f"[{total - len(pending)}/{total}] {time.monotonic() - started:.0f} s, running: "
                      + ", ".join(sorted(pending.values())))
            continue
        model_id = pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except Exception as exc:  # the worker process died (OOM, segfault): report, keep going
            result = ExportResult(model_id, "failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        if result.status == "ok":
            manifest.commit(root, manifest.ManifestEntry.model_validate(result.entry), keep=config.keep_versions)
        results.append(result)
        _say(out, f"[{total - len(pending)}/{total}] {model_id}: {result.status} "
                  f"({result.seconds:.1f} s){' - ' + result.error if result.error else ''}")
    _say(out, summary_table(results))
    return results


def summary_table(results: list[ExportResult]) -> str:
    rows = [("model", "status", "seconds", "max abs diff", "node", "gpu", "error")]
    for r in results:
        diff = f"{r.max_abs_diff:.2e}" if r.max_abs_diff is not None else "-"
        rows.append((r.id, r.status, f"{r.seconds:.1f}", diff, r.node_id[:8] or "-", ",".join(r.gpus) or "-",
                     r.error[:80] or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def _say(out: TextIO | None, text: str) -> None:
    if out is not None:
        print(text, file=out, flush=True)
