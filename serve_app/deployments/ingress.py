"""The HTTP ingress: owns the routes, validates requests, sends each to its model's deployment."""

import asyncio
import base64
from typing import Any, Optional

import numpy as np
import orjson
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from contract.errors import InvalidRequest, ModelNotFound, NotReady
from contract.settings import ServerSettings

from ..batching import GreedyBatcher
from ..http import errors, openai_format
from ..http.guards import GuardMiddleware
from ..http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    Health,
    ModelCard,
    ModelList,
)

api = FastAPI(title="onnx-serve", version="0.1.0",
              description="OpenAI-shaped HTTP API over ONNX Runtime models served by Ray Serve.")
errors.install(api)


INLINE_TOKENIZE_CHARS = 16_384  # larger requests are tokenized in a worker thread


def _encode(vector: np.ndarray, fmt: str) -> np.ndarray | str:
    if fmt == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, "<f4").tobytes()).decode()
    return np.ascontiguousarray(vector, np.float32)


class VectorsResponse(Response):
    """JSON with float32 arrays written by orjson: each float is the shortest decimal that reads back as the
    same float32. ``json.dumps`` of ``tolist()`` took 435 us for one 384-d vector on the 2-core machine (17
    digits a float, 7.5 kB); this takes 17 us (4.1 kB)."""
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, embedders: dict[str, DeploymentHandle], cards: list[dict[str, Any]],
                 settings: dict[str, Any], generators: Optional[dict[str, DeploymentHandle]] = None,
                 embed_batch: Optional[dict[str, int]] = None, local: Optional[dict[str, dict[str, Any]]] = None,
                 tokenize: Optional[dict[str, dict[str, Any]]] = None):
        self.embedders, self.generators = embedders, generators or {}
        # Token-input embedders get their requests tokenized here: ingress replicas scale with the CPUs, while
        # one embedder replica per GPU share would otherwise tokenize every request itself.
        self.preparers = {model: self._load_preparer(spec) for model, spec in (tokenize or {}).items()}
        # server.embed_in_ingress: these models run here, in this replica's own session (one hop fewer)
        self.local = {model: self._load_local(spec) for model, spec in (local or {}).items()}
        self.embedding_models = {**self.embedders, **self.local}
        # Requests for a batched model are merged here too, so the embedder replica receives one call per
        # batch instead of one per request: at concurrency 256 its per-call cost, not the GPU, was the cap.
        self.settings = ServerSettings.model_validate(settings)
        self.batchers = {model: GreedyBatcher(self._embed_many(self.embedders[model], model in self.preparers), size,
                                              max_in_flight=self.settings.ingress_in_flight)
                         for model, size in (embed_batch or {}).items() if size > 1 and model in self.embedders}
        self.cards = {card["id"]: ModelCard.model_validate(card) for card in cards}
        api.add_middleware(GuardMiddleware, max_body_bytes=self.settings.max_body_bytes,
                           api_keys=self.settings.api_keys)

    def _handle(self, table: dict[str, DeploymentHandle], model: str, task: str) -> DeploymentHandle:
        if model not in table:
            known = sorted(table)
            raise ModelNotFound(f"model {model!r} is not a served {task} model; available: {known}", "model")
        return table[model]

    async def _call(self, make_call, *, retry: bool = False):
        """Await a deployment call under the request timeout. ``retry``: a call that failed because its
        replica died (not because of the request) is sent once more; only for idempotent work."""
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            try:
                return await asyncio.wait_for(make_call(), self.settings.request_timeout_s)
            except Exception as exc:
                if attempt + 1 < attempts and errors.replica_died(exc):
                    continue
                mapped = errors.translate(exc)
                if mapped is None:
                    raise
                raise mapped from None

    @staticmethod
    def _load_local(spec: dict[str, Any]):
        from .embedder import EmbeddingModel

        model = EmbeddingModel(spec["entry"], spec["root"], spec["truncate"], spec["num_cpus"], spec["cuda_graphs"],
                               spec["gemm_auto_tune"])
        model.configure(spec["user_config"])
        return model

    @staticmethod
    def _load_preparer(spec: dict[str, Any]):
        from contract import manifest
        from inference.encoder import TextPreparer

        entry = manifest.ManifestEntry.model_validate(spec["entry"])
        manifest.verify(spec["root"], entry, only={entry.metadata.tokenizer})  # what passed the gate
        return TextPreparer(entry, spec["root"], truncate=spec["truncate"])

    def _embed_many(self, handle: DeploymentHandle, prepared: bool):
        method = handle.embed_prepared_many if prepared else handle.embed_many

        async def run(requests: list) -> list:
            return await self._call(lambda: method.remote(requests), retry=True)
        return run

    def _check_texts(self, texts: list[str], field: str) -> None:
        limit = self.settings.max_inputs_per_request
        if not texts:
            raise InvalidRequest(f"{field} must not be empty", field)
        if len(texts) > limit:
            raise InvalidRequest(f"{field} has {len(texts)} items; at most {limit} per request", field)
        for i, text in enumerate(texts):
            where = f"{field}[{i}]" if len(texts) > 1 else field
            if not text:
                raise InvalidRequest(f"{where} is an empty string", where)
            if len(text) > self.settings.max_input_chars:
                raise InvalidRequest(f"{where} has {len(text)} characters; at most "
                                     f"{self.settings.max_input_chars}", where)

    @api.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def embeddings(self, request: EmbeddingRequest) -> VectorsResponse:
        handle = self._handle(self.embedding_models, request.model, "embedding")
        texts = request.texts()
        self._check_texts(texts, "input")
        dim = self.cards[request.model].dim
        if request.dimensions is not None and request.dimensions != dim:
            raise InvalidRequest(f"dimensions must be {dim} for {request.model}", "dimensions")
        batcher, preparer = self.batchers.get(request.model), self.preparers.get(request.model)
        items = texts
        if preparer is not None:  # InputTooLong: a 400 before any hop
            big = sum(map(len, texts)) > INLINE_TOKENIZE_CHARS  # off the event loop, which serves every request
            items = await asyncio.to_thread(preparer.prepare, texts) if big else preparer.prepare(texts)
        if request.model in self.local:
            vectors, tokens = await self._call(lambda: handle.embed(texts))
        elif batcher is not None:
            vectors, tokens = await self._call(lambda: batcher.submit(items))
        elif preparer is not None:
            vectors, tokens = await self._call(lambda: handle.embed_prepared.remote(items), retry=True)
        else:
            vectors, tokens = await self._call(lambda: handle.embed.remote(texts), retry=True)
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, request.encoding_format)}
                for i, v in enumerate(vectors)]
        return VectorsResponse({"object": "list", "data": data, "model": request.model,
                                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def _check_generation(self, max_tokens: int, stops: list[str]) -> None:
        limit = self.settings.max_tokens_limit
        if max_tokens > limit:
            raise InvalidRequest(f"max_tokens is {max_tokens}; this server allows at most {limit}", "max_tokens")
        if len(stops) > 4:
            raise InvalidRequest("at most 4 stop strings", "stop")

    async def _generate(self, request: CompletionRequest | ChatCompletionRequest, chat: bool, prompts, messages,
                        **params):
        model = request.model
        handle = self._handle(self.generators, model, "generation")
        # One call to the Generator per request, which checks it first. Until it answers, nothing has reached the
        # client, so a call whose replica died is sent once more.
        if request.stream:
            async def accepted():
                steps = handle.options(stream=True).stream.remote(prompts, messages, **params)
                return steps, await steps.__anext__()  # the prompt's token count, or the request's 4xx error

            steps, prompt_tokens = await self._call(accepted, retry=True)
            usage = request.stream_options is not None and request.stream_options.include_usage
            return StreamingResponse(openai_format.sse(model, steps, chat, prompt_tokens if usage else None),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = await self._call(lambda: handle.complete.remote(prompts, messages, **params), retry=True)
        return JSONResponse(openai_format.completion(model, result, chat))

    @api.post("/v1/completions", responses={200: {"description": "text_completion, or SSE chunks if stream"}})
    async def completions(self, request: CompletionRequest):
        prompts = request.prompts()
        self._check_texts(prompts, "prompt")
        self._check_generation(request.max_tokens, request.stops())
        return await self._generate(request, False, prompts, None,
                                    max_tokens=request.max_tokens, **request.sampling())

    @api.post("/v1/chat/completions", responses={200: {"description": "chat.completion, or SSE chunks if stream"}})
    async def chat_completions(self, request: ChatCompletionRequest):
        messages = [m.model_dump() for m in request.messages]
        self._check_texts([m["content"] or " " for m in messages], "messages")
        self._check_generation(request.token_budget(), request.stops())
        return await self._generate(request, True, None, messages,
                                    max_tokens=request.token_budget(), **request.sampling())

    @api.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        return ModelList(data=list(self.cards.values()))

    @api.get("/health", response_model=Health)
    async def health(self) -> Health:
        """Liveness: the ingress answers."""
        return Health(status="ok")

    @api.get("/ready", response_model=Health, responses={503: {"description": "a model is not loaded"}})
    async def ready(self) -> Health:
        """Readiness: every configured model's replica answers."""
        handles = {**self.embedders, **self.generators}
        results = await asyncio.gather(*(self._ping(h) for h in handles.values()))
        status = {**dict(zip(handles, results)), **{model: True for model in self.local}}  # loaded in __init__
        if not all(status.values()):
            raise NotReady(f"models not ready: {sorted(k for k, ok in status.items() if not ok)}")
        return Health(status="ok", models=status)

    def check_health(self) -> None:
        """Ray calls this periodically: a replica whose own sessions no longer run is replaced."""
        for model in self.local.values():
            model.check()

    @staticmethod
    async def _ping(handle: DeploymentHandle) -> bool:
        try:
            await asyncio.wait_for(handle.info.remote(), 5.0)
            return True
        except Exception:
            return False
