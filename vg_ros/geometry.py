"""SE(3) algebra, pinhole projection and voxelisation shared by the simulator, pipelines and converters.

Conventions: `T_a_b` (4, 4) maps points in frame b into frame a; quaternions are (x, y, z, w) as in
geometry_msgs; camera optical frames are x right, y down, z forward (REP 103 `_optical`).
"""
from __future__ import annotations

import numpy as np

from vg_ros.types import GridSpec

# Rotation taking optical-frame vectors into the camera body frame (x forward, y left, z up).
R_BODY_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def make_T(R: np.ndarray | None = None, t: np.ndarray | None = None) -> np.ndarray:
    """4x4 from rotation (3, 3) and translation (3,)."""
    T = np.eye(4)
    if R is not None:
        T[:3, :3] = R
    if t is not None:
        T[:3, 3] = np.asarray(t, dtype=np.float64).reshape(3)
    return T


def skew(v: np.ndarray) -> np.ndarray:
    """(3, 3) matrix [v]x with [v]x w = v x w."""
    x, y, z = np.asarray(v, dtype=np.float64).reshape(3)
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])


def invert_T(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid transform (4, 4), exact (no general matrix inverse)."""
    R, t = T[:3, :3], T[:3, 3]
    return make_T(R.T, -R.T @ t)


def transform_points(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    """points (N, 3) -> (N, 3) in T's target frame; dtype follows `points`."""
    points = np.asarray(points)
    out = points @ T[:3, :3].T.astype(points.dtype, copy=False) + T[:3, 3].astype(points.dtype, copy=False)
    return out


def rpy_to_R(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Fixed-axis roll (x), pitch (y), yaw (z) in radians: R = Rz(yaw) Ry(pitch) Rx(roll)."""
    cr, sr, cp, sp, cy, sy = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    return np.array([
        [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
        [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
        [-sp, cp * sr, cp * cr],
    ])


def R_to_rpy(R: np.ndarray) -> tuple[float, float, float]:
    pitch = float(np.arcsin(np.clip(-R[2, 0], -1.0, 1.0)))
    roll = float(np.arctan2(R[2, 1], R[2, 2]))
    yaw = float(np.arctan2(R[1, 0], R[0, 0]))
    return roll, pitch, yaw


def quat_to_R(q: np.ndarray) -> np.ndarray:
    """(x, y, z, w) -> (3, 3). The quaternion is normalised; a zero quaternion raises ValueError."""
    x, y, z, w = np.asarray(q, dtype=np.float64)
    n = x * x + y * y + z * z + w * w
    if not np.isfinite(n) or n < 1e-12:
        raise ValueError(f"orientation quaternion {q!r} is zero or not finite")
    s = 2.0 / n
    return np.array([
        [1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)],
        [s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)],
        [s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)],
    ])


def R_to_quat(R: np.ndarray) -> np.ndarray:
    """(3, 3) -> (x, y, z, w) with w >= 0."""
    R = np.asarray(R, dtype=np.float64)
    tr = np.trace(R)
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = np.array([(R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s, 0.25 * s])
    else:
        i = int(np.argmax(np.diag(R)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(max(1.0 + R[i, i] - R[j, j] - R[k, k], 1e-12))
        q = np.zeros(4)
        q[i] = 0.25 * s
        q[j] = (R[j, i] + R[i, j]) / s
        q[k] = (R[k, i] + R[i, k]) / s
        q[3] = (R[k, j] - R[j, k]) / s
    q /= np.linalg.norm(q)
    return q if q[3] >= 0 else -q


def interpolate_T(T0: np.ndarray, T1: np.ndarray, alpha: float) -> np.ndarray:
    """The pose a fraction `alpha` of the way from T0 to T1 (4, 4): positions linearly, the rotation along
    the shortest arc (slerp); alpha outside [0, 1] continues at the same velocity (constant-velocity
    extrapolation)."""
    from scipy.spatial.transform import Rotation

    T0, T1 = np.asarray(T0, dtype=np.float64), np.asarray(T1, dtype=np.float64)
    R_rel = T0[:3, :3].T @ T1[:3, :3]
    out = np.eye(4)
    out[:3, :3] = T0[:3, :3] @ Rotation.from_rotvec(Rotation.from_matrix(R_rel).as_rotvec() * alpha).as_matrix()
    out[:3, 3] = T0[:3, 3] + alpha * (T1[:3, 3] - T0[:3, 3])
    return out


def rotation_angle_deg(R: np.ndarray) -> float:
    """Angle of a rotation matrix in degrees (the RE of registration benchmarks when R = R_est^T R_gt)."""
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0))))


# sensor_msgs/CameraInfo distortion models and their coefficient counts ("" = none, or plumb_bob by count)
DISTORTION_MODELS: dict[str, tuple[int, ...]] = {"": (0, 4, 5, 8), "plumb_bob": (4, 5), "rational_polynomial": (8,),
                                                 "equidistant": (4,)}


def check_distortion(coefficients, model: str) -> np.ndarray:
    """The coefficients (float64) after checking them against `model`; ValueError names what is wrong."""
    D = np.asarray(coefficients, dtype=np.float64).reshape(-1)
    if model not in DISTORTION_MODELS:
        raise ValueError(f"distortion_model {model!r} is not supported (supported: "
                         f"{', '.join(m for m in DISTORTION_MODELS if m)})")
    if D.size not in DISTORTION_MODELS[model]:
        raise ValueError(f"distortion_model {model or 'plumb_bob'!r}: {D.size} coefficients, expected "
                         f"{' or '.join(map(str, DISTORTION_MODELS[model]))}")
    if not np.all(np.isfinite(D)):
        raise ValueError("distortion: coefficients must be finite")
    return D


def has_distortion(coefficients, model: str = "") -> bool:
    """Whether the lens maps points off the pinhole: any non-zero coefficient, or the equidistant (fisheye)
    model, which bends rays (r = theta, not tan theta) even with all coefficients zero."""
    return model == "equidistant" or bool(np.any(np.asarray(coefficients, dtype=np.float64)))


def distort(xy: np.ndarray, coefficients, model: str = "") -> np.ndarray:
    """Normalised image coordinates (N, 2) (x/z, y/z) -> distorted ones, as ROS / OpenCV define them:
    plumb_bob [k1 k2 p1 p2 (k3)], rational_polynomial [k1 k2 p1 p2 k3 k4 k5 k6], equidistant (fisheye)
    [k1 k2 k3 k4]. Without distortion (`has_distortion` false) `xy` is returned as it is."""
    return _distort_checked(np.asarray(xy, dtype=np.float64), check_distortion(coefficients, model), model)


def _distort_checked(xy: np.ndarray, D: np.ndarray, model: str) -> np.ndarray:
    """`distort` with the coefficients `D` already checked (`check_distortion`)."""
    if not has_distortion(D, model):
        return xy
    x, y = xy[:, 0], xy[:, 1]
    r2 = x * x + y * y
    if model == "equidistant":
        r = np.sqrt(r2)
        theta = np.arctan(r)
        t2 = theta * theta
        theta_d = theta * (1 + t2 * (D[0] + t2 * (D[1] + t2 * (D[2] + t2 * D[3]))))
        scale = np.where(r > 1e-12, theta_d / np.maximum(r, 1e-12), 1.0)
        return xy * scale[:, None]
    k = np.zeros(6)
    k[:2] = D[:2]
    if D.size >= 5:
        k[2] = D[4]
    if D.size == 8:
        k[3:] = D[5:8]
    p1, p2 = D[2], D[3]
    radial = (1 + r2 * (k[0] + r2 * (k[1] + r2 * k[2]))) / (1 + r2 * (k[3] + r2 * (k[4] + r2 * k[5])))
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return np.stack([xd, yd], axis=1)


def project_points(K: np.ndarray, T_cam_x: np.ndarray, points: np.ndarray, width: int, height: int,
                   min_depth: float = 0.1, distortion=(), distortion_model: str = ""
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project points (N, 3) given in frame x into a camera: pinhole, then the lens `distortion`
    (`distort`; none by default), so the pixels are those of the raw, unrectified image. With distortion
    a point is only valid where its undistorted projection lies within half an image of the frame, so a
    polynomial model cannot fold a point from far outside the view back into it.

    Returns uv (N, 2) float pixel coordinates (pixel centres at +0.5), depth (N,) along the optical
    axis, and valid (N,) bool: in front of the camera and inside the image.
    """
    cam = transform_points(T_cam_x, np.asarray(points, dtype=np.float64))
    depth = cam[:, 2]
    safe = np.where(depth > min_depth, depth, 1.0)
    normalised = cam[:, :2] / safe[:, None]
    uv = normalised @ K[:2, :2].T + K[:2, 2]
    valid = depth > min_depth
    D = check_distortion(distortion, distortion_model)
    if has_distortion(D, distortion_model):
        valid &= ((uv[:, 0] >= -0.5 * width) & (uv[:, 0] < 1.5 * width)
                  & (uv[:, 1] >= -0.5 * height) & (uv[:, 1] < 1.5 * height))
        uv = _distort_checked(normalised, D, distortion_model) @ K[:2, :2].T + K[:2, 2]
    valid &= (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
    return uv, depth, valid


def voxel_indices(points: np.ndarray, grid: GridSpec) -> tuple[np.ndarray, np.ndarray]:
    """Integer voxel indices (N, 3) of points (N, 3) in `grid`, and (N,) bool inside-the-grid."""
    idx = np.floor((np.asarray(points, dtype=np.float64) - np.asarray(grid.lower)) / grid.voxel_size).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(grid.shape)), axis=1)
    return idx, inside


def voxel_centers(grid: GridSpec) -> np.ndarray:
    """Centres (X, Y, Z, 3) of every voxel of `grid`, float32."""
    axes = [grid.lower[i] + (np.arange(n) + 0.5) * grid.voxel_size for i, n in enumerate(grid.shape)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)
