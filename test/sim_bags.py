"""Short simulated drives shared by the bring-up tests (replay, e2e): each (seed, seconds) is simulated
once per pytest session into a temporary folder, so the several tests that need one pay once."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

_ROOT = Path(tempfile.mkdtemp(prefix="vg_ros_sim_bags_"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def sim_bag(seed: int, seconds: float) -> Path:
    """An mcap rosbag2 of `seconds` of world `seed` (default rig, commands about CAM_FRONT)."""
    from vg_ros.sim.cli import write_bag
    out = _ROOT / f"sim_{seed}_{seconds:g}.mcap"
    write_bag(out, seed, seconds, lidar_labels=False)
    return out
