"""The HTTP API (FastAPI): OpenAI's images shape on one pipeline, behind one worker.

    POST /v1/images/generations   {prompt, n, size "WxH", response_format "b64_json" | "url",
                                   negative_prompt, steps, guidance_scale, seed, sampler, lora, stream,
                                   control_image, control_type, control_scale}
    GET  /v1/images/{id}.png      an image returned as a "url"
    GET  /v1/models               the served model
    GET  /health                  the model and the queue

Every request becomes a job in one `JobQueue`; past `max_queue` waiting requests the answer is
429 with Retry-After. A request that outlives `timeout_s` gets 504; a client that disconnects
(or closes its event stream) cancels its job, which frees its slot. With "stream": true the
answer is a server-sent event stream: `progress` events (queue position, image, step) and then
one `completed` event with the usual body, or one `error` event. Errors are OpenAI-shaped,
{"error": {"message", "type", "param", "code"}}, with a one-line message.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from pixsigma.errors import PixsigmaError
from pixsigma.resolution import parse_size
from pixsigma.serve.config import ServeConfig
from pixsigma.serve.control import MAX_CONTROL_BYTES, check_control, check_control_type, controlnet_hash
from pixsigma.serve.generate import GenerationRequest, check_request, generate, loaded_adapters
from pixsigma.serve.queue import CANCELLED, DONE, TIMED_OUT, Job, JobQueue, QueueFull

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
POLL_S = 0.05
DEADLINE_GRACE_S = 5.0


class ImageRequest(BaseModel):
    """The body of POST /v1/images/generations; any other field is an error."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = None
    negative_prompt: str = ""
    steps: int | None = None
    guidance_scale: float = 4.5
    seed: int | None = None
    sampler: str = "dpm-solver"
    lora: dict[str, float] | None = None  # {adapter name: scale} among GET /v1/models' "loras"
    stream: bool = False
    control_image: str | None = None  # base64 PNG/JPEG (or a data: URL), for the server's --controlnet
    control_type: str = "none"  # none | canny | mask: the preprocessor of the control image
    control_scale: float = 1.0  # the ControlNet conditioning scale


class ApiError(Exception):
    """An error answer: HTTP status, one-line message, OpenAI error type, the field it is about."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": " ".join(str(message).split()), "type": kind, "param": param, "code": None}}


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.kind, e.param), status_code=e.status, headers=e.headers)


def validation_message(e: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """One line for the first problem pydantic found, and the field it is about."""
    err = e.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(ImageRequest.model_fields)
        return f"unknown field {field!r}; expected only {allowed}", field
    if err["type"] == "missing":
        return f"field {field!r} is required", field
    if err["type"] == "model_type":
        return "the request body must be a JSON object", None
    return f"{field or 'body'}: {err['msg']} (got {err.get('input')!r:.80})", field


class ImageStore:
    """The last `keep` generated PNGs by id, for response_format "url" (bounded memory)."""

    def __init__(self, keep: int):
        self.keep = keep
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._items[key] = png
            while len(self._items) > self.keep:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._items.get(key)


class Service:
    """What the routes share: the pipeline, the queue in front of it, the settings, the images."""

    def __init__(self, pipe, config: ServeConfig):
        self.pipe = pipe
        self.config = config
        self.queue = JobQueue(lambda job: generate(pipe, job, config), config.max_queue)
        self.images = ImageStore(config.keep_images)
        self.started = int(time.time())
        self.controlnet = controlnet_hash(pipe)  # None: requests with a control image get 400
        self.body_limit = MAX_BODY_BYTES + (MAX_CONTROL_BYTES * 4 // 3 if self.controlnet else 0)

    def check(self, body: ImageRequest) -> GenerationRequest:
        if body.model is not None and body.model not in (self.pipe.name, "pixsigma"):
            raise ApiError(400, f"model {body.model!r} is not served here; expected {self.pipe.name!r}", param="model")
        height, width = self.parse_size(body.size) if body.size is not None else (None, None)
        check_control_type(body.control_type)
        control = None
        if body.control_image is not None:
            control = check_control(body.control_image, body.control_type, body.control_scale, self.controlnet)
        return check_request(self.config, self.pipe.resolution, body.prompt, body.negative_prompt, body.n, height,
                             width, body.steps, body.guidance_scale, body.sampler, body.seed, body.lora,
                             loaded_adapters(self.pipe), control)

    def parse_size(self, size: str) -> tuple[int, int]:
        """(height, width) from "WxH"; the range in the message is this server's."""
        limit = self.config.side_limit(self.pipe.resolution)
        try:
            return parse_size(size)
        except PixsigmaError:
            raise ApiError(400, f"size {size!r} is not WIDTHxHEIGHT with sides in {self.config.min_side}..{limit}; "
                                f"expected e.g. {self.pipe.resolution}x{self.pipe.resolution}", param="size") from None

    def submit(self, req: GenerationRequest) -> Job:
        try:
            return self.queue.submit(req, self.config.timeout_s)
        except QueueFull as e:
            raise ApiError(429, str(e), "server_busy", headers={"Retry-After": str(e.retry_after)}) from None

    def answer(self, job: Job, body: ImageRequest, request: Request) -> dict:
        """The finished job as the OpenAI body, or the ApiError it ended with."""
        if job.state == TIMED_OUT:
            raise self.timeout_error()
        if job.state == CANCELLED:
            raise ApiError(499, "the request was cancelled", "cancelled")
        if job.state != DONE:
            status, kind = (400, "invalid_request_error") if isinstance(job.error, PixsigmaError) else (500, "server_error")
            raise ApiError(status, f"{job.error}" if status == 400 else f"generation failed: {type(job.error).__name__}: "
                                                                        f"{job.error}", kind)
        data = []
        for image in job.result:
            item = {"seed": image.seed, "revised_prompt": job.request.prompt}
            if body.response_format == "url":
                item["url"] = str(request.url_for("get_image", image_id=self.images.put(image.png)))
            else:
                item["b64_json"] = base64.b64encode(image.png).decode("ascii")
            data.append(item)
        return {"created": int(time.time()), "data": data}

    def timeout_error(self) -> ApiError:
        return ApiError(504, f"the generation did not finish within {self.config.timeout_s:g} s; expected fewer "
                             "steps or images, or a longer --timeout", "timeout")

    def progress(self, job: Job) -> dict:
        if job.state == "queued":
            return {"status": "queued", "queue_position": self.queue.position(job)}
        p = job.progress
        return {"status": job.state, "image": p.image, "images": p.images, "step": p.step, "steps": p.steps,
                "fraction": round(p.fraction, 4)}


def _auth_dependency(config: ServeConfig):
    """Checks `Authorization: Bearer KEY` or `X-API-Key: KEY` when the server has a key."""

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key; expected the header 'Authorization: Bearer KEY' "
                                "(or 'X-API-Key: KEY')", "authentication_error")

    return check_key


async def _read_body(request: Request, limit: int = MAX_BODY_BYTES) -> ImageRequest:
    """The JSON body, at most `limit` bytes, parsed and validated with one-line errors."""
    if int(request.headers.get("content-length") or 0) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); expected a JSON object") from None
    try:
        return ImageRequest.model_validate(data)
    except ValidationError as e:
        message, field = validation_message(e)
        raise ApiError(400, message, param=field) from None


async def _wait(service: Service, job: Job, request: Request) -> None:
    """Wait for the job; cancel it when the client disconnects (499) or once it is past its
    deadline by more than a step could explain (504; the worker normally stops it itself)."""
    try:
        while not job.done:
            if await request.is_disconnected():
                log.info("client disconnected: cancelling job %s", job.id)
                service.queue.cancel(job)
                raise ApiError(499, "the client disconnected", "cancelled")
            if time.monotonic() > job.deadline + DEADLINE_GRACE_S:
                service.queue.cancel(job)
                raise service.timeout_error()
            await asyncio.sleep(POLL_S)
    except asyncio.CancelledError:
        service.queue.cancel(job)
        raise


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _stream(service: Service, job: Job, body: ImageRequest, request: Request) -> StreamingResponse:
    """Server-sent events: `progress` on every change, then `completed` or `error`; closing the
    stream cancels the job."""

    async def events():
        last = None
        try:
            while not job.done:
                now = service.progress(job)
                if now != last:
                    yield _event("progress", now)
                    last = now
                await asyncio.sleep(POLL_S)
            try:
                yield _event("completed", service.answer(job, body, request))
            except ApiError as e:
                yield _event("error", {"status": e.status, **error_body(e.message, e.kind, e.param)})
        finally:
            if not job.done:
                service.queue.cancel(job)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _routes(service: Service) -> APIRouter:
    router = APIRouter(dependencies=[Depends(_auth_dependency(service.config))])
    schema = {"requestBody": {"required": True, "content": {"application/json": {"schema": ImageRequest.model_json_schema()}}}}

    @router.post("/v1/images/generations", openapi_extra=schema)
    async def images_generations(request: Request):
        body = await _read_body(request, service.body_limit)
        job = service.submit(service.check(body))
        if body.stream:
            return _stream(service, job, body, request)
        await _wait(service, job, request)
        return service.answer(job, body, request)

    @router.get("/v1/images/{image_id}.png", name="get_image")
    async def get_image(image_id: str):
        png = service.images.get(image_id)
        if png is None:
            raise ApiError(404, f"image {image_id} is not (or no longer) stored; the server keeps the last "
                                f"{service.config.keep_images}", "not_found")
        return Response(png, media_type="image/png")

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.pipe.name, "object": "model", "created": service.started,
                                            "owned_by": "pixsigma", "hash": service.pipe.weights_hash(),
                                            "loras": list(loaded_adapters(service.pipe)),
                                            "controlnet": service.controlnet}]}

    @router.get("/health")
    async def health():
        return {"status": "ok", "model": service.pipe.name, "queue": service.queue.stats()}

    @router.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unknown(rest: str, request: Request):
        allowed = sorted({m for route in router.routes if route.name != "unknown"
                          and route.matches(request.scope)[0] == Match.PARTIAL for m in route.methods})
        if allowed:
            raise ApiError(405, f"method {request.method} is not allowed on /v1/{rest}; expected {', '.join(allowed)}",
                           headers={"Allow": ", ".join(allowed)})
        raise ApiError(404, f"no such API route /v1/{rest}; expected /v1/images/generations or /v1/models", "not_found")

    return router


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(PixsigmaError)
    async def bad_input(request, e: PixsigmaError):
        return _error_response(ApiError(400, str(e)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        message, field = validation_message(e)
        return _error_response(ApiError(400, message, param=field))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return _error_response(ApiError(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else "http_error",
                                        headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))


def create_app(pipe, config: ServeConfig) -> FastAPI:
    """The FastAPI app serving `pipe`: the API, and the Gradio UI at / when config.ui."""
    config.check()
    service = Service(pipe, config)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.queue.close()

    app = FastAPI(title="pixsigma", version=config.version or "0", lifespan=lifespan)
    app.state.service = service
    _install_error_handlers(app)
    app.include_router(_routes(service))
    if config.ui:
        from pixsigma.serve.ui import mount_ui

        app = mount_ui(app, service)
    return app


def run_server(pipe, config: ServeConfig) -> None:
    """Serve `pipe` with uvicorn until interrupted."""
    import uvicorn

    app = create_app(pipe, config)
    log.info("serving %s on http://%s:%d (API: /v1/images/generations%s)", pipe.name, config.host, config.port,
             ", UI: /" if config.ui else "")
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5)
