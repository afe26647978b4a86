"""Occ3D metrics on the real Occ3D-nuScenes label sample: perfect scores 100, a shifted prediction less."""
from __future__ import annotations

import numpy as np
import pytest

from vg_ros.occupancy.metrics import OccupancyScore, geometric_iou, occ3d_miou
from vg_ros.types import FREE_CLASS


@pytest.fixture(scope="module")
def occ3d(shared_data):
    path = next((shared_data / "occupancy" / "occ3d_label_sample").glob("*/labels.npz"))
    data = np.load(path)
    return data["semantics"], data["mask_camera"]


def test_perfect_prediction_scores_100(occ3d):
    gt, mask = occ3d
    sem = occ3d_miou(gt, gt, mask)
    assert sem["miou"] == pytest.approx(100.0)
    present = {c for c in np.unique(gt[mask.astype(bool)]) if c != FREE_CLASS}
    scored = {name for name, v in sem["per_class"].items() if v is not None}
    assert len(scored) == len(present) >= 5
    assert geometric_iou(gt, gt, mask)["iou"] == pytest.approx(100.0)


def test_shifted_prediction_scores_less(occ3d):
    gt, mask = occ3d
    shifted = np.roll(gt, 3, axis=0)
    sem, geo = occ3d_miou(shifted, gt, mask), geometric_iou(shifted, gt, mask)
    assert sem["miou"] < 90.0 and geo["iou"] < 90.0
    all_free = np.full_like(gt, FREE_CLASS)
    assert occ3d_miou(all_free, gt, mask)["miou"] == 0.0 and geometric_iou(all_free, gt, mask)["iou"] == 0.0


def test_mask_restricts_scoring_and_numbers_by_hand():
    gt = np.full((4, 1, 1), FREE_CLASS, np.uint8)
    gt[:2] = 4  # two car voxels
    pred = gt.copy()
    pred[1] = FREE_CLASS  # one car missed
    pred[2] = 4  # one false car
    sem = occ3d_miou(pred, gt, np.ones_like(gt))
    assert sem["per_class"]["car"] == pytest.approx(100 / 3) and sem["miou"] == pytest.approx(100 / 3)
    assert geometric_iou(pred, gt)["iou"] == pytest.approx(100 / 3)
    mask = np.array([1, 0, 0, 1], np.uint8).reshape(4, 1, 1)  # the wrong voxels are not camera-visible
    assert occ3d_miou(pred, gt, mask)["miou"] == pytest.approx(100.0)


def test_accumulates_over_frames_and_rejects_bad_input():
    score = OccupancyScore()
    gt = np.full((2, 2, 2), FREE_CLASS, np.uint8)
    gt[0, 0, 0] = 1
    score.add(gt, gt)
    score.add(np.full_like(gt, FREE_CLASS), gt)
    assert score.result()["per_class"]["barrier"] == pytest.approx(50.0) and score.result()["frames"] == 2
    with pytest.raises(ValueError, match="shape"):
        occ3d_miou(gt, gt[:1])
    with pytest.raises(ValueError, match="outside"):
        occ3d_miou(gt + 20, gt, np.ones_like(gt))


def test_obstacle_iou_counts_ground_classes_as_not_occupied():
    gt = np.full((5, 1, 1), FREE_CLASS, np.uint8)
    gt[0], gt[1], gt[2] = 14, 4, 15  # terrain, car, manmade
    pred = gt.copy()
    pred[2] = 11  # the wall called driveable surface: occupied right, obstacle missed
    pred[3] = 16  # a false vegetation voxel
    r = occ3d_miou(pred, gt)
    assert r["iou"] == pytest.approx(300 / 4)  # 3 hits of 4 occupied in the union
    assert r["obstacle_iou"] == pytest.approx(100 / 3)  # car found; wall missed; vegetation false


def test_ground_only_prediction_keeps_geometry_but_finds_no_obstacle(occ3d):
    gt, mask = occ3d
    ground = np.isin(gt, [11, 12, 13, 14])
    ground_only = np.where(ground, gt, FREE_CLASS).astype(np.uint8)
    full, flat = occ3d_miou(gt, gt, mask), occ3d_miou(ground_only, gt, mask)
    assert full["obstacle_iou"] == pytest.approx(100.0)
    assert flat["obstacle_iou"] == 0.0 and flat["iou"] > 0.0
    with pytest.raises(ValueError, match="outside"):   # without a camera mask too (was a reshape error)
        occ3d_miou(gt, np.where(gt == 1, 255, gt).astype(np.uint8))
