"""Process-level set-up shared by the programs (proxy, emulator, agent), not the library.

The event loop (uvloop when installed, see :func:`event_loop_factory`), the
allocator tuning and the stop signals are process-wide: a library user embedding
``LocalProxy`` keeps its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import importlib.util
import os
import signal
import sys
import types
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from localproxy.errors import MissingExtraError, UsageError

T = TypeVar("T")

# Which event loop the programs run on: "auto" (uvloop when installed), "uvloop", "asyncio".
EVENT_LOOP_VARIABLE = "LOCALPROXY_EVENT_LOOP"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")

# glibc mallopt parameters (malloc.h) and the values the programs set.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 8 * 1024 * 1024
MMAP_THRESHOLD = 1024 * 1024


def tune_allocator() -> bool:
    """Keep freed heap memory for reuse instead of returning it to the OS at once.

    Every websocket message (up to 128 KiB) is a fresh buffer; with glibc's default
    thresholds (128 KiB) they are mmapped, or carved from heap top that is trimmed
    right after, so each one page-faults its memory in again: measured ~45% of the
    receiving proxy's CPU per GiB (benchmarks/bench_tunnel.py). Up to
    ``TRIM_THRESHOLD`` freed bytes are kept instead. False where not glibc.
    """
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): keep the defaults
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


class _DeferredModule(types.ModuleType):
    """Stands in for a module until one of its attributes is used, then loads it."""

    def __getattr__(self, attribute: str) -> Any:  # only for attributes not set here
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)  # later uses through this object go straight on
        return getattr(real, attribute)


def defer_import(name: str, answers: dict[str, Any] | None = None) -> bool:
    """Make ``import name`` cheap: the module loads when one of its attributes is first used.

    For modules a dependency imports but a run does not use (start-up time and
    memory on small devices). ``importlib.util.LazyLoader`` does not do it: the
    ``import`` statement reads ``__spec__``, which loads a lazy module at once.
    ``answers``: attributes the stand-in has without loading the module, each
    doing exactly what the module's own does (``platform.system``, which ``uuid``
    calls at import): any other attribute loads the module, whose own then replace
    them. False if already imported or not found.
    """
    if name in sys.modules:
        return False
    spec = importlib.util.find_spec(name)
    if spec is None:
        return False
    stand_in = _DeferredModule(name)
    stand_in.__spec__ = spec
    stand_in.__dict__.update(answers or {})
    parent, _, child = name.rpartition(".")
    sys.modules[name] = stand_in
    if parent:
        setattr(sys.modules[parent], child, stand_in)
    return True


# Set by the ``localproxy`` entry point (``localproxy/__main__.py``) when it paused the
# cyclic collector for start-up's imports; :func:`resume_collector` undoes it once.
collector_paused = False


def resume_collector() -> None:
    """Run the cyclic collector again if the entry point paused it (else nothing).

    The objects start-up made (modules, classes) are frozen first: they live as long
    as the process, and later full collections need not walk them again.
    """
    global collector_paused
    if collector_paused:
        collector_paused = False
        gc.freeze()
        gc.enable()


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory :envvar:`LOCALPROXY_EVENT_LOOP` asks for (None: asyncio's own loop).

    uvloop is an extra (``localproxy[uvloop]``): it moves bulk data with less CPU,
    but costs ~2 MiB and ~4 ms at start, which a device's idle proxy behind the
    service's 800 kB/s limit does not win back. "auto" (the default) uses it when
    installed; "asyncio" never; "uvloop" insists.
    """
    choice = os.environ.get(EVENT_LOOP_VARIABLE, "auto").strip().lower() or "auto"
    if choice not in EVENT_LOOPS:
        raise UsageError(f"{EVENT_LOOP_VARIABLE}={choice!r}: expected one of {', '.join(EVENT_LOOPS)}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # not installed (a plain install), or not on this platform
        if choice == "uvloop":
            raise MissingExtraError(
                f"{EVENT_LOOP_VARIABLE}=uvloop, but uvloop is not installed: pip install 'localproxy[uvloop]'"
            ) from None
        return None
    return uvloop.new_event_loop


def run_program(coroutine: Coroutine[Any, Any, T], *, tune_memory: bool = True) -> T:
    """Run a program's main coroutine on the loop :func:`event_loop_factory` picks.

    ``tune_memory``: :func:`tune_allocator` first (False: the program calls it when
    data starts to flow, so that an idle process does not load ``ctypes`` for it).
    """
    try:
        loop_factory = event_loop_factory()
    except BaseException:
        coroutine.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    if tune_memory:
        tune_allocator()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coroutine)


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Set ``stop`` on SIGINT/SIGTERM while inside; handlers removed on the way out."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, Windows
            pass
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
