"""Plain data that flows between converters, pipelines and nodes: sensor inputs, the rig, and results.

Nothing here imports rclpy or torch. Arrays are numpy; shapes are given per field. Times are integer
nanoseconds (ROS `builtin_interfaces/Time` as `sec * 10**9 + nanosec`). Poses are 4x4 homogeneous
matrices `T_a_b` that map points expressed in frame b into frame a.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Occ3D-nuScenes / nuScenes-lidarseg classes; index 17 is "free". Metrics score classes 0-16.
OCC_CLASSES: tuple[str, ...] = (
    "others", "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
    "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain",
    "manmade", "vegetation", "free",
)
FREE_CLASS = 17
NUM_OCC_CLASSES = 18

# RGB colours per class, as in the Occ3D visualiser (free is never drawn).
OCC_PALETTE = np.array([
    [0, 0, 0], [255, 120, 50], [255, 192, 203], [255, 255, 0], [0, 150, 245], [0, 255, 255],
    [200, 180, 0], [255, 0, 0], [255, 240, 150], [135, 60, 0], [160, 32, 240], [255, 0, 255],
    [139, 137, 137], [75, 0, 75], [150, 240, 80], [230, 230, 250], [0, 175, 0], [255, 255, 255],
], dtype=np.uint8)


def stamp_to_ns(sec: int, nanosec: int) -> int:
    return int(sec) * 1_000_000_000 + int(nanosec)


def ns_to_stamp(stamp_ns: int) -> tuple[int, int]:
    return int(stamp_ns) // 1_000_000_000, int(stamp_ns) % 1_000_000_000


@dataclass
class GridSpec:
    """An axis-aligned voxel grid in the ego (`base_link`) frame. Default: Occ3D-nuScenes."""

    lower: tuple[float, float, float] = (-40.0, -40.0, -1.0)
    upper: tuple[float, float, float] = (40.0, 40.0, 5.4)
    voxel_size: float = 0.4

    @property
    def shape(self) -> tuple[int, int, int]:
        """(X, Y, Z) voxel counts."""
        extent = np.asarray(self.upper) - np.asarray(self.lower)
        return tuple(int(round(e / self.voxel_size)) for e in extent)  # type: ignore[return-value]


@dataclass
class CameraModel:
    """A camera. `K` (3, 3); `T_base_cam` (4, 4) maps the optical frame (x right, y down, z forward,
    REP 103 `_optical`) into `base_link`; `distortion` the lens coefficients of `distortion_model`
    (CameraInfo's: "plumb_bob", "rational_polynomial", "equidistant"; "" = plumb_bob by count, or none
    when empty), applied after the pinhole projection (`geometry.distort`)."""

    name: str
    width: int
    height: int
    K: np.ndarray
    T_base_cam: np.ndarray
    frame_id: str = ""
    distortion: np.ndarray = field(default_factory=lambda: np.zeros(0))
    distortion_model: str = ""

    def scaled(self, width: int, height: int) -> "CameraModel":
        """The same camera resized to `width` x `height`: intrinsics scale with the image (the distortion,
        in normalised coordinates, does not)."""
        sx, sy = width / self.width, height / self.height
        K = self.K.astype(np.float64).copy()
        K[0, :] *= sx
        K[1, :] *= sy
        return CameraModel(self.name, width, height, K, self.T_base_cam.copy(), self.frame_id, self.distortion,
                           self.distortion_model)

    @property
    def distorted(self) -> bool:
        """Whether the lens maps points off the pinhole (`geometry.has_distortion`: non-zero coefficients,
        or the equidistant fisheye model, which bends rays even with zero coefficients)."""
        from vg_ros.geometry import has_distortion   # geometry imports this module: imported on use
        return has_distortion(self.distortion, self.distortion_model)


@dataclass
class CameraFrame:
    """One image from one camera. `image` (H, W, 3) uint8 RGB."""

    camera: CameraModel
    image: np.ndarray
    stamp_ns: int = 0


@dataclass
class LidarSpec:
    """A spinning LiDAR: `beams` rings spread over `vfov_deg` (min, max), `points_per_ring` azimuth steps."""

    frame_id: str = "lidar"
    beams: int = 32
    vfov_deg: tuple[float, float] = (-30.0, 10.0)
    points_per_ring: int = 1024
    min_range: float = 0.5
    max_range: float = 70.0
    rate_hz: float = 10.0
    range_noise_std: float = 0.02
    T_base_lidar: np.ndarray = field(default_factory=lambda: np.eye(4))


@dataclass
class LidarScan:
    """One LiDAR sweep in the sensor frame. `xyz` (N, 3) float32; optional per-point `intensity` (N,)
    float32, `ring` (N,) uint16, `time` (N,) float32 seconds relative to `stamp_ns`."""

    xyz: np.ndarray
    stamp_ns: int = 0
    frame_id: str = "lidar"
    intensity: np.ndarray | None = None
    ring: np.ndarray | None = None
    time: np.ndarray | None = None


@dataclass
class Rig:
    """The sensor rig: cameras and a LiDAR mounted on `base_link`. Loaded from `config/rig_<name>.yaml`."""

    name: str
    cameras: list[CameraModel]
    lidar: LidarSpec
    camera_rate_hz: float = 10.0

    def camera(self, name: str) -> CameraModel:
        for cam in self.cameras:
            if cam.name == name:
                return cam
        raise KeyError(f"rig {self.name!r} has no camera {name!r} (has {[c.name for c in self.cameras]})")

    @staticmethod
    def config_dir() -> Path:
        """Where rig files live: `config/` of the source tree, else the installed share directory."""
        src = Path(__file__).resolve().parent.parent / "config"
        if src.is_dir():
            return src
        try:  # installed by colcon
            from ament_index_python.packages import get_package_share_directory
            return Path(get_package_share_directory("vg_ros")) / "config"
        except Exception:  # noqa: BLE001 - any failure means "not installed that way"
            return src

    @classmethod
    def available(cls) -> list[str]:
        return sorted(p.stem[len("rig_"):] for p in cls.config_dir().glob("rig_*.yaml"))

    @classmethod
    def load(cls, name_or_path: str | Path = "default") -> "Rig":
        """A rig by name (`config/rig_<name>.yaml`) or by path. Raises ValueError naming what is wrong."""
        from vg_ros.rig import load_rig  # parsing and validation live beside the YAML format
        return load_rig(name_or_path)


@dataclass
class OccupancyResult:
    """Semantic occupancy in `base_link`. `semantics` (X, Y, Z) uint8 class ids (17 free);
    `confidence` (X, Y, Z) float32 in [0, 1]; `observed` (X, Y, Z) bool, voxels some camera sees."""

    stamp_ns: int
    grid: GridSpec
    semantics: np.ndarray
    confidence: np.ndarray
    observed: np.ndarray
    seconds: float = 0.0


@dataclass
class RegistrationResult:
    """`transform` (4, 4) maps source into target. `covariance` (6, 6) over (x, y, z, roll, pitch, yaw)
    in the ROS convention. `converged` is False whenever the result should not be trusted."""

    transform: np.ndarray
    inliers: int
    inlier_ratio: float
    fitness: float
    seconds: float
    converged: bool
    covariance: np.ndarray = field(default_factory=lambda: np.eye(6))
    reason: str = ""


@dataclass
class OdometryResult:
    """`pose` (4, 4) is T_odom_base at `stamp_ns`; `covariance` (6, 6) over base_link's (x, y, z) in odom and
    rotations about odom's axes (nav_msgs/Odometry's pose covariance). `twist` (6,) vx vy vz wx wy wz of
    base_link in base_link since the previous scan, with `twist_covariance` (6, 6); None when unknown (the
    first scan, a re-localisation, a failure)."""

    stamp_ns: int
    pose: np.ndarray
    covariance: np.ndarray
    converged: bool
    seconds: float = 0.0
    reason: str = ""
    twist: np.ndarray | None = None
    twist_covariance: np.ndarray | None = None


@dataclass
class GroundingResult:
    """The target a command refers to in one image. `box` (x0, y0, x1, y1) pixels; `mask` (H, W) bool.
    `found` False means the score (or the presence) is under threshold: box and mask must not be used.
    `presence`: P(the command's referent is in the image) from the weights' presence head; NaN without one."""

    stamp_ns: int
    command: str
    found: bool
    score: float
    box: np.ndarray
    mask: np.ndarray
    seconds: float = 0.0
    position: np.ndarray | None = None  # (3,) target centre in the LiDAR/base frame, when a cloud was given
    presence: float = float("nan")


@dataclass
class Expression:
    """A referring expression about one object seen by `camera`. `box` (x0, y0, x1, y1) pixels;
    `mask` (H, W) bool; `hops` is the number of relations chained (0, 1, 2)."""

    text: str
    camera: str
    instance_id: int
    box: np.ndarray
    mask: np.ndarray
    hops: int
    stamp_ns: int = 0
