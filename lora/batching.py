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

All model work (predictions and ``run_on_model_thread`` calls such as a reload) runs on one
thread, one call at a time, in arrival order. Only asyncio and the standard library.
"""
import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

DEFAULT_MAX_ROWS = 64
DEFAULT_MAX_WAIT_S = 0.005


@dataclass
class _Request:
    adapter: str
    texts: list[str]
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Collects ``submit(adapter, texts)`` calls into ``predict(texts, adapters)`` calls.

    ``predict`` gets one adapter name per text and returns one result per text, in order.
    An exception from it is retried request by request, so that one bad request fails alone.
    """

    def __init__(self, predict: Callable[[list[str], list[str]], list], max_rows: int = DEFAULT_MAX_ROWS,
                 max_wait_s: float = DEFAULT_MAX_WAIT_S):
        if max_rows < 1 or max_wait_s < 0:
            raise ValueError(f"max_rows must be >= 1 and max_wait_s >= 0, got {max_rows}, {max_wait_s}")
        self.predict, self.max_rows, self.max_wait_s = predict, max_rows, max_wait_s
        self.batches = 0  # forwards run so far, for /healthz and the load test
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
        """The results of ``predict`` for ``texts``, all under ``adapter``, once its batch ran."""
        if self._worker is None:
            raise RuntimeError("the batcher is not running")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(adapter, texts, future))
        return await future

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
        arrives within ``max_wait_s``; None once ``stop`` was called and all is answered."""
        first = self._carried or await self._queue.get()
        self._carried = None
        if first is None:
            return None
        batch, rows = [first], len(first.texts)
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while rows < self.max_rows:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                item = self._queue.get_nowait() if remaining <= 0 else \
                    await asyncio.wait_for(self._queue.get(), remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if item is None or rows + len(item.texts) > self.max_rows:
                self._carried = item  # the stop mark, or the first request of the next batch
                break
            batch.append(item)
            rows += len(item.texts)
        return batch

    async def _answer(self, batch: list[_Request]) -> None:
        texts = [text for request in batch for text in request.texts]
        adapters = [request.adapter for request in batch for _ in request.texts]
        try:
            results = await self.run_on_model_thread(lambda: self.predict(texts, adapters))
        except Exception as error:
            if len(batch) == 1:
                _settle(batch[0].future, error=error)
                return
            for request in batch:  # one at a time: only the request at fault fails
                await self._answer([request])
            return
        self.batches += 1
        start = 0
        for request in batch:
            _settle(request.future, result=results[start:start + len(request.texts)])
            start += len(request.texts)


def _settle(future: asyncio.Future, result=None, error: Exception | None = None) -> None:
    """Resolve ``future`` unless its caller gave up on it (a client that disconnected)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
