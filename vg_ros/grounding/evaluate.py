"""`vg-ros eval grounding`: score VG-LAW weights on held-out simulated scenes, split by hop count.

Reports Prec@0.5, mask mIoU and oIoU per hop count, by target size (`SIZE_BUCKETS`) and where the misses go
(`OUTCOMES`: outlined badly on the target, another referred object, elsewhere, empty); how often a command
whose referent is NOT in the image is still answered as found (`absent`: each image paired with another
expression of the split whose target noun phrase admits nothing in it; the node should publish "not
found"); how often a command whose object and anchor are both in the image, but not in the named relation,
is answered as found (`relation_negative`: "the red car left of the bus" turned into "... right of the bus"
where no red car is; `data.relation_negatives` re-runs the simulator for them); and two controls:

* `phi_zero`: the same weights with the language-adaptive weights disabled (Phi fixed at zero, W0 only);
  the heads still see the [CLS] feature. (An inference-time ablation; `vg-ros train grounding
  --ablation-phi-zero` trains the retrained ablation the paper reports.)
* `mismatched`: each image paired with a command about a DIFFERENT object in the same image, scored
  against the original target. Chance level printed beside it: how often the other object's own box
  already overlaps the target with IoU >= 0.5.

Masks and boxes are scored at the camera's full resolution (480x270 by default), exactly as the
pipeline post-processes them (`GroundingConfig`: one mask region, the box = the mask's tight box). The
`box_head` row scores the box head's own regression (the paper's REC output) on the same runs.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vg_ros.grounding import metrics
from vg_ros.grounding.model import VGLAW, cxcywh_to_xyxy

DEFAULT_VAL_SEEDS = "1000-1011"
SWEEP_THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)   # score_threshold candidates (--sweep)
PRESENCE_SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # presence_threshold candidates (--sweep)


@torch.no_grad()
def predict(model: VGLAW, split, text_index: np.ndarray, *, batch: int = 32, device: str | torch.device = "cpu",
            use_language_weights: bool = True, config=None, expr_subset=None) -> dict[str, np.ndarray | list]:
    """Run `model` over the split's expressions (all, or `expr_subset`) with the texts `text_index`, one
    per expression run (aligned with `expr_subset` when given), post-processed exactly as the pipeline does
    with `config` (a `GroundingConfig`; None = its defaults).

    Returns {"boxes" (n, 4) xyxy pixels as published, "head_boxes" (n, 4) the box head's own, "masks" list of
    (H, W) bool, "scores" (n,), "presences" (n,) (NaN without a presence head)} at the image size stored
    in the split (full-size splits give full-resolution results)."""
    from vg_ros.grounding.data import resize_image
    from vg_ros.grounding.pipeline import GroundingConfig, mask_from_logits, published_box

    config = config or GroundingConfig()
    model.eval()
    spec = model.spec
    idx_all = np.arange(len(split)) if expr_subset is None else np.asarray(expr_subset)
    text_index = np.asarray(text_index)
    if len(text_index) != len(idx_all):
        raise ValueError(f"text_index: {len(text_index)} texts for {len(idx_all)} expressions")
    H, W = split.size
    boxes, head_boxes, masks, scores, presences = [], [], [], [], []
    for start in range(0, len(idx_all), batch):
        idx = idx_all[start:start + batch]
        images = torch.stack([resize_image(split.images[i], (spec.img_h, spec.img_w))
                              for i in split.expr_image[idx]]).to(device)
        feats, valid = split.text_batch(text_index[start:start + batch])
        out = model.forward_visual(images, model.generate(feats.to(device), valid.to(device)), use_language_weights)
        head = cxcywh_to_xyxy(out["boxes"].double()).cpu().numpy() * [W, H, W, H]
        presences.append(out["presence_logits"].sigmoid().cpu().numpy() if "presence_logits" in out
                           else np.full(len(idx), np.nan))
        for b in range(len(idx)):
            mask, score = mask_from_logits(out["mask_logits"][b], (H, W), config.mask_threshold, config.single_region)
            masks.append(mask)
            scores.append(score)
            boxes.append(published_box(mask, head[b], config.box_source))
        head_boxes.append(head)
    return {"boxes": np.stack(boxes), "head_boxes": np.concatenate(head_boxes), "masks": masks,
            "scores": np.asarray(scores), "presences": np.concatenate(presences)}


# the headline totals: (printed label, report key); the ones with a 95 % interval and a paired difference
HEADLINE = (("P@0.5", "prec@0.5"), ("mIoU", "miou"))


def evaluate_split(model: VGLAW, split, *, device="cpu", batch: int = 32, config=None,
                   controls: bool = True, absent: bool = True, negatives: np.ndarray | None = None,
                   log=print) -> dict:
    """All numbers for one held-out split: {"main", "absent", "relation_negative", "phi_zero", "mismatched",
    "chance", ...} reports. `config` (a `GroundingConfig`; None: the pipeline's defaults) decides what would
    be published as found (`pipeline.published_found`: its score and presence thresholds). `negatives`
    (E,): per expression the text id of its relation-turned negative or -1 (`data.relation_negatives`)."""
    from vg_ros.grounding.pipeline import GroundingConfig, published_found
    config = config or GroundingConfig()
    H, W = split.size
    gt_boxes = split.boxes.astype(np.float64) * [W, H, W, H]
    gt_masks = [split.masks(i) for i in range(len(split))]
    hops = split.hops.astype(int)
    t0 = time.time()
    main = predict(model, split, split.text_index, batch=batch, device=device)
    main_counts = metrics.mask_counts(main["masks"], gt_masks)   # the one walk over the main masks
    main_mask_ious = metrics.ious_from_counts(*main_counts)
    correct = main_mask_ious >= 0.5
    absent_run = None
    if absent:
        image_ids, first = np.unique(split.expr_image, return_index=True)
        texts = split.absent_texts(image_ids, np.random.default_rng(0))
        keep = texts >= 0
        absent_run = predict(model, split, texts[keep], batch=batch, device=device, expr_subset=first[keep])
    relation_run, has_negative = None, np.flatnonzero(negatives >= 0) if negatives is not None else None
    if has_negative is not None and len(has_negative):
        relation_run = predict(model, split, negatives[has_negative], batch=batch, device=device,
                               expr_subset=has_negative)
    refusals = {"absent_found_rate": absent_run, "relation_found_rate": relation_run}

    def published(run: dict, cfg) -> np.ndarray:
        return published_found(run["scores"], run["presences"], cfg)

    found = published(main, config)
    # what each candidate threshold would publish, the other threshold kept at the config's
    candidates = {"threshold_sweep": [("score_threshold", t) for t in SWEEP_THRESHOLDS]}
    if np.isfinite(main["presences"]).all():
        candidates["presence_sweep"] = [("presence_threshold", t) for t in PRESENCE_SWEEP]
    result = {"count": len(split), "images": int(len(split.images)),
              "main": metrics.report_from_counts(main["boxes"], gt_boxes, main_counts, hops),
              "box_head": metrics.report_from_counts(main["head_boxes"], gt_boxes, main_counts, hops),
              "found_rate": float(found.mean()), "found": metrics.found_report(found, correct),
              "thresholds": {"score_threshold": config.score_threshold,
                             "presence_threshold": config.presence_threshold
                             if "presence_sweep" in candidates else None},
              "seconds_per_expression": (time.time() - t0) / len(split)}
    # how far the totals could move on other scenes like these: images resampled with their expressions
    per_expression = {"prec@0.5": metrics.box_iou(np.atleast_2d(main["boxes"]), gt_boxes) >= 0.5,
                      "miou": main_mask_ious}
    result["main_interval95"] = {name: list(metrics.bootstrap_interval(v, split.expr_image))
                                 for name, v in per_expression.items()}
    # where the misses go and how the target's size matters
    outcome = miss_outcomes(split, main["masks"], gt_masks, per_expression["prec@0.5"], main_counts[0])
    target_area = np.array([m.sum() for m in gt_masks])
    result["outcomes"] = {kind: float(np.mean(outcome == kind)) for kind in OUTCOMES}
    result["by_size"] = size_report(target_area / (H * W), per_expression["prec@0.5"], main_mask_ious, H * W)
    result["per_expression"] = {"image": split.expr_image.tolist(),
                                **{name: v.astype(float).tolist() for name, v in per_expression.items()},
                                "outcome": outcome.tolist(), "target_area": target_area.tolist()}
    for key, options in candidates.items():
        result[key] = {}
        for threshold, t in options:
            cfg = config.replace(**{threshold: t})
            report = metrics.found_report(published(main, cfg), correct)
            for rate, run in refusals.items():
                if run is not None:
                    report[rate] = float(published(run, cfg).mean())
            result[key][f"{t:.2f}"] = report
    if absent_run is not None:
        result["absent"] = {"pairs": int(len(absent_run["scores"])), "images": int(len(split.images)),
                            "found_rate": float(published(absent_run, config).mean())}
    if relation_run is not None:
        found_negative = published(relation_run, config)
        # a found negative usually paints the object the command names, ignoring the turned relation
        on_target = metrics.mask_ious(relation_run["masks"], [gt_masks[i] for i in has_negative]) >= 0.5
        result["relation_negative"] = {"pairs": int(len(has_negative)), "found_rate": float(found_negative.mean()),
                                       "mask_on_the_original_target": float(on_target.mean()),
                                       "by_hops": {str(h): float(found_negative[hops[has_negative] == h].mean())
                                                   for h in np.unique(hops[has_negative])}}
    log(f"[grounding eval] main done ({time.time() - t0:.0f} s)")
    if not controls:
        return result
    ablated = predict(model, split, split.text_index, batch=batch, device=device, use_language_weights=False)
    result["phi_zero"] = metrics.grounding_report(ablated["boxes"], gt_boxes, ablated["masks"], gt_masks, hops)
    has_other = np.flatnonzero(split.other >= 0)
    if len(has_other):
        other = split.other[has_other]
        swapped = predict(model, split, split.text_index[other], batch=batch, device=device, expr_subset=has_other)
        result["mismatched"] = metrics.grounding_report(swapped["boxes"], gt_boxes[has_other],
                                                        swapped["masks"], [gt_masks[i] for i in has_other],
                                                        hops[has_other])
        # the prediction for the other command against the other object's own ground truth
        result["mismatched_vs_own_target"] = metrics.grounding_report(
            swapped["boxes"], gt_boxes[other], swapped["masks"], [gt_masks[i] for i in other], hops[other])
        result["mismatched_found_rate"] = float(published(swapped, config).mean())
        overlap = np.atleast_1d(metrics.box_iou(gt_boxes[other], gt_boxes[has_other]))
        # picking one of the image's referred objects at random hits the target with probability 1 / k
        per_image_k = {img: len(np.unique(split.instance[split.expr_image == img])) for img in np.unique(split.expr_image)}
        random_pick = np.mean([1.0 / per_image_k[split.expr_image[i]] for i in has_other])
        result["chance"] = {"prec@0.5_other_object_box": float((overlap >= 0.5).mean()),
                            "prec@0.5_random_referred_object": float(random_pick), "pairs": int(len(has_other))}
    return result


# why an expression missed (box IoU < 0.5), in this order: its published mask is empty; at least half of it
# lies on the target (found, outlined badly); at least half on another object a command about the same image
# names (a wrong pick among the scene's referred objects); otherwise elsewhere (background, an unnamed object,
# or spread over several)
OUTCOMES = ("hit", "on_target", "other_object", "elsewhere", "empty")
# target sizes: the target's mask area as a share of the image (on a 480x270 camera: < 454, < 1,944 pixels)
SIZE_BUCKETS = (("small", 0.0035), ("medium", 0.015), ("large", float("inf")))


def miss_outcomes(split, masks: list[np.ndarray], gt_masks: list[np.ndarray], hits: np.ndarray,
                  inter: np.ndarray) -> np.ndarray:
    """Per expression one of `OUTCOMES` (str array): "hit" where `hits` (box IoU >= 0.5), else why not.
    `inter` (E,): each published mask's intersection with its own target (`metrics.mask_counts`). The
    other objects of an image are those its other expressions refer to (their ground-truth masks)."""
    by_image: dict[int, dict[int, int]] = {}
    for i, (image, instance) in enumerate(zip(split.expr_image, split.instance)):
        by_image.setdefault(int(image), {}).setdefault(int(instance), i)
    outcome = np.full(len(masks), "hit", dtype=object)
    for i in np.flatnonzero(~np.asarray(hits, dtype=bool)):
        area = masks[i].sum()
        if area == 0:
            outcome[i] = "empty"
        elif inter[i] >= 0.5 * area:
            outcome[i] = "on_target"
        elif any(np.logical_and(masks[i], gt_masks[j]).sum() >= 0.5 * area
                 for instance, j in by_image[int(split.expr_image[i])].items() if instance != split.instance[i]):
            outcome[i] = "other_object"
        else:
            outcome[i] = "elsewhere"
    return outcome.astype(str)


def size_report(share: np.ndarray, hits: np.ndarray, ious: np.ndarray, image_pixels: int) -> dict:
    """{bucket: {"count", "prec@0.5", "miou", "max_share", "max_pixels"}} over `SIZE_BUCKETS` by the
    targets' area `share` of the image (the last bucket's bounds None); a bucket without targets reports
    count 0 and NaN values."""
    report, low = {}, 0.0
    for name, high in SIZE_BUCKETS:
        sel = (share >= low) & (share < high)
        report[name] = {"count": int(sel.sum()),
                        "prec@0.5": float(hits[sel].mean()) if sel.any() else float("nan"),
                        "miou": float(ious[sel].mean()) if sel.any() else float("nan"),
                        "max_share": high if np.isfinite(high) else None,   # None: the last, open bucket
                        "max_pixels": high * image_pixels if np.isfinite(high) else None}
        low = high
    return report


def write_gallery(model: VGLAW, split, result: dict, out_dir, *, per_outcome: int = 12, device="cpu",
                  seed: int = 0) -> list[dict]:
    """Pictures of the misses, so that one can see what the numbers count: for each of `OUTCOMES` (the
    hits too, for comparison) up to `per_outcome` expressions drawn at random (`seed`) from
    `result["per_expression"]`, re-run through `predict` and drawn as `preview.comparison_panel` (truth
    green, published mask and box magenta, the command, outcome, IoUs and score above) into
    `out_dir/<outcome>_<k>.png`, listed in `out_dir/index.json`. Returns that list."""
    from pathlib import Path

    from PIL import Image

    from vg_ros.sim.preview import comparison_panel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outcome = np.asarray(result["per_expression"]["outcome"])
    rng = np.random.default_rng(seed)
    chosen = [(kind, k, int(i)) for kind in OUTCOMES
              for k, i in enumerate(np.sort(rng.permutation(np.flatnonzero(outcome == kind))[:per_outcome]))]
    if not chosen:
        return []
    idx = np.array([i for _, _, i in chosen])
    run = predict(model, split, split.text_index[idx], device=device, expr_subset=idx)
    H, W = split.size
    entries = []
    for j, (kind, k, i) in enumerate(chosen):
        truth, truth_box = split.masks(i), split.boxes[i].astype(np.float64) * [W, H, W, H]   # unpacked once
        box_iou = float(metrics.box_iou(run["boxes"][j], truth_box))
        mask_iou = float(metrics.mask_ious([run["masks"][j]], [truth])[0])
        text = split.texts[split.text_index[i]]
        caption = (f'"{text}" - {kind}, hop {int(split.hops[i])}: box IoU {box_iou:.2f}, mask IoU {mask_iou:.2f}, '
                   f"score {run['scores'][j]:.2f}")
        name = f"{kind}_{k:02d}.png"
        Image.fromarray(comparison_panel(split.images[split.expr_image[i]], truth, truth_box,
                                         run["masks"][j], run["boxes"][j], caption)).save(out_dir / name)
        entries.append({"file": name, "expression": i, "image": int(split.expr_image[i]), "command": text,
                        "outcome": kind, "hops": int(split.hops[i]), "box_iou": box_iou, "mask_iou": mask_iou,
                        "score": float(run["scores"][j]), "target_area": int(truth.sum())})
    with open(out_dir / "index.json", "w") as fh:
        json.dump(entries, fh, indent=1)
    return entries


def coverage_map_ious(gt_masks: list[np.ndarray], grid_hw: tuple[int, int]) -> np.ndarray:
    """Per-expression mask IoU that a perfect map on a coarser grid would score: each ground-truth mask
    area-averaged onto `grid_hw` (the fraction of each cell it covers), bilinearly resized back
    (align_corners=False, as the head's logits are) and thresholded at 0.5. How much a head whose map lives
    on that grid loses to resolution alone (not a strict bound: logits sharper than coverage can put an
    edge inside a cell)."""
    best = []
    for mask in gt_masks:
        full = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
        cover = F.interpolate(full, size=grid_hw, mode="area")
        best.append(F.interpolate(cover, size=mask.shape, mode="bilinear", align_corners=False)[0, 0].numpy() >= 0.5)
    return metrics.mask_ious(best, gt_masks)


def format_sweep(result: dict) -> str:
    """What each candidate `score_threshold` (and `presence_threshold`, with a presence head) would
    publish, the other threshold at its configured value: one line per candidate."""
    lines = []
    for key, name in (("threshold_sweep", "score_threshold"), ("presence_sweep", "presence_threshold")):
        if key not in result:
            continue
        lines.append(f"{name:>20}  found %  correct among found %  wrong held back %  right kept %  found on absent %"
                     "  found on turned relation %")
        for t, f in result[key].items():
            lines.append(f"{t:>20}  {100 * f['found_rate']:7.1f}  {100 * f['precision']:20.1f}  "
                         f"{100 * f['wrong_rejected']:17.1f}  {100 * f['right_kept']:12.1f}  "
                         f"{100 * f.get('absent_found_rate', float('nan')):17.1f}  "
                         f"{100 * f.get('relation_found_rate', float('nan')):26.1f}")
    return "\n".join(lines)


def paired_difference(result: dict, other: dict) -> dict:
    """How much better `result`'s main numbers are than `other`'s on the same split (both from
    `evaluate_split`): {metric: {"difference", "interval95"}}, the interval from resampling whole images of
    the per-expression differences, so that what the two networks share cancels (tighter than comparing
    two separate intervals)."""
    a, b = result["per_expression"], other["per_expression"]
    if a["image"] != b["image"]:
        raise ValueError("paired_difference: the two results are not on the same expressions")
    out = {}
    for _, name in HEADLINE:
        diff = np.asarray(a[name]) - np.asarray(b[name])
        out[name] = {"difference": float(diff.mean()),
                     "interval95": list(metrics.bootstrap_interval(diff, np.asarray(a["image"])))}
    return out


def format_against(against: dict) -> str:
    """One line: the other weights' totals and the paired differences (`result["against"]`)."""
    cells = []
    for label, key in HEADLINE:
        d = against["difference"][key]
        lo, hi = d["interval95"]
        cells.append(f"{label} {100 * against['main'][key]['all']:5.1f}, difference {100 * d['difference']:+5.1f} "
                     f"(95 % interval {100 * lo:+5.1f} .. {100 * hi:+5.1f})")
    return f"against {against['weights']}: " + "  ".join(cells)


def format_report(result: dict) -> str:
    """A plain-text table: rows = main / phi_zero / mismatched; columns per hop."""
    lines = [f"expressions {result['count']} in {result['images']} images; "
             f"found rate {result['found_rate']:.3f}"]
    for name in ("main", "phi_zero", "mismatched", "mismatched_vs_own_target"):  # the last: hops of the other
        if name not in result:
            continue
        rep = result[name]
        keys = [k for k in rep["count"] if k != "all"] + ["all"]
        cells = "  ".join(f"hop {k}: P@0.5 {100 * rep['prec@0.5'][k]:5.1f}  mIoU {100 * rep['miou'][k]:5.1f}  "
                          f"oIoU {100 * rep['oiou'][k]:5.1f} (n={rep['count'][k]})" for k in keys)
        lines.append(f"{name:>24}: {cells}")
    if "main_interval95" in result:
        lo_hi = result["main_interval95"]
        lines.append(f"{'main, 95 % interval':>24}: " + "  ".join(
            f"{label} {100 * lo_hi[key][0]:5.1f} .. {100 * lo_hi[key][1]:5.1f}"
            for label, key in HEADLINE)
            + f"  (all hops; the {result['images']} images resampled with their expressions)")
    if "by_size" in result:
        cells = []
        for name, rep in result["by_size"].items():
            bound = (f"< {100 * rep['max_share']:.2f} % of the image, < {rep['max_pixels']:,.0f} px"
                     if rep["max_share"] is not None else "the rest")
            cells.append(f"{name} ({bound}): P@0.5 {100 * rep['prec@0.5']:5.1f}  mIoU {100 * rep['miou']:5.1f} "
                         f"(n={rep['count']})")
        lines.append(f"{'main, by target size':>24}: " + "  ".join(cells))
    if "outcomes" in result:
        o = result["outcomes"]
        lines.append(f"{'main, the misses':>24}: on the target but outlined badly {100 * o['on_target']:.1f} %; on "
                     f"another object a command of the image names {100 * o['other_object']:.1f} %; elsewhere "
                     f"{100 * o['elsewhere']:.1f} %; empty {100 * o['empty']:.1f} % (of all expressions)")
    if "box_head" in result:
        rep = result["box_head"]
        keys = [k for k in rep["count"] if k != "all"] + ["all"]
        lines.append(f"{'box head (paper REC)':>24}: " + "  ".join(
            f"hop {k}: P@0.5 {100 * rep['prec@0.5'][k]:5.1f}" for k in keys))
    if "found" in result:
        f = result["found"]
        lines.append(f"{'not found':>24}: found {100 * f['found_rate']:.1f} %; correct (mask IoU >= 0.5) among found "
                     f"{100 * f['precision']:.1f} %; wrong results published as not found {100 * f['wrong_rejected']:.1f} %; "
                     f"right results kept {100 * f['right_kept']:.1f} %")
    if "absent" in result:
        a = result["absent"]
        lines.append(f"{'absent referent':>24}: published as found for {100 * a['found_rate']:.1f} % of {a['pairs']} "
                     "images paired with a command about something not in them (right: not found)")
    if "relation_negative" in result:
        r = result["relation_negative"]
        lines.append(f"{'relation turned around':>24}: published as found for {100 * r['found_rate']:.1f} % of "
                     f"{r['pairs']} commands whose object and anchor are in the image but not in that relation "
                     f"(right: not found); the mask on the object the original command meant: "
                     f"{100 * r['mask_on_the_original_target']:.1f} %")
    if "chance" in result:
        chance = result["chance"]
        lines.append(f"{'chance':>24}: the other object's own box hits the target (IoU>=0.5) in "
                     f"{100 * chance['prec@0.5_other_object_box']:.1f} % of {chance['pairs']} pairs; a random "
                     f"referred object of the image: {100 * chance['prec@0.5_random_referred_object']:.1f} %; "
                     f"mismatched found rate {result['mismatched_found_rate']:.3f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from vg_ros.cli import UserError
    from vg_ros.grounding.data import load_or_render, load_with_negatives, parse_seeds
    from vg_ros.grounding.pipeline import default_weights_path, load_weights, resolve_device
    from vg_ros.grounding.text import TextEncoder

    ap = argparse.ArgumentParser(prog="vg-ros eval grounding", description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="default", help="safetensors file, or 'default' (the shipped tiny)")
    ap.add_argument("--config", default="tiny", choices=("tiny", "base"), help="which shipped weights for default")
    ap.add_argument("--seeds", default=DEFAULT_VAL_SEEDS, help=f"held-out simulator seeds (default {DEFAULT_VAL_SEEDS})")
    ap.add_argument("--seconds", type=float, default=1.5, help="simulated seconds per seed")
    ap.add_argument("--expressions", type=int, default=12, help="expressions per frame")
    ap.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--no-controls", action="store_true", help="skip the Phi=0 and mismatched-command controls")
    ap.add_argument("--json", dest="json_out", default="", help="also write the numbers to this JSON file")
    ap.add_argument("--resolution-cap", action="store_true",
                    help="also print what a perfect mask map at 1/4 and 1/2 of the model input would score")
    ap.add_argument("--no-relation-negatives", action="store_true",
                    help="skip the commands with their relation turned around (they re-run the simulator)")
    ap.add_argument("--against", default="",
                    help="also score these weights ('default': the shipped ones) on the same expressions and print "
                         "the difference with a 95 %% interval (images resampled, paired): is --weights better?")
    ap.add_argument("--gallery", default="",
                    help="also draw misses (and hits) per outcome into this folder: truth green, prediction magenta")
    ap.add_argument("--gallery-size", type=int, default=12, help="pictures per outcome for --gallery")
    ap.add_argument("--sweep", action="store_true",
                    help="also print what each candidate score_threshold would publish (choose it on dev seeds)")
    args = ap.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        if args.gallery_size < 1:
            raise ValueError(f"--gallery-size: at least 1, got {args.gallery_size}")
        if args.json_out:   # before minutes of evaluation, not after them
            json_dir = Path(args.json_out).resolve().parent
            if Path(args.json_out).is_dir() or not json_dir.is_dir():
                raise ValueError(f"--json {args.json_out}: " + ("is a folder" if Path(args.json_out).is_dir()
                                                                 else f"folder {json_dir} does not exist"))
        torch.set_num_threads(max(1, args.threads))
        device = resolve_device(args.device)
        path = default_weights_path(args.config) if args.weights == "default" else args.weights
        networks = {}
        against = default_weights_path(args.config) if args.against == "default" else args.against
        for name in (path, against) if against else (path,):
            model, meta = load_weights(name, device)
            train_seeds = set(parse_seeds(meta["train_seeds"])) if meta.get("train_seeds") else set()
            if train_seeds & set(seeds):
                raise UserError(f"seeds {sorted(train_seeds & set(seeds))[:5]} were used in training {name}: "
                                "not held out")
            networks[name] = model
        model = networks[path]
        encoder = TextEncoder()
        if args.no_relation_negatives:
            split, negatives = load_or_render(seeds, args.seconds, args.expressions, None, encoder, log=print), None
        else:
            split, negatives = load_with_negatives(seeds, args.seconds, args.expressions, None, encoder, log=print)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    result = evaluate_split(model, split, device=device, controls=not args.no_controls, negatives=negatives)
    result["weights"] = str(path)
    result["seeds"] = args.seeds
    print(format_report(result))
    if args.sweep:
        print(format_sweep(result))
    if args.against:
        other = evaluate_split(networks[against], split, device=device, controls=False, absent=False,
                               log=lambda *_: None)
        result["against"] = {"weights": str(against), "main": other["main"],
                             "difference": paired_difference(result, other)}
        print(format_against(result["against"]))
    if args.resolution_cap:
        gt_masks = [split.masks(i) for i in range(len(split))]
        result["resolution_cap"] = {}
        for stride in (4, 2):
            grid = (model.spec.img_h // stride, model.spec.img_w // stride)
            ious = coverage_map_ious(gt_masks, grid)
            result["resolution_cap"][f"1/{stride}"] = {"grid": list(grid), "miou": float(ious.mean()),
                                                       "iou>=0.5": float((ious >= 0.5).mean())}
            print(f"a perfect mask map at 1/{stride} of the input ({grid[1]}x{grid[0]}) would score mask mIoU "
                  f"{100 * ious.mean():.1f}, IoU >= 0.5 for {100 * (ious >= 0.5).mean():.1f} % of the expressions")
    if args.gallery:
        try:
            entries = write_gallery(model, split, result, args.gallery, per_outcome=args.gallery_size, device=device)
        except OSError as exc:
            raise UserError(f"--gallery {args.gallery}: {exc}") from exc
        print(f"gallery: {len(entries)} pictures in {args.gallery} (index.json lists them)")
    if args.json_out:
        try:
            with open(args.json_out, "w") as fh:   # strict JSON: an undefined rate (nothing found) is null, not NaN
                json.dump(without_nan(result), fh, indent=2, default=str, allow_nan=False)
        except OSError as exc:
            raise UserError(f"--json {args.json_out}: {exc}") from exc
    return 0


def without_nan(value):
    """`value` with every float NaN or inf inside dicts, lists and tuples replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(v) for v in value]
    if isinstance(value, np.floating):
        return without_nan(float(value))
    return value
