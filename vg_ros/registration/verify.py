"""Hypothesis verification on the clouds: which of the voting search's poses really aligns source and target.

The correspondence score ranks a pose by how many putative matches it explains. On LiDAR pairs 8-19 m
apart in repetitive streets (rows of parked cars, straight facades) only 1-5 % of the matches are true,
and a 180 deg flip or an along-road shift often explains more of them than the right pose does. The
clouds tell them apart: every raw hypothesis gets a coarse overlap (a sample of source structure points
looked up in a voxel hash of the target at cell size tau), the best distinct ones are aligned by GICP
(small_gicp) and compared by fine overlap (source structure points within 1.5 voxels of the target).

Shapes: clouds (N, 3) float64 voxelised points; keep masks (N,) bool (structure points: not ground on
LiDAR); transforms (4, 4), batches (S, 4, 4), all mapping source into target.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

_KEY_BITS = 21  # per axis: 2 million cells, far beyond any cloud at the cell sizes used


def _voxel_keys(points: np.ndarray, origin: np.ndarray, cell: float) -> np.ndarray:
    """(..., 3) -> (...,) int64 voxel keys relative to `origin`; cells outside the key range get -1."""
    ijk = np.floor((points - origin) / cell).astype(np.int64)
    inside = ((ijk >= 0) & (ijk < (1 << _KEY_BITS))).all(axis=-1)
    keys = (ijk[..., 0] << (2 * _KEY_BITS)) | (ijk[..., 1] << _KEY_BITS) | ijk[..., 2]
    return np.where(inside, keys, -1)


class CloudVerifier:
    """Scores and aligns hypotheses on one (source, target) pair of voxelised clouds.

    `coarse_overlap(T_all)`: (S,) fraction of a regular sample of `sample` source structure points that
    land in an occupied target cell of size `cell` (one vectorised lookup for all hypotheses).
    `overlap(T)`: fraction of source structure points within `near` of the target's structure points.
    `align(T, max_distances)`: GICP stages, each kept only when it does not lower `overlap`.
    """

    def __init__(self, src_pts: np.ndarray, dst_pts: np.ndarray, src_keep: np.ndarray, dst_keep: np.ndarray, *,
                 voxel_size: float, cell: float, sample: int = 1000) -> None:
        if src_pts.ndim != 2 or src_pts.shape[1] != 3 or dst_pts.ndim != 2 or dst_pts.shape[1] != 3:
            raise ValueError(f"CloudVerifier: clouds must be (N, 3), got {src_pts.shape} and {dst_pts.shape}")
        if src_keep.shape != (len(src_pts),) or dst_keep.shape != (len(dst_pts),):
            raise ValueError("CloudVerifier: keep masks must be (N,) bool, one per point")
        self.src_pts, self.dst_pts = src_pts, dst_pts
        self.voxel_size, self.cell = float(voxel_size), float(cell)
        self.near = 1.5 * self.voxel_size
        self.src_structure = src_pts[src_keep]
        dst_structure = dst_pts[dst_keep]
        self.dst_tree = cKDTree(dst_structure)
        step = max(1, int(np.ceil(len(self.src_structure) / max(sample, 1))))
        self.src_sample = self.src_structure[::step]
        self.origin = dst_structure.min(axis=0) - self.cell
        self.dst_keys = np.unique(_voxel_keys(dst_structure, self.origin, self.cell))
        self._gicp_clouds = None

    def coarse_overlap(self, T_all: np.ndarray) -> np.ndarray:
        """T_all (S, 4, 4) -> (S,) coarse overlap in [0, 1]."""
        if T_all.ndim != 3 or T_all.shape[1:] != (4, 4):
            raise ValueError(f"coarse_overlap: T_all must be (S, 4, 4), got {T_all.shape}")
        moved = self.src_sample @ T_all[:, :3, :3].transpose(0, 2, 1) + T_all[:, None, :3, 3]  # (S, P, 3)
        keys = _voxel_keys(moved, self.origin, self.cell)
        pos = np.searchsorted(self.dst_keys, keys).clip(max=len(self.dst_keys) - 1)
        return np.mean((self.dst_keys[pos] == keys) & (keys >= 0), axis=1)

    def overlap(self, T: np.ndarray) -> float:
        """Fraction of source structure points within 1.5 voxels of the target's structure after T."""
        moved = self.src_structure @ T[:3, :3].T + T[:3, 3]
        return float(np.mean(self.dst_tree.query(moved, distance_upper_bound=self.near)[0] < self.near))

    def align(self, T_init: np.ndarray, max_distances: list[float]) -> np.ndarray:
        """GICP from T_init with each max correspondence distance in turn; a stage that diverges or lowers
        the overlap is ignored. The clouds are preprocessed for small_gicp once, on first use."""
        import small_gicp
        if self._gicp_clouds is None:
            src, _ = small_gicp.preprocess_points(self.src_pts, downsampling_resolution=self.voxel_size, num_threads=1)
            dst, dst_tree = small_gicp.preprocess_points(self.dst_pts, downsampling_resolution=self.voxel_size,
                                                         num_threads=1)
            self._gicp_clouds = (src, dst, dst_tree)
        src, dst, dst_tree = self._gicp_clouds
        T_best, best = T_init, self.overlap(T_init)
        for max_distance in max_distances:
            result = small_gicp.align(dst, src, dst_tree, init_T_target_source=T_best, registration_type="GICP",
                                      max_correspondence_distance=max_distance, num_threads=1)
            T_new = np.array(result.T_target_source, dtype=np.float64, copy=True)
            if not np.isfinite(T_new).all():
                continue
            score = self.overlap(T_new)
            if score >= best:
                T_best, best = T_new, score
        return T_best
