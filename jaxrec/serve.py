"""`jaxrec serve EXPORT`: an export's top-k recommendations over HTTP (the `serve` extra).

    POST /recommend  {"histories": [["tok", ...], ...], "k": 10, "exclude_history": null,
                      "unknown": "reject" | "skip"}
                  -> {"results": [{"items": [...], "scores": [...]}, ...]}  (one per history, best first;
                     with "unknown": "skip", a history that lost tokens also has "skipped": [...],
                     as in `jaxrec recommend`'s lines)
    GET  /health     {"status": "ok", "task": ..., "kind": ..., "items": catalogue size, "max_k": largest k,
                      "max_batch": N}
    GET  /manifest   the export's manifest.json

A bad request gets a 4xx whose JSON body is {"error": one line naming the field/row and the
problem, ...}: wrong JSON or wrong types 422 (the field named, e.g. `histories[0][2]`); an empty
batch or history 422; k outside 1..catalogue size, or above the top-k an export ranks, 422; more
histories than `max_batch` 413; unknown item tokens 422 naming each token with its row (or, with
"unknown": "skip", dropped and listed in the result's "skipped"); any other refusal of the recommender (an
ExportError) 422 with its message.

The export is loaded once, before the socket accepts anything. Model calls run one at a time on
one worker thread, off the event loop: the loop keeps answering /health while a batch is scored,
and requests queue rather than compete for the cores (batch on the client, up to `max_batch`).
Batches are padded to the next power of two (capped at `max_batch`), so a jitted model compiles
at most log2(max_batch) + 1 programs instead of one per distinct batch size.

SIGTERM or Ctrl-C stops accepting connections, lets requests in flight finish and exits; the
exit status is the signal's (uvicorn re-raises it after its shutdown), Ctrl-C 130.

`make_app(recommender)` builds the application without a socket (anything with the
`load_recommender` interface: `.items`, `.manifest`, `.recommend(histories, k, exclude_history)`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import math
import socket
from typing import Any, Literal, Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from jaxrec.export.histories import check_histories
from jaxrec.export.manifest import ExportError
from jaxrec.export.recommend import UnknownItems

DEFAULT_MAX_BATCH = 256


class RecommendRequest(BaseModel):
    # Strict: an item token is a string as in items.json (1 is not "1"), k an integer (not "10"),
    # and an unexpected field is an error rather than silently ignored (a typo such as "K").
    model_config = ConfigDict(strict=True, extra="forbid")

    histories: list[list[str]]
    k: int = 10
    exclude_history: bool | None = None
    unknown: Literal["reject", "skip"] = "reject"


class RequestProblem(Exception):
    """A request the recommender cannot answer: HTTP status + one line (+ extra JSON fields)."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def _field(loc: Sequence[Any]) -> str:
    """("body", "histories", 0, 2) -> "histories[0][2]"."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def describe_validation_error(errors: Sequence[dict]) -> str:
    """FastAPI's validation errors as one line: "field: problem; field: problem"."""
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            parts.append(f"body: not valid JSON ({reason})" if reason else "body: not valid JSON")
        elif error.get("type") == "missing":
            parts.append(f"{_field(error.get('loc', ()))}: required field missing")
        else:
            parts.append(f"{_field(error.get('loc', ()))}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def check_request(request: RecommendRequest, n_items: int, max_batch: int, max_k: int | None = None) -> None:
    """The batch and k against the server's limits and the catalogue (types are pydantic's; the
    histories' own checks are `check_histories`, shared with `jaxrec recommend`)."""
    n = len(request.histories)
    if n == 0:
        raise RequestProblem(422, "histories: empty batch; give at least one history")
    if n > max_batch:
        raise RequestProblem(413, f"histories: {n} histories in one request, more than this server's "
                                  f"--max-batch {max_batch}; split the batch")
    if not 1 <= request.k <= n_items:
        raise RequestProblem(422, f"k: {request.k} is outside 1..{n_items} (the catalogue holds {n_items} items)")
    if max_k is not None and request.k > max_k:
        raise RequestProblem(422, f"k: {request.k} is more than the {max_k} items this export ranks")


def _pairs(unknown: Sequence[tuple[int, str]]) -> list[dict]:
    return [{"row": row, "token": token} for row, token in unknown]


def padded_batch_size(n: int, max_batch: int) -> int:
    """The next power of two >= n, at most max(n, max_batch): the batch sizes the model compiles for."""
    return max(n, min(1 << (n - 1).bit_length(), max_batch))


def make_app(recommender, max_batch: int = DEFAULT_MAX_BATCH) -> FastAPI:
    """The HTTP application around a loaded recommender (no socket: tests drive it directly)."""
    items = recommender.items
    n_items = len(items) - 1                 # index 0 is padding
    manifest = dict(getattr(recommender, "manifest", {}) or {})
    max_k = getattr(recommender, "max_k", None)      # exports that rank a fixed top-k say how many
    # One worker: model calls never overlap (see the module docstring).
    model_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxrec-model")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        model_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="jaxrec", description=f"top-k recommendations from a {manifest.get('task')} export",
                  lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, invalid: RequestValidationError) -> JSONResponse:
        errors = invalid.errors()
        detail = [{key: e[key] for key in ("type", "loc", "msg") if key in e} for e in errors]
        return JSONResponse(status_code=422, content={"error": describe_validation_error(errors),
                                                      "detail": json.loads(json.dumps(detail, default=str))})

    @app.exception_handler(RequestProblem)
    async def _problem(request: Request, problem: RequestProblem) -> JSONResponse:
        return JSONResponse(status_code=problem.status, content={"error": problem.message, **problem.extra})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "task": manifest.get("task"), "kind": manifest.get("kind"), "items": n_items,
                "max_k": max_k if max_k is not None else n_items, "max_batch": max_batch}

    @app.get("/manifest")
    async def get_manifest() -> dict:
        return manifest

    @app.post("/recommend")
    async def recommend(request: RecommendRequest) -> dict:
        check_request(request, n_items, max_batch, max_k)
        try:
            histories, skipped = check_histories(recommender, request.histories, request.unknown == "skip")
        except UnknownItems as e:
            raise RequestProblem(422, f"histories: {e} (send \"unknown\": \"skip\" to drop them)",
                                 unknown=_pairs(e.unknown)) from None
        except ExportError as e:    # an empty history, given or left after skipping
            raise RequestProblem(422, f"histories: {e}") from None
        n = len(histories)
        padded = histories + [histories[0]] * (padded_batch_size(n, max_batch) - n)
        loop = asyncio.get_running_loop()
        try:
            answers = await loop.run_in_executor(
                model_thread, lambda: recommender.recommend(padded, k=request.k,
                                                            exclude_history=request.exclude_history))
        except UnknownItems as e:   # a recommender whose vocabulary is narrower than `items` says so
            raise RequestProblem(422, f"histories: {e}", unknown=_pairs(e.unknown)) from None
        except ExportError as e:    # the recommender's own one-line refusal of this request
            raise RequestProblem(422, str(e)) from None
        results = []
        for row, top in enumerate(answers[:n]):
            # Rows with fewer than k rankable items (the rest excluded) may end in -inf fillers:
            # not answers, and not JSON. (A NaN is left in: it fails loudly as a 500.)
            kept = [(token, score) for token, score in top if score != -math.inf]
            result: dict[str, Any] = {"items": [token for token, _ in kept], "scores": [score for _, score in kept]}
            if row in skipped:
                result["skipped"] = skipped[row]
            results.append(result)
        return {"results": results}

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port (port 0: any free one), or OSError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"{host}:{port}: cannot listen there ({e.strerror or e})") from None
    return sock


def warm_up(recommender, k: int = 10) -> None:
    """One call before the socket opens, so the first request does not pay the compilation
    of the batch-1 program (other batch sizes compile on first use)."""
    recommender.recommend([[recommender.items[1]]], k=min(k, len(recommender.items) - 1))


def serve(recommender, sock: socket.socket, max_batch: int = DEFAULT_MAX_BATCH, log_level: str = "info") -> None:
    """Run the HTTP server on a bound socket until SIGINT/SIGTERM (uvicorn shuts down cleanly)."""
    config = uvicorn.Config(make_app(recommender, max_batch=max_batch), log_level=log_level)
    uvicorn.Server(config).run(sockets=[sock])
