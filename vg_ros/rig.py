"""Reads and validates `config/rig_<name>.yaml`: camera intrinsics and mounts, LiDAR geometry."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from vg_ros.geometry import R_BODY_OPTICAL, check_distortion, make_T, rpy_to_R
from vg_ros.types import CameraModel, LidarSpec, Rig


def _mount(entry: dict, where: str) -> np.ndarray:
    """A mount as `xyz` + `rpy_deg` (body frame: x forward, y left, z up), or a full 4x4 `T`."""
    if "T" in entry:
        T = np.asarray(entry["T"], dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise ValueError(f"{where}.T must be a finite 4x4 matrix")
        return T
    try:
        xyz = np.asarray(entry["xyz"], dtype=np.float64)
        rpy = np.radians(np.asarray(entry.get("rpy_deg", [0.0, 0.0, 0.0]), dtype=np.float64))
    except KeyError as exc:
        raise ValueError(f"{where} needs `xyz` (and optional `rpy_deg`) or a 4x4 `T`") from exc
    if xyz.shape != (3,) or rpy.shape != (3,) or not (np.all(np.isfinite(xyz)) and np.all(np.isfinite(rpy))):
        raise ValueError(f"{where}.xyz and {where}.rpy_deg must be 3 finite numbers each")
    return make_T(rpy_to_R(*rpy), xyz)


def parse_rig(data: dict, name: str) -> Rig:
    if not isinstance(data, dict) or "cameras" not in data or "lidar" not in data:
        raise ValueError(f"rig {name!r}: needs top-level `cameras` (list) and `lidar` (mapping)")
    cameras = []
    for i, c in enumerate(data["cameras"]):
        where = f"rig {name!r} cameras[{i}]"
        try:
            width, height = int(c["width"]), int(c["height"])
            fx, fy = float(c["fx"]), float(c["fy"])
            cx, cy = float(c.get("cx", width / 2)), float(c.get("cy", height / 2))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: needs numeric width, height, fx, fy ({exc})") from exc
        if width <= 0 or height <= 0 or fx <= 0 or fy <= 0:
            raise ValueError(f"{where}: width, height, fx, fy must be positive")
        T_base_body = _mount(c, where)
        # A `T` given in the file is already optical; xyz/rpy describe the body frame.
        T_base_cam = T_base_body if "T" in c else T_base_body @ make_T(R_BODY_OPTICAL)
        K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
        cam_name = str(c.get("name", f"cam{i}"))
        model = str(c.get("distortion_model", ""))
        try:
            distortion = check_distortion(c.get("distortion", []), model)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        cameras.append(CameraModel(cam_name, width, height, K, T_base_cam,
                                   str(c.get("frame_id", cam_name.lower() + "_optical")), distortion, model))
    names = [c.name for c in cameras]
    if len(set(names)) != len(names):
        raise ValueError(f"rig {name!r}: camera names repeat: {names}")
    li = data["lidar"]
    lidar = LidarSpec(
        frame_id=str(li.get("frame_id", "lidar")),
        beams=int(li.get("beams", 32)),
        vfov_deg=tuple(float(v) for v in li.get("vfov_deg", (-30.0, 10.0))),  # type: ignore[arg-type]
        points_per_ring=int(li.get("points_per_ring", 1024)),
        min_range=float(li.get("min_range", 0.5)),
        max_range=float(li.get("max_range", 70.0)),
        rate_hz=float(li.get("rate_hz", 10.0)),
        range_noise_std=float(li.get("range_noise_std", 0.02)),
        T_base_lidar=_mount(li, f"rig {name!r} lidar"),
    )
    if lidar.beams < 1 or lidar.points_per_ring < 8 or not lidar.vfov_deg[0] < lidar.vfov_deg[1]:
        raise ValueError(f"rig {name!r} lidar: beams >= 1, points_per_ring >= 8, vfov_deg (min < max)")
    if not 0 < lidar.min_range < lidar.max_range or lidar.rate_hz <= 0:
        raise ValueError(f"rig {name!r} lidar: 0 < min_range < max_range and rate_hz > 0")
    return Rig(name=str(data.get("name", name)), cameras=cameras, lidar=lidar,
               camera_rate_hz=float(data.get("camera_rate_hz", 10.0)))


def load_rig(name_or_path: str | Path = "default") -> Rig:
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = Rig.config_dir() / f"rig_{name_or_path}.yaml"
    if not path.exists():
        raise ValueError(f"unknown rig {str(name_or_path)!r}: no file {path} (known rigs: {Rig.available()})")
    with open(path) as fh:
        data = yaml.safe_load(fh)
    return parse_rig(data, path.stem.removeprefix("rig_"))
