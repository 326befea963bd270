"""Dynamic batching: requests that arrive together, for any adapters, run as one mixed batch.

A worker takes the first waiting request, then keeps taking requests for up to ``max_wait_s``
or until ``max_rows`` texts are in hand, and hands them all to one ``predict(texts, adapters)``
call on the model thread. While that call runs, new requests queue up and form the next batch,
so under load batches fill without any waiting. ``max_rows=1`` turns batching off: every
request runs alone (a request is never split; the predict function batches its own rows).

Defaults, and why: ``max_rows = 64``, the batch ``bench/serving.py`` measures: an encoder's
cost per row stops falling once one batch's matmuls keep the cores busy (a few dozen rows of
AG News length on a CPU), and a larger batch only makes every request in it wait for all of it.
``max_wait_s = 0.005``: on an idle server a lone request waits at most 5 ms for company, little
beside one forward pass (tens of milliseconds for MiniLM on a CPU, more for roberta-base); under
load no wait is needed, since requests queue up while a batch runs.

Overload, as Hugging Face's text-embeddings-inference handles it (``--max-concurrent-requests``,
429): at most ``max_queued_texts`` texts are admitted and not yet answered; a request that would
go beyond that is refused at once (``Overloaded``, with the seconds the queue needs at the
throughput measured so far), so the wait and the memory stay bounded however many clients
come. Default 512 texts: eight full batches, about 5 s of MiniLM on 2 CPU cores
(``bench/serving.py``), well under a second on a GPU. Every admitted request has a deadline
(``request_timeout_s``, default 30 s): past it the caller gets ``DeadlineExceeded`` and its
texts are dropped from the queue, never computed (unless their batch was already running).

All model work (predictions and ``run_on_model_thread`` calls such as a reload) runs on one
thread, one call at a time, in arrival order. Only asyncio and the standard library.
"""

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

DEFAULT_MAX_ROWS = 64
DEFAULT_MAX_WAIT_S = 0.005
DEFAULT_MAX_QUEUED_TEXTS = 512
DEFAULT_REQUEST_TIMEOUT_S = 30.0


class Overloaded(Exception):
    """The queue is full: try again in ``retry_after_s`` seconds (an HTTP 429)."""

    def __init__(self, queued: int, asked: int, limit: int, retry_after_s: int):
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the server is at capacity: {queued} texts queued, {asked} more would pass the limit "
            f"of {limit}; retry in {retry_after_s} s"
        )


class DeadlineExceeded(Exception):
    """A request was not answered within its deadline; its texts left the queue (an HTTP 504)."""


@dataclass
class _Request:
    adapter: str
    texts: list[str]
    future: asyncio.Future = field(repr=False)
    expired: bool = False  # past its deadline: dropped wherever it waits
    released: bool = False  # its texts no longer count as queued


class Batcher:
    """Collects ``submit(adapter, texts)`` calls into ``predict(texts, adapters)`` calls.

    ``predict`` gets one adapter name per text and returns one result per text, in order.
    An exception from it is retried request by request, so that one bad request fails alone.
    """

    def __init__(
        self,
        predict: Callable[[list[str], list[str]], list],
        max_rows: int = DEFAULT_MAX_ROWS,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        max_queued_texts: int = DEFAULT_MAX_QUEUED_TEXTS,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ):
        if max_rows < 1 or max_wait_s < 0 or max_queued_texts < 1 or not request_timeout_s > 0:
            raise ValueError(
                "max_rows and max_queued_texts must be >= 1, max_wait_s >= 0 and request_timeout_s "
                f"> 0, got {max_rows}, {max_queued_texts}, {max_wait_s}, {request_timeout_s}"
            )
        self.predict, self.max_rows, self.max_wait_s = predict, max_rows, max_wait_s
        self.max_queued_texts, self.request_timeout_s = max_queued_texts, request_timeout_s
        self.batches = 0  # forwards run so far, for /healthz and the load test
        self.queued_texts = 0  # admitted, not yet answered or dropped
        self.refused = 0  # requests refused as overload (429)
        self.expired = 0  # requests past their deadline (504)
        self._texts_per_second: float | None = None  # measured on the batches run so far
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._carried: _Request | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Answer every request submitted so far, then stop the worker and the model thread."""
        if self._worker is not None:
            await self._queue.put(None)  # after everything already queued
            await self._worker
            self._worker = None
        self._executor.shutdown(wait=True)

    async def submit(self, adapter: str, texts: list[str]) -> list:
        """The results of ``predict`` for ``texts``, all under ``adapter``, once its batch ran.

        Raises:
            Overloaded: ``texts`` would take the queue past ``max_queued_texts``; nothing queued.
            DeadlineExceeded: no answer within ``request_timeout_s``; the texts left the queue.
        """
        if self._worker is None:
            raise RuntimeError("the batcher is not running")
        if self.queued_texts + len(texts) > self.max_queued_texts:
            self.refused += 1
            raise Overloaded(self.queued_texts, len(texts), self.max_queued_texts, self.retry_after_s())
        request = _Request(adapter, texts, asyncio.get_running_loop().create_future())
        self.queued_texts += len(texts)
        self._queue.put_nowait(request)
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), self.request_timeout_s)
        except asyncio.TimeoutError:
            self.expired += 1
            self._drop(request)
            raise DeadlineExceeded(
                f"no answer within the request timeout of {self.request_timeout_s:g} s; "
                "the texts were dropped from the queue"
            ) from None
        except asyncio.CancelledError:  # the caller is gone (a client that disconnected)
            self._drop(request)
            raise

    def retry_after_s(self) -> int:
        """Whole seconds until the texts queued now are answered, at the measured throughput
        (1 before any batch ran): what a refused client should wait."""
        if not self._texts_per_second:
            return 1
        return max(1, math.ceil(self.queued_texts / self._texts_per_second))

    def _drop(self, request: _Request) -> None:
        """Nobody waits for ``request`` any more: pass it over wherever it waits."""
        request.expired = True
        self._release(request)

    def _release(self, request: _Request) -> None:
        if not request.released:
            request.released = True
            self.queued_texts -= len(request.texts)

    async def run_on_model_thread(self, call: Callable[[], object]) -> object:
        """``call()`` on the model thread, between two batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if batch is None:
                return
            await self._answer(batch)

    async def _collect(self) -> list[_Request] | None:
        """The next batch: the first waiting request plus whatever fits in ``max_rows`` and
        arrives within ``max_wait_s``; None once ``stop`` was called and all is answered.
        Expired requests are passed over."""
        first = self._carried or await self._queue.get()
        self._carried = None
        while first is not None and first.expired:
            first = await self._queue.get()
        if first is None:
            return None
        batch, rows = [first], len(first.texts)
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while rows < self.max_rows:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                item = (
                    self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)
                )
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if item is not None and item.expired:
                continue
            if item is None or rows + len(item.texts) > self.max_rows:
                self._carried = item  # the stop mark, or the first request of the next batch
                break
            batch.append(item)
            rows += len(item.texts)
        return batch

    async def _answer(self, batch: list[_Request]) -> None:
        batch = [request for request in batch if not request.expired]  # expired while the batch filled
        if not batch:
            return
        texts = [text for request in batch for text in request.texts]
        adapters = [request.adapter for request in batch for _ in request.texts]
        started = time.perf_counter()
        try:
            results = await self.run_on_model_thread(lambda: self.predict(texts, adapters))
        except Exception as error:
            if len(batch) == 1:
                self._release(batch[0])
                _settle(batch[0].future, error=error)
                return
            for request in batch:  # one at a time: only the request at fault fails
                await self._answer([request])
            return
        self._measure(len(texts), time.perf_counter() - started)
        self.batches += 1
        start = 0
        for request in batch:
            self._release(request)
            _settle(request.future, result=results[start : start + len(request.texts)])
            start += len(request.texts)

    def _measure(self, texts: int, seconds: float) -> None:
        """Texts per second of the model thread, a running average over recent batches."""
        rate = texts / max(seconds, 1e-6)
        self._texts_per_second = rate if self._texts_per_second is None else 0.8 * self._texts_per_second + 0.2 * rate


def _settle(future: asyncio.Future, result=None, error: Exception | None = None) -> None:
    """Resolve ``future`` unless its caller gave up on it (a client that disconnected)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
