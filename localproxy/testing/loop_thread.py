"""An event loop on a thread of its own, and calls that block or can be awaited, as the caller needs.

The fixtures run the emulator (and the pairs' proxies) here, like moto's
``ThreadedMotoServer``: a blocking call in the test (boto3, a socket, ``time.sleep``)
then cannot stall the service it is talking to, in a ``def`` and an ``async def`` test alike.

How a call "works in both" (:meth:`LoopThread.dual`): the operation is handed to
the loop thread at once; if the calling thread runs an event loop (an ``async def``
test) the caller gets an asyncio future to ``await``, otherwise (a ``def`` test)
the call blocks until the operation is done and returns its value. Either way the
operation runs even if the future is never awaited.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Bounds every blocking wait on the loop thread: a wedged loop fails the test instead of hanging it.
CALL_TIMEOUT = 60.0


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in the calling thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class LoopThread:
    """``with LoopThread("name") as runner:`` a started loop on a daemon thread; stopped at exit."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()

    def __enter__(self) -> LoopThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = CALL_TIMEOUT) -> None:
        if self._thread is not None:
            raise RuntimeError(f"the {self.name} thread is already running")
        self._started.clear()
        self.loop = None
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"the {self.name} thread did not start within {timeout} s")

    def _main(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._started.set()
            await self._stop.wait()

        # asyncio.run cancels what is left and closes the loop cleanly at the end.
        asyncio.run(serve())

    def stop(self, timeout: float = CALL_TIMEOUT) -> None:
        """Stop the loop (tasks still running are cancelled) and join the thread; again is a no-op."""
        thread, loop, stop = self._thread, self.loop, self._stop
        if thread is None or loop is None or stop is None:
            return
        self._thread = None
        if not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)

    @property
    def in_this_thread(self) -> bool:
        return self.loop is not None and running_loop() is self.loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on this loop now; its future, usable from any thread."""
        if self.loop is None:
            coro.close()
            raise RuntimeError(f"the {self.name} thread is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT) -> T:
        """Run ``coro`` on this loop and block until it is done (never from this loop's own thread)."""
        if self.in_this_thread:
            coro.close()
            raise RuntimeError(f"run() from the {self.name} thread itself would deadlock: await it instead")
        return _result(self.submit(coro), timeout)

    def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` on this loop's thread (its state is not thread-safe); its value."""
        if self.in_this_thread:
            return function(*args, **kwargs)

        async def in_loop() -> T:
            return function(*args, **kwargs)

        return self.run(in_loop())

    def dual(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT) -> Any:
        """``coro`` on this loop: awaitable in a thread with a running loop, else its value (blocking).

        From this loop's own thread, ``coro`` itself is returned (to be awaited there).
        """
        if self.in_this_thread:
            return coro
        future = self.submit(coro)
        if running_loop() is not None:
            return asyncio.wrap_future(future)
        return _result(future, timeout)


def _result(future: concurrent.futures.Future[T], timeout: float) -> T:
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()  # not left running behind the failed test
        raise
