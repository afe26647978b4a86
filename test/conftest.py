"""Shared fixtures: where the real sample data lives, and DDS kept on this machine."""
from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# DDS never leaves the machine, whatever the caller's environment says.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", "42")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Ctrl-C raises KeyboardInterrupt here, as in a terminal, even when the suite was started with SIGINT ignored
# (a background job of a non-interactive shell, nohup): the tests that send a real SIGINT mid-run
# (signal_helpers.sigint_on_call) check what a user's Ctrl-C does, which the inherited SIG_IGN swallowed
# (`(./run test &)`: a training run meant to stop trained all its steps).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# The shipped Fast DDS profile (100 ms reliable heartbeats) for every participant of this process, as the
# nodes, `vg-ros play` and the demo use it: Fast DDS reads it once, at the first participant
from vg_ros.ros_compat import use_dds_profiles  # noqa: E402

use_dds_profiles()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a skip with the reason when this checkout has none beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (present in CI; see README)")
    return SHARED_DATA


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture(autouse=True)
def _stop_signal_handlers_restored(request):
    """Every test starts with the stop signals' handlers the session started with. A test that leaves one
    of its own installed (a session object not closed, two restored out of order) would make a later
    test's Ctrl-C land in an abandoned handler: it is put back and named in a warning."""
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in before.items():
        now = signal.getsignal(sig)
        if now is not handler:
            warnings.warn(f"{request.node.nodeid} left {sig.name}'s handler {now!r} (was {handler!r}): restored")
            signal.signal(sig, handler)
