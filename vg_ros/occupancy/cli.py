"""`vg-ros occupancy FRAME_DIR [--json] [--png OUT.png]`: semantic occupancy from a folder of camera images
plus a `calib.json` (the layout of mmdetection3d's nuScenes demo sample, see docs/occupancy.md).

calib.json (matrices row-major; only `cameras` with `img_path`, `cam2img` and `cam2ego` are required):

    {"cameras": {"CAM_FRONT": {"img_path": "front.jpg", "cam2img": 3x3 K, "cam2ego": 4x4 optical -> ego,
                               "width": 1600, "height": 900}, ...},
     "lidar_path": "scan.pcd.bin", "lidar2ego": 4x4, "lidar_num_pts_feats": 5}      (optional)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from vg_ros.types import FREE_CLASS, OCC_CLASSES, OCC_PALETTE, CameraFrame, CameraModel, OccupancyResult


def _matrix(entry: dict, key: str, shape: tuple[int, int], where: str) -> np.ndarray:
    from vg_ros.cli import UserError
    try:
        m = np.asarray(entry[key], dtype=np.float64)
    except KeyError:
        raise UserError(f"{where}: missing `{key}`") from None
    except (TypeError, ValueError):
        raise UserError(f"{where}.{key}: not a numeric matrix") from None
    if m.shape != shape:
        raise UserError(f"{where}.{key}: must be a {shape[0]}x{shape[1]} matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise UserError(f"{where}.{key}: holds NaN or inf")
    return m


def load_calib(frame_dir: str | Path) -> dict:
    from vg_ros.cli import UserError
    frame_dir = Path(frame_dir)
    path = frame_dir / "calib.json"
    if not frame_dir.is_dir():
        raise UserError(f"{frame_dir} is not a folder")
    if not path.is_file():
        raise UserError(f"{frame_dir} has no calib.json (see docs/occupancy.md for the format)")
    try:
        calib = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(calib, dict) or not isinstance(calib.get("cameras"), dict) or not calib["cameras"]:
        raise UserError(f"{path}: needs a non-empty `cameras` mapping")
    return calib


def load_frame_dir(frame_dir: str | Path) -> list[CameraFrame]:
    """Every camera of calib.json with its image (RGB uint8) and calibration (T_base_cam = cam2ego)."""
    from vg_ros.cli import UserError
    from vg_ros.convert import read_rgb
    frame_dir = Path(frame_dir)
    calib = load_calib(frame_dir)
    frames = []
    for name, entry in calib["cameras"].items():
        where = f"calib.json cameras.{name}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: must be a mapping (img_path, cam2img, cam2ego), got {type(entry).__name__}")
        if not isinstance(entry.get("img_path"), str) or not entry["img_path"]:
            raise UserError(f"{where}: missing `img_path` (a file name)")
        img_path = frame_dir / entry["img_path"]
        try:
            image = read_rgb(img_path)
        except ValueError as exc:
            raise UserError(f"{where}: cannot read image ({exc})") from None
        K = _matrix(entry, "cam2img", (3, 3), where)
        T = _matrix(entry, "cam2ego", (4, 4), where)
        h, w = image.shape[:2]
        if (entry.get("width", w), entry.get("height", h)) != (w, h):
            raise UserError(f"{where}: image {img_path.name} is {w}x{h}, calib says {entry['width']}x{entry['height']}")
        if K[0, 0] <= 0 or K[1, 1] <= 0:
            raise UserError(f"{where}.cam2img: focal length must be positive")
        if not (0 <= K[0, 2] <= w and 0 <= K[1, 2] <= h):
            # a K for another image size (images rescaled, calib not): every ray would be wrong
            raise UserError(f"{where}.cam2img: principal point ({K[0, 2]:g}, {K[1, 2]:g}) lies outside the "
                            f"{w}x{h} image {img_path.name}; K belongs to another size (rescale cam2img, or give "
                            "width/height)")
        frames.append(CameraFrame(CameraModel(name, w, h, K, T, frame_id=name.lower()), image))
    return frames


def load_lidar(frame_dir: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(points (N, 3) in the LiDAR frame, T_ego_lidar (4, 4)) when calib.json names a scan, else None."""
    frame_dir = Path(frame_dir)
    calib = load_calib(frame_dir)
    if "lidar_path" not in calib:
        return None
    feats = int(calib.get("lidar_num_pts_feats", 5))
    raw = np.fromfile(frame_dir / calib["lidar_path"], dtype=np.float32)
    points = raw.reshape(-1, feats)[:, :3]
    return points, _matrix(calib, "lidar2ego", (4, 4), "calib.json")


def bev_image(result: OccupancyResult, scale: int = 2) -> np.ndarray:
    """Top-down RGB (H, W, 3): forward (+x) up, left (+y) left; the top-most occupied class's colour,
    light grey where observed free, dark grey where no camera sees."""
    sem, seen = result.semantics, result.observed
    occupied = (sem != FREE_CLASS) & seen
    Z = sem.shape[2]
    top = Z - 1 - np.argmax(occupied[:, :, ::-1], axis=2)  # highest occupied layer per column
    top_class = np.take_along_axis(sem, top[..., None], axis=2)[..., 0]
    rgb = np.full(sem.shape[:2] + (3,), 70, np.uint8)
    rgb[seen.any(axis=2)] = 225
    any_occ = occupied.any(axis=2)
    rgb[any_occ] = OCC_PALETTE[top_class[any_occ]]
    rgb = rgb[::-1, ::-1]  # rows: x descending (forward up); cols: y descending (left on the left)
    return np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)


def summary(result: OccupancyResult, frames: list[CameraFrame]) -> dict:
    sem, seen = result.semantics, result.observed
    counts = np.bincount(sem[seen].ravel(), minlength=len(OCC_CLASSES))
    return {
        "stamp_ns": result.stamp_ns,
        "cameras": [f.camera.name for f in frames],
        "grid": {"lower": list(result.grid.lower), "upper": list(result.grid.upper),
                 "voxel_size": result.grid.voxel_size, "shape": list(result.grid.shape)},
        "observed_fraction": float(seen.mean()),
        "occupied_voxels": int(((sem != FREE_CLASS) & seen).sum()),
        "class_counts": {OCC_CLASSES[c]: int(n) for c, n in enumerate(counts) if n and c != FREE_CLASS},
        "mean_confidence": float(result.confidence[seen].mean()) if seen.any() else None,
        "seconds": round(result.seconds, 3),
    }


def main(argv: list[str]) -> int:
    from vg_ros.cli import UserError
    from vg_ros.occupancy.model import MODEL_CONFIGS
    from vg_ros.occupancy.pipeline import OccupancyConfig, OccupancyPipeline
    parser = argparse.ArgumentParser(prog="vg-ros occupancy", description=__doc__.split("\n\n")[0])
    parser.add_argument("frame_dir", help="folder with camera images and calib.json")
    parser.add_argument("--json", action="store_true", help="print the result summary as JSON")
    parser.add_argument("--png", help="write the bird's-eye view as a PNG")
    parser.add_argument("--model", default="tiny", choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--weights", default="default", help="'default', a .safetensors path, or 'random'")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    args = parser.parse_args(argv)
    if args.png:
        from vg_ros.cli import image_output_path
        image_output_path(args.png, make_folder=True)
    frames = load_frame_dir(args.frame_dir)
    try:
        pipe = OccupancyPipeline(OccupancyConfig(model=args.model), weights=args.weights, device=args.device)
        result = pipe.infer(frames, stamp_ns=0)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    info = summary(result, frames)
    if args.png:
        from PIL import Image
        try:
            Image.fromarray(bev_image(result)).save(args.png)
        except (OSError, ValueError) as exc:
            raise UserError(f"--png {args.png}: {exc}") from None
        info["png"] = str(args.png)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
    else:
        print(f"{len(frames)} cameras, {info['occupied_voxels']} occupied voxels, "
              f"{100 * info['observed_fraction']:.1f}% observed, {info['seconds']:.2f} s"
              + (f"; BEV written to {args.png}" if args.png else ""))
    return 0
