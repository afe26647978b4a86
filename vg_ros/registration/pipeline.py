"""Global point-cloud registration with VBReg: sanitise -> voxel downsample -> normals + FPFH -> mutual
matches -> VBReg inlier confidence -> voting-based inlier search -> verification of the best hypotheses on
the clouds (verify.py) -> optional GICP refinement (small_gicp) -> covariance from the inlier geometry.

    cfg = RegistrationConfig.preset("lidar")
    pipe = RegistrationPipeline(cfg, weights="default")       # None: compatibility-only confidence
    res = pipe.register(source_xyz, target_xyz)               # res.transform maps source into target

Never raises for bad clouds: empty, < 3 points, all-NaN or degenerate inputs come back with
`converged=False` and a `reason`. Shapes: clouds (N, 3+) float; correspondences (K, 3) each.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

from vg_ros.checkpoint import load_into, read_state
from vg_ros.config import PipelineConfig, param
from vg_ros.geometry import skew
from vg_ros.registration import features
from vg_ros.registration.model import VBRegDims, VBRegNet, second_order_compatibility, spatial_compatibility
from vg_ros.registration.search import distinct_best, refine, scale_candidates, voting_search
from vg_ros.registration.verify import CloudVerifier
from vg_ros.types import RegistrationResult

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "registration_vbreg.safetensors"


@dataclasses.dataclass
class RegistrationConfig(PipelineConfig):
    """Parameters of the registration pipeline. Presets: `indoor` (3DMatch-like) and `lidar`."""

    voxel_size: float = param(0.05, "voxel size of the downsampled clouds (m)", low=1e-3, high=20.0)
    normal_radius: float = param(0.10, "neighbourhood radius for normals (m)", low=1e-3, high=50.0)
    fpfh_radius: float = param(0.25, "FPFH neighbourhood radius (m)", low=1e-3, high=100.0)
    fpfh_max_nn: int = param(100, "max neighbours per FPFH descriptor", low=5, high=1000)
    max_points: int = param(2_000_000, "stride cap applied before voxelising (huge clouds)", low=100, high=100_000_000)
    max_keypoints: int = param(30_000, "stride cap on downsampled points that get descriptors", low=10, high=1_000_000)
    mutual: bool = param(True, "keep only mutual nearest neighbours in descriptor space")
    max_correspondences: int = param(1500, "cap on putative correspondences (best descriptor distance)", low=3, high=20_000)
    min_correspondences: int = param(100, "when mutual matching gives fewer, the best one-way matches fill up",
                                     low=0, high=20_000)
    tau: float = param(0.10, "inlier threshold (m)", low=1e-5, high=20.0)
    num_layers: int = param(6, "VBReg iterations L (paper code 12; 6 nearly as good)", low=1, high=24)
    feature_dim: int = param(64, "VBReg feature width (paper code 128)", low=4, high=1024)
    random_dim: int = param(32, "VBReg random-feature width (paper code 128)", low=2, high=1024)
    hidden_dim: int = param(64, "VBReg GRU hidden width (paper code 256)", low=4, high=2048)
    seed_ratio: float = param(0.1, "fraction of correspondences used as seeds", low=0.0, high=1.0)
    min_seeds: int = param(100, "at least this many seeds where available", low=1, high=100_000)
    max_seeds: int = param(600, "at most this many seeds (CPU cost ~ seeds x correspondences)", low=1, high=100_000)
    nms_radius: float = param(0.10, "seed non-maximum suppression radius (m)", low=0.0, high=100.0)
    kappa: int = param(40, "hypothetical inliers per seed (kappa - 1 voted + the seed)", low=3, high=1000)
    wilson_z: float = param(1.96, "z of the Wilson score lower bound on votes", low=0.0, high=10.0)
    refine_iterations: int = param(20, "max reweighted least-squares iterations", low=0, high=1000)
    confidence_weighting: bool = param(True, "weight hypothesis scores and the final least squares by the inlier "
                                       "confidence (false: count every correspondence alike, as the paper's score)")
    verify_candidates: int = param(5, "register(): the best distinct hypotheses by coarse cloud overlap and as many "
                                   "by correspondence score are aligned and compared by overlap of the clouds; "
                                   "1 = take the best correspondence score as the paper does", low=1, high=100)
    verify_sample: int = param(1000, "source points sampled for the coarse overlap of every hypothesis",
                               low=10, high=1_000_000)
    bev_candidates: int = param(0, "register() with verify_candidates > 1, ground vehicles: the best distinct (yaw, x, y) "
                                "poses of a bird's-eye-view correlation of the structure points join the verified "
                                "hypotheses (found without descriptors: rescues pairs whose matches hold no true pair; "
                                "always aligned by GICP, being rough); 0 = off", low=0, high=100)
    bev_cell: float = param(1.0, "bird's-eye-view cell of that correlation (m)", low=0.05, high=20.0)
    bev_yaw_step_deg: float = param(3.0, "yaw step of that correlation (deg)", low=0.1, high=90.0)
    local_refine: bool = param(True, "refine with GICP (small_gicp) on the downsampled clouds")
    gicp_max_distance: float = param(0.15, "GICP max correspondence distance (m)", low=1e-3, high=50.0)
    max_match_normal_z: float = param(1.0, "only points with |normal z| below this are matched (0.9 drops the "
                                      "ground, whose FPFH descriptors all look alike); 1 keeps all", low=0.0, high=1.0)
    min_inliers: int = param(10, "fewer inlier correspondences -> converged=False", low=3, high=100_000)
    min_fitness: float = param(0.05, "lower fitness (fraction of source points near the target) -> converged=False",
                               low=0.0, high=1.0)

    @classmethod
    def preset(cls, name: str) -> "RegistrationConfig":
        """`indoor`: 3DMatch-like RGB-D fragments (tau 0.10 m); `lidar`: outdoor scans (tau 1.2 m, KITTI)."""
        if name == "indoor":
            return cls()
        if name == "lidar":
            return cls(voxel_size=0.3, normal_radius=0.9, fpfh_radius=1.5, tau=1.2, nms_radius=0.6,
                       gicp_max_distance=1.0, max_correspondences=2000, max_points=2_000_000,
                       max_match_normal_z=0.9, min_correspondences=2000, bev_candidates=5)
        raise ValueError(f"RegistrationConfig.preset: unknown preset {name!r}; choose indoor | lidar")

    def dims(self) -> VBRegDims:
        return VBRegDims(self.feature_dim, self.random_dim, self.hidden_dim, self.num_layers)


def resolve_device(device: str) -> torch.device:
    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device = {device!r}: must be one of cpu | cuda | auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' but torch sees no CUDA device; use cpu or auto")
    return torch.device(device)


def load_network(weights: str | Path, cfg: RegistrationConfig, device: torch.device) -> VBRegNet:
    """A VBRegNet from a safetensors file written by train.py. The file's metadata carries the dims;
    they override the config's (the config only sizes an untrained network)."""
    path = DEFAULT_WEIGHTS if str(weights) == "default" else Path(weights)
    state, meta = read_state(path, required="num_layers", kind="registration")
    dims = cfg.dims()
    for key in ("feature_dim", "random_dim", "hidden_dim", "num_layers", "input_dim"):
        if key in meta:
            setattr(dims, key, int(meta[key]))
    net = VBRegNet(dims)
    load_into(net, state, path, "registration")
    return net.to(device).eval()


FAR_FROM_ORIGIN_M = 1e4   # a cloud whose median point is farther than this is registered about its centre


def recentre(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(points - centre, centre): the median point when it is over FAR_FROM_ORIGIN_M from the origin, else
    (points, 0): a sensor-frame scan keeps its origin (the normals face the sensor there)."""
    centre = np.median(points, axis=0)
    if np.abs(centre).max() <= FAR_FROM_ORIGIN_M:
        return points, np.zeros(3)
    return points - centre, centre


def uncentre(res: RegistrationResult, src_centre: np.ndarray, dst_centre: np.ndarray) -> RegistrationResult:
    """A result found between recentred clouds as one between the original ones: T = D T' S^-1 (S, D the
    translations by the source's and the target's centre); the covariance, a left perturbation in the
    target frame, moves with D's adjoint."""
    T = res.transform.copy()
    T[:3, 3] = T[:3, :3] @ (-src_centre) + T[:3, 3] + dst_centre
    res.transform = T
    adjoint = np.eye(6)
    adjoint[:3, 3:] = skew(dst_centre)
    res.covariance = adjoint @ res.covariance @ adjoint.T
    return res


def rigid_covariance(points: np.ndarray, residual_vec: np.ndarray, normals: np.ndarray | None = None) -> np.ndarray:
    """6x6 covariance over (x, y, z, roll, pitch, yaw) of a registration, from its inlier geometry.

    points (K, 3): inlier source points already in the target frame; residual_vec (K, 3) their
    residuals; normals (K, 3) target normals for point-to-plane (else point-to-point). Gauss-Newton
    Hessian H = sum J^T J with J = d r / d (t, w) for a left perturbation; covariance =
    sigma^2 H^-1 with sigma^2 the residual variance. Poorly constrained directions get large variance.
    """
    K = len(points)
    if normals is not None:
        J = np.concatenate([normals, np.cross(points, normals)], axis=1)  # (K, 6)
        r = np.einsum("ij,ij->i", residual_vec, normals)
        dof = max(K - 6, 1)
        sigma2 = float(np.sum(r ** 2) / dof)
        H = J.T @ J
    else:
        H = np.zeros((6, 6))
        skew = np.zeros((K, 3, 3))
        skew[:, 0, 1], skew[:, 0, 2] = -points[:, 2], points[:, 1]
        skew[:, 1, 0], skew[:, 1, 2] = points[:, 2], -points[:, 0]
        skew[:, 2, 0], skew[:, 2, 1] = -points[:, 1], points[:, 0]
        J = np.concatenate([np.broadcast_to(np.eye(3), (K, 3, 3)), -skew], axis=2)  # (K, 3, 6)
        H = np.einsum("kia,kib->ab", J, J)
        sigma2 = float(np.sum(residual_vec ** 2) / max(3 * K - 6, 1))
    sigma2 = max(sigma2, 1e-8)
    # Tikhonov keeps an unobservable direction finite but huge, rather than inf/NaN.
    reg = 1e-9 * max(np.trace(H), 1e-9)
    cov = sigma2 * np.linalg.inv(H + reg * np.eye(6))
    return 0.5 * (cov + cov.T)


def _failure(reason: str, start: float) -> RegistrationResult:
    cov = np.eye(6) * 1e6
    return RegistrationResult(transform=np.eye(4), inliers=0, inlier_ratio=0.0, fitness=0.0,
                              seconds=time.perf_counter() - start, converged=False, covariance=cov, reason=reason)


class RegistrationPipeline:
    """VBReg registration of two clouds or of putative correspondences. Deterministic."""

    def __init__(self, cfg: RegistrationConfig | None = None, weights: str | Path | None = "default",
                 device: str = "cpu") -> None:
        self.cfg = cfg or RegistrationConfig()
        self.device = resolve_device(device)
        self.net: VBRegNet | None = None
        self.weights_path: Path | None = None
        if weights is not None:
            self.net = load_network(weights, self.cfg, self.device)
            self.weights_path = DEFAULT_WEIGHTS if str(weights) == "default" else Path(weights)
        self.last_debug: dict = {}

    # ------------------------------------------------------------------------------ preprocessing

    def preprocess(self, xyz: np.ndarray, name: str) -> np.ndarray:
        """(N, 3+) -> finite, stride-capped, voxel-downsampled (M, 3) float64."""
        clean = features.sanitize(xyz, name)
        clean = features.stride_cap(clean, self.cfg.max_points)
        down = features.voxel_downsample(clean, self.cfg.voxel_size)
        return features.stride_cap(down, self.cfg.max_keypoints)

    def describe(self, points: np.ndarray, viewpoint: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """points (M, 3) -> normals (M, 3) facing `viewpoint` (default the origin), FPFH (M, 33)."""
        normals = features.estimate_normals(points, self.cfg.normal_radius, viewpoint=viewpoint)
        return normals, features.fpfh(points, normals, self.cfg.fpfh_radius, self.cfg.fpfh_max_nn)

    def structure_masks(self, src_normals: np.ndarray, dst_normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(M,) bool masks of points whose normal is not (near) vertical when `max_match_normal_z` < 1.

        On LiDAR scans the ground's FPFH descriptors all look alike and its scan rings move with the
        sensor, so matching and hypothesis verification use the other points (all when too few remain)."""
        cfg = self.cfg
        if cfg.max_match_normal_z >= 1:
            return np.ones(len(src_normals), bool), np.ones(len(dst_normals), bool)
        src_keep = np.abs(src_normals[:, 2]) < cfg.max_match_normal_z
        dst_keep = np.abs(dst_normals[:, 2]) < cfg.max_match_normal_z
        if src_keep.sum() < 30 or dst_keep.sum() < 30:
            return np.ones(len(src_normals), bool), np.ones(len(dst_normals), bool)
        return src_keep, dst_keep

    def match(self, src_pts, src_normals, src_desc, dst_pts, dst_normals, dst_desc) -> np.ndarray:
        """Putative correspondences (K, 2) [source row, target row] among the structure points."""
        cfg = self.cfg
        src_keep, dst_keep = self.structure_masks(src_normals, dst_normals)
        src_rows, dst_rows = np.nonzero(src_keep)[0], np.nonzero(dst_keep)[0]
        pairs = features.match_descriptors(src_desc[src_rows], dst_desc[dst_rows], mutual=cfg.mutual,
                                           max_correspondences=cfg.max_correspondences,
                                           min_correspondences=min(cfg.max_correspondences, cfg.min_correspondences))
        return np.stack([src_rows[pairs[:, 0]], dst_rows[pairs[:, 1]]], axis=1) if len(pairs) else pairs

    # ------------------------------------------------------------------------------ confidence

    def confidence_and_voters(self, src: torch.Tensor, dst: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """src, dst (N, 3) -> confidence (N,), voters (V, N, N).

        With the network: sigmoid(logits) and, per layer, the attention row and the
        feature-similarity gated by compatibility (2L voters). Without: the normalised second-order
        compatibility degree, voters [beta, beta2] (compatibility only)."""
        beta = spatial_compatibility(src[None].float(), dst[None].float(), tau)
        if self.net is None:
            beta2 = second_order_compatibility(beta)
            degree = beta2.sum(-1)[0]
            confidence = degree / degree.max().clamp(min=1e-12)
            return confidence, torch.cat([beta, beta2], dim=0)
        with torch.no_grad():
            out = self.net(src[None].float(), dst[None].float(), beta)
        confidence = torch.sigmoid(out["logits"][0])
        gate = (beta[0] > 0).float()
        voters = []
        for attention, feats in zip(out["attention"], out["features"]):
            unit = torch.nn.functional.normalize(feats[0], dim=-1)
            similarity = (unit @ unit.T).clamp(min=0.0)
            voters.append(attention[0] * gate)
            voters.append(similarity * beta[0])
        return confidence, torch.stack(voters)

    # ------------------------------------------------------------------------------ solving

    def solve_correspondences(self, src: np.ndarray, dst: np.ndarray, *, tau: float | None = None,
                              estimate_scale_too: bool = False, noise_bound: float | None = None) -> RegistrationResult:
        """Transform from putative correspondences src (K, 3) -> dst (K, 3) (row i matches row i).

        `estimate_scale_too`: dst = s R src + t (TEASER-style sets); the scale is found by voting on
        pairwise-distance ratios and the returned `transform` is the similarity [[sR, t], [0, 1]]."""
        start = time.perf_counter()
        tau = float(tau or self.cfg.tau)
        src = np.asarray(src, dtype=np.float64)
        dst = np.asarray(dst, dtype=np.float64)
        if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3:
            raise ValueError(f"solve_correspondences: src {src.shape} and dst {dst.shape} must both be (K, 3)")
        finite = np.isfinite(src).all(1) & np.isfinite(dst).all(1)
        src, dst = src[finite], dst[finite]
        if len(src) < 3:
            return _failure(f"too few finite correspondences ({len(src)} < 3)", start)
        if not estimate_scale_too:
            return self._solve(src, dst, tau, start, covariance_normals=None)
        best: tuple[int, float, RegistrationResult] | None = None
        for scale in scale_candidates(src, dst, noise_bound if noise_bound is not None else tau):
            res = self._solve(src, dst / scale, tau / scale, start, covariance_normals=None)
            if best is None or res.inliers > best[0]:
                best = (res.inliers, scale, res)
        assert best is not None
        _, scale, res = best
        T = res.transform.copy()
        T[:3, :3] *= scale
        T[:3, 3] *= scale
        res.transform = T
        res.seconds = time.perf_counter() - start
        return res

    def _solve(self, src: np.ndarray, dst: np.ndarray, tau: float, start: float,
               covariance_normals: np.ndarray | None, verifier: CloudVerifier | None = None) -> RegistrationResult:
        """Confidence, voting search and (with a `verifier` on the clouds) the choice among the best
        distinct hypotheses by overlap of the clouds."""
        cfg = self.cfg
        src_t = torch.as_tensor(src, dtype=torch.float64, device=self.device)
        dst_t = torch.as_tensor(dst, dtype=torch.float64, device=self.device)
        confidence, voters = self.confidence_and_voters(src_t, dst_t, tau)
        N = len(src)
        num_seeds = int(min(N, max(cfg.min_seeds, round(cfg.seed_ratio * N)), cfg.max_seeds))
        found = voting_search(src_t, dst_t, confidence.double(), voters, tau=tau, kappa=cfg.kappa,
                              num_seeds=num_seeds, nms_radius=cfg.nms_radius, wilson_z=cfg.wilson_z,
                              refine_iterations=cfg.refine_iterations, confidence_weighting=cfg.confidence_weighting)
        T, mask, score = found.transform, found.inlier_mask, found.score
        self.last_debug = {"confidence": confidence.cpu().numpy(), "num_seeds": num_seeds}
        if verifier is not None:
            T, overlap = self._verify(found, verifier, src_t, dst_t, confidence.double(), tau)
            mask = np.linalg.norm(src @ T[:3, :3].T + T[:3, 3] - dst, axis=1) < tau
            score = overlap
        self.last_debug.update({"inlier_mask": mask, "score": score})
        inliers = int(mask.sum())
        moved = src[mask] @ T[:3, :3].T + T[:3, 3]
        cov = rigid_covariance(moved, moved - dst[mask]) if inliers >= 3 else np.eye(6) * 1e6
        res = RegistrationResult(transform=T, inliers=inliers, inlier_ratio=inliers / N, fitness=inliers / N,
                                 seconds=time.perf_counter() - start, converged=True, covariance=cov)
        reason = self._degenerate_reason(src[mask], inliers)
        if reason:
            res.converged, res.reason = False, reason
        return res

    def _verify(self, found, verifier: CloudVerifier, src: torch.Tensor, dst: torch.Tensor,
                confidence: torch.Tensor, tau: float) -> tuple[np.ndarray, float]:
        """The pose among the search's hypotheses that best aligns the clouds, and its overlap.

        Candidates: the `verify_candidates` best distinct raw hypotheses by coarse cloud overlap, then as
        many by correspondence score. On LiDAR (tau above the fine GICP distance) each is aligned by GICP
        on the clouds at 2 tau and tau, so a pose that is right but rough (a few degrees, ~1 m: typical of
        a seed's kappa-set on a 1-5 % inlier set) is compared at its best; the reweighted least squares on
        the correspondences is not used there, as at such inlier ratios it can pull a rough pose towards
        a wrong one. Otherwise each is refined on the correspondences. With `bev_candidates` the
        bird's-eye-view correlation's best poses (`CloudVerifier.bev_hypotheses`) are candidates too, aligned
        by GICP at 2 tau and tau. The first maximum of the fine overlap wins."""
        cfg = self.cfg
        hypotheses = torch.as_tensor(found.hypotheses, dtype=src.dtype, device=src.device)
        coarse = torch.as_tensor(verifier.coarse_overlap(found.hypotheses))
        count = cfg.verify_candidates
        picks = distinct_best(hypotheses, coarse, count, min_shift=tau)
        picks += [i for i in distinct_best(hypotheses, torch.as_tensor(found.hypothesis_scores), count, min_shift=tau)
                  if i not in picks]
        weight = confidence if cfg.confidence_weighting else None
        stages = self._coarse_gicp_stages(tau) if cfg.local_refine else []
        candidates = []  # (pose aligned or refined, where it came from)
        for index in picks:
            if stages:
                candidates.append((verifier.align(found.hypotheses[index], stages), "search"))
            else:
                T = refine(hypotheses[index], src, dst, tau, cfg.refine_iterations, prior_weight=weight)[0]
                candidates.append((T.cpu().numpy(), "search"))
        candidates += [(verifier.align(T, stages or [2.0 * tau, tau]), "bev")
                       for T in verifier.bev_hypotheses(cfg.bev_candidates, cfg.bev_cell, cfg.bev_yaw_step_deg)]
        best_T, best_overlap, best_source = found.transform, -1.0, "search"
        for T, source in candidates:
            overlap = verifier.overlap(T)
            if overlap > best_overlap:
                best_T, best_overlap, best_source = T, overlap, source
        self.last_debug.update({"candidates": len(candidates), "chosen_from": best_source})
        return best_T, best_overlap

    def _coarse_gicp_stages(self, tau: float) -> list[float]:
        """GICP max distances that bring a rough pose into the fine stage's reach: 2 tau, tau when tau is
        above `gicp_max_distance` (LiDAR), none otherwise (indoor: the search is already that precise)."""
        return [2.0 * tau, tau] if tau > self.cfg.gicp_max_distance else []

    def _degenerate_reason(self, inlier_src: np.ndarray, inliers: int) -> str:
        if inliers < self.cfg.min_inliers:
            return f"too few inliers ({inliers} < min_inliers {self.cfg.min_inliers})"
        centred = inlier_src - inlier_src.mean(0)
        eig = np.sort(np.linalg.eigvalsh(centred.T @ centred / len(centred)))[::-1]
        if eig[0] <= 1e-12 or eig[1] / eig[0] < 1e-4:
            return "degenerate inlier set (points coincide or are collinear): rotation is unobservable"
        return ""

    def register(self, source_xyz: np.ndarray, target_xyz: np.ndarray, init: np.ndarray | None = None) -> RegistrationResult:
        """Register source (N, 3+) into target (M, 3+). `init` is unused by global search (VBReg needs
        no initial guess); it is accepted for API symmetry with local methods."""
        start = time.perf_counter()
        cfg = self.cfg
        try:
            src_pts = self.preprocess(source_xyz, "source")
            dst_pts = self.preprocess(target_xyz, "target")
        except ValueError as exc:
            return _failure(str(exc), start)
        for name, pts in (("source", src_pts), ("target", dst_pts)):
            if len(pts) < 3:
                return _failure(f"{name} has {len(pts)} usable points after removing NaN/inf and "
                                f"voxelising at {cfg.voxel_size} m (need >= 3)", start)
        # a cloud in map coordinates (UTM: millions of metres) is registered about its own centre, where
        # float32 neighbour searches and the voxel grid keep millimetres; composed back below
        src_pts, src_centre = recentre(src_pts)
        dst_pts, dst_centre = recentre(dst_pts)
        # normals still face the original origin, so the descriptors are those of the clouds as given
        src_normals, src_desc = self.describe(src_pts, -src_centre)
        dst_normals, dst_desc = self.describe(dst_pts, -dst_centre)
        pairs = self.match(src_pts, src_normals, src_desc, dst_pts, dst_normals, dst_desc)
        res = self.register_matches(src_pts, src_normals, dst_pts, dst_normals, pairs, start)
        if src_centre.any() or dst_centre.any():
            res = uncentre(res, src_centre, dst_centre)
        return res

    def register_matches(self, src_pts: np.ndarray, src_normals: np.ndarray, dst_pts: np.ndarray,
                         dst_normals: np.ndarray, pairs: np.ndarray, start: float | None = None) -> RegistrationResult:
        """The part of `register` after matching: voxelised clouds (N, 3) / (M, 3) with their normals and
        the putative correspondences (K, 2) [source row, target row] -> result."""
        start = time.perf_counter() if start is None else start
        cfg = self.cfg
        if len(pairs) < 3:
            return _failure(f"only {len(pairs)} descriptor correspondences (need >= 3)", start)
        corr_src, corr_dst = src_pts[pairs[:, 0]], dst_pts[pairs[:, 1]]
        src_keep, dst_keep = self.structure_masks(src_normals, dst_normals)
        verifier = CloudVerifier(src_pts, dst_pts, src_keep, dst_keep, voxel_size=cfg.voxel_size, cell=cfg.tau,
                                 sample=cfg.verify_sample)
        res = self._solve(corr_src, corr_dst, cfg.tau, start, None,
                          verifier=verifier if cfg.verify_candidates > 1 else None)
        self.last_debug["num_correspondences"] = len(pairs)
        T = res.transform
        if cfg.local_refine and res.inliers >= 3:
            # candidates were already aligned coarsely during verification; the paper's path was not
            stages = [] if cfg.verify_candidates > 1 else self._coarse_gicp_stages(cfg.tau)
            T = verifier.align(T, stages + [cfg.gicp_max_distance])
        fitness, cov = self._fitness_covariance(src_pts, dst_pts, dst_normals, T)
        res.transform, res.fitness, res.covariance = T, fitness, cov
        if res.converged and fitness < cfg.min_fitness:
            res.converged, res.reason = False, f"fitness {fitness:.3f} < min_fitness {cfg.min_fitness}"
        res.seconds = time.perf_counter() - start
        return res

    def _fitness_covariance(self, src_pts: np.ndarray, dst_pts: np.ndarray, dst_normals: np.ndarray,
                            T: np.ndarray) -> tuple[float, np.ndarray]:
        """Fitness = fraction of downsampled source points within 1.5 voxels of the target after T;
        covariance from the point-to-plane Hessian of those overlapping points."""
        moved = src_pts @ T[:3, :3].T + T[:3, 3]
        dist, idx = cKDTree(dst_pts).query(moved)
        near = dist < 1.5 * self.cfg.voxel_size
        fitness = float(near.mean())
        if near.sum() < 6:
            return fitness, np.eye(6) * 1e6
        cov = rigid_covariance(moved[near], moved[near] - dst_pts[idx[near]], dst_normals[idx[near]])
        return fitness, cov
