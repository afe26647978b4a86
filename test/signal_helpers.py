"""A real Ctrl-C at a chosen moment of a training run, for the tests of the trainings' stop handling."""
from __future__ import annotations

import signal
from typing import Any, Callable


def sigint_on_call(fn: Callable[..., Any], call: int) -> Callable[..., Any]:
    """`fn`, sending this process a real SIGINT as its `call`-th call starts (1 = the first).

    `signal.raise_signal` sends it to the calling (main) thread and runs the handler before returning. An
    `os.kill` of the process may be taken by any thread that does not block it (torch's, an earlier DDS
    test's); on a loaded machine the handler then ran later, somewhere else in the run, and a Ctrl-C
    meant for the rendering went unanswered (the run trained all its steps)."""
    calls = {"n": 0}

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == call:
            signal.raise_signal(signal.SIGINT)
        return fn(*args, **kwargs)
    return wrapped
