"""Occupancy inference: N camera frames (any rig, any size) -> TPVFormer -> semantic voxel grid + confidence,
and the BEV grid Nav2 reads.

    pipe = OccupancyPipeline(OccupancyConfig(model="tiny"), weights="default", device="auto")
    result = pipe.infer(frames, stamp_ns)                       # OccupancyResult
    grid_int8, origin_T, resolution = bev_occupancy(result, z_min=0.2, z_max=2.0)

Each frame is resized to the model's input size with its intrinsics scaled to match
(`CameraModel.scaled`); cameras that are missing simply give fewer views, and voxels no camera sees are
reported as not `observed`. Never imports rclpy.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from vg_ros.checkpoint import load_into, read_state, save_state
from vg_ros.config import PipelineConfig, param
from vg_ros.geometry import invert_T, voxel_centers
from vg_ros.occupancy.model import MODEL_CONFIGS, TPVConfig, TPVFormer, model_config
from vg_ros.types import FREE_CLASS, CameraFrame, CameraModel, GridSpec, OccupancyResult

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def default_weights_path(model: str) -> Path:
    return WEIGHTS_DIR / f"occupancy_tpvformer_{model}.safetensors"


@dataclasses.dataclass
class OccupancyConfig(PipelineConfig):
    """Parameters of the occupancy pipeline (and of `occupancy_node`)."""

    model: str = param("tiny", "TPVFormer size (named config)", choices=tuple(MODEL_CONFIGS))
    weights: str = param("default", "safetensors checkpoint: 'default' (shipped for `model`), a path, or 'random'")
    device: str = param("auto", "torch device", choices=("cpu", "cuda", "auto"))
    num_threads: int = param(0, "torch CPU threads (0 = leave torch's default)", low=0, high=256)
    z_min: float = param(0.2, "lower edge of the BEV height band, m in base_link", low=-10.0, high=10.0)
    z_max: float = param(2.0, "upper edge of the BEV height band, m in base_link", low=-10.0, high=10.0)
    max_observed_range: float = param(60.0, "voxels farther than this from every camera are unobserved (m)",
                                      low=1.0, high=500.0)
    min_confidence: float = param(0.0, "occupied voxels below this confidence are reported free", low=0.0, high=1.0)
    ground_z: float = param(0.0, "height of the ground in base_link (m): voxels wholly below it are hidden from "
                            "every camera and reported unobserved", low=-5.0, high=5.0)

    def validate(self) -> None:
        super().validate()
        if self.z_max <= self.z_min:
            raise ValueError(f"OccupancyConfig.z_max = {self.z_max} must exceed z_min = {self.z_min}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    return torch.device(device)


# ------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(model: TPVFormer, path: str | Path, metadata: dict | None = None) -> None:
    """Weights as safetensors; the model config travels in the metadata (`tpv_config`, JSON)."""
    save_state(model, path, {**(metadata or {}), "tpv_config": json.dumps(model.cfg.to_dict())})


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[TPVFormer, dict]:
    """A TPVFormer from a safetensors file written by `save_checkpoint`; (model in eval mode, metadata)."""
    state, meta = read_state(path, "tpv_config", "occupancy")
    model = TPVFormer(TPVConfig.from_dict(json.loads(meta["tpv_config"])))
    load_into(model, state, path, "occupancy")
    return model.to(device).eval(), meta


# ------------------------------------------------------------------------------------------- inputs


def check_camera(camera: CameraModel) -> None:
    """ValueError naming the camera and the field when the calibration cannot be used."""
    K = np.asarray(camera.K, dtype=np.float64)
    T = np.asarray(camera.T_base_cam, dtype=np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)):
        raise ValueError(f"camera {camera.name!r}: K must be a finite 3x3 matrix")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"camera {camera.name!r}: focal length fx={K[0, 0]}, fy={K[1, 1]} must be positive")
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ValueError(f"camera {camera.name!r}: T_base_cam must be a finite 4x4 matrix (NaN extrinsic?)")
    if not np.allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-3):
        raise ValueError(f"camera {camera.name!r}: T_base_cam rotation is not orthonormal")
    if camera.width <= 0 or camera.height <= 0:
        raise ValueError(f"camera {camera.name!r}: width/height must be positive")


def check_frame(frame: CameraFrame) -> None:
    check_camera(frame.camera)
    img = frame.image
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        shape = getattr(img, "shape", None)
        dtype = getattr(img, "dtype", None)
        raise ValueError(f"camera {frame.camera.name!r}: image must be (H, W, 3) uint8 RGB, got {shape} {dtype}")
    if img.shape[:2] != (frame.camera.height, frame.camera.width):
        raise ValueError(f"camera {frame.camera.name!r}: image is {img.shape[1]}x{img.shape[0]} but the "
                         f"calibration is for {frame.camera.width}x{frame.camera.height}")


_RECTIFY_MAPS: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}


def rectified(frame: CameraFrame) -> CameraFrame:
    """The frame resampled to the distortion-free camera with the same K (image_proc's rectification with
    P = K), when its camera has lens distortion; else the frame itself. The network projects with a
    pinhole, so a distorted image would put every feature it samples off by the lens's displacement. The
    remap tables are cached per camera."""
    cam = frame.camera
    if not cam.distorted:
        return frame
    import cv2
    check_frame(frame)
    K = np.asarray(cam.K, dtype=np.float64)
    D = np.asarray(cam.distortion, dtype=np.float64)
    key = K.tobytes() + D.tobytes() + cam.distortion_model.encode() + np.array([cam.width, cam.height]).tobytes()
    maps = _RECTIFY_MAPS.get(key)
    if maps is None:
        size = (cam.width, cam.height)
        if cam.distortion_model == "equidistant":
            maps = cv2.fisheye.initUndistortRectifyMap(K, D, np.eye(3), K, size, cv2.CV_16SC2)
        else:
            maps = cv2.initUndistortRectifyMap(K, D, None, K, size, cv2.CV_16SC2)
        if len(_RECTIFY_MAPS) >= 32:
            _RECTIFY_MAPS.clear()
        _RECTIFY_MAPS[key] = maps
    image = cv2.remap(frame.image, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return CameraFrame(pinhole(cam), image, frame.stamp_ns)


def pinhole(cam: CameraModel) -> CameraModel:
    """The camera without its lens distortion (what `rectified` resamples a frame to)."""
    return dataclasses.replace(cam, distortion=np.zeros(0), distortion_model="") if cam.distorted else cam


def prepare_inputs(frames: list[CameraFrame], image_size: tuple[int, int]) -> tuple[np.ndarray, list[CameraModel]]:
    """Rectify (`rectified`) and resize every frame to `image_size` (W, H): images (N, 3, H, W) uint8 and
    the scaled pinhole cameras."""
    import cv2
    W, H = image_size
    images, cams = [], []
    for frame in frames:
        check_frame(frame)
        frame = rectified(frame)
        img = frame.image
        if img.shape[:2] != (H, W):
            shrink = img.shape[1] > W
            img = cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        images.append(np.ascontiguousarray(img.transpose(2, 0, 1)))
        cams.append(frame.camera.scaled(W, H))
    return np.stack(images), cams


def observed_voxels(grid: GridSpec, cameras: list[CameraModel], max_range: float,
                    ground_z: float | None = None) -> np.ndarray:
    """(X, Y, Z) bool: the voxel centre projects inside some camera's image within `max_range` metres, and
    (with `ground_z`) the voxel reaches above the ground: one wholly under it projects into the images too,
    but no camera sees it (the training labels never cover it, and the network's guesses there are noise)."""
    centres = voxel_centers(grid).reshape(-1, 3).astype(np.float64)
    seen = np.zeros(len(centres), dtype=bool)
    for cam in cameras:
        T_cam_base = invert_T(cam.T_base_cam)
        pts = centres @ T_cam_base[:3, :3].T + T_cam_base[:3, 3]
        depth = pts[:, 2]
        ok = (depth > 0.1) & (np.linalg.norm(pts, axis=1) < max_range)
        z = np.where(ok, depth, 1.0)
        u = cam.K[0, 0] * pts[:, 0] / z + cam.K[0, 2]
        v = cam.K[1, 1] * pts[:, 1] / z + cam.K[1, 2]
        seen |= ok & (u >= 0) & (u < cam.width) & (v >= 0) & (v < cam.height)
    if ground_z is not None:
        seen &= centres[:, 2] + grid.voxel_size / 2 > ground_z
    return seen.reshape(grid.shape)


# ------------------------------------------------------------------------------------------- pipeline


class OccupancyPipeline:
    """TPVFormer inference around `OccupancyConfig`. `weights`/`device` arguments override the config's."""

    def __init__(self, cfg: OccupancyConfig | None = None, weights: str | Path | None = None,
                 device: str | None = None):
        self.cfg = cfg or OccupancyConfig()
        self.device = resolve_device(device or self.cfg.device)
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        weights = str(weights if weights is not None else self.cfg.weights)
        if weights == "random":
            self.model = TPVFormer(model_config(self.cfg.model)).to(self.device).eval()
            self.metadata: dict = {"weights": "random"}
        else:
            path = default_weights_path(self.cfg.model) if weights == "default" else Path(weights)
            self.model, self.metadata = load_checkpoint(path, self.device)
        self.tpv_cfg = self.model.cfg
        self.grid = self.tpv_cfg.grid
        self._observed_cache: dict[bytes, np.ndarray] = {}

    def observed(self, cameras: list[CameraModel]) -> np.ndarray:
        key = np.float64(self.cfg.ground_z).tobytes() + b"".join(np.asarray(c.K, np.float64).tobytes() + np.asarray(c.T_base_cam, np.float64).tobytes()
                       + np.array([c.width, c.height]).tobytes() for c in cameras)
        if key not in self._observed_cache:
            if len(self._observed_cache) > 16:
                self._observed_cache.clear()
            self._observed_cache[key] = observed_voxels(self.grid, cameras, self.cfg.max_observed_range,
                                                        self.cfg.ground_z)
        return self._observed_cache[key]

    @torch.no_grad()
    def logits(self, frames: list[CameraFrame]) -> torch.Tensor:
        """Voxel logits (classes, X, Y, Z) for the frames (validated, resized)."""
        images, cams = prepare_inputs(frames, self.tpv_cfg.image_size)
        K = torch.tensor(np.stack([c.K for c in cams]), dtype=torch.float32, device=self.device)[None]
        T = torch.tensor(np.stack([invert_T(c.T_base_cam) for c in cams]), dtype=torch.float32,
                         device=self.device)[None]
        planes = self.model(torch.from_numpy(images).to(self.device)[None], K, T)
        return self.model.decoder.voxel_logits(planes)[0]

    def infer(self, frames: list[CameraFrame], stamp_ns: int) -> OccupancyResult:
        """Semantic occupancy from any number (>= 1) of camera frames. Raises ValueError on bad input."""
        if not frames:
            raise ValueError("occupancy: no camera frames given")
        names = [f.camera.name for f in frames]
        if len(set(names)) != len(names):
            raise ValueError(f"occupancy: camera names repeat: {names}")
        start = time.perf_counter()
        probs = self.logits(frames).softmax(0)
        confidence, semantics = probs.max(0)
        semantics = semantics.to(torch.uint8).cpu().numpy()
        confidence = confidence.float().cpu().numpy()
        if self.cfg.min_confidence > 0:
            semantics[(semantics != FREE_CLASS) & (confidence < self.cfg.min_confidence)] = FREE_CLASS
        observed = self.observed([pinhole(f.camera) for f in frames])   # the cameras the model saw
        return OccupancyResult(stamp_ns=int(stamp_ns), grid=self.grid, semantics=semantics, confidence=confidence,
                               observed=observed.copy(), seconds=time.perf_counter() - start)


def bev_occupancy(result: OccupancyResult, z_min: float, z_max: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The BEV grid Nav2 reads: (grid_int8 (Y, X), origin_T (4, 4), resolution m).

    A column is 100 where an observed voxel with centre in [z_min, z_max] is occupied, 0 where the
    band is observed and free, -1 where no camera sees the band. Row index = y cell, column = x cell,
    as `nav_msgs/OccupancyGrid.data` lays them out; `origin_T` places cell (0, 0)'s corner in base_link.
    """
    grid = result.grid
    if z_max <= z_min:
        raise ValueError(f"bev_occupancy: z_max {z_max} must exceed z_min {z_min}")
    z_centres = grid.lower[2] + (np.arange(grid.shape[2]) + 0.5) * grid.voxel_size
    band = (z_centres >= z_min) & (z_centres <= z_max)
    if not band.any():
        raise ValueError(f"bev_occupancy: no voxel layer of the grid ({grid.lower[2]}..{grid.upper[2]} m) has its "
                         f"centre in [{z_min}, {z_max}]")
    sem = result.semantics[:, :, band]
    seen = result.observed[:, :, band]
    occupied = ((sem != FREE_CLASS) & seen).any(axis=2)
    observed = seen.any(axis=2)
    bev = np.full(occupied.shape, -1, dtype=np.int8)
    bev[observed] = 0
    bev[occupied] = 100
    origin_T = np.eye(4)
    origin_T[:3, 3] = (grid.lower[0], grid.lower[1], 0.0)
    return np.ascontiguousarray(bev.T), origin_T, float(grid.voxel_size)
