"""The gateway's FastAPI app: OpenAI-compatible routes, /health and /metrics.

Routes stay thin: validation.py turns a body into a plan, generation.py runs it against
the scheduler, serving.py and responses.py answer in OpenAI's shapes; tokenize_routes.py adds
vLLM's /tokenize, /detokenize and /version.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager

import redis
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from opentelemetry.trace import SpanKind
from prometheus_client import CONTENT_TYPE_LATEST

from services.gateway.cluster import ClusterStatus
from services.gateway.engine_client import EngineClient
from services.gateway.errors import ApiError, install_error_handlers, retry_after
from services.gateway.generation import Generation
from services.gateway.metrics import GatewayMetrics
from services.gateway.middleware import ApiKeyAuth, BodySizeLimit
from services.gateway.output_constraints import GrammarChecker
from services.gateway.protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.served_model import ServedModel
from services.gateway.serving import formatter, respond
from services.gateway.tokenize_routes import tokenize_routes
from services.gateway.tool_calls import ChatConfig
from services.gateway.validation import GenerationPlan, chat_plan, check_model_name, completion_plan
from shared import figure_records
from shared.config import GatewaySettings
from shared.redis_keys import RedisKeys
from shared.redis_protocol import connect, read_status
from shared.tracing import context_from, tracer_for


class Gateway:
    """What the routes share: the model, the link to the scheduler, status and metrics."""

    def __init__(self, settings: GatewaySettings, model: ServedModel, client: redis.Redis | None = None):
        self.settings = settings
        self.model = model
        self.keys = RedisKeys(settings.redis_prefix)
        self.client = client or connect(settings.redis_url)
        self.cluster = ClusterStatus(self.client, self.keys, model.limits)
        self.engine = EngineClient(
            self.client,
            self.keys,
            settings.output_bind,
            settings.output_advertise,
            settings.max_queue_len,
            settings.max_queue_tokens,
        )
        self.metrics = GatewayMetrics(
            model.name, model.max_model_len, lambda: read_status(self.client, self.keys)
        )
        self.grammars = GrammarChecker(model.tokenizer, model.vocab_size)
        self.draining = False  # shutting down (shutdown.py): no new work
        self.tracer = tracer_for("gateway", settings.otlp_traces_endpoint, settings.otlp_traces_protocol)

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise ApiError(
                503,
                "the server is shutting down and takes no new requests; retry (another replica may serve it)",
                code="shutting_down",
                headers=retry_after(),
            )

    async def generate(self, kind: str, plan: GenerationPlan, request: Request) -> Response:
        await self.grammars.check(plan.constraint)  # an invalid one is the client's 400 before any wait
        await self.cluster.require_ready()
        gen = Generation(
            plan,
            self.model,
            self.engine,
            self.metrics,
            self.settings.queue_timeout,
            self.settings.request_timeout,
            self._span(plan, request),
        )
        # NOTE: checked just before start() registers the request, with no await between:
        # the drain, which waits for registered requests, cannot miss one that got past.
        self.refuse_if_draining()
        await gen.start()
        try:
            return await respond(gen, request, formatter(kind, self.model, gen))
        except BaseException:
            gen.close()  # whatever went wrong, nothing keeps running for nobody
            raise

    def _span(self, plan: GenerationPlan, request: Request):
        """The request's trace span, under the caller's trace when its headers carry one."""
        if self.tracer is None:
            return None
        first = plan.choices[0].sampling
        return self.tracer.start_span(
            "gateway.request",
            context=context_from(request.headers),
            kind=SpanKind.SERVER,
            attributes={
                "gen_ai.request.id": plan.request_id,
                "gen_ai.response.model": self.model.name,
                "gen_ai.request.max_tokens": first.max_tokens,
                "gen_ai.request.temperature": first.temperature,
                "gen_ai.request.top_p": first.top_p,
                "gen_ai.request.n": len(plan.choices),
                "gen_ai.usage.prompt_tokens": sum(len(p) for p in plan.prompts),
            },
        )

    async def model_card(self) -> dict:
        m = self.model
        limits = await self.cluster.limits()
        return {
            "id": m.name,
            "object": "model",
            "created": m.created,
            "owned_by": "conveyor",
            "root": str(m.path),
            "max_model_len": limits.max_model_len,
        }


def create_app(settings: GatewaySettings, model: ServedModel, client: redis.Redis | None = None) -> FastAPI:
    gw = Gateway(settings, model, client)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await gw.engine.start()
        yield
        await gw.engine.stop()

    app = FastAPI(
        title="Conveyor",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible completions and chat completions (see docs/http_api.md)",
    )
    app.state.gateway = gw
    install_error_handlers(app)
    app.include_router(_openai_routes(gw))
    app.include_router(tokenize_routes(model, gw.cluster.limits))
    app.include_router(_status_routes(gw))
    # Outermost first: the key is checked before the body is read.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyAuth, api_key=settings.api_key)
    return app


def _openai_routes(gw: Gateway) -> APIRouter:
    """/v1: completions, chat completions and the model list, as OpenAI's API."""
    model, settings = gw.model, gw.settings
    chat_config = ChatConfig(
        settings.tool_call_parser, settings.trust_request_chat_template, settings.reasoning_parser
    )
    v1 = APIRouter(prefix="/v1")

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        with _count_refusals(gw):
            plan = completion_plan(body, model, await gw.cluster.limits())
            return await gw.generate("completion", plan, request)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        with _count_refusals(gw):
            plan = chat_plan(body, model, await gw.cluster.limits(), chat_config)
            return await gw.generate("chat", plan, request)

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [await gw.model_card()]}

    @v1.get("/models/{model_id:path}")
    async def model_info(model_id: str) -> dict:
        check_model_name(model_id, model)
        return await gw.model_card()

    return v1


def _status_routes(gw: Gateway) -> APIRouter:
    """/health for load balancers and orchestrators, /metrics for Prometheus."""
    router = APIRouter()

    @router.get("/health")
    async def health() -> JSONResponse:
        """200 when the scheduler is alive and a worker serves (figure_records.health); else 503 and why."""
        if gw.draining:
            return JSONResponse(
                {"status": "unavailable", "reason": "the server is shutting down"}, status_code=503
            )
        try:
            status = await gw.cluster.read(max_age_s=0)
            reason = figure_records.health(status, time.time())
        except ApiError as e:  # Redis unreachable
            reason = e.message
        if reason is not None:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        s = status.scheduler
        assert s is not None  # else health() gave the reason
        return JSONResponse(
            {
                "status": "ok",
                "workers": len(status.workers),
                "stalled_workers": s.stalled_workers,
                "running": s.running,
                "waiting": s.waiting,
            }
        )

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(await asyncio.to_thread(gw.metrics.render), media_type=CONTENT_TYPE_LATEST)

    return router


@contextmanager
def _count_refusals(gw: Gateway) -> Iterator[None]:
    try:
        yield
    except ApiError as e:
        gw.metrics.rejected(e.status)
        raise
