"""LidarOdometry on simulated drives: accuracy against ground truth, covariance, re-localisation after a
jump the motion prior cannot explain, and bad scans."""
from __future__ import annotations

import numpy as np
import pytest

from vg_ros.geometry import invert_T, make_T, rpy_to_R
from vg_ros.registration.metrics import ate, rpe_drift_percent
from vg_ros.registration.odometry import LidarOdometry, OdometryConfig, deskew, orthonormalize
from vg_ros.types import LidarScan


@pytest.fixture(scope="module")
def drive():
    from vg_ros.sim import simulate
    return list(simulate(9100, 4.0, cameras=False, occupancy=False, expressions=0))


def test_odometry_tracks_a_simulated_drive(drive):
    T_bl = drive[0].rig.lidar.T_base_lidar
    odo = LidarOdometry(OdometryConfig(), T_base_lidar=T_bl, weights=None)
    est, gt, twists = [], [], []
    for frame in drive:
        res = odo.update(frame.lidar)
        assert res.converged, res.reason
        assert res.stamp_ns == frame.lidar.stamp_ns
        est.append(res.pose)
        gt.append(invert_T(drive[0].T_odom_base) @ frame.T_odom_base)
        twists.append(res.twist)
    # the twist: unknown at the first scan, then base_link's velocity in base_link, as ground truth has it
    assert twists[0] is None and res.twist_covariance.shape == (6, 6)
    assert np.all(np.linalg.eigvalsh(res.twist_covariance) > 0)
    for k in range(1, len(drive)):
        dt = (drive[k].lidar.stamp_ns - drive[k - 1].lidar.stamp_ns) / 1e9
        step = invert_T(gt[k - 1]) @ gt[k]
        v_true = gt[k][:3, :3].T @ (gt[k][:3, 3] - gt[k - 1][:3, 3]) / dt
        assert np.linalg.norm(twists[k][:3] - v_true) < 0.3, k          # m/s, at ~10 m/s
        yaw_rate = np.arctan2(step[1, 0], step[0, 0]) / dt
        assert abs(twists[k][5] - yaw_rate) < 0.05, k
    est, gt = np.stack(est), np.stack(gt)
    assert np.allclose(est[0], np.eye(4))  # odom = base_link at the first scan
    assert ate(est, gt) < 0.05
    assert rpe_drift_percent(est, gt) < 1.0
    assert odo.stats["failed"] == 0 and odo.stats["relocalized"] == 0
    # registered cloud: the last scan in odom, i.e. T_odom_lidar applied
    T_odom_lidar = est[-1] @ T_bl
    expected = drive[-1].lidar.xyz[:5].astype(float) @ T_odom_lidar[:3, :3].T + T_odom_lidar[:3, 3]
    assert odo.registered_cloud.shape[1] == 3 and len(odo.registered_cloud) > 1000
    assert np.allclose(odo.registered_cloud[:5], expected, atol=1e-3)
    cov = res.covariance
    assert np.allclose(cov, cov.T) and np.all(np.linalg.eigvalsh(cov) > 0) and np.sqrt(cov[0, 0]) < 0.05


def test_pose_covariance_is_base_links_position_in_odom_not_about_the_odom_origin():
    """nav_msgs/Odometry's pose covariance: base_link's (x, y, z) in odom and rotations about odom's axes. The
    same registration far from the odom origin gives the same position covariance (the adjoint about the
    origin made it grow with the distance driven), and a LiDAR mounted ahead of base_link adds the lever
    arm of its rotation uncertainty."""
    from types import SimpleNamespace

    from vg_ros.registration.odometry import gicp_covariance
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 6))
    result = SimpleNamespace(H=A @ A.T + 6 * np.eye(6), num_inliers=500, error=2.0)
    here = gicp_covariance(result, 1000, make_T(rpy_to_R(0, 0, 0.3), [1.0, 2.0, 0.0]))
    far = gicp_covariance(result, 1000, make_T(rpy_to_R(0, 0, 0.3), [800.0, -650.0, 12.0]))
    assert np.allclose(here, far, rtol=1e-9, atol=1e-15)
    lever = gicp_covariance(result, 1000, make_T(rpy_to_R(0, 0, 0.3), [1.0, 2.0, 0.0]),
                            T_lidar_base=make_T(np.eye(3), [-1.5, 0.0, -1.8]))
    assert np.allclose(lever[3:, 3:], here[3:, 3:]) and not np.allclose(lever[:3, :3], here[:3, :3])
    assert np.all(np.linalg.eigvalsh(lever) > 0)


def test_relocalisation_recovers_a_jump(drive):
    T_bl = drive[0].rig.lidar.T_base_lidar
    cfg = OdometryConfig()
    odo = LidarOdometry(cfg, T_base_lidar=T_bl, weights=None)
    jump = make_T(rpy_to_R(0, 0, np.radians(40)), [4.0, -3.0, 0.0])  # sensor carried off: the prior is wrong
    for k, frame in enumerate(drive[:24]):
        scan = frame.lidar
        if k >= 20:
            xyz = scan.xyz.astype(float) @ jump[:3, :3].T + jump[:3, 3]
            scan = LidarScan(xyz.astype(np.float32), scan.stamp_ns, scan.frame_id)
        res = odo.update(scan)
        assert res.converged, f"scan {k}: {res.reason}"
        gt = invert_T(drive[0].T_odom_base) @ frame.T_odom_base
        if k >= 20:
            gt = gt @ T_bl @ invert_T(jump) @ invert_T(T_bl)
        assert np.linalg.norm(res.pose[:3, 3] - gt[:3, 3]) < 0.2, f"scan {k}"
    assert odo.stats["relocalized"] >= 1


def test_bad_scans(drive):
    odo = LidarOdometry(OdometryConfig(), weights=None)
    first = odo.update(drive[0].lidar)
    assert first.converged
    empty = odo.update(LidarScan(np.zeros((0, 3), np.float32), drive[1].stamp_ns))
    assert not empty.converged and "usable points" in empty.reason
    assert np.all(np.diag(empty.covariance) >= 1e3)  # never a confident pose
    nan = odo.update(LidarScan(np.full((1000, 3), np.nan, np.float32), drive[2].stamp_ns))
    assert not nan.converged
    with pytest.raises(ValueError, match="stamp"):
        odo.update(LidarScan(drive[0].lidar.xyz, drive[0].stamp_ns))  # not after the last accepted scan
    with pytest.raises(ValueError, match="xyz"):
        odo.update(LidarScan(np.zeros((10, 2), np.float32), drive[3].stamp_ns))
    # tracking resumes after the failures: 2 m of motion the (still identity) prior does not know,
    # found by re-localisation
    res = odo.update(drive[3].lidar)
    assert res.converged, res.reason
    gt = invert_T(drive[0].T_odom_base) @ drive[3].T_odom_base
    assert np.linalg.norm(res.pose[:3, 3] - gt[:3, 3]) < 0.2
    assert odo.stats["failed"] == 2


def test_a_scan_with_non_finite_point_times_is_registered_without_deskew(drive):
    """deskew on, a sweep whose per-point time column is all NaN (a driver bug): registered as it is and
    counted, never turned into NaN points and a misleading 'fitness 0' failure."""
    import dataclasses
    poses = []
    for last_times in (None, "nan"):
        odo = LidarOdometry(OdometryConfig(deskew=True), weights=None)
        for k in range(3):
            scan = drive[k].lidar
            if k == 2:
                scan = dataclasses.replace(scan, time=None if last_times is None else
                                           np.full(len(scan.xyz), np.nan, np.float32))
            res = odo.update(scan)
            assert res.converged, res.reason
        poses.append(res.pose)
        assert odo.stats["deskew_skipped"] == (0 if last_times is None else 1)
    assert np.all(np.isfinite(poses[1])) and np.allclose(poses[1], poses[0], atol=1e-6)


@pytest.fixture(scope="module")
def bent_drive():
    """A straight stretch at ~12 m/s with the simulator's motion-distorted LiDAR (each column fired from the
    vehicle's pose at its time: the sweep's end is 1.2 m off)."""
    from vg_ros.sim import simulate
    return list(simulate(5, 3.0, cameras=False, occupancy=False, expressions=0, lidar_motion=True))


def _lidar_steps(frames, poses=None):
    """Per-scan LiDAR motions (4, 4): from ground truth, or from `poses` (T_odom_base per frame)."""
    T_bl = frames[0].rig.lidar.T_base_lidar
    T = [f.T_odom_base if poses is None else p for f, p in zip(frames, poses or frames)]
    return [invert_T(a @ T_bl) @ (b @ T_bl) for a, b in zip(T, T[1:])]


def test_deskew_undoes_the_motion_of_a_bent_sweep_without_oscillating(bent_drive):
    """deskew on a motion-distorted drive: the poses beat the undeskewed ones (end error in the plane about
    1 cm against 12 cm, each step's translation within 2 cm of the truth) and the velocity it deskews with settles
    (each within 5 cm per sweep). Deskewing to the sweep's start made each velocity error come back as
    about minus half of it in the next: the velocity swung by +-0.5 m per sweep and the drive re-localised."""
    T_bl = bent_drive[0].rig.lidar.T_base_lidar
    truth = _lidar_steps(bent_drive)
    gt_end = invert_T(bent_drive[0].T_odom_base) @ bent_drive[-1].T_odom_base
    end = {}
    for on in (False, True):
        odo = LidarOdometry(OdometryConfig(deskew=on), T_base_lidar=T_bl, weights=None)
        poses, velocity_errors = [], []
        for k, f in enumerate(bent_drive):
            res = odo.update(f.lidar)
            assert res.converged, res.reason
            poses.append(res.pose)
            if k >= 2:
                velocity_errors.append(np.linalg.norm(odo.velocity[:3, 3] - truth[k - 1][:3, 3]))
        end[on] = np.linalg.norm(poses[-1][:2, 3] - gt_end[:2, 3])
        if on:
            steps = [np.linalg.norm(a[:3, 3] - b[:3, 3]) for a, b in zip(_lidar_steps(bent_drive, poses), truth)]
            assert odo.stats["relocalized"] == 0 and odo.stats["deskew_skipped"] == 0
            assert max(velocity_errors) < 0.05 and max(steps) < 0.02, (max(velocity_errors), max(steps))
    assert end[True] < 0.04 and end[False] > 3 * end[True], end


@pytest.mark.parametrize("case", ["turned on", "turned off", "sweeps without times"])
def test_deskew_switched_while_running_moves_no_pose(bent_drive, case):
    """The pose's instant (a deskewed sweep's middle, an undeskewed sweep's stamp) must not jump when deskew
    is turned on or off while running (a live parameter of the node) or a sweep has no usable times: each
    step stays within 2.5 cm of the truth (1.2 cm with deskew on throughout; the reference switching
    without a conversion made steps of 30 cm there)."""
    import dataclasses
    T_bl = bent_drive[0].rig.lidar.T_base_lidar
    deskew_at = {"turned on": lambda k: k >= 15, "turned off": lambda k: k < 15}.get(case, lambda k: True)
    odo = LidarOdometry(OdometryConfig(deskew=deskew_at(0)), T_base_lidar=T_bl, weights=None)
    poses = []
    for k, f in enumerate(bent_drive):
        odo.cfg = dataclasses.replace(odo.cfg, deskew=deskew_at(k))
        no_times = case == "sweeps without times" and k in (15, 16)
        res = odo.update(dataclasses.replace(f.lidar, time=None) if no_times else f.lidar)
        assert res.converged, res.reason
        poses.append(res.pose)
    steps = [np.linalg.norm(a[:3, 3] - b[:3, 3]) for a, b in zip(_lidar_steps(bent_drive, poses),
                                                                  _lidar_steps(bent_drive))]
    assert max(steps) < 0.025 and odo.stats["relocalized"] == 0, (np.argmax(steps), max(steps))


def test_a_dropped_scan_widens_the_motion_prior_by_its_gap_only(drive):
    """A scan lost between two others: the velocity is their motion over the 0.2 s between them, and the
    next scan's prior is the motion of the 0.1 s to it (it was half that: the velocity was rescaled to one
    period but then read against the 0.2 s gap as the period)."""
    T_bl = drive[0].rig.lidar.T_base_lidar
    odo = LidarOdometry(OdometryConfig(), T_base_lidar=T_bl, weights=None)
    for k in (0, 1, 2, 4):   # scan 3 never came
        assert odo.update(drive[k].lidar).converged
    assert odo.velocity_s == pytest.approx(0.2)
    prior = odo._velocity_for(drive[5].stamp_ns)
    truth = _lidar_steps(drive[4:6])[0]
    assert np.linalg.norm(prior[:3, 3] - truth[:3, 3]) < 0.1 * np.linalg.norm(truth[:3, 3])   # was 50 %
    assert odo.update(drive[5].lidar).converged


def test_deskew_and_orthonormalize():
    delta = make_T(rpy_to_R(0, 0, 0.1), [1.0, 0, 0])
    pts = np.array([[10.0, 0, 0], [10.0, 0, 0]])
    out = deskew(pts, np.array([0.0, 0.1]), delta, 0.1)
    assert np.allclose(out[0], pts[0]) and np.allclose(out[1], delta[:3, :3] @ pts[1] + delta[:3, 3])
    T = make_T(rpy_to_R(0.1, 0.2, 0.3), [1, 2, 3])
    T[:3, :3] *= 1.01
    fixed = orthonormalize(T)
    assert np.allclose(fixed[:3, :3] @ fixed[:3, :3].T, np.eye(3)) and np.allclose(fixed[:3, 3], [1, 2, 3])


def test_published_covariance_carries_the_prior_deviation_term_from_the_third_scan(drive):
    """update() adds the prior-deviation variance to the Hessian's, from the third scan on (the second has
    no motion prior yet: its whole motion would count as correction), on base_link's pose."""
    import dataclasses as dc
    T_bl = drive[0].rig.lidar.T_base_lidar
    runs = {}
    for k in (0.0, 0.3):
        odo = LidarOdometry(OdometryConfig(covariance_prior_deviation=k), T_base_lidar=T_bl, weights=None)
        runs[k] = [odo.update(dc.replace(f.lidar)) for f in drive[:12]]
    plain, inflated = runs[0.0], runs[0.3]
    np.testing.assert_allclose(inflated[1].covariance, plain[1].covariance)   # the second scan: no prior
    extra = [np.diag(b.covariance - a.covariance) for a, b in zip(plain[2:], inflated[2:])]
    assert all((e >= -1e-12).all() for e in extra) and all(e[0] > 0 and e[5] > 0 for e in extra)
    for e in extra:   # isotropic: the same on x, y, z, and on the three rotations
        assert np.allclose(e[:3], e[0]) and np.allclose(e[3:], e[3])


def test_prior_deviation_covariance_grows_with_the_correction():
    """The extra pose variance is (k x the correction against the motion prior)^2: isotropic, zero when the
    scan lands where the prior put it, in m^2 for a 0.5 m / rad^2 for a 0.2 rad correction."""
    from vg_ros.geometry import make_T, rpy_to_R
    from vg_ros.registration.odometry import prior_deviation_covariance
    T_pred = make_T(rpy_to_R(0.1, 0.0, 1.0), [10.0, 5.0, 0.0])
    assert np.allclose(prior_deviation_covariance(T_pred, T_pred, 0.3), 0.0)
    moved = T_pred @ make_T(rpy_to_R(0.0, 0.0, 0.2), [0.3, 0.4, 0.0])
    cov = prior_deviation_covariance(T_pred, moved, 0.3)
    np.testing.assert_allclose(np.diag(cov), [0.15 ** 2] * 3 + [0.06 ** 2] * 3)
    assert np.count_nonzero(cov - np.diag(np.diag(cov))) == 0


def test_a_map_that_no_longer_matches_restarts_after_failures_in_a_row():
    """Scans from elsewhere (another simulated town, as after a kidnapping the re-localisation cannot solve)
    fail against the local map for ever unless it restarts: after `restart_after_failures` failures in a row
    the map restarts from the last failed scan at the motion prior's pose, and the next scans register with
    their true motion (within 2 cm). 0 never restarts."""
    import dataclasses
    from vg_ros.sim import simulate
    here = list(simulate(5, 0.4, cameras=False, occupancy=False, expressions=0))
    there = list(simulate(77, 0.6, cameras=False, occupancy=False, expressions=0))
    T_bl = here[0].rig.lidar.T_base_lidar
    stamps = [here[-1].stamp_ns + (k + 1) * 100_000_000 for k in range(len(there))]
    for after in (3, 0):
        odo = LidarOdometry(OdometryConfig(relocalize=False, restart_after_failures=after), T_base_lidar=T_bl,
                            weights=None)
        assert all(odo.update(f.lidar).converged for f in here)
        results = [odo.update(dataclasses.replace(f.lidar, stamp_ns=s)) for f, s in zip(there, stamps)]
        if after == 0:
            assert not any(r.converged for r in results) and odo.stats["map_restarts"] == 0
            continue
        assert [r.converged for r in results] == [False] * 3 + [True] * (len(there) - 3)
        assert odo.stats["map_restarts"] == 1 and "map restarts" in results[2].reason
        assert np.all(np.diag(results[2].covariance) >= 1e3)   # the restart pose is never a confident one
        for k in range(3, len(there)):
            step = invert_T(results[k - 1].pose) @ results[k].pose
            truth = invert_T(there[k - 1].T_odom_base) @ there[k].T_odom_base
            assert np.linalg.norm(step[:3, 3] - truth[:3, 3]) < 0.02, k


def test_a_burst_of_bad_sweeps_keeps_the_map_and_restarts_go_on_at_the_velocity():
    """12 sweeps of noise (a driver glitch of 1.2 s) in a drive, found by a review of the map restarts. With the
    default threshold (50) the map is kept and dead reckoning bridges the burst: the drive ends within 10 cm, as
    before restarts existed. With a threshold under the burst (10) the map restarts at the 10th, then at each
    further bad sweep (a map of one bad sweep the next cannot match); those restarts must go on at the
    vehicle's velocity: with the velocity forgotten the restart poses stood still and the drive ended 3 m off."""
    import dataclasses
    from vg_ros.sim import simulate
    frames = list(simulate(5, 3.0, cameras=False, occupancy=False, expressions=0))
    truth = invert_T(frames[0].T_odom_base) @ frames[-1].T_odom_base
    for after, restarts, tolerance in ((50, 0, 0.1), (10, 3, 1.0)):
        odo = LidarOdometry(OdometryConfig(relocalize=False, restart_after_failures=after),
                            T_base_lidar=frames[0].rig.lidar.T_base_lidar, weights=None)
        rng = np.random.default_rng(1)
        results = []
        for k, frame in enumerate(frames):
            scan = frame.lidar
            if 12 <= k < 24:
                d = rng.normal(size=(3000, 3))
                xyz = d / np.linalg.norm(d, axis=1, keepdims=True) * rng.uniform(3, 60, (3000, 1))
                scan = dataclasses.replace(scan, xyz=xyz, time=None)
            results.append(odo.update(scan))
        assert odo.stats["map_restarts"] >= restarts and (restarts or odo.stats["map_restarts"] == 0)
        assert results[-1].converged
        assert np.linalg.norm(results[-1].pose[:3, 3] - truth[:3, 3]) < tolerance, after
