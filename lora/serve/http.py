"""The HTTP layer of ``lora-serve``: parse and check requests, hand them to the batcher, answer.

    POST /v1/classify         {"adapter": "news", "texts": ["...", ...]}
                              -> {"predictions": [{"label": "Business", "probabilities": {...}}, ...]}
    GET  /v1/adapters         the served adapters (labels, rank, targets) and the refused ones, why
    POST /v1/adapters/reload  read the adapters directory again -> {"added", "removed", "refused"}
    GET  /healthz             {"status": "ok", ...}; never needs the API key

Every error is a 4xx (or 500) with ``{"error": "one line"}``, and the server keeps serving. Under
overload a request is refused at once with 429 and ``Retry-After`` (``max_queued_texts``), and one
not answered in time gets 504 (``request_timeout_s``): see ``lora.serve.batching``.
With an API key (``LORA_API_KEY`` in the environment of ``lora-serve``) every route but
``/healthz`` needs ``Authorization: Bearer KEY``. The model work lives in ``lora.serve.adapters``
(what is served) and ``lora.serve.batching`` (when it runs).
"""

import asyncio
import json
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .adapters import ADAPTER_NAME, AdapterDirectory, UnknownAdapter
from .batching import (
    DEFAULT_MAX_QUEUED_TEXTS,
    DEFAULT_MAX_ROWS,
    DEFAULT_MAX_WAIT_S,
    DEFAULT_REQUEST_TIMEOUT_S,
    Batcher,
    DeadlineExceeded,
    Overloaded,
)

API_KEY_VARIABLE = "LORA_API_KEY"


@dataclass
class ServerLimits:
    """What one request may ask, and how requests are batched (see ``lora.serve.batching``)."""

    max_texts: int = 256  # texts per request: four full batches
    max_body_bytes: int = 1_000_000  # 256 texts of ~4 KB each: far longer than any model input
    max_batch_rows: int = DEFAULT_MAX_ROWS
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    max_queued_texts: int = DEFAULT_MAX_QUEUED_TEXTS  # beyond it: 429 with Retry-After
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S  # past it: 504, the texts dropped
    api_key: str | None = None


# An oversized body is read and thrown away before the 413 goes out, up to this many bytes and
# seconds (nginx's "lingering close"): a client that sends its whole body before it reads (no
# ``Expect: 100-continue``, as Python's urllib) then reads the JSON error; answering at once and
# closing would reset its connection mid-send ("connection reset" instead of the 413). A body
# past these bounds is answered at once and its connection closed.
DISCARD_BYTES = 64 * 1024 * 1024
DISCARD_SECONDS = 10.0


class RequestError(Exception):
    """A bad request: answered with ``status``, ``{"error": message}`` and ``headers``."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def create_app(directory: AdapterDirectory, limits: ServerLimits) -> FastAPI:
    """The FastAPI app serving ``directory`` (its adapters set, reloads) within ``limits``."""
    batcher = Batcher(
        _predictions(directory),
        limits.max_batch_rows,
        limits.max_wait_s,
        limits.max_queued_texts,
        limits.request_timeout_s,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()  # uvicorn waits for requests in flight first; the batcher answers them

    app = FastAPI(title="lora-serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return JSONResponse({"error": str(error)}, status_code=error.status, headers=error.headers)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, error: Overloaded):
        return JSONResponse({"error": str(error)}, status_code=429, headers={"Retry-After": str(error.retry_after_s)})

    @app.exception_handler(DeadlineExceeded)
    async def deadline_exceeded(request: Request, error: DeadlineExceeded):
        return JSONResponse({"error": str(error)}, status_code=504)

    @app.exception_handler(UnknownAdapter)
    async def adapter_gone(request: Request, error: UnknownAdapter):  # dropped by a reload meanwhile
        return JSONResponse({"error": str(error)}, status_code=404)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        return JSONResponse({"error": f"internal error: {type(error).__name__}: {error}"}, status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):  # unknown route, wrong method
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    @app.middleware("http")
    async def require_api_key(request: Request, call_next):
        if limits.api_key and request.url.path != "/healthz":
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(given.encode(), limits.api_key.encode()):
                return JSONResponse({"error": "missing or wrong API key (Authorization: Bearer KEY)"}, status_code=401)
        return await call_next(request)

    @app.get("/healthz")
    async def healthz():
        return {
            "status": "ok",
            "adapters": len(directory.adapter_set.adapters),
            "batches": batcher.batches,
            "queued_texts": batcher.queued_texts,
            "refused": batcher.refused,
            "expired": batcher.expired,
        }

    @app.get("/v1/adapters")
    async def adapters():
        return _adapter_listing(directory)

    @app.post("/v1/adapters/reload")
    async def reload():
        changes = await batcher.run_on_model_thread(directory.reload)
        return {**changes, **_adapter_listing(directory)}

    @app.post("/v1/classify")
    async def classify(request: Request):
        adapter, texts = _parse_classify(await _read_json(request, limits.max_body_bytes), directory, limits)
        return {"predictions": await batcher.submit(adapter, texts)}

    return app


def _predictions(directory: AdapterDirectory):
    """``predict(texts, adapters)`` for the batcher: one ``{"label", "probabilities"}`` per text."""

    def predict(texts: list[str], adapters: list[str]) -> list[dict]:
        adapter_set = directory.adapter_set
        rows = adapter_set.predict_proba(texts, adapters)
        answers = []
        for row, name in zip(rows, adapters):
            labels = adapter_set.adapters[name].labels
            answers.append(
                {
                    "label": labels[int(row.argmax())],
                    "probabilities": {label: float(p) for label, p in zip(labels, row)},
                }
            )
        return answers

    return predict


def _adapter_listing(directory: AdapterDirectory) -> dict:
    served = directory.adapter_set.adapters
    return {
        "base_model": directory.adapter_set.base_model,
        "adapters": [
            {
                "name": name,
                "labels": adapter.labels,
                "r": adapter.config.lora.r,
                "target_modules": list(adapter.config.lora.target_modules),
                "dora": adapter.config.lora.dora,
                "runs_as": directory.adapter_set.kind(name),
            }
            for name, adapter in sorted(served.items())
        ],
        "refused": [{"name": name, "reason": reason} for name, reason in sorted(directory.refused.items())],
    }


async def _read_json(request: Request, limit: int):
    """The request body parsed as JSON; 400 if not JSON; 413 past ``limit`` bytes, sent once
    the rest of the body was read and thrown away (within ``DISCARD_BYTES`` and
    ``DISCARD_SECONDS``; beyond them at once, closing the connection)."""
    declared = request.headers.get("content-length", "")
    too_long = (
        f"request body of {declared} bytes is over the limit of {limit}"
        if declared.isdigit()
        else f"request body is over the limit of {limit} bytes"
    )
    if declared.isdigit() and int(declared) > DISCARD_BYTES:
        raise RequestError(413, too_long, {"Connection": "close"})
    body, received = bytearray(), 0
    deadline = asyncio.get_running_loop().time() + DISCARD_SECONDS
    async for chunk in request.stream():
        received += len(chunk)
        if received <= limit:
            body += chunk
        elif received > DISCARD_BYTES or asyncio.get_running_loop().time() > deadline:
            raise RequestError(413, too_long, {"Connection": "close"})
    if received > limit:
        raise RequestError(413, too_long)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"request body is not valid JSON: {error}") from None


def _parse_classify(body, directory: AdapterDirectory, limits: ServerLimits) -> tuple[str, list[str]]:
    """``(adapter, texts)`` of a classify request, or the RequestError that says what is wrong."""
    if not isinstance(body, dict) or set(body) != {"adapter", "texts"}:
        raise RequestError(422, 'the body must be a JSON object {"adapter": NAME, "texts": [TEXT, ...]}')
    adapter, texts = body["adapter"], body["texts"]
    if not isinstance(adapter, str) or not ADAPTER_NAME.fullmatch(adapter):
        raise RequestError(
            400,
            f"adapter must be the name of a sub-folder of the adapters directory "
            f"(letters, digits, '.', '_', '-'), got {json.dumps(adapter)[:80]}",
        )
    if adapter in directory.refused:
        raise RequestError(409, f"adapter {adapter!r} is not served: {directory.refused[adapter]}")
    if adapter not in directory.adapter_set.adapters:
        raise RequestError(
            404, f"unknown adapter {adapter!r}; served: {', '.join(sorted(directory.adapter_set.adapters)) or 'none'}"
        )
    if not isinstance(texts, list) or not texts:
        raise RequestError(422, "texts must be a non-empty list of strings")
    if len(texts) > limits.max_texts:
        raise RequestError(413, f"{len(texts)} texts in one request; at most {limits.max_texts}")
    wrong = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
    if wrong is not None:
        raise RequestError(422, f"texts[{wrong}] is a {type(texts[wrong]).__name__}, not a string")
    return adapter, texts
