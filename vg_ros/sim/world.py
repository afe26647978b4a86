"""The procedural world of the simulator: a seeded road-grid town with stuff (road, sidewalk, terrain,
parking lots, buildings, trees) and things (vehicles, pedestrians, cyclists, cones, barriers, poles), an ego
path and moving agents. Pure numpy; `vg_ros.sim.render` turns it into sensor data.

Frames: `odom` (= world) is z-up with the ground at z = 0. Every object is upright (yaw only), so an
object's pose at time t is (x, y, yaw). Parts (boxes, vertical cylinders/cones, spheres) are given in the
object frame (x forward, y left, z up, origin on the ground at the object's centre).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from vg_ros.types import OCC_CLASSES

CLS = {name: i for i, name in enumerate(OCC_CLASSES)}

# Saturated, well separated colours so that colour words are learnable (CLEVR-like).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 30), "green": (30, 165, 50), "blue": (35, 70, 215), "yellow": (240, 220, 20),
    "white": (235, 235, 235), "black": (28, 28, 30), "gray": (125, 125, 128), "orange": (255, 110, 0),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

# Stuff colours (not named in language).
STUFF_RGB = {
    "road": (70, 70, 75), "sidewalk": (165, 160, 150), "terrain": (95, 140, 60), "other_flat": (120, 110, 100),
    "building": (180, 160, 140), "trunk": (90, 65, 40), "crown": (50, 120, 45), "skin": (225, 180, 150),
    "tyre": (20, 20, 20),
}

# Kinds of named (referable) objects and their Occ3D class.
KIND_CLASS = {
    "car": CLS["car"], "truck": CLS["truck"], "bus": CLS["bus"], "pedestrian": CLS["pedestrian"],
    "cyclist": CLS["bicycle"], "cone": CLS["traffic_cone"], "barrier": CLS["barrier"], "pole": CLS["manmade"],
    "building": CLS["manmade"], "tree": CLS["vegetation"],
}
REFERABLE_KINDS = ("car", "truck", "bus", "pedestrian", "cyclist", "cone", "barrier", "pole")

ROAD_HALF_WIDTH = 4.0   # two 4 m lanes
LANE_OFFSET = 2.0       # lane centre from the road centre line
SIDEWALK_WIDTH = 3.0
CURB_HEIGHT = 0.15
CORNER_RADIUS = 8.0     # loop corner radius on the road centre line


@dataclass
class Part:
    """One primitive of an object, in the object frame. `shape` 'box': `center` (3,), `half` (3,) half
    extents; 'cyl': vertical frustum, `center` = bottom centre (3,), `half` = (r_bottom, r_top, height);
    'sphere': `center` (3,), `half` = (r, r, r). `rgb` (3,) uint8; `class_id` Occ3D class."""

    shape: str
    center: np.ndarray
    half: np.ndarray
    rgb: tuple[int, int, int]
    class_id: int


@dataclass
class Motion:
    """How an object moves. kind 'static'; 'loop' (along a rounded-rectangle path: `half_size`,
    `radius`, `s0` arc length at t=0, `speed` m/s, negative = clockwise); 'shuttle' (back and forth between
    `a` and `b` (2,) at `speed`, phase `s0` metres)."""

    kind: str = "static"
    half_size: float = 0.0
    radius: float = 0.0
    s0: float = 0.0
    speed: float = 0.0
    a: np.ndarray | None = None
    b: np.ndarray | None = None


@dataclass
class SimObject:
    """An object of the world. `instance_id` > 0 for referable things (0 for buildings and trees, which are
    stuff); `kind` e.g. 'car'; `colour` one of COLOUR_NAMES ('' for stuff); `size` 'small' | 'large';
    `pose` (x, y, yaw) at t = 0; `dimensions` (length, width, height) metres; `parts` its primitives."""

    index: int
    kind: str
    class_id: int
    instance_id: int
    colour: str
    size: str
    pose: tuple[float, float, float]
    dimensions: tuple[float, float, float]
    parts: list[Part]
    motion: Motion = field(default_factory=Motion)
    radius: float = 0.0  # bounding radius in xy about the origin, for culling

    @property
    def moving(self) -> bool:
        return self.motion.kind != "static"

    def pose_at(self, t: float) -> tuple[float, float, float]:
        """(x, y, yaw) in odom at time t seconds."""
        m = self.motion
        if m.kind == "static":
            return self.pose
        if m.kind == "loop":
            s = m.s0 + m.speed * t
            x, y, yaw = loop_pose(s, m.half_size, m.radius)
            return x, y, yaw if m.speed >= 0 else yaw + math.pi
        if m.kind == "shuttle":
            a, b = m.a, m.b
            length = float(np.linalg.norm(b - a))
            if length < 1e-6:
                return float(a[0]), float(a[1]), self.pose[2]
            u = (m.s0 + abs(m.speed) * t) % (2 * length)
            forward = u <= length
            d = u if forward else 2 * length - u
            p = a + (b - a) * (d / length)
            yaw = math.atan2(*(b - a)[::-1]) if forward else math.atan2(*(a - b)[::-1])
            return float(p[0]), float(p[1]), yaw
        raise ValueError(f"motion.kind: unknown {m.kind!r}")

    def T_world_obj(self, t: float) -> np.ndarray:
        x, y, yaw = self.pose_at(t)
        c, s = math.cos(yaw), math.sin(yaw)
        T = np.eye(4)
        T[:2, :2] = [[c, -s], [s, c]]
        T[0, 3], T[1, 3] = x, y
        return T


@dataclass
class GroundLayout:
    """The ground as a grid of axis-aligned cells: `xs` (nx+1,), `ys` (ny+1,) breakpoints in odom;
    `cls` (nx, ny) Occ3D class of each cell; `raised` (nx, ny) bool, sidewalk cells (top at CURB_HEIGHT)."""

    xs: np.ndarray
    ys: np.ndarray
    cls: np.ndarray
    raised: np.ndarray
    road_x: list[float]   # centre lines of roads running along y (x = const)
    road_y: list[float]   # centre lines of roads running along x (y = const)

    def class_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Ground class at odom points (N,) x, y; FREE (17) outside the world."""
        ix = np.searchsorted(self.xs, x, side="right") - 1
        iy = np.searchsorted(self.ys, y, side="right") - 1
        inside = (ix >= 0) & (ix < len(self.xs) - 1) & (iy >= 0) & (iy < len(self.ys) - 1)
        out = np.full(np.shape(x), 17, dtype=np.uint8)
        out[inside] = self.cls[ix[inside], iy[inside]]
        return out


@dataclass
class World:
    """A seeded scene. `objects` all objects (static and moving); `ground` the road grid; `half_extent`
    the world spans [-half_extent, half_extent]^2; ego path: rounded rectangle (`ego_half_size`,
    `ego_radius`) driven counter-clockwise with speed `ego_speed(t)`."""

    seed: int
    objects: list[SimObject]
    ground: GroundLayout
    half_extent: float
    loop_half: float
    ego_half_size: float
    ego_radius: float
    ego_s0: float
    ego_v_mean: float
    ego_v_amp: float
    ego_v_period: float
    ego_v_phase: float

    def ego_speed(self, t: float) -> float:
        return self.ego_v_mean + self.ego_v_amp * math.sin(2 * math.pi * t / self.ego_v_period + self.ego_v_phase)

    def ego_arclength(self, t: float) -> float:
        w = 2 * math.pi / self.ego_v_period
        return (self.ego_s0 + self.ego_v_mean * t
                - self.ego_v_amp / w * (math.cos(w * t + self.ego_v_phase) - math.cos(self.ego_v_phase)))

    def T_odom_base(self, t: float) -> np.ndarray:
        """Ego pose (4, 4) at time t: base_link on the ground, x forward."""
        x, y, yaw = loop_pose(self.ego_arclength(t), self.ego_half_size, self.ego_radius)
        c, s = math.cos(yaw), math.sin(yaw)
        T = np.eye(4)
        T[:2, :2] = [[c, -s], [s, c]]
        T[0, 3], T[1, 3] = x, y
        return T

    def object_by_instance(self, instance_id: int) -> SimObject:
        for obj in self.objects:
            if obj.instance_id == instance_id:
                return obj
        raise KeyError(f"no object with instance_id {instance_id}")


def loop_length(half_size: float, radius: float) -> float:
    return 8 * (half_size - radius) + 2 * math.pi * radius


def loop_pose(s: float, half_size: float, radius: float) -> tuple[float, float, float]:
    """(x, y, yaw) at arc length s on a counter-clockwise rounded rectangle centred at the origin. s = 0 is
    the middle of the +x side, heading +y."""
    straight = 2 * (half_size - radius)
    arc = 0.5 * math.pi * radius
    side = straight + arc
    s = s % (4 * side)
    k = int(s // side)
    u = s - k * side
    # Side k in a frame rotated by k * 90 degrees: start at (H, 0) heading +y, straight for half, arc, straight half.
    half_straight = straight / 2
    if u < half_straight:
        x, y, yaw = half_size, u, math.pi / 2
    elif u < half_straight + arc:
        a = (u - half_straight) / radius
        cx, cy = half_size - radius, half_size - radius
        x, y, yaw = cx + radius * math.cos(a), cy + radius * math.sin(a), math.pi / 2 + a
    else:
        x, y, yaw = half_size - radius - (u - half_straight - arc), half_size, math.pi
    ang = k * math.pi / 2
    c, sn = math.cos(ang), math.sin(ang)
    return c * x - sn * y, sn * x + c * y, yaw + ang


# ----------------------------------------------------------------------------------------------------------
# object templates


def _box(center, size, rgb, cls) -> Part:
    return Part("box", np.asarray(center, float), np.asarray(size, float) / 2, tuple(rgb), cls)


def _cyl(bottom, r0, r1, h, rgb, cls) -> Part:
    return Part("cyl", np.asarray(bottom, float), np.array([r0, r1, h], float), tuple(rgb), cls)


def _sphere(center, r, rgb, cls) -> Part:
    return Part("sphere", np.asarray(center, float), np.array([r, r, r], float), tuple(rgb), cls)


def make_parts(kind: str, colour: str, size: str) -> tuple[list[Part], tuple]:
    """Primitives and (length, width, height) for a referable kind."""
    rgb = COLOURS[colour]
    big = size == "large"
    c = KIND_CLASS[kind]
    if kind == "car":
        L, W, H = (4.9, 2.0, 1.65) if big else (3.9, 1.7, 1.45)
        parts = [_box((0, 0, (0.25 + 0.55 * H) / 2), (L, W, 0.55 * H - 0.25), rgb, c)]   # body above 0.25 m clearance
        parts.append(_box((-0.1 * L, 0, 0.55 * H + 0.45 * H / 2), (0.55 * L, 0.9 * W, 0.45 * H), rgb, c))
        for sx in (-0.3 * L, 0.3 * L):
            for sy in (-0.42 * W, 0.42 * W):
                parts.append(_box((sx, sy, 0.17), (0.6, 0.22, 0.34), STUFF_RGB["tyre"], c))
    elif kind == "truck":
        L, W, H = (9.0, 2.5, 3.6) if big else (6.5, 2.3, 3.0)
        cab = 1.9
        # The cargo box is the truck's colour too, so the colour word describes most of its pixels.
        parts = [_box((L / 2 - cab / 2, 0, (0.4 + H * 0.8) / 2), (cab, W, H * 0.8 - 0.4), rgb, c),
                 _box((-cab / 2, 0, (0.6 + H) / 2), (L - cab - 0.2, W, H - 0.6), rgb, c),
                 _box((0, 0, 0.25), (L, W * 0.9, 0.5), STUFF_RGB["tyre"], c)]
    elif kind == "bus":
        L, W, H = (12.0, 2.55, 3.3) if big else (9.5, 2.45, 3.1)
        parts = [_box((0, 0, (0.35 + H) / 2), (L, W, H - 0.35), rgb, c),
                 _box((0, 0, 0.18), (L * 0.9, W * 0.9, 0.36), STUFF_RGB["tyre"], c)]
    elif kind == "pedestrian":
        h = 1.85 if big else 1.6
        L, W, H = 0.5, 0.6, h
        parts = [_box((0, 0, 0.45 * h / 2), (0.3, 0.4, 0.45 * h), rgb, c),
                 _box((0, 0, 0.45 * h + 0.38 * h / 2), (0.32, 0.5, 0.38 * h), rgb, c),
                 _sphere((0, 0, 0.83 * h + 0.085 * h), 0.085 * h + 0.02, STUFF_RGB["skin"], c)]
    elif kind == "cyclist":
        h = 1.8 if big else 1.6
        L, W, H = 1.8, 0.6, h
        parts = [_box((0, 0, 0.35), (1.7, 0.08, 0.7), (30, 30, 30), c),              # bicycle frame + wheels
                 _box((-0.1, 0, 0.75 + 0.25), (0.35, 0.42, 0.5), rgb, c),              # legs / hips
                 _box((0.05, 0, 1.0 + 0.3 * h / 1.6), (0.4, 0.48, 0.6 * h / 1.6), rgb, c),  # torso
                 _sphere((0.12, 0, 1.0 + 0.6 * h / 1.6 + 0.14), 0.14, STUFF_RGB["skin"], c)]
    elif kind == "cone":
        h = 0.9 if big else 0.6
        L, W, H = 0.45, 0.45, h
        parts = [_box((0, 0, 0.03), (0.42, 0.42, 0.06), rgb, c), _cyl((0, 0, 0.06), 0.18, 0.04, h - 0.06, rgb, c)]
    elif kind == "barrier":
        L, W, H = (2.5, 0.5, 1.1) if big else (1.6, 0.4, 0.85)
        parts = [_box((0, 0, H / 2), (L, W, H), rgb, c)]
    elif kind == "pole":
        h = 8.0 if big else 5.0
        L, W, H = 0.3, 0.3, h
        parts = [_cyl((0, 0, 0), 0.15, 0.1, h, rgb, c)]
        if big:
            parts.append(_box((0.8, 0, h - 0.1), (1.6, 0.25, 0.2), rgb, c))
    else:
        raise ValueError(f"kind: unknown {kind!r}")
    return parts, (L, W, H)


def _bounding_radius(parts: list[Part]) -> float:
    r = 0.0
    for p in parts:
        if p.shape == "box":
            r = max(r, math.hypot(abs(p.center[0]) + p.half[0], abs(p.center[1]) + p.half[1]))
        else:
            r = max(r, math.hypot(p.center[0], p.center[1]) + max(p.half[0], p.half[1]))
    return r


# ----------------------------------------------------------------------------------------------------------
# world generation


def _bands(centres: list[float], W: float) -> np.ndarray:
    edges = {-W, W}
    for cx in centres:
        for d in (-ROAD_HALF_WIDTH - SIDEWALK_WIDTH, -ROAD_HALF_WIDTH, ROAD_HALF_WIDTH, ROAD_HALF_WIDTH + SIDEWALK_WIDTH):
            edges.add(round(cx + d, 3))
    return np.array(sorted(edges))


def _band_kind(lo: float, hi: float, centres: list[float]) -> str:
    mid = (lo + hi) / 2
    for cx in centres:
        if abs(mid - cx) < ROAD_HALF_WIDTH:
            return "road"
    for cx in centres:
        if abs(mid - cx) < ROAD_HALF_WIDTH + SIDEWALK_WIDTH:
            return "sidewalk"
    return "block"


class _Builder:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.objects: list[SimObject] = []
        self.next_instance = 1
        self.footprints: list[tuple[float, float, float]] = []  # (x, y, r) of placed static things

    def free(self, x: float, y: float, r: float) -> bool:
        for fx, fy, fr in self.footprints:
            if (x - fx) ** 2 + (y - fy) ** 2 < (r + fr) ** 2:
                return False
        return True

    def colour(self, weights: dict[str, float] | None = None) -> str:
        names = list(COLOUR_NAMES)
        p = np.array([(weights or {}).get(n, 1.0) for n in names])
        return names[int(self.rng.choice(len(names), p=p / p.sum()))]

    def add(self, kind: str, x: float, y: float, yaw: float, *, colour: str | None = None, size: str | None = None,
            motion: Motion | None = None, check: bool = True) -> SimObject | None:
        size = size or ("large" if self.rng.random() < 0.5 else "small")
        colour = colour or self.colour()
        parts, dims = make_parts(kind, colour, size)
        radius = _bounding_radius(parts)
        if check and motion is None:
            if not self.free(x, y, radius * 0.9):
                return None
            self.footprints.append((x, y, radius * 0.9))
        obj = SimObject(len(self.objects), kind, KIND_CLASS[kind], self.next_instance, colour, size,
                        (float(x), float(y), float(yaw)), dims, parts, motion or Motion(), radius)
        self.next_instance += 1
        self.objects.append(obj)
        return obj

    def add_stuff(self, kind: str, x: float, y: float, yaw: float, parts: list[Part], dims) -> SimObject:
        radius = _bounding_radius(parts)
        self.footprints.append((x, y, radius * 0.8))
        obj = SimObject(len(self.objects), kind, KIND_CLASS[kind], 0, "", "large", (float(x), float(y), float(yaw)),
                        dims, parts, Motion(), radius)
        self.objects.append(obj)
        return obj


def make_world(seed: int) -> World:
    """A deterministic procedural scene for `seed` (any int >= 0)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: must be a non-negative int, got {seed!r}")
    rng = np.random.default_rng([int(seed), 4242])
    L = float(rng.uniform(42.0, 58.0))          # loop roads at x, y = +-L
    W = L + 58.0                                # world half extent
    road_x = [-L, L]
    road_y = [-L, L]
    if rng.random() < 0.7:                      # a middle cross road in one direction
        m = float(rng.uniform(-0.25 * L, 0.25 * L))
        (road_x if rng.random() < 0.5 else road_y).append(m)
    road_x.sort()
    road_y.sort()
    xs, ys = _bands(road_x, W), _bands(road_y, W)
    kx = [_band_kind(xs[i], xs[i + 1], road_x) for i in range(len(xs) - 1)]
    ky = [_band_kind(ys[j], ys[j + 1], road_y) for j in range(len(ys) - 1)]
    cls = np.zeros((len(kx), len(ky)), np.uint8)
    raised = np.zeros_like(cls, dtype=bool)
    for i, a in enumerate(kx):
        for j, b in enumerate(ky):
            if "road" in (a, b):
                cls[i, j] = CLS["driveable_surface"]
            elif "sidewalk" in (a, b):
                cls[i, j] = CLS["sidewalk"]
                raised[i, j] = True
            else:
                cls[i, j] = CLS["terrain"] if rng.random() < 0.6 else CLS["other_flat"]
    ground = GroundLayout(xs, ys, cls, raised, road_x, road_y)
    b = _Builder(rng)

    # --- block contents: buildings and trees on terrain, parking rows on other_flat
    for i, a in enumerate(kx):
        for j, bb in enumerate(ky):
            if a != "block" or bb != "block":
                continue
            x0, x1, y0, y1 = xs[i], xs[i + 1], ys[j], ys[j + 1]
            if cls[i, j] == CLS["terrain"]:
                _fill_terrain_block(b, x0, x1, y0, y1)
            else:
                _fill_parking_block(b, x0, x1, y0, y1)

    # --- sidewalks: poles, pedestrians, cones, barriers, cyclists
    for along_x, centres, crossing in ((False, road_x, road_y), (True, road_y, road_x)):
        for c in centres:
            for side in (-1.0, 1.0):
                _fill_sidewalk(b, c, side, along_x, W, crossing)

    # --- parked vehicles on road stretches the ego never drives (outside the loop, on the middle road)
    for along_x, centres in ((False, road_x), (True, road_y)):
        for c in centres:
            _park_on_road(b, c, along_x, L, W)

    # --- moving traffic on the inner (oncoming) lane of the loop, all at one speed so they never collide
    inner_half, inner_r = L - LANE_OFFSET, CORNER_RADIUS - LANE_OFFSET
    n_cars = int(rng.integers(3, 7))
    speed = float(rng.uniform(5.0, 9.0))
    perim = loop_length(inner_half, inner_r)
    offsets = np.sort(rng.uniform(0, perim, n_cars))
    for k, s0 in enumerate(offsets):
        if k and s0 - offsets[k - 1] < 14.0:
            continue
        kind = str(rng.choice(["car", "car", "car", "truck", "bus"]))
        b.add(kind, 0, 0, 0, motion=Motion("loop", inner_half, inner_r, float(s0), -speed))

    ego_half, ego_r = L + LANE_OFFSET, CORNER_RADIUS + LANE_OFFSET
    world = World(
        seed=int(seed), objects=b.objects, ground=ground, half_extent=W, loop_half=L,
        ego_half_size=ego_half, ego_radius=ego_r, ego_s0=float(rng.uniform(0, loop_length(ego_half, ego_r))),
        ego_v_mean=float(rng.uniform(7.5, 10.0)), ego_v_amp=float(rng.uniform(2.0, 4.0)),
        ego_v_period=float(rng.uniform(12.0, 25.0)), ego_v_phase=float(rng.uniform(0, 2 * math.pi)))
    # Poses of moving objects at t=0 are informative only.
    for obj in world.objects:
        if obj.moving:
            obj.pose = obj.pose_at(0.0)
    return world


def _fill_terrain_block(b: _Builder, x0, x1, y0, y1) -> None:
    rng = b.rng
    # trees along the block edges, 1.5 m inside
    for edge in range(4):
        if edge < 2:
            y = y0 + 1.5 if edge == 0 else y1 - 1.5
            n = int((x1 - x0) / rng.uniform(7, 12))
            pts = [(float(x), y) for x in np.linspace(x0 + 3, x1 - 3, max(n, 1))]
        else:
            x = x0 + 1.5 if edge == 2 else x1 - 1.5
            n = int((y1 - y0) / rng.uniform(7, 12))
            pts = [(x, float(y)) for y in np.linspace(y0 + 3, y1 - 3, max(n, 1))]
        for (x, y) in pts:
            if rng.random() < 0.65:
                _add_tree(b, x + rng.uniform(-0.5, 0.5), y + rng.uniform(-0.5, 0.5))
    # buildings inside
    for _ in range(int(rng.integers(2, 5))):
        bl, bw = rng.uniform(8, 22), rng.uniform(8, 18)
        if x1 - x0 < bl + 8 or y1 - y0 < bw + 8:
            continue
        cx, cy = rng.uniform(x0 + 4 + bl / 2, x1 - 4 - bl / 2), rng.uniform(y0 + 4 + bw / 2, y1 - 4 - bw / 2)
        r = math.hypot(bl, bw) / 2
        if not b.free(cx, cy, r):
            continue
        h = float(rng.uniform(5, 16))
        shade = int(rng.integers(-30, 30))
        rgb = tuple(int(np.clip(v + shade, 0, 255)) for v in STUFF_RGB["building"])
        b.add_stuff("building", cx, cy, 0.0, [_box((0, 0, h / 2), (bl, bw, h), rgb, CLS["manmade"])], (bl, bw, h))
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(x0 + 3, x1 - 3), rng.uniform(y0 + 3, y1 - 3)
        if b.free(x, y, 3.0):
            _add_tree(b, x, y)


def _add_tree(b: _Builder, x: float, y: float) -> None:
    rng = b.rng
    if not b.free(x, y, 1.2):
        return
    h = float(rng.uniform(2.0, 3.5))
    r = float(rng.uniform(1.3, 2.4))
    green = tuple(int(np.clip(v + rng.integers(-15, 15), 0, 255)) for v in STUFF_RGB["crown"])
    parts = [_cyl((0, 0, 0), 0.18, 0.14, h + 0.3, STUFF_RGB["trunk"], CLS["vegetation"]),
             _sphere((0, 0, h + r * 0.8), r, green, CLS["vegetation"])]
    b.add_stuff("tree", x, y, 0.0, parts, (2 * r, 2 * r, h + 1.8 * r))


def _fill_parking_block(b: _Builder, x0, x1, y0, y1) -> None:
    rng = b.rng
    along_x = (x1 - x0) >= (y1 - y0)
    rows = np.arange((y0 if along_x else x0) + 5.0, (y1 if along_x else x1) - 4.0, 7.0)
    for r in rows:
        lo, hi = (x0, x1) if along_x else (y0, y1)
        for u in np.arange(lo + 3.5, hi - 3.0, 2.8):
            if rng.random() < 0.45:
                continue
            kind = "car" if rng.random() < 0.9 else "truck"
            yaw = (math.pi / 2 if along_x else 0.0) + (math.pi if rng.random() < 0.5 else 0.0)
            x, y = (u, r) if along_x else (r, u)
            b.add(kind, x, y, yaw)
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(x0 + 2, x1 - 2), rng.uniform(y0 + 2, y1 - 2)
        b.add("cone", x, y, 0.0, colour=b.colour({"orange": 6, "white": 2, "yellow": 2}))
    if rng.random() < 0.5:
        x, y = rng.uniform(x0 + 2, x1 - 2), rng.uniform(y0 + 2, y1 - 2)
        motion = None
        if rng.random() < 0.6:
            a = np.array([x, y])
            d = rng.normal(size=2)
            bpt = np.clip(a + 12 * d / np.linalg.norm(d), [x0 + 1, y0 + 1], [x1 - 1, y1 - 1])
            if np.linalg.norm(bpt - a) > 3:
                motion = Motion("shuttle", a=a, b=bpt, s0=float(rng.uniform(0, 10)), speed=float(rng.uniform(0.8, 1.6)))
        b.add("pedestrian", x, y, float(rng.uniform(-math.pi, math.pi)), motion=motion)


def _fill_sidewalk(b: _Builder, c: float, side: float, along_x: bool, W: float, crossing: list[float]) -> None:
    """Things on the sidewalk on `side` of the road with centre line `c` (road along x if `along_x`), kept
    off the roads that cross it (`crossing` centre lines) so nothing stands or walks where the ego drives."""
    rng = b.rng
    keep_out = ROAD_HALF_WIDTH + 1.5

    def segment_end(u: float) -> float | None:
        """The end of the free stretch containing u, or None when u is on a crossing road."""
        if any(abs(u - x) < keep_out for x in crossing):
            return None
        ahead = [x - keep_out for x in crossing if x - keep_out > u]
        return min(ahead + [W - 2.0])
    curb = c + side * (ROAD_HALF_WIDTH + 0.5)           # just behind the curb
    mid = c + side * (ROAD_HALF_WIDTH + SIDEWALK_WIDTH / 2)

    def xy(u, v):
        return (u, v) if along_x else (v, u)

    road_yaw = 0.0 if along_x else math.pi / 2
    u = -W + rng.uniform(2, 15)
    while u < W - 3:
        r = rng.random()
        end = segment_end(u)
        if end is None:
            u += rng.uniform(5, 16)
            continue
        if r < 0.30:
            b.add("pole", *xy(u, curb), 0.0, colour=b.colour({"gray": 5, "black": 3, "white": 1, "green": 1}))
        elif r < 0.55:
            motion = None
            if rng.random() < 0.5:
                span = float(rng.uniform(8, 25))
                a = np.array(xy(u, mid + rng.uniform(-0.6, 0.6)))
                bpt = np.array(xy(min(u + span, end), float(a[1] if along_x else a[0])))
                motion = Motion("shuttle", a=a, b=bpt, s0=float(rng.uniform(0, span)), speed=float(rng.uniform(0.8, 1.7)))
            b.add("pedestrian", *xy(u, mid + rng.uniform(-0.8, 0.8)), float(rng.uniform(-math.pi, math.pi)), motion=motion)
        elif r < 0.68:
            b.add("cone", *xy(u, curb + side * rng.uniform(-0.1, 0.4)), 0.0,
                  colour=b.colour({"orange": 6, "white": 2, "yellow": 2, "red": 1}))
        elif r < 0.80:
            b.add("barrier", *xy(u, curb + side * 0.3), road_yaw,
                  colour=b.colour({"red": 2, "white": 2, "yellow": 2, "orange": 2, "gray": 1, "blue": 1}))
        elif r < 0.90:
            motion = None
            if rng.random() < 0.5:
                span = float(rng.uniform(15, 35))
                a = np.array(xy(u, mid))
                bpt = np.array(xy(min(u + span, end), mid))
                motion = Motion("shuttle", a=a, b=bpt, s0=float(rng.uniform(0, span)), speed=float(rng.uniform(2.5, 4.5)))
            b.add("cyclist", *xy(u, mid), road_yaw + (math.pi if rng.random() < 0.5 else 0.0), motion=motion)
        u += rng.uniform(5, 16)


def _park_on_road(b: _Builder, c: float, along_x: bool, L: float, W: float) -> None:
    """Parked vehicles on the stretches of road `c` that the ego loop does not use."""
    rng = b.rng
    on_loop = abs(abs(c) - L) < 1e-6
    margin = ROAD_HALF_WIDTH + SIDEWALK_WIDTH + 6.0
    if on_loop:
        spans = [(-W + 3, -L - margin), (L + margin, W - 3)]
    else:
        spans = [(-W + 3, -L - margin), (-L + margin, L - margin), (L + margin, W - 3)]
        # keep clear of any cross road: the middle road crosses only the loop roads at +-L
    for lo, hi in spans:
        for lane in (-1.0, 1.0):
            u = lo + rng.uniform(0, 6)
            while u < hi:
                if rng.random() < 0.55:
                    kind = str(rng.choice(["car"] * 6 + ["truck", "bus", "cyclist"]))
                    yaw = (0.0 if along_x else math.pi / 2) + (0.0 if lane < 0 else math.pi)
                    v = c + lane * (LANE_OFFSET + 0.4)
                    x, y = (u, v) if along_x else (v, u)
                    obj = b.add(kind, x, y, yaw)
                    u += (obj.dimensions[0] if obj else 4.0) + rng.uniform(1.5, 10)
                else:
                    u += rng.uniform(3, 10)
