"""Pictures of simulated (or predicted) data for people: a camera grid, a bird's-eye view of semantic
occupancy, LiDAR over the BEV, and a target mask with its box and command text. All return (H, W, 3) uint8 RGB.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from vg_ros.types import FREE_CLASS, OCC_PALETTE, GridSpec

NUSCENES_GRID = (("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"), ("CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"))
EMPTY_RGB = (40, 40, 40)


def _label(img: np.ndarray, text: str, org=(6, 18), scale: float = 0.5) -> None:
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(img, (org[0] - 4, org[1] - h - 4), (org[0] + w + 4, org[1] + base + 2), (0, 0, 0), -1)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def camera_grid(images: Mapping[str, np.ndarray] | Sequence[np.ndarray], columns: int = 3,
                labels: bool = True) -> np.ndarray:
    """Tile camera images (each (H, W, 3) uint8) into a grid, nuScenes layout (front row: FRONT_LEFT, FRONT,
    FRONT_RIGHT; back row: BACK_LEFT, BACK, BACK_RIGHT) when those six names are given, else in the given order.
    Images of other sizes are resized to the first one's."""
    if isinstance(images, Mapping):
        names = list(images)
        if set(names) == {n for row in NUSCENES_GRID for n in row}:
            names = [n for row in NUSCENES_GRID for n in row]
        items = [(n, images[n]) for n in names]
    else:
        items = [(f"{i}", im) for i, im in enumerate(images)]
    if not items:
        raise ValueError("images: need at least one image")
    if columns < 1:
        raise ValueError(f"columns: must be >= 1, got {columns}")
    H, W = items[0][1].shape[:2]
    tiles = []
    for name, im in items:
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            raise ValueError(f"images[{name!r}]: expected (H, W, 3) uint8, got {im.shape} {im.dtype}")
        tile = np.ascontiguousarray(im if im.shape[:2] == (H, W) else cv2.resize(im, (W, H)))
        if labels and isinstance(images, Mapping):
            tile = tile.copy()
            _label(tile, name)
        tiles.append(tile)
    while len(tiles) % columns:
        tiles.append(np.zeros((H, W, 3), np.uint8))
    rows = [np.concatenate(tiles[i:i + columns], 1) for i in range(0, len(tiles), columns)]
    return np.concatenate(rows, 0)


def bev_image(semantics: np.ndarray, scale: int = 2, ego: bool = True) -> np.ndarray:
    """Bird's-eye view of semantic occupancy (X, Y, Z) uint8 (17 = free): the top-most occupied class of each
    column in OCC_PALETTE colours. Forward (+x) is up, left (+y) is left; ego at the centre (a white marker
    when `ego`).
    Returns (X * scale, Y * scale, 3) uint8."""
    sem = np.asarray(semantics)
    if sem.ndim != 3:
        raise ValueError(f"semantics: expected (X, Y, Z), got shape {sem.shape}")
    occupied = sem != FREE_CLASS
    top = sem.shape[2] - 1 - np.argmax(occupied[:, :, ::-1], axis=2)
    cls = np.take_along_axis(sem, top[:, :, None], 2)[:, :, 0]
    rgb = OCC_PALETTE[np.minimum(cls, len(OCC_PALETTE) - 1)].copy()
    rgb[~occupied.any(2)] = EMPTY_RGB
    img = rgb[::-1, ::-1]  # row 0 = max x (front), column 0 = max y (left)
    img = np.repeat(np.repeat(img, scale, 0), scale, 1)
    img = np.ascontiguousarray(img)
    if not ego:
        return img
    c = (img.shape[1] // 2, img.shape[0] // 2)
    cv2.rectangle(img, (c[0] - 2 * scale, c[1] - 4 * scale), (c[0] + 2 * scale, c[1] + 4 * scale), (255, 255, 255), -1)
    return img


def lidar_on_bev(bev: np.ndarray, points_base: np.ndarray, grid: GridSpec | None = None, scale: int = 2,
                 colour=(255, 255, 255)) -> np.ndarray:
    """Draw points (N, 3) in base_link over a `bev_image` of `grid` (same `scale`)."""
    grid = grid or GridSpec()
    img = np.ascontiguousarray(bev.copy())
    X, Y, _ = grid.shape
    pts = np.asarray(points_base, dtype=np.float64)
    ix = np.floor((pts[:, 0] - grid.lower[0]) / grid.voxel_size * scale).astype(np.int64)
    iy = np.floor((pts[:, 1] - grid.lower[1]) / grid.voxel_size * scale).astype(np.int64)
    row, col = X * scale - 1 - ix, Y * scale - 1 - iy
    ok = (row >= 0) & (row < img.shape[0]) & (col >= 0) & (col < img.shape[1])
    img[row[ok], col[ok]] = colour
    return img


def overlay_mask(rgb: np.ndarray, mask: np.ndarray, box, text: str = "", colour=(255, 0, 255)) -> np.ndarray:
    """The image dimmed outside `mask` (H, W) bool, the mask outlined, `box` (x0, y0, x1, y1) drawn and `text` in a band above.
    Returns (H + band, W, 3) uint8."""
    img = np.asarray(rgb)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"rgb: expected (H, W, 3), got {img.shape}")
    m = np.asarray(mask, dtype=bool)
    if m.shape != img.shape[:2]:
        raise ValueError(f"mask: shape {m.shape} does not match the image {img.shape[:2]}")
    # Dim everything but the target and outline the mask, so the target keeps its own (named) colour.
    out = _dimmed_outside(img, m)
    _outline(out, m, box, colour, (40, 255, 40))
    return with_caption(out, text)


def comparison_panel(rgb: np.ndarray, truth_mask: np.ndarray, truth_box, mask: np.ndarray, box,
                     text: str = "") -> np.ndarray:
    """A prediction against the ground truth on one image: the image dimmed outside both masks, the true
    mask outlined and its box drawn in green, the predicted mask outlined and its box drawn in magenta,
    `text` in a band above. Returns (H + band, W, 3) uint8."""
    img = np.asarray(rgb)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"rgb: expected (H, W, 3), got {img.shape}")
    truth, pred = np.asarray(truth_mask, dtype=bool), np.asarray(mask, dtype=bool)
    if truth.shape != img.shape[:2] or pred.shape != img.shape[:2]:
        raise ValueError(f"masks: shapes {truth.shape} and {pred.shape} do not match the image {img.shape[:2]}")
    out = _dimmed_outside(img, truth | pred)
    for m, b, colour in ((truth, truth_box, (40, 255, 40)), (pred, box, (255, 0, 255))):
        _outline(out, m, b, colour, colour)
    return with_caption(out, text)


def _dimmed_outside(rgb: np.ndarray, keep: np.ndarray) -> np.ndarray:
    out = rgb.astype(np.float32)
    out[~keep] *= 0.5
    return np.ascontiguousarray(out.astype(np.uint8))


def _outline(out: np.ndarray, mask: np.ndarray, box, colour, box_colour) -> None:
    """Draw `mask`'s outer contour in `colour` and `box` (x0, y0, x1, y1, exclusive ends) in `box_colour`
    onto `out`, in place; an empty or degenerate box is not drawn."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, colour, 1)
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.size == 4 and b[2] > b[0] and b[3] > b[1]:
        cv2.rectangle(out, (int(b[0]), int(b[1])), (int(np.ceil(b[2])) - 1, int(np.ceil(b[3])) - 1), box_colour, 1)


def with_caption(image: np.ndarray, text: str, inside: bool = False) -> np.ndarray:
    """`image` (H, W, 3) uint8 with `text` word-wrapped into a dark band above it (unchanged if empty);
    `inside`: the band covers the image's top rows instead, so the size stays (H, W) (a debug image that
    must keep its camera's size)."""
    if not text:
        return image
    W = image.shape[1]
    lines, line = [], ""
    for word in text.split():
        trial = (line + " " + word).strip()
        if cv2.getTextSize(trial, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)[0][0] > W - 12 and line:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    band = np.full((20 * len(lines) + 8, W, 3), 20, np.uint8)
    for k, ln in enumerate(lines):
        cv2.putText(band, ln, (6, 20 * k + 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    if not inside:
        return np.concatenate([band, image], 0)
    out = np.array(image, dtype=np.uint8, copy=True)
    rows = min(len(band), len(out))
    out[:rows] = band[:rows]
    return out
