"""Stop signals (SIGINT, SIGTERM, ...) caught as a request, whatever signal mask the process inherited.

A process inherits its parent's blocked-signal mask across fork and exec, and Python's `signal.signal`
installs a handler without touching that mask: under a harness that blocks SIGTERM a handler never ran,
`kill PID` did nothing, and a node whose supervisor was SIGKILLed kept its parent-death SIGTERM pending
for ever. `catch` installs the handlers and unblocks their signals; `catch_into` turns them into a
`threading.Event` without taking a lock in the handler.
"""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Handler = Callable[[int, Any], Any]


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def unblock(signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
    """Unblock `signals` in this thread, so Ctrl-C and `kill` reach the program (their default action or
    its handler) even where its parent blocked them."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, tuple(signals))


def catch(signals: Iterable[signal.Signals], handler: Handler) -> dict[signal.Signals, Any]:
    """Install `handler` for each of `signals` and unblock them in this thread (call it from the main thread
    before starting others: new threads inherit the mask); returns the previous handlers for `restore`.
    The signals stay unblocked after `restore`: a program that handles a stop request wants to hear one."""
    signals = tuple(signals)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    unblock(signals)
    return previous


@dataclass
class Caught:
    """What `catch_into` replaced: the previous handlers, and the queue its watcher thread reads."""

    handlers: dict[signal.Signals, Any]
    inbox: queue.SimpleQueue[int | None]


def catch_into(signals: Iterable[signal.Signals], event: threading.Event) -> Caught:
    """Set `event` when one of `signals` arrives, as `catch` installs them; `restore` undoes it.

    The handler only puts the signal on a `queue.SimpleQueue`, whose `put` is documented safe in a signal
    handler: `Event.set()` takes the event's (non-reentrant) lock, and a handler runs in the main thread
    between two bytecodes, possibly while that thread holds the same lock (inside `event.wait()`, or inside
    the handler of a first signal when a second arrives: a node gets the parent-death SIGTERM once per
    thread of its dying supervisor). It then waited for itself for ever (a node left running after
    `vg-ros up` was SIGKILLed, now and then). A watcher thread, blocked on the queue, sets the event."""
    signals_queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()

    def watch() -> None:
        if signals_queue.get() is not None:   # None: `restore` ended the watch
            event.set()
    handlers = catch(signals, lambda signum, frame: signals_queue.put(signum))
    threading.Thread(target=watch, name="stop-signal-watch", daemon=True).start()
    return Caught(handlers, signals_queue)


def restore(previous: dict[signal.Signals, Any] | Caught) -> None:
    """Put back the handlers `catch` (or `catch_into`) replaced; end `catch_into`'s watcher."""
    if isinstance(previous, Caught):
        previous.inbox.put(None)
        previous = previous.handlers
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class StopRequest:
    """SIGINT / SIGTERM turned into a request a training loop polls (it then saves what it has and ends
    cleanly) instead of killing the process mid-step; `with StopRequest() as stop:` installs the handlers,
    `stop()` says whether a signal came, leaving restores the previous handlers."""

    SIGNALS = STOP_SIGNALS

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        self._previous = catch(self.SIGNALS, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        restore(self._previous)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __call__(self) -> bool:
        return self.signal is not None
