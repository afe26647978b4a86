"""Shared fixtures: where the real sample data lives, and DDS kept on this machine."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# DDS never leaves the machine, whatever the caller's environment says.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", "42")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
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
