"""`wardrobe serve`: the exported ONNX model behind HTTP, on the TensorFlow-free install.

An ASGI app (Starlette) under uvicorn:
- `POST /predict`: one picture as the raw body, or several as a multipart upload (any field
  name); `?top_k=K` (default 3). Answers each picture as `wardrobe predict --json` does (the same
  decoding, views, temperature and flags), with the model's version: the ONNX file's SHA-256.
- `GET /health` (the process answers), `GET /ready` (the model is loaded and the batcher runs),
  `GET /metrics` (Prometheus' text format: requests by route and code, latency, batch sizes).
- `GET /`: a page to choose or drop a photo and see the top classes as bars, with the flags and a
  link to the model card (`GET /card`, the run's metrics/model_card.md). No CDN: works offline.

Batching: requests wait in a bounded queue; one thread takes up to `--max-batch` pictures, or what
has arrived after `--max-wait-ms`, and classifies them in one call of the graph. A full queue
answers 503 at once instead of growing. `--no-batching` classifies each request alone.

Nothing let through: a body over `--max-body-mb` answers 413 (checked against Content-Length
before reading, and while reading), a picture over the 64-megapixel cap 413, a non-image or a
truncated picture 400, each as one line of JSON; no request names a file on the server; it binds to
127.0.0.1 unless told otherwise; an error in one request is that request's 4xx or 500 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wardrobe.cli import OneLineParser
from wardrobe.cli.predict import Item, answer, load_image, project_file, top_k
from wardrobe.common import WardrobeError, run_main
from wardrobe.data.images import PictureTooLarge
from wardrobe.model.file import OnnxClassifier, file_sha256, load_onnx_classifier
from wardrobe.outputs import MODEL_CARD, ONNX_PATH

PAGE = Path(__file__).resolve().parent.parent / "page.html"  # package data
DEFAULT_TOP_K = 3


class RequestError(Exception):
    """A request the service refuses: its status code and one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Options:
    max_batch: int = 64
    max_wait_ms: float = 0.0  # 0: take what is waiting, never wait for more (see Batcher.work)
    max_queue: int = 64  # requests waiting; beyond it: 503
    batching: bool = True
    max_body_bytes: int = 16 * 2**20


class Batcher:
    """Classifies the pictures of concurrent requests together: a bounded queue and one thread
    that calls the model. The thread, not the event loop, takes each next batch, so the model never
    waits for the loop to get round to it (+7 % requests/s at 32 connections: docs/benchmarks.md)."""

    def __init__(self, classifier: OnnxClassifier, options: Options, observe_batch: Any) -> None:
        self.classifier, self.options, self.observe_batch = classifier, options, observe_batch
        self.queue: queue.Queue[tuple[np.ndarray, asyncio.Future] | None] = queue.Queue(options.max_queue)
        self.thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self.work, args=(loop,), name="wardrobe-batcher", daemon=True)
        self.thread.start()

    async def stop(self) -> None:
        if self.thread:
            await asyncio.to_thread(self.queue.put, None)  # the thread stops when it takes this
            await asyncio.to_thread(self.thread.join)

    async def classify(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((pixels, future))
        except queue.Full:
            raise RequestError(503, "the service is at capacity: the queue is full; retry shortly") from None
        return await future

    def next_batch(self) -> tuple[list[tuple[np.ndarray, asyncio.Future]], bool]:
        """The jobs of the next call (blocks for the first), and whether the server is stopping.

        Greedy by default: the requests that arrived while the last batch ran are the next batch,
        so a lone request waits for nothing and a busy server batches by itself. --max-wait-ms > 0
        also waits that long for more (it only added latency here: docs/benchmarks.md)."""
        first = self.queue.get()
        if first is None:
            return [], True
        jobs, count = [first], len(first[0])
        deadline = time.monotonic() + self.options.max_wait_ms / 1000
        while self.options.batching and count < self.options.max_batch:
            try:
                remaining = deadline - time.monotonic()
                job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            count += len(job[0])
        return jobs, False

    def work(self, loop: asyncio.AbstractEventLoop) -> None:
        stopping = False
        while not stopping:
            jobs, stopping = self.next_batch()
            if not jobs:
                continue
            pixels = np.concatenate([job[0] for job in jobs])
            self.observe_batch(len(pixels))
            try:
                # ONNX Runtime releases the GIL: the event loop keeps serving requests meanwhile.
                result: Any = self.classifier.classify(pixels, max(len(pixels), 1))
            except Exception as exc:  # one failed call fails its requests, not the thread
                result = exc
            loop.call_soon_threadsafe(deliver, jobs, result)


def deliver(jobs: list[tuple[np.ndarray, asyncio.Future]], result: Any) -> None:
    """On the event loop: each job's rows of the batch's (probabilities, distances), or the error."""
    start = 0
    for pixels, future in jobs:
        end = start + len(pixels)
        if not future.done():  # done: its client went away
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result((result[0][start:end], result[1][start:end]))
        start = end


async def read_body(request: Any, limit: int) -> bytes:
    """The request's body, refused with 413 past `limit` bytes (declared or received)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {int(declared):,} bytes is over the {limit:,}-byte cap")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the {limit:,}-byte cap")
        chunks.append(chunk)
    return b"".join(chunks)


async def pictures_of(request: Any, body: bytes) -> list[tuple[str, bytes]]:
    """(name, bytes) of each picture: every file of a multipart upload, or the raw body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream():
            yield body

        try:
            form = await MultiPartParser(request.headers, stream(), max_files=1000, max_fields=100).parse()
        except MultiPartException as exc:
            raise RequestError(400, f"malformed multipart upload: {exc.message}") from None
        uploads = [(key, value) for key, value in form.multi_items() if hasattr(value, "read")]
        files = [(value.filename or key, await value.read()) for key, value in uploads]
        await form.close()
        if not files:
            raise RequestError(400, "the multipart upload has no file")
        return files
    if not body:
        raise RequestError(400, "empty request: send a picture as the body, or files as multipart/form-data")
    return [("body", body)]


def create_app(classifier: OnnxClassifier, model_path: Path, options: Options, card: Path | None = None) -> Any:
    """The ASGI app serving `classifier` (the ONNX file at `model_path`)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    record = classifier.record
    version = file_sha256(model_path)
    registry = CollectorRegistry()
    requests = Counter("wardrobe_requests", "HTTP requests answered", ["route", "code"], registry=registry)
    latency = Histogram(
        "wardrobe_request_seconds",
        "time to answer a /predict request",
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        registry=registry,
    )
    batches = Histogram(
        "wardrobe_batch_pictures",
        "pictures per call of the model",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        registry=registry,
    )
    batcher = Batcher(classifier, options, batches.observe)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        try:
            k = request.query_params.get("top_k", str(DEFAULT_TOP_K))
            if not k.isdigit() or not 1 <= int(k) <= len(record.class_names):
                raise RequestError(400, f"top_k must be 1..{len(record.class_names)}, got {k!r}")
            body = await read_body(request, options.max_body_bytes)
            items = []
            for name, data in await pictures_of(request, body):
                try:
                    items.append(Item(name, load_image(Path(name), record, data)))
                except PictureTooLarge as exc:
                    raise RequestError(413, str(exc)) from None
                except WardrobeError as exc:
                    raise RequestError(400, str(exc)) from None
            probs, distances = await batcher.classify(np.stack([item.pixels for item in items]))
            unlike = record.unlike_training(distances)
            best = top_k(probs, int(k), record.class_names)
            pictures = [
                {"name": item.label, **answer(b, item.blank, bool(u), float(d))}
                for item, b, u, d in zip(items, best, unlike, distances, strict=True)
            ]
            response: Response = JSONResponse({"model": version, "pictures": pictures})
        except RequestError as exc:
            response = error(exc.status, str(exc))
        latency.observe(time.perf_counter() - started)
        requests.labels("/predict", str(response.status_code)).inc()
        return response

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(_: Request) -> Response:
        if batcher.running:
            return JSONResponse({"ready": True, "model": version})
        return error(503, "not ready: the model's batcher is not running")

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    async def page(_: Request) -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def model_card(_: Request) -> Response:
        if card is None or not card.is_file():
            return error(404, "no model card beside this model (metrics/model_card.md)")
        return PlainTextResponse(card.read_text(encoding="utf-8"), media_type="text/markdown; charset=utf-8")

    async def info(_: Request) -> Response:
        threshold = record.distance_threshold
        return JSONResponse({"model": version, "classes": list(record.class_names), "distance_threshold": threshold})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()

    async def http_error(_: Request, exc: HTTPException) -> Response:
        return error(exc.status_code, str(exc.detail))

    async def server_error(_: Request, exc: Exception) -> Response:
        return error(500, f"internal error: {type(exc).__name__}")

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/predict", predict, methods=["POST"]),
            Route("/health", health),
            Route("/ready", ready),
            Route("/metrics", metrics),
            Route("/card", model_card),
            Route("/info", info),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    return app


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="wardrobe serve", description="Serve the exported ONNX model over HTTP.")
    parser.add_argument("--model", type=Path, help=f"ONNX model (default: {ONNX_PATH})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-batch", type=int, default=64, help="pictures per model call at most (default 64)")
    parser.add_argument(
        "--max-wait-ms", type=float, default=0.0, help="also wait this long for more pictures (default 0)"
    )
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; then 503 (default 64)")
    parser.add_argument("--no-batching", action="store_true", help="classify each request alone")
    parser.add_argument("--max-body-mb", type=float, default=16.0, help="request body cap (default 16 MB)")
    args = parser.parse_args(argv)
    for name in ("port", "max_batch", "max_queue"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_wait_ms < 0 or args.max_body_mb <= 0:
        parser.error("--max-wait-ms must be >= 0 and --max-body-mb > 0")
    return args


def run(args: argparse.Namespace) -> None:
    try:
        import uvicorn
    except ImportError:
        raise WardrobeError("wardrobe serve needs the serve extra: pip install 'wardrobe[serve]'") from None
    model_path = args.model or project_file(ONNX_PATH)
    classifier = load_onnx_classifier(model_path, spinning=False)
    try:
        card: Path | None = project_file(MODEL_CARD)
    except WardrobeError:  # a model without its run beside it: no card to link
        card = None
    options = Options(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        batching=not args.no_batching,
        max_body_bytes=int(args.max_body_mb * 2**20),
    )
    app = create_app(classifier, model_path, options, card)
    print(json.dumps({"serving": str(model_path), "url": f"http://{args.host}:{args.port}/"}), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(lambda: run(args))
