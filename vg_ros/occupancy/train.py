"""`vg-ros train occupancy`: train TPVFormer on simulated drives with dense (voxel) or sparse (LiDAR point)
supervision, then score it on held-out seeds and write the safetensors weights + model card.

    vg-ros train occupancy --config tiny --supervision dense --seeds 0-23 --minutes 25

Data: `data.build_cache` renders the seeds once into `.cache/occupancy/`. Each step is one frame (all
cameras); the loss is CE + Lovasz-softmax on that frame's supervision points, decoded by the point path
of the TPV decoder. Dense training samples free voxels at a fixed ratio to occupied ones; at the end the
classifier's free bias is shifted by the log ratio of true to sampled class priors (logit adjustment)
so the voxel decoder sees the real proportions again.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vg_ros.occupancy.data import (SUPERVISION_DEFAULTS, build_cache, class_statistics, load_sample, parse_seeds,
                                   supervision_points)
from vg_ros.occupancy.model import MODEL_CONFIGS, TPVFormer, model_config, occupancy_loss
from vg_ros.occupancy.pipeline import WEIGHTS_DIR, resolve_device, save_checkpoint
from vg_ros.sim.seeds import format_seeds
from vg_ros.stop_signals import StopRequest
from vg_ros.types import FREE_CLASS

DEFAULT_TRAIN_SEEDS = "0-47"
DEFAULT_EVAL_SEEDS = "1000-1003"


def weights_name(config: str, supervision: str) -> str:
    return f"occupancy_tpvformer_{config}" + ("" if supervision == "dense" else f"_{supervision}")


def batch_tensors(sample: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One cached sample -> images (1, N, 3, H, W) uint8, K (1, N, 3, 3), T_cam_base (1, N, 4, 4)."""
    return (torch.from_numpy(sample["images"])[None].to(device),
            torch.from_numpy(sample["K"])[None].float().to(device),
            torch.from_numpy(sample["T_cam_base"])[None].float().to(device))


def apply_free_logit_adjustment(model: TPVFormer, true_free: float, sampled_free: float) -> float:
    """Shift the classifier's free bias by log(true odds / sampled odds) of free vs occupied; returns the shift."""
    eps = 1e-6
    shift = math.log((true_free + eps) / (1 - true_free + eps)) - math.log((sampled_free + eps) / (1 - sampled_free + eps))
    with torch.no_grad():
        model.decoder.classifier.bias[FREE_CLASS] += shift
    return shift


def train(args: argparse.Namespace, log=print, stop=None) -> dict:
    """Train, write the weights, calibrate, evaluate and write the card. `stop` (a StopRequest, installed
    around the steps; polled after each) turning true ends training there: the weights so far are written,
    marked partial, without calibration or card, and the result has `interrupted`."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = model_config(args.config)
    seeds = parse_seeds(args.seeds)
    eval_seeds = parse_seeds(args.eval_seeds)
    if set(seeds) & set(eval_seeds):
        raise ValueError(f"training seeds and held-out seeds overlap: {sorted(set(seeds) & set(eval_seeds))}")
    model = TPVFormer(cfg).to(device).train()
    init_steps = 0
    if args.init:
        from vg_ros.checkpoint import load_into, read_state
        state, init_meta = read_state(args.init, "tpv_config", "occupancy")   # a corrupt file: one clear error
        load_into(model, state, args.init, "occupancy")
        # Undo the inference-time free-logit shifts baked into the bias: training resumes on raw logits.
        baked = float(init_meta.get("free_logit_shift", 0.0)) + float(init_meta.get("free_calibration_shift", 0.0))
        with torch.no_grad():
            model.decoder.classifier.bias[FREE_CLASS] -= baked
        init_steps = int(init_meta.get("steps", 0))
        if init_meta.get("train_seeds"):   # what --init has seen is seen by this network too
            init_seeds = set(parse_seeds(init_meta["train_seeds"]))
            if init_seeds & set(eval_seeds):
                raise ValueError(f"--init {args.init} was trained on held-out seeds "
                                 f"{sorted(init_seeds & set(eval_seeds))[:5]}; choose other --eval-seeds")
            seeds = sorted(set(seeds) | init_seeds)
        log(f"initialised from {args.init} ({init_steps} steps; free bias shift {baked:+.3f} undone)")
    # After --init: a bad file is reported before minutes of rendering, not after.
    paths = build_cache(parse_seeds(args.seeds), cfg.image_size, seconds=args.seconds, every=args.every, log=log)
    if not paths:
        raise ValueError("no training samples")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = min(50, max(1, args.steps // 10))
    start = time.time()

    def lr_at(step: int) -> float:
        # Cosine over whichever budget runs out first: the steps or the wall-clock minutes.
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, args.steps - warmup))
        if args.minutes:
            progress = max(progress, min(1.0, (time.time() - start) / (60 * args.minutes)))
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    out_dir = Path(args.out)
    out_path = out_dir / (weights_name(args.config, args.supervision) + ".safetensors")
    deadline = start + 60 * args.minutes if args.minutes else float("inf")
    free_seen = total_seen = 0
    history: list[dict] = []
    order: list[int] = []
    step = 0
    # Ctrl-C / SIGTERM during the steps only (`stop`, installed here): the step ends and the weights so far
    # are written; before them (rendering) and after (calibration, evaluation) they stop the run as usual
    interrupted = False
    with stop if stop is not None else contextlib.nullcontext():
        while step < args.steps and time.time() < deadline:
            if not order:
                order = list(rng.permutation(len(paths)))
            sample = load_sample(paths[order.pop()])
            points, labels = supervision_points(sample, args.supervision, rng, cfg.grid)
            free_seen += int((labels == FREE_CLASS).sum())
            total_seen += len(labels)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            images, K, T = batch_tensors(sample, device)
            planes = model(images, K, T)
            pts = model.normalise_points(torch.from_numpy(points).to(device))[None]
            logits = model.decoder.point_logits(planes, pts)[0]
            loss, parts = occupancy_loss(logits, torch.from_numpy(labels).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            step += 1
            history.append({"step": step, "loss": float(loss.detach()), **parts})
            if step % args.log_every == 0 or step == 1:
                recent = history[-args.log_every:]
                log(f"step {step:5d}  loss {np.mean([h['loss'] for h in recent]):.3f}  ce {np.mean([h['ce'] for h in recent]):.3f}"
                    f"  lovasz {np.mean([h['lovasz'] for h in recent]):.3f}  lr {lr_at(step):.2e}  "
                    f"{(time.time() - start) / step:.2f} s/step")
            interrupted = stop is not None and stop()
            if step % args.save_every == 0 or interrupted:
                if step == args.save_every or interrupted:   # the card and metrics beside it describe earlier weights
                    for stale in (out_path.with_suffix(".md"), out_dir / (weights_name(args.config, args.supervision) + ".json")):
                        stale.unlink(missing_ok=True)
                save_checkpoint(model, out_path, {"steps": init_steps + step, "partial": "true",
                                                  "train_seeds": format_seeds(seeds)})
            if interrupted:
                break
    if interrupted:
        log(f"stopped at step {step} of {args.steps}: weights so far in {out_path} (partial; no calibration, "
            "evaluation or card); --init it to go on")
        return {"interrupted": True, "steps": init_steps + step, "weights": str(out_path)}
    model.eval()
    train_seconds = time.time() - start
    stats = class_statistics(paths)
    info = {
        "config": args.config, "supervision": args.supervision, "train_seeds": format_seeds(seeds),
        "eval_seeds": args.eval_seeds, "samples": len(paths), "steps": init_steps + step, "lr": args.lr,
        "train_minutes": round(train_seconds / 60, 1), "resumed_from_steps": init_steps, "threads": torch.get_num_threads(),
        "final_loss": float(np.mean([h["loss"] for h in history[-50:]])),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "vg-ros train occupancy " + " ".join(shlex.quote(a) for a in args.argv),
        **SUPERVISION_DEFAULTS,
        # The LiDAR-free baseline travels with the weights: per-height class counts of the training set.
        "height_prior_counts": json.dumps(stats["per_height"].tolist()),
    }
    if args.supervision == "dense":
        true_free = float(stats["total"][FREE_CLASS] / stats["total"].sum())
        info["free_logit_shift"] = apply_free_logit_adjustment(model, true_free, free_seen / max(total_seen, 1))
    if args.calibrate_frames and args.supervision == "sparse":
        # The calibration scores voxel labels, which sparse (LiDAR-only) training must never see.
        log("free-logit calibration skipped: it needs voxel labels, and sparse supervision has none")
    elif args.calibrate_frames:
        from vg_ros.occupancy.evaluate import calibrate_free_shift
        calib_paths = [paths[i] for i in rng.choice(len(paths), min(args.calibrate_frames, len(paths)), replace=False)]
        shift, sweep = calibrate_free_shift(model, calib_paths, device)
        info["free_calibration_shift"] = shift
        info["free_calibration_frames"] = len(calib_paths)
        log(f"free-logit calibration on {len(calib_paths)} training frames: shift {shift:+.2f}")
    save_checkpoint(model, out_path, info)
    log(f"wrote {out_path} after {step} steps ({info['train_minutes']} min)")
    info["weights"] = str(out_path)
    if not args.no_eval:
        from vg_ros.occupancy.evaluate import evaluate_model, write_card
        eval_paths = build_cache(eval_seeds, cfg.image_size, seconds=args.seconds, every=2 * args.every, log=log)
        metrics = evaluate_model(model, eval_paths, device, per_height=stats["per_height"])
        info["metrics"] = metrics
        write_card(out_path.with_suffix(".md"), info)
        model_r, prior_r = metrics["model"], metrics["height_prior"]
        log(f"held-out seeds {args.eval_seeds}: mIoU {model_r['miou']:.2f}  IoU {model_r['iou']:.2f}  obstacle IoU "
            f"{model_r['obstacle_iou']:.2f}  | height-prior baseline mIoU {prior_r['miou']:.2f}  "
            f"IoU {prior_r['iou']:.2f}  obstacle IoU {prior_r['obstacle_iou']:.2f}")
    (out_dir / (weights_name(args.config, args.supervision) + ".json")).write_text(json.dumps(info, indent=2))
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vg-ros train occupancy", description="train TPVFormer on simulated drives")
    p.add_argument("--config", default="tiny", choices=sorted(MODEL_CONFIGS))
    p.add_argument("--supervision", default="dense", choices=("dense", "sparse"),
                   help="dense: GT voxel labels; sparse: LiDAR point labels + free space along the rays")
    p.add_argument("--seeds", default=DEFAULT_TRAIN_SEEDS, help="training drives, e.g. 0-23")
    p.add_argument("--eval-seeds", default=DEFAULT_EVAL_SEEDS, help="held-out drives (never trained on)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of each drive")
    p.add_argument("--every", type=int, default=10, help="keep every n-th LiDAR tick (10 Hz)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget (0 = none)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="start from these safetensors weights (same config)")
    p.add_argument("--out", default=str(WEIGHTS_DIR), help="folder for weights, card and metrics")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--calibrate-frames", type=int, default=16,
                   help="training frames for the free-logit calibration (0 = off; dense supervision only)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation and model card")
    return p


def main(argv: list[str]) -> int:
    from vg_ros.cli import UserError
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    if args.steps < 1:
        raise UserError("--steps must be >= 1")
    if not 0 < args.lr < math.inf:
        raise UserError(f"--lr {args.lr}: must be a finite number > 0")
    if not 0 <= args.minutes < math.inf:
        raise UserError(f"--minutes {args.minutes}: must be a finite number >= 0 (0: no limit)")
    if args.threads < 0:
        raise UserError(f"--threads {args.threads}: must be >= 0 (0: torch's default)")
    if not 0 < args.seconds < math.inf:
        raise UserError(f"--seconds {args.seconds}: must be a finite number > 0")
    if args.calibrate_frames < 0:
        raise UserError(f"--calibrate-frames {args.calibrate_frames}: must be >= 0 (0: off)")
    for name in ("every", "log_every", "save_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out}: a file, not a folder")
    try:   # a StopRequest: train() installs it around its steps
        info = train(args, log=lambda msg: print(msg, flush=True), stop=StopRequest())
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return 130 if info.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
