"""`vg-ros eval occupancy`: score TPVFormer weights on held-out simulated drives (Occ3D mIoU and geometric IoU
on camera-visible voxels) next to the LiDAR-free per-height class prior baseline; writes the model card.

    vg-ros eval occupancy [--weights default] [--config tiny] [--eval-seeds 1000-1003] [--json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vg_ros.occupancy.data import (build_cache, class_statistics, height_prior_prediction, load_sample,
                                   parse_seeds)
from vg_ros.occupancy.metrics import OccupancyScore
from vg_ros.occupancy.model import MODEL_CONFIGS, TPVFormer
from vg_ros.occupancy.pipeline import default_weights_path, load_checkpoint, resolve_device


@torch.no_grad()
def predict_sample(model: TPVFormer, sample: dict, device: torch.device,
                   points: np.ndarray | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Class ids (X, Y, Z) uint8 for one cached sample; with `points` (P, 3) metric base_link, also their
    semantic class ids (P,) (argmax over the occupied classes: a LiDAR hit is never free)."""
    from vg_ros.occupancy.train import batch_tensors
    from vg_ros.types import FREE_CLASS
    images, K, T = batch_tensors(sample, device)
    planes = model(images, K, T)
    voxels = model.decoder.voxel_logits(planes)[0].argmax(0).to(torch.uint8).cpu().numpy()
    if points is None:
        return voxels
    pts = model.normalise_points(torch.as_tensor(points, dtype=torch.float32, device=device))[None]
    logits = model.decoder.point_logits(planes, pts)[0]
    logits[:, FREE_CLASS] = -torch.inf
    return voxels, logits.argmax(1).cpu().numpy()


def lidar_points_in_grid(model: TPVFormer, sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """The sample's LiDAR hits inside the model's grid (P, 3) and their point labels (P,)."""
    pts, labels = sample["lidar_base"], sample["lidar_labels"]
    lower, upper = (np.asarray(b, dtype=np.float32) for b in (model.cfg.grid_lower, model.cfg.grid_upper))
    inside = np.all((pts >= lower) & (pts < upper), axis=1)
    return pts[inside], labels[inside]


@torch.no_grad()
def calibrate_free_shift(model: TPVFormer, paths: list[Path], device: torch.device,
                         shifts: np.ndarray | None = None) -> tuple[float, list[dict]]:
    """Pick the shift of the free-class logit that maximises mIoU + IoU + obstacle IoU on (training) samples.

    Only the free logit moves; the argmax among occupied classes is kept per voxel. Returns the best
    shift and the sweep [{"shift", "miou", "iou", "obstacle_iou"}]. Call it on training seeds, never on
    held-out ones. Obstacle IoU is in the sum because geometric IoU alone is mostly the ground layer: it
    favours calling doubtful voxels free, which loses the objects a planner must avoid.
    """
    from vg_ros.occupancy.train import batch_tensors
    from vg_ros.types import FREE_CLASS
    shifts = np.arange(-3.0, 3.01, 0.25) if shifts is None else shifts
    cached = []
    for path in paths:
        sample = load_sample(path)
        images, K, T = batch_tensors(sample, device)
        logits = model.decoder.voxel_logits(model(images, K, T))[0]
        free = logits[FREE_CLASS].cpu().numpy()
        others = logits.clone()
        others[FREE_CLASS] = -torch.inf
        best, best_class = others.max(0)
        cached.append((free, best.cpu().numpy(), best_class.to(torch.uint8).cpu().numpy(),
                       sample["occupancy"], sample["mask_camera"]))
    sweep = []
    for shift in shifts:
        score = OccupancyScore()
        for free, best, best_class, gt, mask in cached:
            score.add(np.where(free + shift >= best, FREE_CLASS, best_class).astype(np.uint8), gt, mask)
        r = score.result()
        sweep.append({"shift": float(shift), "miou": r["miou"], "iou": r["iou"], "obstacle_iou": r["obstacle_iou"]})
    chosen = max(sweep, key=lambda s: s["miou"] + s["iou"] + s["obstacle_iou"])
    with torch.no_grad():
        model.decoder.classifier.bias[FREE_CLASS] += chosen["shift"]
    return chosen["shift"], sweep


def evaluate_model(model: TPVFormer, paths: list[Path], device: torch.device,
                   per_height: np.ndarray | None = None) -> dict:
    """{"model": score, "height_prior": score (when per_height counts are given), "lidarseg": {"model",
    "height_prior"}, "frames", "seconds_per_frame"}.

    Scores are Occ3D (camera-visible voxels); "lidarseg" is the paper's metric for sparse supervision:
    mIoU of the semantic class predicted at every held-out LiDAR hit (its "iou" is meaningless there,
    every hit is occupied). The prior's class at a hit is its height layer's most frequent occupied class.
    """
    model.eval()
    score, prior_score = OccupancyScore(), OccupancyScore()
    point_score, point_prior = OccupancyScore(), OccupancyScore()
    start = time.perf_counter()
    for path in paths:
        sample = load_sample(path)
        gt, mask = sample["occupancy"], sample["mask_camera"]
        points, point_labels = lidar_points_in_grid(model, sample)
        voxels, point_pred = predict_sample(model, sample, device, points)
        score.add(voxels, gt, mask)
        point_score.add(point_pred, point_labels)
        if per_height is not None:
            prior_score.add(height_prior_prediction(per_height, gt.shape), gt, mask)
            point_prior.add(height_prior_points(per_height, points, model.cfg), point_labels)
    out = {"model": score.result(), "frames": len(paths),
           "seconds_per_frame": round((time.perf_counter() - start) / max(len(paths), 1), 3),
           "lidarseg": {"model": point_score.result()}}
    if per_height is not None:
        out["height_prior"] = prior_score.result()
        out["lidarseg"]["height_prior"] = point_prior.result()
    return out


def height_prior_points(per_height: np.ndarray, points: np.ndarray, cfg) -> np.ndarray:
    """The height prior at LiDAR hits (P, 3): each hit's layer's most frequent occupied class (P,)."""
    from vg_ros.types import FREE_CLASS
    occupied = per_height.astype(np.float64).copy()
    occupied[:, FREE_CLASS:] = -1.0  # free (and anything after it) is not a class a hit can have
    layer_class = occupied.argmax(1)
    Z = len(layer_class)
    lower, upper = cfg.grid_lower[2], cfg.grid_upper[2]
    layer = np.clip(((points[:, 2] - lower) / (upper - lower) * Z).astype(np.int64), 0, Z - 1)
    return layer_class[layer].astype(np.uint8)


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.1f}"


def metrics_table(metrics: dict) -> str:
    def cells(r: dict) -> str:
        return f"{_fmt(r['miou'])} | {_fmt(r['iou'])} | {_fmt(r.get('obstacle_iou'))}"

    rows = ["| | mIoU | IoU | obstacle IoU |", "|---|---|---|---|",
            f"| TPVFormer ({metrics.get('name', 'model')}) | {cells(metrics['model'])} |"]
    if "height_prior" in metrics:
        rows.append(f"| per-height class prior (LiDAR-free baseline) | {cells(metrics['height_prior'])} |")
    rows += ["", "Obstacle IoU: geometric IoU with the flat ground classes (driveable surface, other flat, sidewalk, "
             "terrain) counted as not occupied."]
    names = list(metrics["model"]["per_class"])
    rows += ["", "Per-class IoU (held-out, camera-visible voxels; '-' = class absent):", "",
             "| class | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
             "| TPVFormer | " + " | ".join(_fmt(metrics["model"]["per_class"][n]) for n in names) + " |"]
    if "height_prior" in metrics:
        rows.append("| height prior | " + " | ".join(_fmt(metrics["height_prior"]["per_class"][n]) for n in names) + " |")
    if "lidarseg" in metrics:
        seg = metrics["lidarseg"]
        line = f"LiDAR segmentation (the paper's metric for sparse supervision: class at every held-out LiDAR hit): " \
               f"mIoU {_fmt(seg['model']['miou'])}"
        if "height_prior" in seg:
            line += f" vs height prior {_fmt(seg['height_prior']['miou'])}"
        rows += ["", line + "."]
    return "\n".join(rows)


def sampling_text(info: dict) -> str:
    """How the training points of one frame were drawn (recorded in `info`, else today's defaults)."""
    from vg_ros.occupancy.data import SUPERVISION_DEFAULTS
    info = {**SUPERVISION_DEFAULTS, **info}
    per_class = f"occupied ones class-balanced (at most {info['max_per_class']} per class, {info['max_occupied']} in all)"
    if info["supervision"] == "dense":
        return f"{per_class}, free ones {info['free_per_occupied']} per occupied (at least 1000 occupied counted)."
    return f"LiDAR hits class-balanced (at most {info['max_per_class']} per class, {info['max_occupied']} in all), " \
           f"{info['free_per_ray']} free points along each ray."


def shown_path(path: str) -> str:
    """`path` as a card shows it: relative to the checkout when inside it (the shipped cards), else as given."""
    repo = Path(__file__).resolve().parents[2]
    try:
        return str(Path(path).resolve().relative_to(repo))
    except ValueError:
        return str(path)


def write_card(path: Path, info: dict) -> None:
    """The model card beside the weights: data, seeds, steps, command, metrics, date."""
    m = info["metrics"]
    text = f"""# TPVFormer `{info['config']}` — occupancy weights ({info['supervision']} supervision)

File: `{Path(info['weights']).name}` (safetensors; the model config is in its metadata). Made by this
package's own `vg_ros/occupancy/train.py` on {info['date']}.

* Data: simulated drives (`vg_ros.sim.simulate`, default rig, 6 cameras at 480x270 resized to the model
  input {MODEL_CONFIGS[info['config']].image_size[0]}x{MODEL_CONFIGS[info['config']].image_size[1]}), training seeds
  `{info['train_seeds']}` ({info['samples']} frames), {info['supervision']} supervision
  ({'GT voxel labels' if info['supervision'] == 'dense' else 'LiDAR point labels + free space along the rays'}).
* Training: {info['steps']} steps of one frame each, AdamW lr {info['lr']} (cosine), CE + Lovasz-softmax,
  {info['train_minutes']} min on {info['threads']} CPU threads; final loss {info['final_loss']:.3f}.
  {('Free-class logit adjustment ' + format(info['free_logit_shift'], '.3f') + ' (true vs sampled free prior).') if 'free_logit_shift' in info else ''}
  {('Free-logit calibration on ' + str(info['free_calibration_frames']) + ' training frames (max mIoU + IoU + obstacle IoU): ' + format(info['free_calibration_shift'], '+.2f') + '.') if 'free_calibration_shift' in info else ''}
* Supervision points per frame: {sampling_text(info)}
* Command: `{info['command']}`

## Held-out evaluation

Seeds `{info['eval_seeds']}` (never used in training), {m['frames']} frames, Occ3D metrics on camera-visible
voxels (`vg-ros eval occupancy --weights {shown_path(info['weights'])} --eval-seeds {info['eval_seeds']}`):

{metrics_table(dict(m, name=info['config']))}

Inference on this machine: {m['seconds_per_frame']} s per 6-camera frame (CPU, includes the full 200x200x16 decode).
These numbers are on the simulator, not on nuScenes; the weights are not expected to transfer to real images.
"""
    path.write_text(text)


def main(argv: list[str]) -> int:
    from vg_ros.cli import UserError
    p = argparse.ArgumentParser(prog="vg-ros eval occupancy", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", choices=sorted(MODEL_CONFIGS), help="which shipped weights by default")
    p.add_argument("--weights", default="default", help="'default' or a .safetensors path")
    p.add_argument("--eval-seeds", default="1000-1003")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prior-seeds", help="training seeds for the height-prior baseline when the weights carry none")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be >= 1")
    if not 0 < args.seconds < math.inf:
        raise UserError(f"--seconds {args.seconds}: must be a finite number > 0")
    if args.every < 1:
        raise UserError(f"--every {args.every}: must be >= 1")
    torch.set_num_threads(args.threads)
    try:
        path = default_weights_path(args.config) if args.weights == "default" else Path(args.weights)
        model, meta = load_checkpoint(path, resolve_device(args.device))
        if "height_prior_counts" in meta:
            per_height = np.asarray(json.loads(meta["height_prior_counts"]))
        elif args.prior_seeds:
            prior_paths = build_cache(parse_seeds(args.prior_seeds), model.cfg.image_size, seconds=args.seconds)
            per_height = class_statistics(prior_paths)["per_height"]
        else:
            per_height = None
        eval_seeds = parse_seeds(args.eval_seeds)
        train_seeds = set(parse_seeds(meta["train_seeds"])) if "train_seeds" in meta else set()
        if train_seeds & set(eval_seeds):
            raise UserError(f"eval seeds {sorted(train_seeds & set(eval_seeds))} were used to train {path.name}")
        paths = build_cache(eval_seeds, model.cfg.image_size, seconds=args.seconds, every=args.every,
                            log=lambda m: print(m, file=sys.stderr))
        if not paths:   # scored nothing: "mIoU -" and exit 0 said the evaluation had run
            raise UserError(f"--eval-seeds {args.eval_seeds} --seconds {args.seconds}: no frames to score")
        metrics = evaluate_model(model, paths, resolve_device(args.device), per_height)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{path.name} on held-out seeds {args.eval_seeds} ({metrics['frames']} frames):")
        print(metrics_table(dict(metrics, name=model.cfg.name)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
