"""A real Ctrl-C at a chosen moment of a training run, for the tests of the trainings' stop handling."""
from __future__ import annotations

import os
import signal
from typing import Any, Callable


def sigint_on_call(fn: Callable[..., Any], call: int) -> Callable[..., Any]:
    """`fn`, sending this process a real SIGINT as its `call`-th call starts (1 = the first)."""
    calls = {"n": 0}

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGINT)
        return fn(*args, **kwargs)
    return wrapped
