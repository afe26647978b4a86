"""Point-cloud preprocessing and putative correspondences for registration: sanitising, voxel
downsampling, normals, FPFH descriptors (Open3D) and mutual nearest neighbours in descriptor space.

Everything here is deterministic: no random subsampling; caps keep the best matches by descriptor
distance, ties broken by index.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def sanitize(points: np.ndarray, name: str = "points") -> np.ndarray:
    """points (N, >=3) -> (M, 3) float64 with non-finite rows removed. Raises ValueError on a bad shape."""
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise ValueError(f"{name}: expected an (N, 3) array of points, got shape {arr.shape}")
    xyz = np.asarray(arr[:, :3], dtype=np.float64)
    return xyz[np.isfinite(xyz).all(axis=1)]


def stride_cap(points: np.ndarray, max_points: int) -> np.ndarray:
    """Keep at most `max_points` rows by a regular stride (deterministic, O(N)): a guard before the
    voxel grid so 10-million-point inputs cost one pass, not a hash of every point."""
    if len(points) <= max_points:
        return points
    step = int(np.ceil(len(points) / max_points))
    return points[::step]


def voxel_downsample(points: np.ndarray, voxel_size: float) -> np.ndarray:
    """points (N, 3) -> (M, 3): the centroid of the points in each occupied voxel, in voxel-key order."""
    if voxel_size <= 0:
        raise ValueError(f"voxel_size = {voxel_size}: must be > 0")
    if len(points) == 0:
        return points.reshape(0, 3)
    cells = np.floor(points / voxel_size)
    if not np.abs(cells).max() < 2.0 ** 62:
        raise ValueError(f"coordinates up to {np.abs(points).max():.3g} m are beyond what a {voxel_size} m voxel "
                         "grid can index: not a metric point cloud")
    keys = cells.astype(np.int64)
    keys -= keys.min(axis=0)
    dims = keys.max(axis=0) + 1
    if float(dims[0]) * float(dims[1]) * float(dims[2]) < 2.0 ** 62:
        flat = (keys[:, 0] * dims[1] + keys[:, 1]) * dims[2] + keys[:, 2]
        uniq, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    else:   # a cloud so wide that one integer per voxel would overflow: the voxel rows themselves
        uniq, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(-1)
    sums = np.zeros((len(uniq), 3))
    np.add.at(sums, inverse, points)
    return sums / counts[:, None]


def to_o3d(points: np.ndarray):
    import open3d as o3d
    pcd = o3d.geometry.PointCloud()
    pcd.points = o3d.utility.Vector3dVector(np.ascontiguousarray(points, dtype=np.float64))
    return pcd


def estimate_normals(points: np.ndarray, radius: float, max_nn: int = 30,
                     viewpoint: np.ndarray | None = None) -> np.ndarray:
    """Unit normals (N, 3) from the covariance of neighbours within `radius` (Open3D hybrid search),
    oriented towards `viewpoint` (default the origin: the sensor for a single scan)."""
    import open3d as o3d
    pcd = to_o3d(points)
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=radius, max_nn=max_nn))
    normals = np.asarray(pcd.normals).copy()
    towards = points if viewpoint is None else points - np.asarray(viewpoint, dtype=np.float64)
    flip = np.einsum("ij,ij->i", normals, towards) > 0
    normals[flip] *= -1.0
    return normals


def fpfh(points: np.ndarray, normals: np.ndarray, radius: float, max_nn: int = 100) -> np.ndarray:
    """FPFH descriptors (N, 33) float32 (Open3D), L2-normalised so one distance scale fits all clouds."""
    import open3d as o3d
    pcd = to_o3d(points)
    pcd.normals = o3d.utility.Vector3dVector(np.ascontiguousarray(normals, dtype=np.float64))
    feat = o3d.pipelines.registration.compute_fpfh_feature(
        pcd, o3d.geometry.KDTreeSearchParamHybrid(radius=radius, max_nn=max_nn))
    desc = np.asarray(feat.data).T.astype(np.float32)
    norms = np.linalg.norm(desc, axis=1, keepdims=True)
    return desc / np.maximum(norms, 1e-12)


def match_descriptors(src_desc: np.ndarray, dst_desc: np.ndarray, *, mutual: bool = True,
                      max_correspondences: int = 2000, min_correspondences: int = 0) -> np.ndarray:
    """Putative correspondences (K, 2) int64 [source index, target index] by nearest descriptor.

    `mutual` keeps pairs that are each other's nearest neighbour. When mutual matching yields fewer
    than `min_correspondences`, one-way source->target matches fill up (best descriptor distance
    first). At most `max_correspondences` are kept, the smallest descriptor distances first.
    """
    if len(src_desc) == 0 or len(dst_desc) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    dst_tree = cKDTree(dst_desc)
    d_sd, nn_sd = dst_tree.query(src_desc, k=1)
    pairs = np.stack([np.arange(len(src_desc)), nn_sd], axis=1).astype(np.int64)
    dist = d_sd.astype(np.float64)
    if mutual:
        _, nn_ds = cKDTree(src_desc).query(dst_desc, k=1)
        is_mutual = nn_ds[nn_sd] == np.arange(len(src_desc))
        keep = is_mutual
        if is_mutual.sum() < min_correspondences:
            order = np.lexsort((np.arange(len(dist)), dist))
            extra = order[~is_mutual[order]][: min_correspondences - int(is_mutual.sum())]
            keep = is_mutual.copy()
            keep[extra] = True
        pairs, dist = pairs[keep], dist[keep]
    if len(pairs) > max_correspondences:
        order = np.lexsort((pairs[:, 0], dist))[:max_correspondences]
        pairs = pairs[np.sort(order)]
    return pairs
