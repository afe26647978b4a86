"""Simulator data for TPVFormer: a cache of frames pre-rendered at the model's input size, the supervision
points of both modes of the paper, and the per-height class prior baseline.

One cached sample (`.cache/occupancy/<W>x<H>/seed<S>_tick<T>.npz`):
    images (N, 3, H, W) uint8; K (N, 3, 3) scaled to W x H; T_cam_base (N, 4, 4) base_link -> optical;
    occupancy (X, Y, Z) uint8 (17 free); mask_camera (X, Y, Z) bool;
    lidar_base (P, 3) float32 LiDAR hits in base_link; lidar_labels (P,) uint8; lidar_origin (3,) float32.

Supervision (`supervision_points`), as metric points in base_link with class labels:
    dense  - voxel centres of camera-visible voxels: occupied ones (class-balanced cap) plus free ones;
    sparse - LiDAR hits with their point labels, plus free points sampled along each ray before its hit
             (what the LiDAR saw through); no voxel labels at all.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vg_ros.sim.seeds import parse_seeds  # noqa: F401 - re-exported for the CLIs
from vg_ros.geometry import invert_T, transform_points
from vg_ros.types import FREE_CLASS, NUM_OCC_CLASSES, GridSpec, Rig

REPO = Path(__file__).resolve().parent.parent.parent
CACHE_ROOT = REPO / ".cache" / "occupancy"


def cache_dir(image_size: tuple[int, int], root: Path | None = None) -> Path:
    return (root or CACHE_ROOT) / f"{image_size[0]}x{image_size[1]}"


def sample_from_frame(frame, image_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """A `vg_ros.sim.SimFrame` -> the arrays of one cached sample (images resized, K scaled)."""
    import cv2
    W, H = image_size
    images, Ks, Ts = [], [], []
    for cam in frame.rig.cameras:
        img = frame.images[cam.name]
        img = cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA if img.shape[1] > W else cv2.INTER_LINEAR)
        images.append(img.transpose(2, 0, 1))
        Ks.append(cam.scaled(W, H).K)
        Ts.append(invert_T(cam.T_base_cam))
    T_base_lidar = frame.rig.lidar.T_base_lidar
    return {
        "images": np.stack(images).astype(np.uint8),
        "K": np.stack(Ks).astype(np.float32),
        "T_cam_base": np.stack(Ts).astype(np.float32),
        "occupancy": frame.occupancy.astype(np.uint8),
        "mask_camera": frame.mask_camera.astype(bool),
        "lidar_base": transform_points(T_base_lidar, frame.lidar.xyz.astype(np.float64)).astype(np.float32),
        "lidar_labels": frame.lidar_labels.astype(np.uint8),
        "lidar_origin": T_base_lidar[:3, 3].astype(np.float32),
    }


def build_cache(seeds: list[int], image_size: tuple[int, int], *, seconds: float = 20.0, every: int = 10,
                rig: str = "default", root: Path | None = None, log=print) -> list[Path]:
    """Render `seconds` of each seed's drive (every `every`-th tick) once; existing files are reused."""
    from vg_ros.sim import simulate
    out_dir = cache_dir(image_size, root)
    out_dir.mkdir(parents=True, exist_ok=True)
    rig_obj = Rig.load(rig)
    paths = []
    for seed in seeds:
        n_ticks = int(np.floor(seconds * rig_obj.lidar.rate_hz + 1e-9))
        expected = [out_dir / f"seed{seed:04d}_tick{tick:05d}.npz" for tick in range(0, n_ticks, every)]
        if expected and all(p.exists() for p in expected):
            paths += expected
            continue
        for frame in simulate(seed, seconds, rig_obj, every=every, expressions=0):
            path = out_dir / f"seed{seed:04d}_tick{frame.tick:05d}.npz"
            if not path.exists():
                tmp = path.with_suffix(".tmp.npz")
                np.savez_compressed(tmp, **sample_from_frame(frame, image_size))
                tmp.rename(path)
            paths.append(path)
        log(f"cached seed {seed}: {len(paths)} samples so far in {out_dir}")
    return paths


def load_sample(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def voxel_centre_points(idx: np.ndarray, grid: GridSpec) -> np.ndarray:
    """Voxel indices (P, 3) -> metric centres (P, 3) float32."""
    return (np.asarray(grid.lower) + (idx + 0.5) * grid.voxel_size).astype(np.float32)


def balanced_subset(labels: np.ndarray, per_class: int, total: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most `per_class` items of each label, then at most `total` overall, drawn at random.

    Ground classes cover most occupied voxels of a street scene; capping each class keeps every voxel of
    the rare ones (cones, pedestrians, bicycles) in the loss instead of a uniform sample that misses them."""
    keep = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        keep.append(members if len(members) <= per_class else rng.choice(members, per_class, replace=False))
    keep = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    if len(keep) > total:
        keep = rng.choice(keep, total, replace=False)
    return np.sort(keep)


SUPERVISION_DEFAULTS = {"max_occupied": 8000, "max_per_class": 2500, "free_per_occupied": 2.0, "free_per_ray": 2}


def supervision_points(sample: dict[str, np.ndarray], mode: str, rng: np.random.Generator, grid: GridSpec,
                       max_occupied: int = SUPERVISION_DEFAULTS["max_occupied"],
                       free_per_occupied: float = SUPERVISION_DEFAULTS["free_per_occupied"],
                       free_per_ray: int = SUPERVISION_DEFAULTS["free_per_ray"],
                       max_per_class: int = SUPERVISION_DEFAULTS["max_per_class"]) -> tuple[np.ndarray, np.ndarray]:
    """Training points of one sample: (points (P, 3) metres in base_link, labels (P,) int64). Occupied
    points are class-balanced: at most `max_per_class` of each class, `max_occupied` in all."""
    if mode == "dense":
        occ, mask = sample["occupancy"], sample["mask_camera"].astype(bool)
        occ_idx = np.argwhere(mask & (occ != FREE_CLASS))
        free_idx = np.argwhere(mask & (occ == FREE_CLASS))
        occ_idx = occ_idx[balanced_subset(occ[occ_idx[:, 0], occ_idx[:, 1], occ_idx[:, 2]], max_per_class,
                                          max_occupied, rng)]
        n_free = min(len(free_idx), int(free_per_occupied * max(len(occ_idx), 1000)))
        free_idx = free_idx[rng.choice(len(free_idx), n_free, replace=False)]
        idx = np.concatenate([occ_idx, free_idx])
        labels = occ[idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.int64)
        return voxel_centre_points(idx, grid), labels
    if mode == "sparse":
        hits, hit_labels, origin = sample["lidar_base"], sample["lidar_labels"].astype(np.int64), sample["lidar_origin"]
        lower, upper = np.asarray(grid.lower), np.asarray(grid.upper)
        inside = np.all((hits >= lower) & (hits < upper), axis=1) & (hit_labels < FREE_CLASS)
        hits, hit_labels = hits[inside], hit_labels[inside]
        keep = balanced_subset(hit_labels, max_per_class, max_occupied, rng)
        hits, hit_labels = hits[keep], hit_labels[keep]
        # Free space the beam crossed: stop one voxel diagonal short of the hit.
        ray = hits - origin
        length = np.linalg.norm(ray, axis=1, keepdims=True)
        margin = np.sqrt(3) * grid.voxel_size
        frac = rng.uniform(0.0, 1.0, (len(hits), free_per_ray)) * np.clip(1.0 - margin / np.maximum(length, 1e-3), 0, 1)
        free = (origin + frac[..., None] * ray[:, None, :]).reshape(-1, 3)
        free = free[np.all((free >= lower) & (free < upper), axis=1)]
        points = np.concatenate([hits, free]).astype(np.float32)
        labels = np.concatenate([hit_labels, np.full(len(free), FREE_CLASS, np.int64)])
        return points, labels
    raise ValueError(f"supervision mode must be 'dense' or 'sparse', got {mode!r}")


def class_statistics(paths: list[Path]) -> dict[str, np.ndarray]:
    """Counts over the camera-visible voxels of the training samples: per height (Z, classes) and total."""
    per_height = None
    for path in paths:
        with np.load(path) as data:
            occ, mask = data["occupancy"], data["mask_camera"].astype(bool)
        Z = occ.shape[2]
        if per_height is None:
            per_height = np.zeros((Z, NUM_OCC_CLASSES), np.int64)
        for z in range(Z):
            per_height[z] += np.bincount(occ[:, :, z][mask[:, :, z]], minlength=NUM_OCC_CLASSES)
    if per_height is None:
        raise ValueError("class_statistics: no samples")
    return {"per_height": per_height, "total": per_height.sum(0)}


def height_prior_prediction(per_height: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The LiDAR-free baseline: every voxel gets its height's most frequent training class. (X, Y, Z) uint8."""
    layer_class = per_height.argmax(1).astype(np.uint8)
    return np.broadcast_to(layer_class[None, None, :], shape).copy()
