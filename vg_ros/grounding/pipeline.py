"""Grounding inference: a command and camera frames in, the target's box, mask, score and 3D position out.

The language-adaptive weights depend on the command alone, so `set_command` runs the text encoder and the
weight generator once and caches the merged per-block q/k/v matrices and the mask head's per-command
tensors (`VGLAW.merge`); `infer` then runs a plain ViT per frame. `infer_uncached` re-does the language
side every frame (for the benchmark).

    pipe = GroundingPipeline(GroundingConfig(), weights="default", device="auto")
    pipe.set_command("the red car left of the bus")
    res = pipe.infer(frame, stamp_ns)        # GroundingResult; res.found False under the thresholds
    best = best_camera(pipe.infer_many(frames))   # several cameras as one batch: the one to publish
    pos = pipe.locate(res, points_lidar, T_cam_lidar, camera)   # (3,) in the LiDAR frame, or None

No rclpy here: the node (`vg_ros/nodes/grounding_node.py`) converts messages and calls this.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from vg_ros.checkpoint import load_into, read_state, save_state
from vg_ros.config import PipelineConfig, param
from vg_ros.geometry import project_points
from vg_ros.grounding.model import (MASK_THRESHOLD, VGLAW, LanguageWeights, VGLAWSpec, cxcywh_to_xyxy,
                                   spec_by_name)
from vg_ros.grounding.text import MAX_TOKENS, TextEncoder, check_command
from vg_ros.sim.language import mask_box
from vg_ros.types import CameraFrame, CameraModel, GroundingResult

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def default_weights_path(model: str = "tiny") -> Path:
    return WEIGHTS_DIR / f"grounding_vglaw_{model}.safetensors"


@dataclasses.dataclass
class GroundingConfig(PipelineConfig):
    """Parameters of the grounding pipeline (also the grounding node's ROS parameters)."""

    model: str = param("tiny", "network config: tiny (CPU) or base (ViT-B at 448)", choices=("tiny", "base"))
    score_threshold: float = param(0.9, "below this score the target is published as not found (0.9: on the dev "
                                   "seeds 900-911 the highest that keeps >= 95 % of right results)", low=0.0, high=1.0)
    presence_threshold: float = param(0.3, "with weights that carry a presence head: below this probability "
                                      "that the command's referent is in the image, the target is published as "
                                      "not found (0.3: on the dev seeds 900-911 the highest that keeps >= 95 % of "
                                      "right results, for grounding_vglaw_tiny_presence)", low=0.0, high=1.0)
    mask_threshold: float = param(MASK_THRESHOLD, "mask probability threshold", low=0.01, high=0.99)
    single_region: bool = param(True, "publish only the connected mask region with the most probability mass "
                                "(drops the mask head's stray blobs on look-alikes)")
    box_source: str = param("mask", "published box: mask = tight box of the published mask (box head's box "
                            "when the mask is empty); head = the box head's regression, as the paper",
                            choices=("mask", "head"))
    text_model_dir: str = param("", "local Hugging Face BERT directory; empty = packaged all-MiniLM-L6-v2")
    max_tokens: int = param(MAX_TOKENS, "command tokens kept, [CLS] first", low=2, high=512)
    min_points: int = param(3, "LiDAR points inside the mask needed for a 3D position", low=1, high=10000)
    depth_window: float = param(1.5, "depth window (m) of the densest point cluster used for the position",
                                low=0.05, high=50.0)
    num_threads: int = param(0, "torch CPU threads (0 = leave torch's default)", low=0, high=256)


def target_region(prob: np.ndarray, threshold: float, single_region: bool = True) -> tuple[np.ndarray, float]:
    """(mask (H, W) bool, score) from the mask head's probability map (H, W): the pixels above `threshold`,
    with `single_region` only the 4-connected region holding the most probability mass. `score` is the
    mean probability over the mask, or the map's peak when nothing passes the threshold. The regions are
    labelled inside the rows and columns that hold any pixel above the threshold (the same regions in the
    same order as over the whole map, for a fraction of the cost: a target is usually small)."""
    prob = np.asarray(prob, dtype=np.float32)
    mask = prob > threshold
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return mask, float(prob.max())
    cols = np.flatnonzero(mask.any(axis=0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    inside, inside_prob = mask[window], prob[window]
    if single_region:
        labels, count = ndimage.label(inside)
        if count > 1:
            mass = ndimage.sum(inside_prob, labels, np.arange(1, count + 1))
            inside = labels == 1 + int(np.argmax(mass))
            mask = np.zeros_like(mask)
            mask[window] = inside
    return mask, float(inside_prob[inside].mean())


def published_found(scores, presences, config: GroundingConfig) -> np.ndarray:
    """Which results are published as found: score >= `score_threshold` and, where the weights carry a
    presence head (a finite presence), presence >= `presence_threshold`. Arrays (or scalars) in,
    bool array out."""
    scores, presences = np.asarray(scores, dtype=np.float64), np.asarray(presences, dtype=np.float64)
    return (scores >= config.score_threshold) & ~(presences < config.presence_threshold)


def mask_from_logits(logits: torch.Tensor, out_hw: tuple[int, int], threshold: float,
                     single_region: bool = True) -> tuple[np.ndarray, float]:
    """`target_region` of sigmoid(the logits (h, w) bilinearly resized to `out_hw`), as F.interpolate
    (align_corners=False) would resize them, computed only where it can matter.

    A resized value is a convex combination of source logits, so output pixels whose source pixels are all
    at or under logit(threshold) stay under the threshold: only the output window over the source pixels
    above it is resized (separable bilinear weights, two small matrix products) and passed through the
    sigmoid. The same mask and score as resizing the whole map (to float rounding); when nothing passes,
    the whole map is resized, since the score is then its peak."""
    H, W = out_hw
    src = logits.detach().float().cpu().numpy()
    above = src > math.log(threshold / (1.0 - threshold))
    if above.any():
        Ry, Rx = _bilinear_weights(H, src.shape[0]), _bilinear_weights(W, src.shape[1])
        rows, cols = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
        out_r = np.flatnonzero(Ry[:, rows[0]:rows[-1] + 1].any(axis=1))
        out_c = np.flatnonzero(Rx[:, cols[0]:cols[-1] + 1].any(axis=1))
        Ry, Rx = Ry[out_r[0]:out_r[-1] + 1], Rx[out_c[0]:out_c[-1] + 1]
        used_r, used_c = np.flatnonzero(Ry.any(axis=0)), np.flatnonzero(Rx.any(axis=0))
        r0, r1, c0, c1 = used_r[0], used_r[-1] + 1, used_c[0], used_c[-1] + 1
        # the product in torch, on torch's threads (torch.tensor copies the cached read-only slices): numpy's
        # runs on OpenBLAS's own pool, whose threads then spin for a while and took the cores from the next
        # frame's network (a large mask's window made the next forward 3-4x slower on 2 cores)
        window = torch.from_numpy(src[r0:r1, c0:c1]).double()
        resized = (torch.tensor(Ry[:, r0:r1]) @ window @ torch.tensor(Rx[:, c0:c1]).t()).numpy()
        mask_window, score = target_region(1.0 / (1.0 + np.exp(-resized)), threshold, single_region)
        if mask_window.any():
            mask = np.zeros((H, W), dtype=bool)
            mask[out_r[0]:out_r[-1] + 1, out_c[0]:out_c[-1] + 1] = mask_window
            return mask, score
    prob = F.interpolate(logits.detach().float().cpu()[None, None], size=(H, W), mode="bilinear",
                         align_corners=False)[0, 0].sigmoid()
    return target_region(prob.numpy(), threshold, single_region)


@functools.lru_cache(maxsize=32)
def _bilinear_weights(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D bilinear resampling as F.interpolate (align_corners=False, no
    antialias): source coordinate (i + 0.5) * n_in / n_out - 0.5, clamped at 0, between its two neighbours."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(int), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = src - low
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), low), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), high), frac)
    weights.setflags(write=False)
    return weights


def camera_evidence(result) -> float:
    """How strongly one camera's GroundingResult says the target is in its image: the score, times the
    presence where the weights carry a presence head (the probability that the referent is in that image:
    the question a choice between cameras asks)."""
    weight = float(result.presence) if math.isfinite(result.presence) else 1.0
    return float(result.score) * weight


def best_camera(results) -> int:
    """Which of one instant's per-camera GroundingResults is published: found ones first, then the highest
    `camera_evidence`. Ties go to the earlier camera."""
    if not results:
        raise ValueError("best_camera: no results")
    return max(range(len(results)), key=lambda i: (bool(results[i].found), camera_evidence(results[i]), -i))


def published_box(mask: np.ndarray, head_box: np.ndarray, box_source: str) -> np.ndarray:
    """The box a result carries, (x0, y0, x1, y1) pixels with x1/y1 exclusive: the mask's tight box
    (`box_source` "mask", unless the mask is empty) or the box head's `head_box`."""
    if box_source == "mask" and mask.any():
        return mask_box(mask)
    return np.asarray(head_box, dtype=np.float64)


def resolve_device(device: str) -> torch.device:
    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device = {device!r}: must be one of cpu, cuda, auto")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' but torch sees no CUDA device")
    return torch.device(device)


def save_weights(model: VGLAW, path: str | Path, metadata: dict | None = None) -> None:
    """Write the model's state (safetensors) with its spec in the metadata."""
    save_state(model, path, {"spec": json.dumps(model.spec.to_dict()), "format": "vg_ros.grounding.vglaw/1",
                             **(metadata or {})})


def load_weights(path: str | Path, device: torch.device | str = "cpu") -> tuple[VGLAW, dict]:
    """(model in eval mode, metadata) from a safetensors file written by `save_weights`. Never unpickles."""
    state, meta = read_state(path, "spec", "grounding")
    model = VGLAW(VGLAWSpec(**json.loads(meta["spec"])))
    load_into(model, state, path, "grounding")
    return model.to(device).eval(), meta


def check_image(image: Any) -> None:
    """ValueError unless `image` is an (H, W, 3) uint8 RGB array of at least 8x8 pixels."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", None)
        raise ValueError(f"image: expected (H, W, 3) uint8 RGB, got shape {shape} dtype {dtype}")
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise ValueError(f"image: {image.shape[1]}x{image.shape[0]} is too small")


class GroundingPipeline:
    """VG-LAW inference with per-command weight caching. Not thread-safe (one caller at a time)."""

    def __init__(self, config: GroundingConfig | None = None, weights: str | Path | None = "default",
                 device: str = "auto", text_encoder: TextEncoder | None = None) -> None:
        """`weights`: "default" (the shipped file for `config.model`), a path, or None (untrained; tests)."""
        self.config = config or GroundingConfig()
        self.device = resolve_device(device)
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        if weights is None:
            self.model = VGLAW(spec_by_name(self.config.model)).to(self.device).eval()
            self.weights_meta: dict = {}
        else:
            path = default_weights_path(self.config.model) if str(weights) == "default" else Path(weights)
            self.model, self.weights_meta = load_weights(path, self.device)
        self.model.for_inference()
        self.text = text_encoder or TextEncoder(self.config.text_model_dir or None, self.config.max_tokens)
        self.text.to(self.device).eval()
        if self.text.dim != self.model.spec.text_dim:
            raise ValueError(f"text encoder width {self.text.dim} != model text_dim {self.model.spec.text_dim}")
        self.command: str | None = None
        self._weights: LanguageWeights | None = None

    @property
    def spec(self) -> VGLAWSpec:
        return self.model.spec

    # -- language side ----------------------------------------------------------------------------------
    @torch.no_grad()
    def language_weights(self, text: str, merge: bool = True) -> LanguageWeights:
        """Text encoder + weight generation for one command (ValueError for unusable text)."""
        command = check_command(text)
        feats, valid = self.text.encode([command], device=self.device)
        weights = self.model.generate(feats, valid)
        return self.model.merge(weights) if merge else weights

    def set_command(self, text: str) -> None:
        """Validate the command, generate and cache its weights. On ValueError the old command stays."""
        weights = self.language_weights(text)
        self.command, self._weights = check_command(text), weights

    # -- visual side ------------------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (1, 3, img_h, img_w) float in [0, 1] on the device."""
        check_image(image)
        size = (self.spec.img_h, self.spec.img_w)
        # torch wants a writable array: a read-only image (a ROS message's buffer, a decoded file) is copied
        # (13 us at 480x270), rather than silencing torch's warning through the process-wide, thread-unsafe
        # warnings filters on every frame
        tensor = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)[None]
        # on CPU the uint8 image is resized (3x faster than in float; within one grey level of it);
        # CUDA has no uint8 antialiased resize, so there it is converted first
        if self.device.type != "cpu":
            tensor = tensor.to(self.device).float() / 255
        resized = F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)
        return resized.float() / 255 if resized.dtype == torch.uint8 else resized

    @torch.inference_mode()
    def _run(self, frames: Sequence[CameraFrame], stamps: Sequence[int], weights: LanguageWeights, command: str,
             t_start: float) -> list[GroundingResult]:
        """The frames through the ViT as one batch (resized to the network's input), each result from its
        own slice; `seconds` of each is the batch's time (what every frame of it waited)."""
        sizes = [image.shape[:2] if isinstance(image, np.ndarray) and image.ndim == 3 else (0, 0)
                 for image in (frame.image for frame in frames)]
        batch = torch.cat([self.preprocess(frame.image) for frame in frames])
        # the box head runs only when its box is published: box_source "head", or an empty mask
        head_first = self.config.box_source == "head"
        out = self.model.forward_visual(batch, weights, box_head=head_first)
        head_boxes = out["boxes"] if head_first else None
        results = []
        for i, (height, width) in enumerate(sizes):
            mask, score = mask_from_logits(out["mask_logits"][i], (height, width), self.config.mask_threshold,
                                           self.config.single_region)
            if head_first or not mask.any():
                if head_boxes is None:
                    head_boxes = self.model.box_head(out["visual"], weights.cls.expand(len(frames), -1))[0]
                head_box = cxcywh_to_xyxy(head_boxes[i].double()).cpu().numpy() * [width, height, width, height]
            else:
                head_box = np.zeros(4)  # not used: the mask's own box is published
            box = np.clip(published_box(mask, head_box, self.config.box_source), 0, [width, height, width, height])
            presence = float(out["presence_logits"][i].sigmoid()) if "presence_logits" in out else float("nan")
            results.append(GroundingResult(stamp_ns=int(stamps[i]), command=command,
                                           found=bool(published_found(score, presence, self.config)), score=score,
                                           box=box.astype(np.float64), mask=mask, presence=presence))
        seconds = time.perf_counter() - t_start
        return [dataclasses.replace(r, seconds=seconds) for r in results]

    def infer(self, frame: CameraFrame, stamp_ns: int | None = None) -> GroundingResult:
        """Ground the cached command in one frame (the cached weights; RuntimeError if no command yet)."""
        return self.infer_many([frame], None if stamp_ns is None else [stamp_ns])[0]

    def infer_many(self, frames: Sequence[CameraFrame], stamps: Sequence[int] | None = None) -> list[GroundingResult]:
        """Ground the cached command in several frames (e.g. one instant's cameras) as one batch: the same
        results as `infer` on each, in one forward pass. Stamps default to the frames' own."""
        if self._weights is None or self.command is None:
            raise RuntimeError("grounding: no command set (call set_command first)")
        if not frames:
            return []
        t_start = time.perf_counter()
        stamps = [frame.stamp_ns for frame in frames] if stamps is None else list(stamps)
        return self._run(frames, stamps, self._weights, self.command, t_start)

    def infer_uncached(self, frame: CameraFrame, text: str, stamp_ns: int | None = None) -> GroundingResult:
        """Re-run the text encoder and weight generation for this frame (the no-cache baseline)."""
        t_start = time.perf_counter()
        weights = self.language_weights(text, merge=False)
        return self._run([frame], [frame.stamp_ns if stamp_ns is None else stamp_ns], weights, check_command(text),
                         t_start)[0]

    # -- 3D ---------------------------------------------------------------------------------------------
    def locate(self, result: GroundingResult, points_lidar: np.ndarray, T_cam_lidar: np.ndarray,
               camera: CameraModel) -> np.ndarray | None:
        """The target's position (3,) in the LiDAR frame from the points that project inside the mask.

        Robust to background seen through the mask's edges: among in-mask points the densest
        `depth_window` metres of camera depth (nearest first on ties) is kept and its median returned.
        None when not found or fewer than `min_points` points land in the mask.
        """
        if not result.found:
            return None
        points = np.asarray(points_lidar, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"points_lidar: expected (N, 3), got {points.shape}")
        T = np.asarray(T_cam_lidar, dtype=np.float64)
        if T.shape != (4, 4):
            raise ValueError(f"T_cam_lidar: expected (4, 4), got {T.shape}")
        points = points[np.isfinite(points).all(axis=1)]
        mask = np.asarray(result.mask, dtype=bool)
        mh, mw = mask.shape
        uv, depth, valid = project_points(camera.K, T, points, camera.width, camera.height,
                                          distortion=camera.distortion, distortion_model=camera.distortion_model)
        if not valid.any():
            return None
        # the mask may be at another resolution than the camera model: scale pixel coordinates
        cols = np.clip((uv[valid, 0] * mw / camera.width).astype(int), 0, mw - 1)
        rows = np.clip((uv[valid, 1] * mh / camera.height).astype(int), 0, mh - 1)
        inside = mask[rows, cols]
        if inside.sum() < self.config.min_points:
            return None
        cand = points[valid][inside]
        cand_depth = depth[valid][inside]
        order = np.argsort(cand_depth)
        sorted_depth = cand_depth[order]
        ends = np.searchsorted(sorted_depth, sorted_depth + self.config.depth_window, side="right")
        counts = ends - np.arange(len(sorted_depth))
        start = int(np.argmax(counts))  # first (nearest) of the densest windows
        keep = order[start:ends[start]]
        if len(keep) < self.config.min_points:
            return None
        return np.median(cand[keep], axis=0)
