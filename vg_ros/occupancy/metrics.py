"""Occ3D scoring: semantic mIoU over classes 0-16 and geometric (occupied vs free) IoU on camera-visible voxels.

As the Occ3D-nuScenes challenge code does: voxels count only where `mask_camera.astype(bool)`; a
confusion matrix is accumulated over frames; per-class IoU = TP / (TP + FP + FN); mIoU is the mean over
classes 0-16 whose union is non-empty (NaN classes are left out). Free is class 17 and is not scored
semantically; geometric IoU scores "occupied" (class != 17) against free. Numbers are in percent.

Beside them, `obstacle_iou` (ours, not Occ3D's): geometric IoU with the flat ground classes (driveable
surface, other flat, sidewalk, terrain) counted as not occupied, i.e. how well the voxels a robot must
avoid are found. On a flat street most camera-visible occupied voxels are the ground layer, which a
height prior gets by construction, so geometric IoU alone hardly separates a model from it.
"""
from __future__ import annotations

import numpy as np

from vg_ros.types import FREE_CLASS, NUM_OCC_CLASSES, OCC_CLASSES

SCORED_CLASSES = FREE_CLASS  # classes 0..16
GROUND_CLASSES = tuple(OCC_CLASSES.index(n) for n in ("driveable_surface", "other_flat", "sidewalk", "terrain"))
OBSTACLE_CLASSES = np.array([c for c in range(FREE_CLASS) if c not in GROUND_CLASSES])


def _check(pred: np.ndarray, gt: np.ndarray, mask_camera: np.ndarray | None) -> np.ndarray:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"occupancy metrics: pred shape {pred.shape} != gt shape {gt.shape}")
    for name, arr in (("pred", pred), ("gt", gt)):   # with or without a mask: one clear error
        if arr.size and (arr.min() < 0 or arr.max() >= NUM_OCC_CLASSES):
            raise ValueError(f"occupancy metrics: {name} holds labels outside 0..{NUM_OCC_CLASSES - 1}")
    if mask_camera is None:
        return np.ones(gt.shape, dtype=bool)
    mask = np.asarray(mask_camera).astype(bool)
    if mask.shape != gt.shape:
        raise ValueError(f"occupancy metrics: mask_camera shape {mask.shape} != gt shape {gt.shape}")
    return mask


def _grouped_iou(conf: np.ndarray, classes: np.ndarray) -> float:
    """IoU in percent of "any of `classes`" against the rest, from a [gt, pred] confusion matrix."""
    hit = conf[np.ix_(classes, classes)].sum()
    union = conf[classes].sum() + conf[:, classes].sum() - hit
    return float(100.0 * hit / union) if union > 0 else float("nan")


class OccupancyScore:
    """Accumulates a confusion matrix over frames; `result()` gives per-class IoU, mIoU and geometric IoU."""

    def __init__(self) -> None:
        self.confusion = np.zeros((NUM_OCC_CLASSES, NUM_OCC_CLASSES), dtype=np.int64)  # [gt, pred]
        self.frames = 0

    def add(self, pred: np.ndarray, gt: np.ndarray, mask_camera: np.ndarray | None = None) -> None:
        """pred, gt (X, Y, Z) class ids 0..17; mask_camera (X, Y, Z) any dtype, nonzero = scored."""
        mask = _check(pred, gt, mask_camera)
        g = np.asarray(gt)[mask].astype(np.int64)
        p = np.asarray(pred)[mask].astype(np.int64)
        self.confusion += np.bincount(g * NUM_OCC_CLASSES + p, minlength=NUM_OCC_CLASSES ** 2).reshape(
            NUM_OCC_CLASSES, NUM_OCC_CLASSES)
        self.frames += 1

    def result(self) -> dict:
        conf = self.confusion
        tp = np.diag(conf).astype(np.float64)
        union = conf.sum(0) + conf.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan) * 100.0
        per_class = iou[:SCORED_CLASSES]
        return {
            "per_class": {OCC_CLASSES[c]: (None if np.isnan(v) else float(v)) for c, v in enumerate(per_class)},
            "miou": float(np.nanmean(per_class)) if np.any(~np.isnan(per_class)) else float("nan"),
            "iou": _grouped_iou(conf, np.arange(FREE_CLASS)),
            "obstacle_iou": _grouped_iou(conf, OBSTACLE_CLASSES),
            "frames": self.frames,
            "voxels": int(conf.sum()),
        }


def occ3d_miou(pred: np.ndarray, gt: np.ndarray, mask_camera: np.ndarray | None = None) -> dict:
    """One frame's Occ3D semantic score: {"per_class": {name: IoU % or None}, "miou": %, ...}."""
    score = OccupancyScore()
    score.add(pred, gt, mask_camera)
    return score.result()


def geometric_iou(pred: np.ndarray, gt: np.ndarray, mask_camera: np.ndarray | None = None) -> dict:
    """Occupied (class != 17) vs free IoU in percent: {"iou": %, "per_class": {"free": %, "occupied": %}}."""
    mask = _check(pred, gt, mask_camera)
    occ_p = np.asarray(pred)[mask] != FREE_CLASS
    occ_g = np.asarray(gt)[mask] != FREE_CLASS

    def iou(a: np.ndarray, b: np.ndarray) -> float | None:
        union = np.count_nonzero(a | b)
        return None if union == 0 else 100.0 * np.count_nonzero(a & b) / union

    occupied, free = iou(occ_p, occ_g), iou(~occ_p, ~occ_g)
    return {"iou": float("nan") if occupied is None else occupied, "per_class": {"occupied": occupied, "free": free}}
