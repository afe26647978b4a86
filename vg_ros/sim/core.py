"""`simulate(...)`: the simulator's training-sample API. One `SimFrame` per LiDAR tick with sensor data and
ground truth (images, depth, semantics, instances, LiDAR with labels, occupancy with masks, expressions)."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from vg_ros.sim.language import make_expressions
from vg_ros.sim.render import Renderer
from vg_ros.sim.world import World, make_world
from vg_ros.types import Expression, GridSpec, LidarScan, Rig

EPOCH_NS = 1_700_000_000 * 1_000_000_000   # stamp of t = 0


@dataclass
class SimFrame:
    """One tick. Images (H, W, 3) uint8 RGB, depth (H, W) float32 z-depth (inf: no hit), semantic (H, W)
    uint8 (17 = sky), instance (H, W) int32 (0 = stuff) — all keyed by camera name in rig order. LiDAR in its
    own frame with per-point `lidar_labels` (N,) uint8 and `lidar_instance` (N,) int32. `occupancy`,
    `mask_camera`, `mask_lidar` (X, Y, Z) in base_link on `grid`. Disabled outputs are empty dicts / None."""

    stamp_ns: int
    rig: Rig
    T_odom_base: np.ndarray
    images: dict[str, np.ndarray] = field(default_factory=dict)
    depth: dict[str, np.ndarray] = field(default_factory=dict)
    semantic: dict[str, np.ndarray] = field(default_factory=dict)
    instance: dict[str, np.ndarray] = field(default_factory=dict)
    lidar: LidarScan | None = None
    lidar_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    lidar_instance: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    occupancy: np.ndarray | None = None
    mask_camera: np.ndarray | None = None
    mask_lidar: np.ndarray | None = None
    expressions: list[Expression] = field(default_factory=list)
    grid: GridSpec = field(default_factory=GridSpec)
    t: float = 0.0        # seconds since the world's start
    tick: int = 0         # LiDAR tick index since the world's start


def _check_args(seed, seconds, start_s, every, expressions) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: must be a non-negative int, got {seed!r}")
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"seconds: must be a finite number >= 0, got {seconds!r}")
    if not (isinstance(start_s, (int, float)) and math.isfinite(start_s) and start_s >= 0):
        raise ValueError(f"start_s: must be a finite number >= 0, got {start_s!r}")
    if not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"every: must be an int >= 1, got {every!r}")
    if not isinstance(expressions, (int, np.integer)) or expressions < 0:
        raise ValueError(f"expressions: must be an int >= 0, got {expressions!r}")


_RENDERERS: dict = {}


def _rig_key(rig: Rig) -> tuple:
    """What the renderer depends on in a rig, hashable (so a re-loaded identical rig hits the cache)."""
    li = rig.lidar
    cams = tuple((c.name, c.width, c.height, np.asarray(c.K, np.float64).tobytes(),
                  np.asarray(c.T_base_cam, np.float64).tobytes()) for c in rig.cameras)
    return cams + ((li.frame_id, li.beams, tuple(li.vfov_deg), li.points_per_ring, li.min_range, li.max_range,
                    li.rate_hz, li.range_noise_std, np.asarray(li.T_base_lidar, np.float64).tobytes()),)


def get_renderer(seed: int, rig: Rig, grid: GridSpec | None = None) -> tuple[World, Renderer]:
    """World and renderer for (seed, rig), cached (the last few) so repeated `simulate` calls are cheap."""
    grid = grid or GridSpec()
    key = (int(seed), _rig_key(rig), tuple(grid.lower), tuple(grid.upper), float(grid.voxel_size))
    if key not in _RENDERERS:
        if len(_RENDERERS) >= 2:
            _RENDERERS.pop(next(iter(_RENDERERS)))
        world = make_world(int(seed))
        _RENDERERS[key] = (world, Renderer(world, rig, grid))
    return _RENDERERS[key]


def simulate(seed: int, seconds: float, rig: Rig | None = None, *, start_s: float = 0.0, every: int = 1,
             cameras: bool = True, lidar: bool = True, occupancy: bool = True, expressions: int = 3,
             grid: GridSpec | None = None, lidar_motion: bool = False) -> Iterator[SimFrame]:
    """Drive through `make_world(seed)` for `seconds` from `start_s`, yielding every `every`-th LiDAR tick
    (10 Hz with the default rig). `rig` None -> Rig.load("default"). Turn off `cameras`, `lidar` or
    `occupancy` to skip that work; `expressions` is the most referring expressions per frame (needs cameras);
    `lidar_motion` distorts each sweep by the vehicle's motion during it (`render.Renderer.render`).
    Deterministic: the same arguments give identical arrays."""
    _check_args(seed, seconds, start_s, every, expressions)
    rig = rig if rig is not None else Rig.load("default")
    world, renderer = get_renderer(seed, rig, grid)
    rate = rig.lidar.rate_hz
    first = int(math.ceil(start_s * rate - 1e-9))
    n = int(math.floor(seconds * rate + 1e-9))
    for tick in range(first, first + n, every):
        t = tick / rate
        T_odom_base, out = renderer.render(t, tick, cameras=cameras, lidar=lidar, occupancy=occupancy,
                                           lidar_motion=lidar_motion)
        stamp = EPOCH_NS + int(round(t * 1e9))
        if out.lidar is not None:
            out.lidar.stamp_ns = stamp
        frame = SimFrame(stamp, rig, T_odom_base, out.images, out.depth, out.semantic, out.instance, out.lidar,
                         out.lidar_labels, out.lidar_instance, out.occupancy, out.mask_camera, out.mask_lidar,
                         grid=renderer.grid, t=t, tick=tick)
        if cameras and expressions:
            rng = np.random.default_rng([int(seed), tick, 3])
            names = [c.name for c in rig.cameras]
            for k in rng.permutation(len(names)):
                if len(frame.expressions) >= expressions:
                    break
                name = names[int(k)]
                frame.expressions += make_expressions(world, name, out.instance[name], out.depth[name], rng,
                                                      min(1, expressions - len(frame.expressions)), stamp)
            if len(frame.expressions) < expressions:  # a second pass lets busy cameras contribute more
                for k in rng.permutation(len(names)):
                    if len(frame.expressions) >= expressions:
                        break
                    name = names[int(k)]
                    have = {e.instance_id for e in frame.expressions if e.camera == name}
                    more = make_expressions(world, name, out.instance[name], out.depth[name], rng,
                                            expressions - len(frame.expressions) + len(have), stamp)
                    frame.expressions += [e for e in more if e.instance_id not in have][:expressions - len(frame.expressions)]
        yield frame
