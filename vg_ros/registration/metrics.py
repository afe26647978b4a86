"""How registration is scored: rotation/translation error, success under a threshold pair, registration
recall (RR), inlier precision/recall/F1 for correspondence sets, and ATE / drift over 10-50 m segments (KITTI's error, shorter segments) for
trajectories. Transforms are (4, 4) numpy arrays mapping source into target."""
from __future__ import annotations

import numpy as np

# (RE deg, TE m) success thresholds of the two benchmarks.
THRESHOLDS = {"indoor": (15.0, 0.30), "lidar": (5.0, 0.60)}


def rotation_error_deg(T_est: np.ndarray, T_gt: np.ndarray) -> float:
    """Angle of R_est^T R_gt in degrees (accepts (3, 3) or (4, 4))."""
    R_est, R_gt = np.asarray(T_est)[:3, :3], np.asarray(T_gt)[:3, :3]
    cos = (np.trace(R_est.T @ R_gt) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def translation_error(T_est: np.ndarray, T_gt: np.ndarray) -> float:
    """|t_est - t_gt| in metres."""
    return float(np.linalg.norm(np.asarray(T_est)[:3, 3] - np.asarray(T_gt)[:3, 3]))


def success(T_est: np.ndarray, T_gt: np.ndarray, re_deg: float, te_m: float) -> bool:
    return rotation_error_deg(T_est, T_gt) < re_deg and translation_error(T_est, T_gt) < te_m


def rr(estimates: list[np.ndarray], ground_truth: list[np.ndarray], re_deg: float = 5.0, te_m: float = 0.6) -> float:
    """Registration recall in [0, 1]: the fraction of pairs within both thresholds."""
    if len(estimates) != len(ground_truth):
        raise ValueError(f"rr: {len(estimates)} estimates for {len(ground_truth)} ground-truth poses")
    if not estimates:
        raise ValueError("rr: no pairs")
    return float(np.mean([success(e, g, re_deg, te_m) for e, g in zip(estimates, ground_truth)]))


def inlier_prf(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall, F1 of predicted inlier flags (N,) against true flags (N,). 0 where undefined."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"inlier_prf: predicted {predicted.shape} vs truth {truth.shape}")
    tp = float(np.sum(predicted & truth))
    precision = tp / predicted.sum() if predicted.sum() else 0.0
    recall = tp / truth.sum() if truth.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return float(precision), float(recall), float(f1)


def _check_traj(est: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    est, gt = np.asarray(est, float), np.asarray(gt, float)
    if est.ndim != 3 or est.shape[1:] != (4, 4) or est.shape != gt.shape:
        raise ValueError(f"trajectories must both be (T, 4, 4); got {est.shape} and {gt.shape}")
    return est, gt


def ate(est: np.ndarray, gt: np.ndarray, align: bool = True) -> float:
    """Absolute trajectory error: RMS position error (m) after a rigid (Umeyama, no scale) alignment of
    est (T, 4, 4) onto gt (T, 4, 4); `align=False` compares the raw positions."""
    est, gt = _check_traj(est, gt)
    p_est, p_gt = est[:, :3, 3], gt[:, :3, 3]
    if align and len(p_est) >= 3:
        mu_e, mu_g = p_est.mean(0), p_gt.mean(0)
        U, _, Vt = np.linalg.svd((p_gt - mu_g).T @ (p_est - mu_e))
        D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
        R = U @ D @ Vt
        p_est = (p_est - mu_e) @ R.T + mu_g
    return float(np.sqrt(np.mean(np.sum((p_est - p_gt) ** 2, axis=1))))


def path_lengths(poses: np.ndarray) -> np.ndarray:
    steps = np.linalg.norm(np.diff(poses[:, :3, 3], axis=0), axis=1)
    return np.concatenate([[0.0], np.cumsum(steps)])


def rpe_drift_percent(est: np.ndarray, gt: np.ndarray, lengths: tuple[float, ...] = (10, 20, 30, 40, 50)) -> float:
    """Translational drift in %, KITTI's error over segments but short ones (10-50 m by default; KITTI's
    benchmark uses 100-800 m and every 10th start frame): for every start frame and segment length (m) of
    the GT path, |relative translation error| / segment length, averaged. Segments longer than the path
    are skipped; when none fits, one segment over the whole path is used; NaN when the GT path has no
    length (a robot standing still: drift is undefined, not zero)."""
    est, gt = _check_traj(est, gt)
    dist = path_lengths(gt)
    errors = []
    usable = [L for L in lengths if L < dist[-1]] or ([dist[-1]] if dist[-1] > 0 else [])
    for L in usable:
        for first in range(len(gt)):
            last_candidates = np.nonzero(dist >= dist[first] + L)[0]
            if len(last_candidates) == 0:
                break
            last = int(last_candidates[0])
            rel_gt = np.linalg.inv(gt[first]) @ gt[last]
            rel_est = np.linalg.inv(est[first]) @ est[last]
            err = np.linalg.inv(rel_est) @ rel_gt
            errors.append(np.linalg.norm(err[:3, 3]) / L)
    if not errors:
        return float("nan")
    return float(100.0 * np.mean(errors))
