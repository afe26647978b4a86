"""Training data and training for the VBReg network: `vg-ros train registration`.

Data: pairs of simulator LiDAR scans at varied offsets and overlaps (skip 1..max_skip ticks, plus a random
yaw / translation applied to the source), or user data in 3DMatch layout (cloud_bin_*.ply + gt.log) or
KITTI layout (velodyne/*.bin + poses.txt [+ calib.txt]). Each pair becomes a putative correspondence set
through the pipeline's own FPFH matching; labels come from the ground-truth transform
(|T x - y| < tau). Sets are cached under `.cache/registration/`.

Training maximises the ELBO (`model.elbo_loss`) with Adam; weights go to safetensors with a model card.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vg_ros.checkpoint import save_state
from vg_ros.geometry import invert_T, make_T, rpy_to_R
from vg_ros.registration.model import VBRegNet, elbo_loss, spatial_compatibility
from vg_ros.registration.pipeline import DEFAULT_WEIGHTS, RegistrationConfig, RegistrationPipeline
from vg_ros.sim.seeds import format_seeds, parse_seeds
from vg_ros.stop_signals import StopRequest

CACHE_DIR = Path(__file__).resolve().parent.parent.parent / ".cache" / "registration"
# The RegistrationConfig fields that shape a correspondence set (the cache key); the rest only affect solving.
MATCHING_FIELDS = ("voxel_size", "normal_radius", "fpfh_radius", "fpfh_max_nn", "max_points", "max_keypoints", "mutual",
                   "max_correspondences", "tau", "max_match_normal_z", "min_correspondences")
# Training and correspondence-level evaluation sets: the preset's matching, except that LiDAR sets stop
# the one-way top-up at 1000 matches where the pipeline goes on to 2000 (the shipped network was trained
# on 1000-match sets, sampled 512 at a time, and is measured on the pipeline's 2000; these keys keep its
# training sets reproducible from the cache).
SET_OVERRIDES = {"lidar": {"min_correspondences": 1000, "max_correspondences": 1500}}


def set_config(preset: str) -> RegistrationConfig:
    """The matching config of training / evaluation correspondence sets for `preset`."""
    return RegistrationConfig.preset(preset).replace(**SET_OVERRIDES.get(preset, {}))


TRAIN_SEEDS = tuple(range(0, 96))
HELDOUT_SEEDS = tuple(range(9500, 9520))  # development held-out set (9700-9719 too); 9800-9819 is the final, run-once set
FINAL_SEEDS = "9800-9819"
# every seed an evaluation of ours used: development 9500-9519 and 9700-9719, final 9800-9819 and 9900-9919
EVAL_SEEDS = frozenset(HELDOUT_SEEDS) | frozenset(range(9700, 9720)) | frozenset(parse_seeds(FINAL_SEEDS)) \
    | frozenset(range(9900, 9920))


@dataclasses.dataclass
class PairSpec:
    """How sim pairs are drawn: scans `skip` ticks apart (1..max_skip), the source turned by a yaw in
    [-max_yaw_deg, max_yaw_deg] and shifted by up to `max_shift` m horizontally."""

    seconds: float = 8.0
    pairs_per_seed: int = 12
    max_skip: int = 15
    max_yaw_deg: float = 180.0
    max_shift: float = 3.0


@dataclasses.dataclass
class CloudPair:
    """Two clouds and the GT transform mapping source into target: src (N, 3), dst (M, 3), T (4, 4)."""

    name: str
    src: np.ndarray
    dst: np.ndarray
    T_gt: np.ndarray


def sim_pairs(seed: int, spec: PairSpec) -> list[CloudPair]:
    """Scan pairs from one simulated drive. Deterministic in (seed, spec)."""
    from vg_ros.sim import simulate

    frames = list(simulate(int(seed), spec.seconds, cameras=False, occupancy=False, expressions=0))
    if len(frames) < 2:
        raise ValueError(f"sim seed {seed}: {spec.seconds} s gives {len(frames)} scans; need >= 2")
    rng = np.random.default_rng([int(seed), 77])
    T_base_lidar = frames[0].rig.lidar.T_base_lidar
    pairs = []
    for k in range(spec.pairs_per_seed):
        skip = int(rng.integers(1, min(spec.max_skip, len(frames) - 1) + 1))
        first = int(rng.integers(0, len(frames) - skip))
        a, b = frames[first], frames[first + skip]
        T_odom_la = a.T_odom_base @ T_base_lidar
        T_odom_lb = b.T_odom_base @ T_base_lidar
        T_b_a = invert_T(T_odom_lb) @ T_odom_la
        yaw = np.radians(rng.uniform(-spec.max_yaw_deg, spec.max_yaw_deg))
        shift = np.r_[rng.uniform(-spec.max_shift, spec.max_shift, 2), 0.0]
        P = make_T(rpy_to_R(0.0, 0.0, yaw), shift)  # applied to the source points
        src = a.lidar.xyz.astype(np.float64) @ P[:3, :3].T + P[:3, 3]
        pairs.append(CloudPair(f"sim{seed}_{first}_{skip}", src, b.lidar.xyz.astype(np.float64), T_b_a @ invert_T(P)))
    return pairs


def threedmatch_pairs(folder: Path) -> list[CloudPair]:
    """3DMatch layout: `cloud_bin_<i>.ply` and `gt.log` (entry i j maps fragment j into fragment i)."""
    from vg_ros.registration.io import read_3dmatch_log, read_cloud
    log = read_3dmatch_log(folder / "gt.log")
    pairs = []
    for (i, j), T in sorted(log.items()):
        fi, fj = folder / f"cloud_bin_{i}.ply", folder / f"cloud_bin_{j}.ply"
        if fi.exists() and fj.exists():
            pairs.append(CloudPair(f"3dm_{i}_{j}", read_cloud(fj), read_cloud(fi), T))
    return pairs


def kitti_pairs(folder: Path, every: int = 10) -> list[CloudPair]:
    """KITTI odometry layout: `velodyne/NNNNNN.bin`, `poses.txt` (camera poses, 3x4 per line) and
    optionally `calib.txt` (`Tr:` velodyne -> camera). Pairs `every` scans apart."""
    from vg_ros.registration.io import read_cloud
    scans = sorted((folder / "velodyne").glob("*.bin"))
    poses_raw = np.loadtxt(folder / "poses.txt").reshape(-1, 12)
    Tr = np.eye(4)
    calib = folder / "calib.txt"
    if calib.exists():
        for line in calib.read_text().splitlines():
            if line.startswith("Tr:"):
                Tr[:3] = np.array(line.split()[1:13], float).reshape(3, 4)
    poses = []
    for row in poses_raw:
        P = np.eye(4)
        P[:3] = row.reshape(3, 4)
        poses.append(invert_T(Tr) @ P @ Tr)  # velodyne poses
    pairs = []
    for i in range(0, min(len(scans), len(poses)) - every, every):
        j = i + every
        pairs.append(CloudPair(f"kitti_{i}_{j}", read_cloud(scans[i], 4), read_cloud(scans[j], 4),
                               invert_T(poses[j]) @ poses[i]))
    return pairs


def data_fingerprint(folder: Path, layout: str) -> list:
    """(name, size, mtime) of every file a `layout` folder's pairs are read from: the user-data cache key,
    so that files fixed or replaced in the same folder are matched again, not answered from the cache."""
    names = (["gt.log", "cloud_bin_*.ply"] if layout == "3dmatch" else ["poses.txt", "calib.txt", "velodyne/*.bin"])
    files = sorted({f for pattern in names for f in folder.glob(pattern) if f.is_file()})
    return [(str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def correspondence_set(pipe: RegistrationPipeline, pair: CloudPair) -> dict[str, np.ndarray]:
    """{"src": (K, 3), "dst": (K, 3), "labels": (K,) uint8, "T_gt": (4, 4)} from the pipeline's FPFH matches."""
    src_pts = pipe.preprocess(pair.src, "source")
    dst_pts = pipe.preprocess(pair.dst, "target")
    src_normals, src_desc = pipe.describe(src_pts)
    dst_normals, dst_desc = pipe.describe(dst_pts)
    cfg = pipe.cfg
    idx = pipe.match(src_pts, src_normals, src_desc, dst_pts, dst_normals, dst_desc)
    src, dst = src_pts[idx[:, 0]], dst_pts[idx[:, 1]]
    moved = src @ pair.T_gt[:3, :3].T + pair.T_gt[:3, 3]
    labels = (np.linalg.norm(moved - dst, axis=1) < cfg.tau).astype(np.uint8)
    return {"src": src, "dst": dst, "labels": labels, "T_gt": pair.T_gt}


def cached_sets(source: str, pairs_fn, pipe: RegistrationPipeline, key: dict) -> list[dict[str, np.ndarray]]:
    """Correspondence sets for `source`, from `.cache/registration/` when the key (config + spec) matches."""
    matching = {k: v for k, v in pipe.cfg.to_dict().items() if k in MATCHING_FIELDS}
    digest = hashlib.sha1(json.dumps({**key, "cfg": matching}, sort_keys=True, default=str).encode()).hexdigest()[:10]
    path = CACHE_DIR / f"{source}_{digest}.npz"
    if path.exists():
        with np.load(path) as data:
            count = int(data["count"])
            return [{k: data[f"{k}_{i}"] for k in ("src", "dst", "labels", "T_gt")} for i in range(count)]
    sets = [correspondence_set(pipe, pair) for pair in pairs_fn()]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    arrays = {"count": np.array(len(sets))}
    for i, s in enumerate(sets):
        arrays.update({f"{k}_{i}": v for k, v in s.items()})
    np.savez_compressed(path, **arrays)
    return sets


def sim_sets(seeds, spec: PairSpec, pipe: RegistrationPipeline) -> list[dict[str, np.ndarray]]:
    sets = []
    for seed in seeds:
        sets += cached_sets(f"sim{seed}", lambda s=seed: sim_pairs(s, spec), pipe, dataclasses.asdict(spec))
    return sets


def batch_from_sets(sets: list[dict], rng: np.random.Generator, batch: int, size: int, tau: float):
    """A training batch: src, dst (B, size, 3), beta (B, size, size), labels (B, size). Sets smaller
    than `size` are padded by repetition (repeats are harmless for the attention's normalisation)."""
    picks = rng.integers(0, len(sets), batch)
    src, dst, labels = [], [], []
    for p in picks:
        s = sets[int(p)]
        n = len(s["labels"])
        idx = rng.permutation(n)[:size] if n >= size else rng.integers(0, n, size)
        src.append(s["src"][idx])
        dst.append(s["dst"][idx])
        labels.append(s["labels"][idx])
    src_t = torch.as_tensor(np.stack(src), dtype=torch.float32)
    dst_t = torch.as_tensor(np.stack(dst), dtype=torch.float32)
    beta = spatial_compatibility(src_t, dst_t, tau)
    return src_t, dst_t, beta, torch.as_tensor(np.stack(labels), dtype=torch.float32)


def train(sets: list[dict], cfg: RegistrationConfig, *, steps: int, batch: int = 4, size: int = 384,
          lr: float = 1e-3, kl_weight: float = 0.1, prior_weight: float = 1.0, seed: int = 0, log_every: int = 50,
          max_seconds: float | None = None, stop=None, log=print) -> tuple[VBRegNet, dict]:
    """Adam on the negative ELBO. Returns the network and a summary (final loss terms, steps, seconds,
    `interrupted`: `stop()` turned true, polled after each step, and training ended there)."""
    if not sets:
        raise ValueError("train: no correspondence sets")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = VBRegNet(cfg.dims())
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * 0.05)
    start = time.perf_counter()
    history = []
    done = 0
    for step in range(steps):
        src, dst, beta, labels = batch_from_sets(sets, rng, batch, size, cfg.tau)
        net.train()
        out = net(src, dst, beta, labels)
        prior_out = net(src, dst, beta, None, sample=False) if prior_weight > 0 else None
        warm = min(1.0, (step + 1) / max(steps * 0.2, 1))  # KL annealing
        terms = elbo_loss(out, labels, kl_weight=kl_weight * warm, prior_output=prior_out, prior_weight=prior_weight)
        opt.zero_grad()
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        done = step + 1
        history.append((float(terms["nll"]), float(terms["kl"]), float(terms.get("prior_nll", terms["nll"]))))
        if log_every and (step % log_every == 0 or step == steps - 1):
            nll, kl, prior_nll = np.mean(history[-log_every:], axis=0)
            log(f"step {step:5d}  nll {nll:.4f}  kl {kl:.4f}  prior nll {prior_nll:.4f}  "
                f"{time.perf_counter() - start:.0f}s", flush=True)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            log(f"stopping at step {done}: time budget {max_seconds:.0f}s spent")
            break
        if stop is not None and stop():
            break
    net.eval()
    nll, kl, prior_nll = np.mean(history[-min(50, len(history)):], axis=0)
    return net, {"steps": done, "seconds": time.perf_counter() - start, "final_nll": float(nll), "final_kl": float(kl),
                 "final_prior_nll": float(prior_nll), "interrupted": bool(stop is not None and stop())}


def save_weights(net: VBRegNet, path: Path, meta: dict) -> None:
    save_state(net, path, {**dataclasses.asdict(net.dims), **meta})


def write_model_card(path: Path, info: dict) -> None:
    lines = [f"# {path.stem.replace('.md', '')}: VBReg inlier network", "",
             "Trained by `vg_ros/registration/train.py` (ELBO: BCE inlier likelihood + KL(posterior || prior) "
             "per iteration, Adam, cosine schedule, KL annealing).", ""]
    for key, value in info.items():
        lines.append(f"* **{key}**: {value}")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    from vg_ros.cli import UserError
    parser = argparse.ArgumentParser(prog="vg-ros train registration", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=list(TRAIN_SEEDS), help="simulator seeds to train on")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default=str(DEFAULT_WEIGHTS.parent), help="output folder")
    parser.add_argument("--preset", default="lidar", choices=("lidar", "indoor"))
    parser.add_argument("--data", default=None, help="user data folder (3DMatch or KITTI layout) instead of / beside sim")
    parser.add_argument("--layout", default=None, choices=("3dmatch", "kitti"), help="layout of --data (default: detect)")
    parser.add_argument("--no-sim", action="store_true", help="train on --data only")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=384, help="correspondences per training sample")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=0.1)
    parser.add_argument("--prior-weight", type=float, default=1.0, help="weight of the prior-path BCE (hybrid objective)")
    parser.add_argument("--max-minutes", type=float, default=12.0, help="stop training after this wall time")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise UserError("--steps must be >= 1")
    for name in ("batch", "size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be >= 1")
    for name in ("lr", "max_minutes"):
        if not 0 < getattr(args, name) < math.inf:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a finite number > 0")
    for name in ("kl_weight", "prior_weight"):   # a negative weight trains the wrong way; NaN only showed at the end
        if not 0 <= getattr(args, name) < math.inf:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a finite number >= 0")
    held = [] if args.no_sim else sorted(set(args.seeds or []) & EVAL_SEEDS)
    if held:
        raise UserError(f"--seeds {held[:10]}: held-out evaluation seeds ({format_seeds(sorted(EVAL_SEEDS))}); "
                        "train on others")
    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be >= 1")
    if negative := [s for s in args.seeds or [] if s < 0]:
        raise UserError(f"--seeds {negative[:5]}: simulator seeds are >= 0")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out}: a file, not a folder")
    try:   # before minutes of matching and training, not after them
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {args.out}: cannot create the folder ({exc})") from None
    torch.set_num_threads(args.threads)
    cfg = set_config(args.preset)
    pipe = RegistrationPipeline(cfg, weights=None)
    spec = PairSpec()
    sets: list[dict] = []
    sources = []
    if not args.no_sim:
        print(f"building sim correspondence sets for seeds {format_seeds(args.seeds)} (cached in {CACHE_DIR})", flush=True)
        sets += sim_sets(args.seeds, spec, pipe)
        sources.append(f"simulator seeds {format_seeds(args.seeds)} ({spec})")
    if args.data:
        folder = Path(args.data)
        if not folder.is_dir():
            raise UserError(f"--data {folder}: not a folder")
        layout = args.layout or ("3dmatch" if (folder / "gt.log").exists() else "kitti" if (folder / "velodyne").is_dir() else None)
        if layout is None:
            raise UserError(f"--data {folder}: neither 3DMatch (gt.log) nor KITTI (velodyne/) layout; pass --layout")
        fn = (lambda: threedmatch_pairs(folder)) if layout == "3dmatch" else (lambda: kitti_pairs(folder))
        key = {"path": str(folder.resolve()), "layout": layout, "files": data_fingerprint(folder, layout)}
        try:   # a missing poses.txt, a malformed gt.log, a cloud that is no cloud: one line naming the file
            user = cached_sets(f"user_{folder.name}", fn, pipe, key)
        except (ValueError, OSError) as exc:
            raise UserError(f"--data {folder}: {exc}") from None
        if not user:
            raise UserError(f"--data {folder}: no pairs found in {layout} layout")
        sets += user
        sources.append(f"{layout} data at {folder} ({len(user)} pairs)")
    if not sets:
        raise UserError("no training data: give --seeds or --data")
    inlier_ratio = float(np.mean([s["labels"].mean() for s in sets]))
    print(f"{len(sets)} correspondence sets, mean inlier ratio {inlier_ratio:.3f}", flush=True)
    with StopRequest() as stop:   # Ctrl-C / SIGTERM: the step ends, the weights so far are written
        net, summary = train(sets, cfg, steps=args.steps, batch=args.batch, size=args.size, lr=args.lr,
                             kl_weight=args.kl_weight, prior_weight=args.prior_weight,
                             max_seconds=args.max_minutes * 60, stop=stop)
    out = Path(args.out)
    weights_path = out / "registration_vbreg.safetensors"
    meta = {"preset": args.preset, "steps": summary["steps"], "tau": cfg.tau}
    if args.seeds and not args.no_sim:   # `vg-ros eval registration` refuses to score these
        meta["train_seeds"] = format_seeds(args.seeds)
    if summary["interrupted"]:
        meta["partial"] = "true"
    try:
        save_weights(net, weights_path, meta)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if summary["interrupted"]:
        (out / "registration_vbreg.md").unlink(missing_ok=True)   # it describes earlier weights
        print(f"stopped by signal {stop.signal} at step {summary['steps']} of {args.steps}; weights so far in "
              f"{weights_path} (partial, no model card)", flush=True)
        return 130
    card = {
        "data": "; ".join(sources) + f"; {len(sets)} correspondence sets, mean inlier ratio {inlier_ratio:.3f}",
        "seeds": format_seeds(args.seeds) if not args.no_sim else "none",
        "held-out seeds (never trained on)": f"{format_seeds(HELDOUT_SEEDS)}, 9700-9719 (development), {FINAL_SEEDS} (final, run once)",
        "steps": f"{summary['steps']} x batch {args.batch} x {args.size} correspondences",
        "network": json.dumps(dataclasses.asdict(net.dims)),
        "optimiser": f"Adam lr {args.lr} (cosine), KL weight {args.kl_weight} (annealed over 20 % of steps), "
                     f"prior-path BCE weight {args.prior_weight}",
        "final loss (last 50 steps)": f"nll {summary['final_nll']:.4f}, kl {summary['final_kl']:.4f}, "
                                      f"prior-path nll {summary['final_prior_nll']:.4f}",
        "train time": f"{summary['seconds']:.0f} s CPU ({args.threads} thread)",
        "command": "vg-ros train registration " + " ".join(argv),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "metrics": "see `vg-ros eval registration` (docs/registration.md)",
    }
    write_model_card(out / "registration_vbreg.md", card)
    print(f"wrote {weights_path} ({weights_path.stat().st_size / 1e6:.2f} MB) and its model card")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
