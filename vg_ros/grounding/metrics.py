"""Grounding metrics as in the referring-expression literature: Prec@0.5 for boxes, mIoU and oIoU for masks,
and a helper that splits any of them by hop count.

* `box_iou(a, b)`: IoU of xyxy boxes, paired rows (N, 4) x (N, 4) -> (N,) (or two (4,) -> float).
* `prec_at_05(pred, gt)`: fraction of pairs with box IoU >= 0.5, in [0, 1].
* `mask_miou(pred, gt)`: mean over samples of per-sample mask IoU (a sample with both masks empty scores 1).
* `mask_oiou(pred, gt)`: overall IoU = total intersection / total union over all samples.
* `mask_counts(pred, gt)`: per-sample intersection and union pixel counts, the one walk over the masks the
  mask metrics need (`ious_from_counts`, `report_from_counts` take them).
* `split_by_hops(values, hops)`: {hop: mean of values with that hop count} plus "all".
* `found_report(found, correct)`: how well "found" / "not found" separates right results from wrong ones.
* `bootstrap_interval(values, groups)`: a 95 % interval of a mean, resampling whole groups (camera images).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """IoU of xyxy boxes. a, b (N, 4) paired -> (N,); a, b (4,) -> float. Degenerate boxes have area 0."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    single = a.ndim == 1
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    if a.shape != b.shape or a.shape[-1] != 4:
        raise ValueError(f"box_iou: expected paired (N, 4) boxes, got {a.shape} and {b.shape}")
    lt = np.maximum(a[:, :2], b[:, :2])
    rb = np.minimum(a[:, 2:], b[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a + area_b - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    return float(iou[0]) if single else iou


def prec_at_05(pred_boxes: np.ndarray, gt_boxes: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction in [0, 1] of predictions whose box IoU with the ground truth is >= threshold."""
    ious = np.atleast_1d(box_iou(np.atleast_2d(pred_boxes), np.atleast_2d(gt_boxes)))
    if ious.size == 0:
        raise ValueError("prec_at_05: no boxes")
    return float((ious >= threshold).mean())


def mask_counts(pred: np.ndarray | Sequence, gt: np.ndarray | Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (intersection, union) pixel counts of paired boolean masks (N, H, W) or lists of (H, W)."""
    if len(pred) != len(gt) or len(pred) == 0:
        raise ValueError(f"masks: need the same non-zero number of predictions and truths, got {len(pred)} and {len(gt)}")
    inter, union = np.zeros(len(pred)), np.zeros(len(pred))
    for i, (p, g) in enumerate(zip(pred, gt)):
        p, g = np.asarray(p, dtype=bool), np.asarray(g, dtype=bool)
        if p.shape != g.shape:
            raise ValueError(f"masks: sample {i} has prediction {p.shape} but truth {g.shape}")
        inter[i] = np.logical_and(p, g).sum()
        union[i] = np.logical_or(p, g).sum()
    return inter, union


def ious_from_counts(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Per-sample IoU (N,) from `mask_counts`; both masks empty (union 0) -> 1."""
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def mask_ious(pred, gt) -> np.ndarray:
    """Per-sample IoU (N,); both empty -> 1."""
    return ious_from_counts(*mask_counts(pred, gt))


def mask_miou(pred, gt) -> float:
    """Mean of per-sample mask IoUs, in [0, 1]."""
    return float(mask_ious(pred, gt).mean())


def mask_oiou(pred, gt) -> float:
    """Cumulative intersection over cumulative union, in [0, 1] (large objects weigh more)."""
    inter, union = mask_counts(pred, gt)
    return float(inter.sum() / union.sum()) if union.sum() > 0 else 1.0


def split_by_hops(values: Sequence[float] | np.ndarray, hops: Sequence[int] | np.ndarray) -> dict:
    """{hop (int): mean value, ..., "all": mean} over paired per-sample `values` and `hops`."""
    values = np.asarray(values, dtype=np.float64)
    hops = np.asarray(hops, dtype=int)
    if values.shape != hops.shape:
        raise ValueError(f"split_by_hops: values {values.shape} and hops {hops.shape} differ")
    out: dict = {int(h): float(values[hops == h].mean()) for h in np.unique(hops)}
    out["all"] = float(values.mean()) if values.size else float("nan")
    return out


def grounding_report(pred_boxes, gt_boxes, pred_masks, gt_masks, hops) -> dict:
    """Everything at once, split by hops: {"prec@0.5", "miou", "oiou", "count"} -> {hop | "all": value}."""
    return report_from_counts(pred_boxes, gt_boxes, mask_counts(pred_masks, gt_masks), hops)


def report_from_counts(pred_boxes, gt_boxes, counts: tuple[np.ndarray, np.ndarray], hops) -> dict:
    """`grounding_report` with the masks' `mask_counts` (inter, union) already taken: several reports on
    the same masks (the published boxes, the box head's) walk them once."""
    hops = np.asarray(hops, dtype=int)
    ious = np.atleast_1d(box_iou(np.atleast_2d(pred_boxes), np.atleast_2d(gt_boxes)))
    inter, union = counts
    m_ious = ious_from_counts(inter, union)
    report = {"prec@0.5": split_by_hops(ious >= 0.5, hops), "miou": split_by_hops(m_ious, hops),
              "oiou": {}, "count": {}}
    for h in list(np.unique(hops)) + ["all"]:
        sel = np.ones_like(hops, bool) if h == "all" else hops == h
        key = h if h == "all" else int(h)
        # as mask_oiou: every mask and label empty is a perfect score
        report["oiou"][key] = float(inter[sel].sum() / union[sel].sum()) if union[sel].sum() > 0 else 1.0
        report["count"][key] = int(sel.sum())
    return report


def bootstrap_interval(values, groups, *, resamples: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (lo, hi) of the mean of per-sample `values` (N,), resampling whole
    `groups` (N,) with replacement: the expressions about one camera image share its scene, so they are not
    independent samples, and resampling them one by one would claim a narrower interval than the data
    carries. Deterministic for a `seed`."""
    values = np.asarray(values, dtype=np.float64)
    groups = np.asarray(groups)
    if values.shape != groups.shape or values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_interval: expected two equal non-empty (N,) arrays, got {values.shape} "
                         f"and {groups.shape}")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ValueError(f"bootstrap_interval: level {level} must be in (0, 1), resamples {resamples} positive")
    _, which = np.unique(groups, return_inverse=True)
    sums = np.bincount(which, weights=values)
    counts = np.bincount(which).astype(np.float64)
    draw = np.random.default_rng(seed).integers(0, len(sums), (resamples, len(sums)))
    means = sums[draw].sum(1) / counts[draw].sum(1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def found_report(found: np.ndarray, correct: np.ndarray) -> dict:
    """How far the node's "not found" can be trusted. `found` (N,) bool: published as found; `correct` (N,)
    bool: the result is right (e.g. mask IoU >= 0.5). Returns fractions in [0, 1] (NaN when undefined):
    "found_rate"; "precision" = correct among found (what a consumer of found results gets);
    "wrong_rejected" = not found among the wrong results (wrong masks kept off the topic);
    "right_kept" = found among the right ones."""
    found = np.asarray(found, dtype=bool)
    correct = np.asarray(correct, dtype=bool)
    if found.shape != correct.shape or found.ndim != 1:
        raise ValueError(f"found_report: expected two (N,) arrays, got {found.shape} and {correct.shape}")

    def frac(num: np.ndarray, den: np.ndarray) -> float:
        return float(num.sum() / den.sum()) if den.sum() else float("nan")

    return {"found_rate": float(found.mean()) if found.size else float("nan"),
            "precision": frac(found & correct, found), "wrong_rejected": frac(~found & ~correct, ~correct),
            "right_kept": frac(found & correct, correct), "count": int(found.size)}
