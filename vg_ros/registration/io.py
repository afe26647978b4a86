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


_PLY_SIZES = {"char": 1, "int8": 1, "uchar": 1, "uint8": 1, "short": 2, "int16": 2, "ushort": 2, "uint16": 2,
              "int": 4, "int32": 4, "uint": 4, "uint32": 4, "float": 4, "float32": 4, "double": 8, "float64": 8}


def _check_body(path: Path) -> None:
    """A .ply / .pcd whose data is shorter than its header declares is refused: Open3D warns, then returns the
    declared number of points with the missing ones at the origin (a truncated download or an unfinished copy
    would be registered as if whole)."""
    data = path.read_bytes()
    shortfall = _ply_shortfall(data) if path.suffix.lower() == ".ply" else _pcd_shortfall(data)
    if shortfall:
        raise ValueError(f"{path}: truncated: {shortfall}")


def _rows(body: bytes) -> int:
    """Text rows in `body`, counted without splitting it (a 50 MB file would take four times that as a list);
    blank lines count too, which can only make a file look longer, never refuse a whole one."""
    ends = max(body.count(b"\n"), body.count(b"\r"))
    return ends + int(bool(body.strip()) and not body.endswith((b"\n", b"\r")))


def _ply_shortfall(data: bytes) -> str | None:
    """What a PLY's body lacks against its header's vertex count; None when complete or not checkable (no
    header end: Open3D refuses it; a list property before the vertices: row sizes vary)."""
    end = data.find(b"end_header")
    if end < 0:
        return None
    body = data[data.find(b"\n", end) + 1:]
    fmt, elements = "", []   # elements: [name, count, bytes per row or None where a list property varies]
    for words in (line.split() for line in data[:end].decode("ascii", "replace").splitlines()):
        if words[:1] == ["format"] and len(words) > 1:
            fmt = words[1]
        elif words[:1] == ["element"] and len(words) == 3 and words[2].isdigit():
            elements.append([words[1], int(words[2]), 0])
        elif words[:1] == ["property"] and len(words) > 1 and elements and elements[-1][2] is not None:
            size = _PLY_SIZES.get(words[1])
            elements[-1][2] = None if size is None else elements[-1][2] + size
    rows = nbytes = 0   # what the vertices and the elements before them take
    for name, count, row in elements:
        rows += count
        if nbytes is not None:
            nbytes = None if row is None else nbytes + count * row
        if name == "vertex":
            if fmt == "ascii" and (have := _rows(body)) < rows:
                return f"the header declares {count} points, the file holds {max(have - rows + count, 0)} rows"
            if fmt.startswith("binary") and nbytes is not None and len(body) < nbytes:
                return f"the header declares {count} points ({nbytes} bytes of data), the file holds {len(body)} bytes"
            return None
    return None


def _pcd_shortfall(data: bytes) -> str | None:
    """What a PCD's body lacks against its POINTS; None when complete or not checkable (binary_compressed)."""
    end = data.find(b"\nDATA ")
    if end < 0:
        return None
    line_end = data.find(b"\n", end + 1)
    kind = data[end + 6: line_end if line_end >= 0 else len(data)].decode("ascii", "replace").strip()
    body = data[line_end + 1:] if line_end >= 0 else b""
    fields = {words[0]: words[1:] for words in (ln.split() for ln in data[:end].decode("ascii", "replace").splitlines())
              if words}
    try:
        points = int(fields.get("POINTS", ["0"])[0])
        sizes = [int(v) for v in fields.get("SIZE", [])]
        counts = [int(v) for v in fields.get("COUNT", [])] or [1] * len(sizes)
    except ValueError:
        return None
    if kind == "ascii" and (have := _rows(body)) < points:
        return f"the header declares {points} points, the file holds {have} rows"
    need = points * sum(s * c for s, c in zip(sizes, counts))
    if kind == "binary" and sizes and len(counts) == len(sizes) and len(body) < need:
        return f"the header declares {points} points ({need} bytes of data), the file holds {len(body)} bytes"
    return None


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
    """xyz (N, 3) float64 from a point-cloud file. Raises ValueError naming the file and the problem, also for
    a cloud without one finite point (an empty cloud is a bad file, whatever its format)."""
    xyz = _read_xyz(Path(path), bin_fields)
    if not np.isfinite(xyz).all(axis=1).any():
        raise ValueError(f"{path}: no finite point among its {len(xyz)} (every one has a NaN or infinite coordinate)")
    return xyz


def _read_xyz(path: Path, bin_fields: int | None) -> np.ndarray:
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix == ".ply":
        _check_header(path, (b"ply",), "PLY")
        _check_body(path)
        return _open3d_points(path)
    if suffix == ".pcd":
        _check_header(path, (b"VERSION", b"FIELDS", b"# .PCD"), "PCD")
        _check_body(path)
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
