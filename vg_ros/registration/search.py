"""VBReg's voting-based inlier search: seeds by confidence + NMS, kappa most-compatible matches per
seed voted by every layer, Wilson lower bound on the votes, a weighted SVD per seed, hypothesis
scoring and a reweighted least-squares refinement. Deterministic (no random sampling).

Shapes: src, dst (N, 3) matched points (row i of src matches row i of dst); confidence (N,);
voters (V, N, N) nonnegative per-voter support of match j for match i.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SearchResult:
    """`transform` (4, 4) source -> target; `inlier_mask` (N,) bool; `score` of the best hypothesis;
    `num_hypotheses` evaluated; `hypotheses` (S, 4, 4) every seed's raw pose and `hypothesis_scores` (S,)
    their scores, for a caller that verifies them against the clouds."""

    transform: np.ndarray
    inlier_mask: np.ndarray
    score: float
    num_hypotheses: int
    residuals: np.ndarray
    hypotheses: np.ndarray
    hypothesis_scores: np.ndarray


def weighted_kabsch(src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Batched weighted rigid fit: src, dst (S, K, 3), weights (S, K) >= 0 -> T (S, 4, 4) with
    T @ src ~ dst minimising sum_k w_k |R x_k + t - y_k|^2 (reflection-corrected SVD)."""
    w = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)
    src_c = (w[..., None] * src).sum(1)
    dst_c = (w[..., None] * dst).sum(1)
    cov = torch.einsum("sk,ski,skj->sij", w, src - src_c[:, None], dst - dst_c[:, None])
    U, _, Vh = torch.linalg.svd(cov)
    V = Vh.transpose(1, 2)
    det = torch.det(V @ U.transpose(1, 2))
    D = torch.diag_embed(torch.stack([torch.ones_like(det), torch.ones_like(det), torch.sign(det + 1e-30)], dim=-1))
    R = V @ D @ U.transpose(1, 2)
    T = torch.eye(4, dtype=src.dtype, device=src.device).repeat(src.shape[0], 1, 1)
    T[:, :3, :3] = R
    T[:, :3, 3] = dst_c - (R @ src_c[..., None]).squeeze(-1)
    return T


def wilson_lower_bound(votes: torch.Tensor, trials: int, z: float = 1.96) -> torch.Tensor:
    """Wilson score interval lower bound of a success rate with `votes` successes out of `trials`."""
    n = float(trials)
    p = votes / n
    centre = p + z * z / (2 * n)
    spread = z * torch.sqrt((p * (1 - p) / n + z * z / (4 * n * n)).clamp(min=0.0))
    return ((centre - spread) / (1 + z * z / n)).clamp(min=0.0)


def select_seeds(confidence: torch.Tensor, src: torch.Tensor, num_seeds: int, nms_radius: float) -> torch.Tensor:
    """Seed indices (S,): local confidence maxima within `nms_radius` (source space) first, by
    descending confidence, then the remaining matches by confidence if more seeds are needed."""
    N = confidence.shape[0]
    num_seeds = min(num_seeds, N)
    dist = torch.cdist(src[None], src[None])[0]
    near = dist < nms_radius
    neighbour_best = torch.where(near, confidence[None, :].expand(N, N), torch.full_like(dist, -np.inf)).amax(dim=1)
    is_max = confidence >= neighbour_best
    order_key = confidence + is_max.to(confidence.dtype) * (confidence.abs().max() + 1.0) * 2.0
    # stable, index-ordered tie-break: argsort of (-key, index)
    order = np.lexsort((np.arange(N), -order_key.cpu().numpy()))
    return torch.as_tensor(order[:num_seeds], device=confidence.device)


def residuals(T: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """|T x_i - y_i| for each transform: T (S, 4, 4), src/dst (N, 3) -> (S, N)."""
    moved = torch.einsum("sij,nj->sni", T[:, :3, :3], src) + T[:, None, :3, 3]
    return torch.linalg.norm(moved - dst[None], dim=-1)


def hypothesis_score(dist: torch.Tensor, tau: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_i 1(d_i < tau) (1 - d_i^2 / tau^2) per hypothesis: dist (S, N) -> (S,); w = 1 by default."""
    truncated = torch.clamp(1.0 - dist ** 2 / (tau * tau), min=0.0)
    if weights is not None:
        truncated = truncated * weights
    return truncated.sum(dim=-1)


def vote(voters: torch.Tensor, seeds: torch.Tensor, kappa: int) -> torch.Tensor:
    """votes (S, N): how many of the V voters put match j among seed s's kappa-1 most supported
    matches (support > 0 only; the seed itself excluded)."""
    V, N, _ = voters.shape
    k = max(1, min(kappa - 1, N - 1))
    rows = voters[:, seeds, :]  # (V, S, N), a copy (advanced indexing)
    rows[:, torch.arange(len(seeds)), seeds] = -1.0
    top_val, top_idx = torch.topk(rows, k, dim=-1)
    counted = (top_val > 0).to(voters.dtype)
    votes = torch.zeros((len(seeds), N), dtype=voters.dtype, device=voters.device)
    for v in range(V):
        votes.scatter_add_(1, top_idx[v], counted[v])
    return votes


def refine(T: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, tau: float, max_iterations: int,
           prior_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reweighted least squares from T (4, 4): inliers d < tau weighted by (1 - d^2/tau^2) (times
    `prior_weight`), refit until the inlier set stops changing. Returns (T, inlier mask (N,))."""
    mask = residuals(T[None], src, dst)[0] < tau
    for _ in range(max_iterations):
        if int(mask.sum()) < 3:
            break
        d = residuals(T[None], src, dst)[0]
        w = torch.clamp(1.0 - d ** 2 / (tau * tau), min=0.0)
        if prior_weight is not None:
            w = w * prior_weight
        w = torch.where(mask, w + 1e-6, torch.zeros_like(w))
        T = weighted_kabsch(src[mask][None], dst[mask][None], w[mask][None])[0]
        new_mask = residuals(T[None], src, dst)[0] < tau
        if torch.equal(new_mask, mask):
            break
        mask = new_mask
    return T, mask


def _is_distinct(T: torch.Tensor, others: list[torch.Tensor], min_shift: float, min_angle_deg: float) -> bool:
    for other in others:
        rel = torch.linalg.solve(other, T)
        angle = float(torch.rad2deg(torch.arccos(((torch.trace(rel[:3, :3]) - 1) / 2).clamp(-1, 1))))
        if float(torch.linalg.norm(rel[:3, 3])) < min_shift and angle < min_angle_deg:
            return False
    return True


def distinct_best(T_all: torch.Tensor, scores: torch.Tensor, count: int, min_shift: float, min_angle_deg: float = 5.0) -> list[int]:
    """Indices of up to `count` hypotheses, best score first, each at least `min_shift` (m) or
    `min_angle_deg` away from those already taken (neighbouring seeds give near-copies)."""
    order = np.lexsort((np.arange(len(scores)), -scores.cpu().numpy()))
    picked: list[int] = []
    for i in order:
        if _is_distinct(T_all[int(i)], [T_all[j] for j in picked], min_shift, min_angle_deg):
            picked.append(int(i))
        if len(picked) >= count:
            break
    return picked


def voting_search(src: torch.Tensor, dst: torch.Tensor, confidence: torch.Tensor, voters: torch.Tensor, *,
                  tau: float, kappa: int = 40, num_seeds: int = 100, nms_radius: float = 0.1, wilson_z: float = 1.96,
                  refine_iterations: int = 20, confidence_weighting: bool = False) -> SearchResult:
    """The full search. src/dst (N, 3) float64; confidence (N,); voters (V, N, N).

    The best-scoring hypothesis is refined; every seed's raw hypothesis and score are returned too, so a
    caller holding the clouds can verify them against the full geometry (`verify.CloudVerifier`).
    `confidence_weighting` weights the hypothesis score and the final least squares by the inlier
    confidence (PointDSC-style) instead of counting every correspondence alike."""
    N = src.shape[0]
    if N < 3:
        raise ValueError(f"voting_search: need at least 3 correspondences, got {N}")
    seeds = select_seeds(confidence, src, num_seeds, nms_radius)
    votes = vote(voters, seeds, kappa)
    support = wilson_lower_bound(votes, voters.shape[0], wilson_z)  # (S, N)
    S = len(seeds)
    k = max(2, min(kappa - 1, N - 1))
    top_support, members = torch.topk(support, k, dim=-1)  # (S, k)
    members = torch.cat([seeds[:, None], members], dim=1)
    weights = torch.cat([torch.ones(S, 1, dtype=support.dtype, device=support.device), top_support], dim=1)
    T_all = weighted_kabsch(src[members], dst[members], weights.to(src.dtype))
    dist = residuals(T_all, src, dst)
    weight = confidence.to(src.dtype) if confidence_weighting else None
    scores = hypothesis_score(dist, tau, weight)
    best = distinct_best(T_all, scores, 1, min_shift=tau)[0]
    T_best, mask_best = refine(T_all[best], src, dst, tau, refine_iterations, prior_weight=weight)
    d_final = residuals(T_best[None], src, dst)[0]
    score_best = float(hypothesis_score(d_final[None], tau, weight)[0])
    return SearchResult(T_best.cpu().numpy(), mask_best.cpu().numpy(), score_best, S, d_final.cpu().numpy(),
                        T_all.cpu().numpy(), scores.cpu().numpy())


def scale_candidates(src: np.ndarray, dst: np.ndarray, noise_bound: float, max_candidates: int = 5) -> list[float]:
    """Scales s with |y_i - y_j| ~ s |x_i - x_j| for many pairs (TEASER-style voting over
    pairwise-distance ratios): src, dst (N, 3). Returns up to `max_candidates` distinct scales, the
    most-voted first; [1.0] when nothing is consistent. The caller picks among them by the rigid
    solution's inlier count, which is far more selective than pair votes under heavy noise."""
    i, j = np.triu_indices(len(src), k=1)
    d_src = np.linalg.norm(src[i] - src[j], axis=1)
    d_dst = np.linalg.norm(dst[i] - dst[j], axis=1)
    valid = d_src > 2 * noise_bound
    if valid.sum() == 0:
        return [1.0]
    ratio = d_dst[valid] / d_src[valid]
    bound = 2 * noise_bound / d_src[valid]
    lo, hi = ratio - bound, ratio + bound
    # depth of the interval arrangement at every interval start (sweep over sorted endpoints)
    events = np.concatenate([np.stack([lo, np.ones_like(lo)], 1), np.stack([hi, -np.ones_like(hi)], 1)])
    order = np.lexsort((-events[:, 1], events[:, 0]))
    depth = np.cumsum(events[order, 1])
    positions = events[order, 0]
    candidates: list[float] = []
    for k in np.lexsort((np.arange(len(depth)), -depth)):
        if events[order[k], 1] < 0:
            continue
        s_guess = positions[k]
        inside = (lo <= s_guess + 1e-12) & (hi >= s_guess - 1e-12)
        s_est = float(np.median(ratio[inside])) if inside.any() else float(s_guess)
        if s_est > 0 and all(abs(s_est / c - 1.0) > 0.01 for c in candidates):
            candidates.append(s_est)
        if len(candidates) >= max_candidates:
            break
    return candidates or [1.0]
