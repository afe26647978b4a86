"""Hypothesis verification on the clouds: which of the voting search's poses really aligns source and target.

The correspondence score ranks a pose by how many putative matches it explains. On LiDAR pairs 8-19 m
apart in repetitive streets (rows of parked cars, straight facades) only 1-5 % of the matches are true,
and a 180 deg flip or an along-road shift often explains more of them than the right pose does. The
clouds tell them apart: every raw hypothesis gets a coarse overlap (a sample of source structure points
looked up in a voxel hash of the target at cell size tau), the best distinct ones are aligned by GICP
(small_gicp) and compared by fine overlap (source structure points within 1.5 voxels of the target).

When the matches hold almost no true pair (scans 10-15 m apart, facades seen from the other side) no
hypothesis of the search is near the truth, and nothing downstream can recover it. For a ground vehicle,
whose scans differ mostly by a yaw and a horizontal shift, `bev_hypotheses` proposes poses without
descriptors: the bird's-eye occupancy of the source structure points, turned through every yaw step, is
cross-correlated with the target's (one FFT per yaw); the best distinct (yaw, x, y) peaks join the
search's hypotheses and the same GICP + fine-overlap comparison decides.

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
    `bev_hypotheses(count, cell, yaw_step_deg)`: (count, 4, 4) yaw + horizontal-shift poses from a
    bird's-eye-view correlation of the structure points (no descriptors involved).
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
        self.dst_structure = dst_structure = dst_pts[dst_keep]
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

    def bev_hypotheses(self, count: int, cell: float, yaw_step_deg: float, max_range: float = 100.0) -> np.ndarray:
        """(K <= count, 4, 4) poses (rotation about z, horizontal shift) whose bird's-eye occupancy of the source
        structure points overlaps the target's most, best first, pairwise at least 10 deg or 2 cells apart.

        Both clouds are rasterised at `cell` metres within `max_range` of their origin; each yaw's overlap
        for every shift is one cross-correlation (FFT, zero-padded so no shift wraps around). The best shift
        of every yaw is a candidate. Exact to about a cell and half a yaw step: GICP takes it from there."""
        if count <= 0 or len(self.src_structure) < 3 or len(self.dst_structure) < 3:
            return np.zeros((0, 4, 4))
        from scipy import fft

        def raster(xy: np.ndarray) -> np.ndarray:
            ij = np.floor((xy + half) / cell).astype(np.int64)
            inside = ((ij >= 0) & (ij < n)).all(axis=1)
            image = np.zeros((2 * n, 2 * n), np.float32)
            image[ij[inside, 0], ij[inside, 1]] = 1.0
            return image

        src_xy, dst_xy = self.src_structure[:, :2], self.dst_structure[:, :2]
        half = min(max_range, max(np.abs(src_xy).max(), np.abs(dst_xy).max())) + cell
        n = int(np.ceil(2 * half / cell))
        target = fft.rfft2(raster(dst_xy))
        yaws = np.deg2rad(np.arange(-180.0, 180.0, yaw_step_deg))
        peaks = []
        for yaw in yaws:
            c, s = np.cos(yaw), np.sin(yaw)
            turned = raster(src_xy @ np.array([[c, s], [-s, c]]))          # rows: R(yaw) applied to each point
            corr = fft.irfft2(np.conj(fft.rfft2(turned)) * target, s=(2 * n, 2 * n))
            a, b = np.unravel_index(int(np.argmax(corr)), corr.shape)
            # corr[a, b] = sum_x src(x) dst(x + (a, b)): the shift in cells, negative past the middle
            peaks.append((float(corr[a, b]), yaw, (a if a < n else a - 2 * n) * cell, (b if b < n else b - 2 * n) * cell))
        chosen: list[tuple[float, float, float, float]] = []
        for peak in sorted(peaks, key=lambda p: -p[0]):
            if any(abs((peak[1] - q[1] + np.pi) % (2 * np.pi) - np.pi) < np.deg2rad(10)
                   and np.hypot(peak[2] - q[2], peak[3] - q[3]) < 2 * cell for q in chosen):
                continue
            chosen.append(peak)
            if len(chosen) == count:
                break
        out = np.tile(np.eye(4), (len(chosen), 1, 1))
        for k, (_, yaw, x, y) in enumerate(chosen):
            c, s = np.cos(yaw), np.sin(yaw)
            out[k, :2, :2] = [[c, -s], [s, c]]
            out[k, :2, 3] = x, y
        return out
