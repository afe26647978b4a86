"""Reading point clouds from files for the registration CLI, training on user data and tests:
.ply, .pcd (Open3D), .npy (N x 3+) and KITTI / nuScenes .bin (float32 x 4 or x 5).

Every reader returns xyz (N, 3) float64 or raises ValueError with one line saying what is wrong."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SUFFIXES = (".ply", ".pcd", ".npy", ".bin")


def _check_header(path: Path, magic: tuple[bytes, ...], kind: str) -> None:
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not any(m in head[: max(len(m) for m in magic) + 64] for m in magic):
        raise ValueError(f"{path}: not a {kind} file (header does not start like one)")


def _open3d_points(path: Path) -> np.ndarray:
    import open3d as o3d
    pcd = o3d.io.read_point_cloud(str(path))
    pts = np.asarray(pcd.points, dtype=np.float64)
    if len(pts) == 0:
        raise ValueError(f"{path}: no points could be read")
    return pts


def bin_field_count(path: Path, num_bytes: int, data: np.ndarray) -> int:
    """4 (KITTI x, y, z, intensity) or 5 (nuScenes x, y, z, intensity, ring) float32 fields per point,
    from the file size; when both divide it, the one whose 5th column looks like ring ids wins."""
    fits4, fits5 = num_bytes % 16 == 0, num_bytes % 20 == 0
    if fits4 and not fits5:
        return 4
    if fits5 and not fits4:
        return 5
    if not fits4 and not fits5:
        raise ValueError(f"{path}: {num_bytes} bytes is not a whole number of float32 x4 or x5 points")
    rows5 = data.reshape(-1, 5)
    ring = rows5[:, 4]
    looks_like_ring = np.isfinite(ring).all() and np.all(ring == np.round(ring)) and ring.min() >= 0 and ring.max() < 1024
    return 5 if looks_like_ring else 4


def read_cloud(path: str | Path, bin_fields: int | None = None) -> np.ndarray:
    """xyz (N, 3) float64 from a point-cloud file. Raises ValueError naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix == ".ply":
        _check_header(path, (b"ply",), "PLY")
        return _open3d_points(path)
    if suffix == ".pcd":
        _check_header(path, (b"VERSION", b"FIELDS", b"# .PCD"), "PCD")
        return _open3d_points(path)
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - any numpy failure means "not a readable array"
            raise ValueError(f"{path}: not a readable .npy array ({type(exc).__name__})") from None
        if arr.ndim != 2 or arr.shape[1] < 3 or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{path}: expected a numeric (N, 3+) array, got {arr.dtype} {arr.shape}")
        if arr.shape[0] == 0:
            raise ValueError(f"{path}: no points")
        return np.asarray(arr[:, :3], dtype=np.float64)
    if suffix == ".bin":
        num_bytes = path.stat().st_size
        if num_bytes == 0:
            raise ValueError(f"{path}: empty file")
        data = np.fromfile(path, dtype=np.float32)
        fields = bin_fields or bin_field_count(path, num_bytes, data)
        if fields < 3 or data.size % fields:
            raise ValueError(f"{path}: {data.size} floats do not split into points of {fields} fields")
        return data.reshape(-1, fields)[:, :3].astype(np.float64)
    raise ValueError(f"{path}: unsupported point-cloud format {suffix!r}; use one of {', '.join(SUFFIXES)}")


def read_pose_txt(path: str | Path) -> np.ndarray:
    """A 4x4 (or 3x4) pose from whitespace-separated text."""
    values = np.loadtxt(path, dtype=np.float64).reshape(-1)
    if values.size not in (12, 16):
        raise ValueError(f"{path}: expected 12 or 16 numbers for a pose, got {values.size}")
    T = np.eye(4)
    T[:3] = values[:12].reshape(3, 4) if values.size == 12 else values.reshape(4, 4)[:3]
    return T


def read_3dmatch_log(path: str | Path) -> dict[tuple[int, int], np.ndarray]:
    """3DMatch `gt.log`: {(i, j): 4x4} where the 4x4 maps fragment j into fragment i's frame."""
    lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    out: dict[tuple[int, int], np.ndarray] = {}
    for k in range(0, len(lines) - 4, 5):
        i, j = int(lines[k][0]), int(lines[k][1])
        out[(i, j)] = np.array([[float(x) for x in lines[k + 1 + r]] for r in range(4)])
    return out
