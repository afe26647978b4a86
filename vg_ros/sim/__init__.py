"""The synthetic driving world: seeded scenes, camera + LiDAR rendering by Open3D ray casting, occupancy and
grounding ground truth, referring expressions, and rosbag2 writing (`vg-ros sim`). See docs/sim.md."""
from vg_ros.sim.core import EPOCH_NS, SimFrame, simulate
from vg_ros.sim.world import COLOUR_NAMES, COLOURS, REFERABLE_KINDS, SimObject, World, make_world

__all__ = ["EPOCH_NS", "SimFrame", "simulate", "make_world", "World", "SimObject", "COLOURS", "COLOUR_NAMES",
           "REFERABLE_KINDS"]
