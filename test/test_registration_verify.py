"""Hypothesis verification on the clouds (vg_ros/registration/verify.py) and its use in the pipeline: a
wrong pose that explains more putative matches than the right one loses to the right one on the clouds."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from vg_ros.geometry import make_T, rpy_to_R
from vg_ros.registration.metrics import rotation_error_deg, translation_error
from vg_ros.registration.pipeline import RegistrationConfig, RegistrationPipeline
from vg_ros.registration.verify import CloudVerifier


def street_scene(seed: int = 0) -> np.ndarray:
    """An asymmetric outdoor scene at LiDAR scale (m): facades of different lengths and heights, poles,
    boxes (parked cars); no ground. (N, 3)."""
    rng = np.random.default_rng(seed)
    parts = []
    for x0, x1, y, height in ((-30, 25, 8, 9), (-10, 30, -9, 5), (-30, -12, -9, 12)):
        n = int((x1 - x0) * height * 4)
        parts.append(np.c_[rng.uniform(x0, x1, n), np.full(n, y) + rng.normal(0, 0.02, n), rng.uniform(0, height, n)])
    for x in (-20, -4, 11, 17):
        parts.append(np.c_[np.full(80, x) + rng.normal(0, 0.05, 80), np.full(80, 5.5) + rng.normal(0, 0.05, 80),
                           rng.uniform(0, 4, 80)])
    for x, y in ((-15, -6), (3, -6.5), (8, 5.8), (22, -6)):
        box = rng.uniform([-2.0, -0.9, 0.0], [2.0, 0.9, 1.5], size=(400, 3))
        parts.append(box + [x, y, 0.0])
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def scene():
    pipe = RegistrationPipeline(RegistrationConfig.preset("lidar"), weights=None)
    src = pipe.preprocess(street_scene(), "source")
    T_true = make_T(rpy_to_R(0.0, 0.0, np.radians(35.0)), [2.0, -1.0, 0.0])
    dst = src @ T_true[:3, :3].T + T_true[:3, 3]
    src_normals, _ = pipe.describe(src)
    dst_normals, _ = pipe.describe(dst)
    return src, dst, src_normals, dst_normals, T_true


def test_coarse_and_fine_overlap(scene):
    src, dst, _, _, T_true = scene
    keep_src, keep_dst = np.ones(len(src), bool), np.ones(len(dst), bool)
    verifier = CloudVerifier(src, dst, keep_src, keep_dst, voxel_size=0.3, cell=1.2, sample=500)
    far = make_T(t=[500.0, 0.0, 0.0])
    flip = T_true @ make_T(rpy_to_R(0.0, 0.0, np.pi))
    coarse = verifier.coarse_overlap(np.stack([T_true, far, flip]))
    assert coarse.shape == (3,)
    assert coarse[0] == 1.0 and coarse[1] == 0.0 and coarse[2] < 0.5
    assert verifier.overlap(T_true) == 1.0 and verifier.overlap(flip) < 0.3
    with pytest.raises(ValueError, match="S, 4, 4"):
        verifier.coarse_overlap(T_true)


def test_align_recovers_a_rough_pose(scene):
    src, dst, _, _, T_true = scene
    verifier = CloudVerifier(src, dst, np.ones(len(src), bool), np.ones(len(dst), bool), voxel_size=0.3, cell=1.2)
    rough = T_true @ make_T(rpy_to_R(0.0, 0.0, np.radians(3.0)), [0.8, -0.5, 0.1])
    aligned = verifier.align(rough, [2.4, 1.2, 1.0])
    assert rotation_error_deg(aligned, T_true) < 0.2 and translation_error(aligned, T_true) < 0.05
    assert verifier.overlap(aligned) > verifier.overlap(rough)


def test_verification_beats_a_correspondence_majority(scene):
    """40 true matches, 120 matches consistent with a 180 deg flip, 400 random: the correspondence score
    (the paper's choice, verify_candidates=1) takes the flip; verification on the clouds the truth."""
    src, dst, src_normals, dst_normals, T_true = scene
    rng = np.random.default_rng(1)
    rows = rng.permutation(len(src))
    true_rows, rest = rows[:40], rows[40:]
    flip = T_true @ make_T(rpy_to_R(0.0, 0.0, np.pi), [3.0, -1.0, 0.0])  # maps one facade onto the other
    # flip-consistent matches: source points that the flipped pose puts (nearly) onto a target point
    flip_dist, flip_cols = cKDTree(dst).query(src[rest] @ flip[:3, :3].T + flip[:3, 3])
    on_target = np.nonzero(flip_dist < 0.3)[0][:120]
    noise_rows = rest[np.setdiff1d(np.arange(len(rest)), on_target)][:400]
    pairs = np.concatenate([np.c_[true_rows, true_rows], np.c_[rest[on_target], flip_cols[on_target]],
                            np.c_[noise_rows, rng.integers(0, len(dst), len(noise_rows))]])
    assert len(on_target) == 120  # the flip really has the majority

    every_seed = RegistrationConfig.preset("lidar").replace(min_seeds=len(pairs), max_seeds=len(pairs))
    paper = RegistrationPipeline(every_seed.replace(verify_candidates=1), weights=None)
    res = paper.register_matches(src, src_normals, dst, dst_normals, pairs)
    assert rotation_error_deg(res.transform, T_true) > 90

    verified = RegistrationPipeline(every_seed, weights=None)
    res = verified.register_matches(src, src_normals, dst, dst_normals, pairs)
    assert res.converged, res.reason
    assert rotation_error_deg(res.transform, T_true) < 0.5 and translation_error(res.transform, T_true) < 0.1
    again = verified.register_matches(src, src_normals, dst, dst_normals, pairs)
    assert np.array_equal(res.transform, again.transform)  # deterministic


def test_hard_sim_pairs_register():
    """Two held-out simulator pairs 10-14 scans apart with 14-16 true inliers among 1000 putative matches,
    where the correspondence score prefers a 90 or 180 deg wrong pose (both failed before the clouds
    verified the hypotheses)."""
    from vg_ros.registration.train import PairSpec, sim_pairs
    pipe = RegistrationPipeline(RegistrationConfig.preset("lidar"), weights="default")
    pairs = {p.name: p for seed in (9502, 9507) for p in sim_pairs(seed, PairSpec())}
    for name in ("sim9502_60_14", "sim9507_26_10"):
        pair = pairs[name]
        res = pipe.register(pair.src, pair.dst)
        assert res.converged, f"{name}: {res.reason}"
        re, te = rotation_error_deg(res.transform, pair.T_gt), translation_error(res.transform, pair.T_gt)
        assert re < 1.0 and te < 0.1, f"{name}: RE {re:.2f} deg TE {te:.3f} m"


def test_bev_hypotheses_find_the_yaw_and_shift(scene):
    """The bird's-eye-view correlation puts its best pose within a cell and a yaw step of the truth."""
    src, dst, _, _, T_true = scene
    verifier = CloudVerifier(src, dst, np.ones(len(src), bool), np.ones(len(dst), bool), voxel_size=0.3, cell=1.2)
    poses = verifier.bev_hypotheses(3, cell=1.0, yaw_step_deg=3.0)
    assert poses.shape == (3, 4, 4)
    assert rotation_error_deg(poses[0], T_true) < 3.0 and translation_error(poses[0], T_true) < 1.5
    assert np.allclose(poses[:, 2, :3], [0.0, 0.0, 1.0]) and np.allclose(poses[:, 2, 3], 0.0)  # yaw + x, y only
    assert verifier.bev_hypotheses(0, cell=1.0, yaw_step_deg=3.0).shape == (0, 4, 4)


def test_bev_hypotheses_rescue_a_pair_the_matches_get_wrong():
    """A held-out sim pair 14 scans apart (14.9 m) that the compatibility-only pipeline gets wrong from its
    FPFH matches (RE 3.2 deg, TE 14.9 m in `vg-ros eval registration --full --set bev_candidates=0`); the
    bird's-eye-view candidates (lidar preset) find the right pose and the clouds' overlap picks it.

    Whether the matches alone fail here depends on the machine (same pinned packages: on one 2-core machine
    of 2026-12-01 they found the pose, RE 0.15 deg, TE 0.01 m), so the rescue is asserted where they fail
    and the candidates must never turn a right pose wrong where they do not."""
    from vg_ros.registration.train import PairSpec, sim_pairs
    pair = next(p for p in sim_pairs(9919, PairSpec()) if p.name == "sim9919_7_14")
    off = RegistrationPipeline(RegistrationConfig.preset("lidar").replace(bev_candidates=0), weights=None)
    res = off.register(pair.src, pair.dst)
    re, te = rotation_error_deg(res.transform, pair.T_gt), translation_error(res.transform, pair.T_gt)
    matches_wrong = re > 5 or te > 0.6
    on = RegistrationPipeline(RegistrationConfig.preset("lidar"), weights=None)
    res = on.register(pair.src, pair.dst)
    assert res.converged, res.reason
    assert rotation_error_deg(res.transform, pair.T_gt) < 1.0 and translation_error(res.transform, pair.T_gt) < 0.1
    if matches_wrong:
        assert on.last_debug["chosen_from"] == "bev"
