"""LiDAR odometry: scan-to-map GICP (small_gicp Gaussian voxel map of recent scans) from a
constant-velocity motion prior, with VBReg global re-localisation when the local refinement fails or
lands far from the prior.

    odo = LidarOdometry(OdometryConfig(), T_base_lidar=rig.lidar.T_base_lidar)
    result = odo.update(scan)              # OdometryResult: pose = T_odom_base at scan.stamp_ns
    odo.registered_cloud                   # (N, 3) the last scan in odom

`odom` is the base frame at the first scan. A scan whose registration cannot be trusted gives
`converged=False` (pose = the motion prior, covariance inflated) and is not added to the map.
"""
from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np

from vg_ros.config import PipelineConfig, param
from vg_ros.geometry import interpolate_T, invert_T, make_T, skew
from vg_ros.types import LidarScan, OdometryResult

UNTRUSTED_VARIANCE = 1e4  # per-axis variance given to poses that must not be trusted


@dataclasses.dataclass
class OdometryConfig(PipelineConfig):
    """Parameters of LidarOdometry (and of registration_node)."""

    min_range: float = param(1.0, "drop points closer than this (m): the vehicle itself", low=0.0, high=100.0)
    max_range: float = param(80.0, "drop points farther than this (m)", low=1.0, high=1000.0)
    voxel_size: float = param(0.5, "scan downsampling before GICP (m)", low=0.01, high=10.0)
    map_voxel_size: float = param(1.0, "Gaussian voxel map resolution (m)", low=0.05, high=20.0)
    map_horizon: int = param(30, "scans a map voxel survives without being seen (LRU)", low=1, high=100_000)
    max_correspondence_distance: float = param(2.0, "GICP max correspondence distance (m)", low=0.05, high=50.0)
    max_iterations: int = param(30, "GICP iterations", low=1, high=1000)
    deskew: bool = param(False, "undistort each sweep to its middle with the constant-velocity model and per-point "
                                "time (the pose is still the one at the stamp)")
    deskew_tolerance: float = param(0.05, "deskew a sweep again with its own registered motion when that moves a "
                                          "point 50 m away by more than this (m) against the prior's", low=0.0,
                                    high=100.0)
    min_fitness: float = param(0.5, "GICP inlier fraction below this = local refinement failed", low=0.0, high=1.0)
    max_prior_deviation: float = param(2.0, "correction vs the motion prior above this (m) = prior is off", low=0.0, high=100.0)
    max_prior_deviation_deg: float = param(15.0, "correction vs the motion prior above this (deg) = prior is off",
                                           low=0.0, high=180.0)
    relocalize: bool = param(True, "run VBReg global registration against the local map when local fails")
    relocalize_scans: int = param(5, "recent registered scans that form the re-localisation target", low=1, high=100)
    global_preset: str = param("lidar", "RegistrationConfig preset for re-localisation", choices=("lidar", "indoor"))
    num_threads: int = param(1, "small_gicp threads", low=1, high=64)
    covariance_scale: float = param(
        1.5, "multiplies the standard deviations of GICP's Hessian covariance (alone it claims far less than "
        "the real scan-to-scan error); `vg-ros odometry BAG --gt-topic T` checks the result on your sensor",
        low=1e-3, high=1e6)
    covariance_prior_deviation: float = param(
        0.3, "adds (this x the scan's correction against the constant-velocity prior)^2 to the pose variances "
        "(m per m of correction, rad per rad): the steps the prior disagrees with are the ones that err",
        low=0.0, high=1e3)
    restart_after_failures: int = param(
        50, "when this many scans in a row fail registration against the local map, it restarts from the last of "
        "them, at the motion prior's pose (a map gone wrong would otherwise fail every later scan for ever; until "
        "then a burst of bad sweeps is bridged by dead reckoning and the map kept); a map of one sweep (a first "
        "cloud that may be degenerate) at the first failure; 0 = never", low=0, high=100_000)


def _rotation_angle_deg(R: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0))))


def orthonormalize(T: np.ndarray) -> np.ndarray:
    """The nearest rigid transform to T (4, 4): composing poses and velocities frame after frame
    otherwise grows round-off exponentially (GICP keeps its initial guess's scale)."""
    U, _, Vt = np.linalg.svd(T[:3, :3])
    R = U @ np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))]) @ Vt
    return make_T(R, T[:3, 3])


def deskew(points: np.ndarray, times: np.ndarray, delta: np.ndarray, period: float) -> np.ndarray:
    """Undistort a sweep: points (N, 3) measured at times (N,) s after an instant t0 (negative: before it);
    `delta` (4, 4) the LiDAR's motion over `period` s (T_prev^-1 T_curr, constant velocity). Each point moves
    by the fraction of the motion its time represents, so all are expressed in the LiDAR frame at t0
    (`LidarOdometry` passes times from the sweep's middle)."""
    from scipy.spatial.transform import Rotation
    frac = (np.asarray(times, np.float64) / max(period, 1e-6))[:, None]
    points = np.asarray(points, np.float64)
    rotvec = Rotation.from_matrix(delta[:3, :3]).as_rotvec()
    angle = float(np.linalg.norm(rotvec))
    if angle > 1e-12:   # every point turns about the same axis, by its own angle (Rodrigues' formula)
        axis = rotvec / angle
        cos, sin = np.cos(frac * angle), np.sin(frac * angle)
        points = points * cos + np.cross(axis, points) * sin + (points @ axis)[:, None] * axis * (1.0 - cos)
    return points + frac * delta[:3, 3]


def gicp_covariance(result, num_points: int, T_odom_lidar: np.ndarray,
                    T_lidar_base: np.ndarray | None = None, scale: float = 1.0) -> np.ndarray:
    """6x6 covariance of base_link's pose in odom from small_gicp's Gauss-Newton Hessian, as nav_msgs/Odometry
    means it: (x, y, z) of base_link's origin in odom, then rotations about odom's axes.

    small_gicp's H is over a right (sensor-frame) perturbation ordered (rotation, translation) and is
    whitened by the point covariances; scaling by the residual variance (2 e / dof) makes it metric. A
    sensor-frame perturbation (v, w) moves base_link's origin by R (v - [t] w) (t: base_link's origin in
    the LiDAR frame, R: the LiDAR's rotation in odom) and turns it by R w about odom's axes. `scale`
    multiplies the standard deviations (the Hessian treats every correspondence as independent and knows
    nothing of the downsampling: alone it is overconfident)."""
    H = np.array(result.H, dtype=np.float64, copy=True)
    if not np.isfinite(H).all() or num_points < 7:
        return np.eye(6) * UNTRUSTED_VARIANCE
    dof = max(3 * int(result.num_inliers) - 6, 1)
    sigma2 = max(2.0 * float(result.error) / dof, 1e-12)
    reg = 1e-9 * max(np.trace(H), 1e-9)
    cov_rt = sigma2 * np.linalg.inv(H + reg * np.eye(6))
    perm = np.r_[3, 4, 5, 0, 1, 2]  # -> (translation, rotation)
    cov_tr = cov_rt[np.ix_(perm, perm)]
    R = T_odom_lidar[:3, :3]
    t = np.zeros(3) if T_lidar_base is None else T_lidar_base[:3, 3]
    J = np.zeros((6, 6))
    J[:3, :3], J[:3, 3:], J[3:, 3:] = R, -R @ skew(t), R
    cov = (scale ** 2) * (J @ cov_tr @ J.T)
    return 0.5 * (cov + cov.T)


def prior_deviation_covariance(T_pred: np.ndarray, T: np.ndarray, k: float) -> np.ndarray:
    """Isotropic extra pose variance from how far registration moved the pose from the motion prior `T_pred`
    (both base_link's in odom): (k x the correction's length)^2 m^2 on x, y, z and (k x its angle)^2 rad^2 on
    the rotations. On the simulator the steps with large errors are those with large corrections (Spearman
    0.70 between the planar error and the correction over 796 steps; median correction 0.14 m on the worst
    tenth, 0.01 m on the rest), which the Hessian does not see. Isotropic: the same about any axes."""
    from scipy.spatial.transform import Rotation
    correction = invert_T(T_pred) @ T
    t2 = (k * float(np.linalg.norm(correction[:3, 3]))) ** 2
    r2 = (k * float(Rotation.from_matrix(correction[:3, :3]).magnitude())) ** 2
    return np.diag([t2, t2, t2, r2, r2, r2])


def odometry_twist(result: OdometryResult) -> tuple[np.ndarray, np.ndarray]:
    """(twist, covariance) to publish for `result`: its own, or zero with UNTRUSTED_VARIANCE on the diagonal
    when unknown (not a zero covariance, which a filter would read as "standing still, for certain")."""
    if result.twist is None or result.twist_covariance is None:
        return np.zeros(6), np.eye(6) * UNTRUSTED_VARIANCE
    return result.twist, result.twist_covariance


def motion_step(T_prev: np.ndarray, T_cur: np.ndarray) -> np.ndarray:
    """(6,) the motion from pose T_prev to T_cur (T_odom_base): the translation in the current base frame,
    then the relative rotation vector (the twist times dt)."""
    from scipy.spatial.transform import Rotation
    delta = invert_T(T_prev) @ T_cur
    return np.r_[T_cur[:3, :3].T @ (T_cur[:3, 3] - T_prev[:3, 3]), Rotation.from_matrix(delta[:3, :3]).as_rotvec()]


def twist_between(T_prev: np.ndarray, T_cur: np.ndarray, dt_s: float, cov_cur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(twist (6,) vx vy vz wx wy wz in the current base frame, its covariance (6, 6)) of the motion from pose
    T_prev to T_cur (T_odom_base) over `dt_s`: `motion_step` divided by dt.
    Covariance: both poses as uncertain as the current one (its odom-frame covariance turned into the base
    frame), the difference of the two over dt^2."""
    twist = motion_step(T_prev, T_cur) / dt_s
    R = T_cur[:3, :3].T   # odom axes -> base axes
    turn = np.zeros((6, 6))
    turn[:3, :3], turn[3:, 3:] = R, R
    cov = 2.0 * (turn @ cov_cur @ turn.T) / dt_s ** 2
    return twist, 0.5 * (cov + cov.T)


class LidarOdometry:
    """Scan-to-map odometry. `update(scan)` -> OdometryResult; `T_base_lidar` (4, 4) from the rig."""

    def __init__(self, cfg: OdometryConfig | None = None, T_base_lidar: np.ndarray | None = None,
                 weights: str | None = "default", device: str = "cpu") -> None:
        import small_gicp
        self._sg = small_gicp
        self.cfg = cfg or OdometryConfig()
        self.T_base_lidar = np.eye(4) if T_base_lidar is None else np.asarray(T_base_lidar, dtype=np.float64)
        self.T_lidar_base = invert_T(self.T_base_lidar)
        self.weights, self.device = weights, device
        self._global = None
        self.reset()

    def reset(self) -> None:
        self._new_map()
        self.T_odom_lidar: np.ndarray | None = None
        self.velocity = np.eye(4)  # the last motion between two scans, lidar frame, over `velocity_s` seconds
        self.velocity_s = 0.1
        self.last_stamp_ns: int | None = None
        self.registered_cloud = np.zeros((0, 3))
        self.recent_clouds: collections.deque = collections.deque(maxlen=self.cfg.relocalize_scans)
        self.poses: list[tuple[int, np.ndarray]] = []
        self.ref_offset = 0.0   # the last pose's instant, s after its stamp (a deskewed sweep's middle)
        self._first_sweeps: list[tuple] = []   # (stamp, points, times, middle) of a sweep registered undeskewed
        self._deskewing = False   # cfg.deskew at the last update (turned on: the map restarts, see update)
        self._map_deskewed = False   # the map holds deskewed sweeps (else new ones register undeskewed first)
        # deskew_skipped: scans registered as they are because a per-point time was NaN or infinite
        # deskewed_again: sweeps deskewed a second time with their own registered motion (`_deskew_again`)
        self.stats = {"scans": 0, "local_ok": 0, "relocalized": 0, "failed": 0, "deskew_skipped": 0,
                      "deskewed_again": 0, "map_restarts": 0}
        self.failed_in_a_row = 0   # scans failed since the last registered one (`restart_after_failures`)

    def local_map(self) -> np.ndarray:
        """(M, 3) float64: the means of the local map's voxels in the odom frame (empty before the first scan)."""
        if self.voxelmap.size() == 0:
            return np.zeros((0, 3))
        return np.asarray(self.voxelmap.voxel_points())[:, :3]

    @property
    def global_registration(self):
        if self._global is None:
            from vg_ros.registration.pipeline import RegistrationConfig, RegistrationPipeline
            self._global = RegistrationPipeline(RegistrationConfig.preset(self.cfg.global_preset),
                                                weights=self.weights, device=self.device)
        return self._global

    def _crop(self, xyz: np.ndarray) -> np.ndarray:
        ranges = np.linalg.norm(xyz, axis=1)
        keep = np.isfinite(xyz).all(axis=1) & (ranges >= self.cfg.min_range) & (ranges <= self.cfg.max_range)
        return keep

    def _align(self, source, T_init: np.ndarray):
        return self._sg.align(self.voxelmap, source, T_init, max_correspondence_distance=self.cfg.max_correspondence_distance,
                              num_threads=self.cfg.num_threads, max_iterations=self.cfg.max_iterations)

    def _check(self, result, num_points: int, T_pred: np.ndarray) -> str:
        fitness = result.num_inliers / max(num_points, 1)
        if not result.converged and fitness < self.cfg.min_fitness:
            return f"GICP did not converge (fitness {fitness:.2f})"
        if fitness < self.cfg.min_fitness:
            return f"fitness {fitness:.2f} < min_fitness {self.cfg.min_fitness}"
        T = np.array(result.T_target_source, dtype=np.float64, copy=True)
        correction = invert_T(T_pred) @ T
        if np.linalg.norm(correction[:3, 3]) > self.cfg.max_prior_deviation:
            return f"correction {np.linalg.norm(correction[:3, 3]):.2f} m from the motion prior > max_prior_deviation"
        if _rotation_angle_deg(correction[:3, :3]) > self.cfg.max_prior_deviation_deg:
            return f"correction {_rotation_angle_deg(correction[:3, :3]):.1f} deg from the motion prior"
        return ""

    def update(self, scan: LidarScan) -> OdometryResult:
        """Register one sweep (points in the LiDAR frame) and return T_odom_base at its stamp."""
        start = time.perf_counter()
        cfg = self.cfg
        xyz = np.asarray(scan.xyz)
        if xyz.ndim != 2 or xyz.shape[1] < 3:
            raise ValueError(f"LidarScan.xyz: expected (N, 3), got shape {xyz.shape}")
        stamp = int(scan.stamp_ns)
        if self.last_stamp_ns is not None and stamp <= self.last_stamp_ns:
            raise ValueError(f"LidarScan.stamp_ns {stamp} is not after the last scan's {self.last_stamp_ns}")
        self.stats["scans"] += 1
        keep = self._crop(xyz[:, :3])
        points = np.asarray(xyz[keep, :3], dtype=np.float64)
        # The instant (s after the stamp) whose pose the registration estimates: a deskewed sweep is undistorted
        # to its middle, not to its stamp. Against the start (or end), an error e in the velocity it is deskewed
        # with moves the registered pose by about e/2, and the next velocity, a difference of two such poses,
        # by -e/2 + e_prev/2: an oscillation that does not decay (seen on a simulated drive: the velocity swung
        # between 0.7 and 1.8 m per sweep at a true 1.27 and the registration had to re-localise). About the
        # middle the errors cancel to first order; the pose is moved back to the stamp for the output only.
        # A sweep registered as measured (no usable times, deskew turned off) fits about its middle too: it
        # keeps the reference of the pose before it (`ref_offset`), so the reference never jumps.
        # Until there is a velocity (the start, deskew turned on) sweeps register as they are (two equal
        # distortions cancel), and once a second one gives the velocity the map restarts from both deskewed
        # (`_restart_map_deskewed`); a map of distorted sweeps would bend every deskewed one registered to it.
        if cfg.deskew and not self._deskewing:   # on (at the start, or turned on while running): bootstrap
            self._first_sweeps = []
        self._deskewing = cfg.deskew
        offset = self.ref_offset
        raw = sweep = None
        if cfg.deskew and scan.time is not None:
            times = np.asarray(scan.time, dtype=np.float64)[keep]
            if len(times) and np.isfinite(times).all():
                middle = 0.5 * (float(times.min()) + float(times.max()))
                if self.T_odom_lidar is None or not self._map_deskewed:
                    raw = (stamp, points, times, middle)
                else:
                    offset, sweep = middle, (points, times - middle)
            elif len(times):   # a NaN time would move its point to NaN: the sweep is registered undistorted
                self.stats["deskew_skipped"] += 1
        predicted = None if self.T_odom_lidar is None else self.T_odom_lidar @ self._velocity_for(stamp, offset)
        if len(points) < 10:
            return self._fail(stamp, predicted, f"only {len(points)} usable points in the scan", start, offset)
        if sweep is not None:
            points = deskew(points, sweep[1], self.velocity, self.velocity_s)
        source = self._downsample(points)
        if source.size() < 10:
            return self._fail(stamp, predicted, f"only {source.size()} points after downsampling", start, offset)
        if self.T_odom_lidar is None:
            T = self.T_base_lidar.copy()  # odom = base_link at the first scan
            cov = np.eye(6) * 1e-9
            self._accept(stamp, T, source, points, offset)
            self._first_sweeps = [raw] if raw is not None else []
            self.stats["local_ok"] += 1
            return OdometryResult(stamp, T @ self.T_lidar_base, cov, True, time.perf_counter() - start)
        result = self._align(source, predicted)
        reason = self._check(result, source.size(), predicted)
        if sweep is not None and not reason:
            result, source, points = self._deskew_again(stamp, offset, sweep, result, source, points, predicted)
        how = "local"
        if reason and cfg.relocalize:
            relocalized = self._relocalize(points, source, predicted)
            if relocalized is not None:
                result, reason, how = relocalized, "", "relocalized"
            else:
                reason = f"{reason}; global re-localisation failed too"
        if reason:
            # only sweeps matched against the map count (a run of near-empty ones says nothing about the map).
            # A map of one sweep has never matched another: it may be the bad one (a partial or degenerate first
            # cloud), so it is replaced at once; a longer one after `restart_after_failures` failures in a row
            self.failed_in_a_row += 1
            if cfg.restart_after_failures and (self._map_sweeps <= 1 or
                                               self.failed_in_a_row >= cfg.restart_after_failures):
                return self._restart_map(stamp, predicted, source, points, offset, raw, reason, start)
            return self._fail(stamp, predicted, reason, start, offset)
        self.failed_in_a_row = 0
        T = orthonormalize(np.array(result.T_target_source, dtype=np.float64, copy=True))
        cov = gicp_covariance(result, source.size(), T, self.T_lidar_base, cfg.covariance_scale)
        if len(self.poses) >= 2:   # a motion prior exists (the second scan's is standing still: no evidence)
            # base_link's correction, as the covariance is base_link's (a LiDAR-frame turn moves it by the lever arm)
            cov = cov + prior_deviation_covariance(predicted @ self.T_lidar_base, T @ self.T_lidar_base,
                                                   cfg.covariance_prior_deviation)
        previous = self.poses[-1] if self.poses else None
        self._accept(stamp, T, source, points, offset, keep_velocity=how != "local")
        self.stats["local_ok" if how == "local" else "relocalized"] += 1
        if raw is not None and how == "local" and self._first_sweeps:
            T = self._restart_map_deskewed(self._first_sweeps[0], raw)
            offset = self.ref_offset
            previous = self.poses[-2]
        elif raw is not None:   # the first of the pair (a re-localised one starts the pair again)
            self._first_sweeps = [raw] if how == "local" else []
        twist = twist_cov = None
        if how == "local" and previous is not None and stamp > previous[0]:   # a re-localisation is no motion
            twist, twist_cov = twist_between(previous[1], T @ self.T_lidar_base, (stamp - previous[0]) / 1e9, cov)
        pose = self._at_stamp(T, offset) @ self.T_lidar_base
        return OdometryResult(stamp, pose, cov, True, time.perf_counter() - start,
                              reason="" if how == "local" else "re-localised by VBReg", twist=twist,
                              twist_covariance=twist_cov)

    def _gap_s(self, stamp: int, offset: float) -> float:
        """Seconds from the last pose's instant to this sweep's (`offset` s after `stamp`)."""
        return (stamp - self.last_stamp_ns) / 1e9 + offset - self.ref_offset

    def _velocity_for(self, stamp: int, offset: float = 0.0) -> np.ndarray:
        """The constant-velocity prior from the last pose to the instant `offset` s after `stamp` (a dropped
        scan widens it)."""
        if self.last_stamp_ns is None:
            return self.velocity
        gap_s = self._gap_s(stamp, offset)
        if abs(gap_s - self.velocity_s) < 1e-3 * self.velocity_s:
            return self.velocity
        return interpolate_T(np.eye(4), self.velocity, gap_s / self.velocity_s)

    def _relocalize(self, points: np.ndarray, source, predicted: np.ndarray):
        """VBReg of the scan against the local map (in the predicted LiDAR frame), then GICP from there."""
        if not self.recent_clouds:
            return None
        map_odom = np.concatenate(list(self.recent_clouds))
        if len(map_odom) < 10:
            return None
        T_pred_odom = invert_T(predicted)
        map_local = map_odom @ T_pred_odom[:3, :3].T + T_pred_odom[:3, 3]
        crop = np.linalg.norm(map_local, axis=1) <= self.cfg.max_range
        found = self.global_registration.register(points, map_local[crop])
        if not found.converged:
            return None
        T_init = predicted @ found.transform
        result = self._align(source, T_init)
        fitness = result.num_inliers / max(source.size(), 1)
        if fitness < self.cfg.min_fitness:
            return None
        return result

    def _accept(self, stamp: int, T_odom_lidar: np.ndarray, source, points: np.ndarray, offset: float,
                keep_velocity: bool = False) -> None:
        """Make T_odom_lidar (the pose `offset` s after `stamp`) the current pose, update the velocity (unless
        the jump came from re-localisation, which is not motion) and add the scan to the map."""
        if self.T_odom_lidar is not None and not keep_velocity:
            self.velocity = orthonormalize(invert_T(self.T_odom_lidar) @ T_odom_lidar)
            self.velocity_s = max(self._gap_s(stamp, offset), 1e-6)
        if not self.cfg.deskew:
            self._map_deskewed = False
        self.T_odom_lidar = T_odom_lidar
        self.last_stamp_ns = stamp
        self.ref_offset = offset
        self.poses.append((stamp, T_odom_lidar @ self.T_lidar_base))
        self._add_to_map(source, points, T_odom_lidar)

    def _new_map(self) -> None:
        self.voxelmap = self._sg.GaussianVoxelMap(self.cfg.map_voxel_size)
        self.voxelmap.set_lru(horizon=self.cfg.map_horizon, clear_cycle=10)
        self._map_sweeps = 0   # sweeps inserted since the map was created

    def _downsample(self, points: np.ndarray):
        """The sweep as GICP takes it: voxel-downsampled, with point covariances."""
        source, _ = self._sg.preprocess_points(points, downsampling_resolution=self.cfg.voxel_size, num_neighbors=10,
                                               num_threads=self.cfg.num_threads)
        return source

    def _add_to_map(self, source, points: np.ndarray, T_odom_lidar: np.ndarray) -> None:
        """A registered sweep (downsampled `source`, full `points`) into the map, the last registered cloud and
        the re-localisation target."""
        self.voxelmap.insert(source, T_odom_lidar)
        self._map_sweeps += 1
        self.registered_cloud = points @ T_odom_lidar[:3, :3].T + T_odom_lidar[:3, 3]
        self.recent_clouds.append(np.asarray(source.points())[:, :3] @ T_odom_lidar[:3, :3].T + T_odom_lidar[:3, 3])

    def _restart_map_deskewed(self, first: tuple, second: tuple) -> np.ndarray:
        """Two sweeps (stamp, points, times, middle), registered as they were measured, now that the velocity
        is known: the map restarts from both deskewed to their middles, and the poses move from the instant
        they were taken at (`ref_offset`: the stamp at the start, where odom's origin was put) to the first
        sweep's middle, so that every later pose is a sweep's middle as `update` registers it (the second is
        the current sweep). Returns its new pose T_odom_lidar."""
        period = self.velocity_s
        T_first = next(T for stamp, T in self.poses if stamp == first[0]) @ self.T_base_lidar
        A = T_first @ interpolate_T(np.eye(4), self.velocity, (first[3] - self.ref_offset) / period) @ invert_T(T_first)
        self.poses = [(stamp, A @ T) for stamp, T in self.poses]
        self.T_odom_lidar = A @ self.T_odom_lidar
        self.ref_offset = first[3]
        self._new_map()
        self.recent_clouds.clear()
        for stamp, points, times, middle in (first, second):
            T = next(T for s, T in self.poses if s == stamp) @ self.T_base_lidar
            points = deskew(points, times - middle, self.velocity, period)
            self._add_to_map(self._downsample(points), points, T)
        self._map_deskewed, self._first_sweeps = True, []
        return self.T_odom_lidar

    def _deskew_again(self, stamp: int, offset: float, sweep: tuple, result, source, points: np.ndarray,
                      predicted: np.ndarray):
        """The sweep deskewed again with its own motion as just registered (from the last pose to this one)
        instead of the previous one, and registered again from there, when the two differ by more than
        `deskew_tolerance` at 50 m: the constant-velocity prior is wrong where the motion changes (a turn
        begins: 7 deg in one sweep on the simulator's loop), and the sweep is then bent as much as it was.
        The second registration is kept if it passes the same checks. (result, source, points) to use."""
        T = np.asarray(result.T_target_source, dtype=np.float64)
        gap_s = max(self._gap_s(stamp, offset), 1e-6)
        motion = orthonormalize(invert_T(self.T_odom_lidar) @ T)
        change = invert_T(self._velocity_for(stamp, offset)) @ motion
        if np.linalg.norm(change[:3, 3]) + 50.0 * np.radians(_rotation_angle_deg(change[:3, :3])) \
                <= self.cfg.deskew_tolerance:
            return result, source, points
        again = deskew(sweep[0], sweep[1], motion, gap_s)
        source_again = self._downsample(again)
        if source_again.size() < 10:
            return result, source, points
        result_again = self._align(source_again, T)
        if self._check(result_again, source_again.size(), predicted):
            return result, source, points
        self.stats["deskewed_again"] += 1
        return result_again, source_again, again

    def _at_stamp(self, T_odom_lidar: np.ndarray, offset: float) -> np.ndarray:
        """The LiDAR's pose at the stamp from its pose `offset` s after it, at the current velocity estimate."""
        if offset == 0.0:
            return T_odom_lidar
        return T_odom_lidar @ interpolate_T(np.eye(4), self.velocity, -offset / self.velocity_s)

    def _restart_map(self, stamp: int, predicted: np.ndarray, source, points: np.ndarray, offset: float,
                     raw: tuple | None, reason: str, start: float) -> OdometryResult:
        """The map is no use any more (`restart_after_failures` scans in a row failed, or the one sweep it holds
        matched nothing): it restarts from this sweep, placed at the motion prior's pose (dead reckoning keeps
        odom continuous); the velocity is kept, so that a run of restarts (a burst of bad sweeps: each one a
        map of one sweep the next cannot match) goes on dead-reckoning instead of standing still. The scan
        itself is still a failure (not a confident pose), the next ones register against the new map."""
        result = self._fail(stamp, predicted, f"{reason}; {self.failed_in_a_row} scan(s) failed in a row: the local "
                                              f"map restarts from this scan at the motion prior's pose", start, offset)
        self._new_map()
        self.recent_clouds.clear()
        self._map_deskewed = False
        # the velocity stays the prior's (not re-measured from the prior itself)
        self._accept(stamp, predicted, source, points, offset, keep_velocity=True)
        self._first_sweeps = [raw] if raw is not None else []
        self.failed_in_a_row = 0
        self.stats["map_restarts"] += 1
        return result

    def _fail(self, stamp: int, predicted: np.ndarray | None, reason: str, start: float,
              offset: float = 0.0) -> OdometryResult:
        self.stats["failed"] += 1
        pose_lidar = (self._at_stamp(predicted, offset) if predicted is not None else
                      self.T_odom_lidar if self.T_odom_lidar is not None else self.T_base_lidar)
        return OdometryResult(stamp, pose_lidar @ self.T_lidar_base, np.eye(6) * UNTRUSTED_VARIANCE, False,
                              time.perf_counter() - start, reason=reason)
