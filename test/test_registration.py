"""Registration pipeline on real data (../shared/data/registration) and on synthetic pairs: accuracy
from identity, outlier-heavy correspondence sets, determinism, bad input, covariance, metrics."""
from __future__ import annotations

import numpy as np
import pytest

from vg_ros.geometry import make_T, rpy_to_R
from vg_ros.registration.io import read_3dmatch_log, read_cloud, read_pose_txt
from vg_ros.registration.metrics import (ate, inlier_prf, rotation_error_deg, rpe_drift_percent, rr,
                                         translation_error)
from vg_ros.registration.pipeline import RegistrationConfig, RegistrationPipeline, rigid_covariance
from vg_ros.registration.search import weighted_kabsch, wilson_lower_bound

import torch


@pytest.fixture(scope="module")
def indoor() -> RegistrationPipeline:
    return RegistrationPipeline(RegistrationConfig.preset("indoor"), weights="default")


@pytest.fixture(scope="module")
def lidar() -> RegistrationPipeline:
    return RegistrationPipeline(RegistrationConfig.preset("lidar"), weights="default")


def real_pairs(root):
    reg = root / "registration"
    geo = reg / "3dmatch_pair_geotransformer"
    kitchen = reg / "3dmatch_redkitchen_0_4"
    lid = reg / "lidar_pair_small_gicp"
    return [
        ("3dmatch_geotransformer", "indoor", np.load(geo / "src.npy"), np.load(geo / "ref.npy"), np.load(geo / "gt.npy")),
        ("3dmatch_redkitchen_0_4", "indoor", read_cloud(kitchen / "cloud_bin_4.ply"), read_cloud(kitchen / "cloud_bin_0.ply"),
         read_3dmatch_log(kitchen / "gt.log")[(0, 4)]),
        ("lidar_small_gicp", "lidar", read_cloud(lid / "source.ply"), read_cloud(lid / "target.ply"),
         read_pose_txt(lid / "T_target_source.txt")),
    ]


THRESH = {"indoor": (15.0, 0.30), "lidar": (5.0, 0.60)}


def test_real_pairs_register_from_identity(shared_data, indoor, lidar):
    for name, preset, src, dst, gt in real_pairs(shared_data):
        pipe = indoor if preset == "indoor" else lidar
        res = pipe.register(src, dst)
        re, te = rotation_error_deg(res.transform, gt), translation_error(res.transform, gt)
        max_re, max_te = THRESH[preset]
        assert res.converged, f"{name}: {res.reason}"
        assert re < max_re and te < max_te, f"{name}: RE {re:.2f} deg TE {te:.3f} m"
        assert res.inliers >= 10 and 0 < res.inlier_ratio <= 1 and 0.2 < res.fitness <= 1
        # covariance: symmetric positive definite, translation std well under the error bound
        cov = res.covariance
        assert cov.shape == (6, 6) and np.allclose(cov, cov.T)
        assert np.all(np.linalg.eigvalsh(cov) > 0)
        assert np.sqrt(np.diag(cov)[:3]).max() < max_te


def test_real_pairs_compatibility_only(shared_data):
    """Without the network (weights=None) the same search still registers every real pair."""
    for name, preset, src, dst, gt in real_pairs(shared_data):
        res = RegistrationPipeline(RegistrationConfig.preset(preset), weights=None).register(src, dst)
        max_re, max_te = THRESH[preset]
        assert rotation_error_deg(res.transform, gt) < max_re and translation_error(res.transform, gt) < max_te, name


def test_real_pair_is_deterministic(shared_data, lidar):
    _, _, src, dst, _ = real_pairs(shared_data)[2]
    first, second = lidar.register(src, dst), lidar.register(src, dst)
    assert np.array_equal(first.transform, second.transform)
    assert first.inliers == second.inliers


@pytest.mark.parametrize("bench", range(1, 7))
def test_correspondence_outlier_sets(shared_data, bench):
    import open3d as o3d
    folder = shared_data / "registration" / "correspondence_outlier_sets" / f"benchmark_{bench}"
    src = np.asarray(o3d.io.read_point_cloud(str(folder / "src.ply")).points)
    dst = np.asarray(o3d.io.read_point_cloud(str(folder / "dst.ply")).points)
    R_ref = np.loadtxt(folder / "R_ref.csv", delimiter=",")
    s_ref = float(np.loadtxt(folder / "s_ref.csv"))
    noise_bound = float((folder / "parameters.txt").read_text().split("Noise Bound:")[1].split()[0])
    noise_bound = max(noise_bound, 1e-3)
    cfg = RegistrationConfig.preset("indoor").replace(min_inliers=3)
    pipe = RegistrationPipeline(cfg, weights="default")
    res = pipe.solve_correspondences(src, dst, tau=2 * noise_bound, estimate_scale_too=True, noise_bound=noise_bound)
    scale = np.cbrt(np.linalg.det(res.transform[:3, :3]))
    assert rotation_error_deg(res.transform[:3, :3] / scale, R_ref) < 2.0
    assert abs(scale / s_ref - 1) < 0.01


def synthetic_pair(seed: int, n: int = 3000):
    """A box room with clutter: structured enough for FPFH."""
    rng = np.random.default_rng(seed)
    walls = []
    for axis in range(3):
        for side in (0.0, 4.0):
            pts = rng.uniform(0, 4, size=(n // 6, 3))
            pts[:, axis] = side
            walls.append(pts)
    boxes = [rng.uniform(0.5, 3.5, 3) + rng.uniform(-0.3, 0.3, size=(300, 3)) for _ in range(6)]
    cloud = np.concatenate(walls + boxes)
    T = make_T(rpy_to_R(*rng.uniform(-0.4, 0.4, 3)), rng.uniform(-0.5, 0.5, 3))
    moved = cloud @ T[:3, :3].T + T[:3, 3]
    return cloud, moved, T


def test_rigid_covariance_reflects_geometry():
    rng = np.random.default_rng(0)
    plane = np.c_[rng.uniform(-5, 5, (500, 2)), np.zeros(500)]
    normals = np.tile([0.0, 0.0, 1.0], (500, 1))
    resid = np.c_[np.zeros((500, 2)), rng.normal(0, 0.01, 500)]
    cov = rigid_covariance(plane, resid, normals)
    # a single plane constrains z, roll, pitch; x, y, yaw are unobservable -> huge variance
    assert cov[2, 2] < 1e-4 and cov[3, 3] < 1e-4 and cov[4, 4] < 1e-4
    assert min(cov[0, 0], cov[1, 1], cov[5, 5]) > 1e3 * max(cov[2, 2], cov[3, 3], cov[4, 4])
    # residual variance scales the covariance
    cov2 = rigid_covariance(plane, resid * 10, normals)
    assert np.isclose(cov2[2, 2] / cov[2, 2], 100.0, rtol=1e-6)


def test_weighted_kabsch_recovers_transform_and_ignores_zero_weights():
    rng = np.random.default_rng(1)
    src = torch.as_tensor(rng.normal(size=(1, 50, 3)))
    T = make_T(rpy_to_R(0.3, -0.2, 1.0), [1.0, 2.0, -0.5])
    dst = src @ torch.as_tensor(T[:3, :3]).T + torch.as_tensor(T[:3, 3])
    dst[0, :10] += 5.0  # outliers with zero weight
    w = torch.ones(1, 50, dtype=torch.float64)
    w[0, :10] = 0
    est = weighted_kabsch(src, dst, w)[0].numpy()
    assert np.allclose(est, T, atol=1e-9)


def test_wilson_lower_bound_values():
    lb = wilson_lower_bound(torch.tensor([0.0, 6.0, 12.0]), 12, 1.96)
    assert lb[0] == 0 and 0.2 < lb[1] < 0.3 and 0.75 < lb[2] < 0.76  # 12/12 -> 0.7575


def test_bad_inputs_give_converged_false(indoor):
    good = np.random.default_rng(0).normal(size=(100, 3))
    cases = {
        "empty": np.zeros((0, 3)),
        "two points": np.zeros((2, 3)),
        "all nan": np.full((100, 3), np.nan),
    }
    for name, cloud in cases.items():
        res = indoor.register(cloud, good)
        assert not res.converged and res.reason, name
        assert np.array_equal(res.transform, np.eye(4))
    res = indoor.register(good, good[:, :2])  # wrong shape
    assert not res.converged and "shape" in res.reason
    res = indoor.solve_correspondences(np.zeros((5, 3)), np.zeros((5, 3)))
    assert not res.converged  # coincident points: degenerate


def test_clouds_in_map_coordinates_register_as_well_as_near_the_origin(shared_data, indoor):
    """A pair given in UTM-like coordinates (millions of metres; float32 would keep half-metres there), the
    target only or both shifted: registered about each cloud's centre and composed back, as accurate as the
    pair at the origin; covariance still positive definite. Coordinates no voxel grid can index: a reason."""
    _, _, src, dst, gt = real_pairs(shared_data)[0]
    base = indoor.register(src, dst)
    offset = np.array([5.0e6, 4.2e6, 120.0])
    shift = make_T(np.eye(3), offset)

    def point_error(T, T_true, points):   # mean distance of the source's points mapped by T and by T_true
        return float(np.linalg.norm((points @ T[:3, :3].T + T[:3, 3]) - (points @ T_true[:3, :3].T + T_true[:3, 3]),
                                    axis=1).mean())
    at_origin = point_error(base.transform, gt, src)
    for moved_src in (False, True):
        given = src + offset if moved_src else src
        res = indoor.register(given, dst + offset)
        expected = shift @ gt @ (np.linalg.inv(shift) if moved_src else np.eye(4))
        assert res.converged, res.reason
        assert rotation_error_deg(res.transform, expected) < 0.2 + rotation_error_deg(base.transform, gt)
        assert point_error(res.transform, expected, given) < 0.02 + at_origin
        assert np.all(np.linalg.eigvalsh(res.covariance) > 0)
    far = indoor.register(src * 1e30, dst)
    assert not far.converged and "not a metric point cloud" in far.reason


def test_identical_clouds_give_identity(indoor):
    src, _, _ = synthetic_pair(3)
    res = indoor.register(src, src)
    assert res.converged
    assert rotation_error_deg(res.transform, np.eye(4)) < 0.5 and translation_error(res.transform, np.eye(4)) < 0.02


def test_synthetic_pair(indoor):
    src, dst, T = synthetic_pair(4)
    res = indoor.register(src, dst)
    assert res.converged, res.reason
    assert rotation_error_deg(res.transform, T) < 2.0 and translation_error(res.transform, T) < 0.05


def test_huge_cloud_is_downsampled_not_a_crash():
    rng = np.random.default_rng(0)
    base, moved, T = synthetic_pair(5)
    huge = np.repeat(moved.astype(np.float32), 10_000_000 // len(moved) + 1, axis=0)[:10_000_000]
    huge += rng.normal(0, 0.002, size=(1, 3)).astype(np.float32)
    pipe = RegistrationPipeline(RegistrationConfig.preset("indoor"), weights="default")
    res = pipe.register(base, huge)
    assert res.seconds < 60
    assert rotation_error_deg(res.transform, T) < 5.0


def test_metrics():
    T = make_T(rpy_to_R(0, 0, np.radians(10)), [0.3, 0.4, 0])
    assert np.isclose(rotation_error_deg(T, np.eye(4)), 10.0)
    assert np.isclose(translation_error(T, np.eye(4)), 0.5)
    assert rr([T, np.eye(4)], [np.eye(4), np.eye(4)], 5.0, 0.6) == 0.5
    assert inlier_prf(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == (0.5, 0.5, 0.5)
    gt = np.stack([make_T(t=[i, 0, 0]) for i in range(100)])
    assert ate(gt, gt) == 0 and rpe_drift_percent(gt, gt) == 0
    est = np.stack([make_T(t=[1.01 * i, 0, 0]) for i in range(100)])
    assert np.isclose(rpe_drift_percent(est, gt), 1.0, rtol=0.05)
    # a robot standing still: drift is undefined (NaN), not a perfect 0 %, however far the estimate wanders
    still = np.stack([np.eye(4)] * 10)
    assert np.isnan(rpe_drift_percent(est[:10], still))
    with pytest.raises(ValueError):
        ate(gt[:3], gt)
