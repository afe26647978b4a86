"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch, the sampling core of TPVFormer.

`ms_deform_sample` is the fast path (one `grid_sample` per level); `ms_deform_sample_reference` is a
slow loop over every query, head, level and point with explicit bilinear interpolation, kept beside it
as the obviously-correct definition the tests compare against. `MSDeformAttention` is the module
around the sampling: value projection, offsets and weights predicted from the query, output projection.

Sampling locations are normalised to [0, 1] over each level's map, (x, y) = (column, row), with pixel
centres at (i + 0.5) / size (`align_corners=False`); samples outside the map read zeros.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def ms_deform_sample(value: torch.Tensor, spatial_shapes: list[tuple[int, int]],
                     sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Weighted bilinear samples of multi-level value maps.

    value: (B, S, M, D), S = sum of H_l * W_l over levels, M heads of D channels;
    spatial_shapes: L pairs (H_l, W_l); sampling_locations: (B, Q, M, L, P, 2) in [0, 1] (x, y);
    attention_weights: (B, Q, M, L, P). Returns (B, Q, M * D).
    """
    B, S, M, D = value.shape
    _, Q, M2, L, P, _ = sampling_locations.shape
    if M2 != M or L != len(spatial_shapes) or S != sum(h * w for h, w in spatial_shapes):
        raise ValueError(f"ms_deform_sample: value {tuple(value.shape)} does not match levels {spatial_shapes} "
                         f"and locations {tuple(sampling_locations.shape)}")
    value_levels = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2.0 * sampling_locations - 1.0
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        # (B, H*W, M, D) -> (B*M, D, H, W)
        value_l = value_levels[lvl].flatten(2).transpose(1, 2).reshape(B * M, D, h, w)
        # (B, Q, M, P, 2) -> (B*M, Q, P, 2)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*M, D, Q, L, P) weighted by (B*M, 1, Q, L, P)
    stacked = torch.stack(sampled, dim=-2)
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Q, L, P)
    out = (stacked * weights).sum(dim=(-1, -2)).view(B, M * D, Q)
    return out.transpose(1, 2).contiguous()


def _bilinear_reference(value_map: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """value_map (D, H, W) at normalised (x, y), zeros outside: the textbook four-neighbour formula."""
    D, H, W = value_map.shape
    px, py = x * W - 0.5, y * H - 0.5  # continuous pixel coordinates, centres on integers
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    out = torch.zeros(D, dtype=value_map.dtype)
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        if 0 <= xi < W and 0 <= yi < H:
            weight = (1.0 - abs(px - xi)) * (1.0 - abs(py - yi))
            out = out + weight * value_map[:, yi, xi]
    return out


def ms_deform_sample_reference(value: torch.Tensor, spatial_shapes: list[tuple[int, int]],
                               sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Slow, loop-by-loop `ms_deform_sample` with the same shapes. For tests only."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    starts = [0]
    for h, w in spatial_shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(B, Q, M, D, dtype=value.dtype)
    for b in range(B):
        for m in range(M):
            for lvl, (h, w) in enumerate(spatial_shapes):
                value_map = value[b, starts[lvl]:starts[lvl + 1], m].T.reshape(D, h, w)
                for q in range(Q):
                    for p in range(P):
                        x, y = sampling_locations[b, q, m, lvl, p].tolist()
                        out[b, q, m] += attention_weights[b, q, m, lvl, p] * _bilinear_reference(value_map, x, y)
    return out.reshape(B, Q, M * D)


class MSDeformAttention(nn.Module):
    """Deformable attention of queries over L value maps, with A reference anchors per query and level.

    Each head predicts P sampling points per level; they are shared out over the A anchors
    (P = A * points_per_anchor) as BEVFormer / TPVFormer do for the points of a pillar. Offsets are in
    units of the level's map size (`offset / (W_l, H_l)`).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"MSDeformAttention: embed_dim {embed_dim} not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.num_levels, self.num_points = embed_dim, num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deformable DETR init: offsets start on a ring around the reference, growing with the point index.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * torch.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        for i in range(self.num_points):
            grid[:, :, i, :] *= (i % 4) + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten() * 0.5)
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, value: torch.Tensor, spatial_shapes: list[tuple[int, int]],
                reference_points: torch.Tensor) -> torch.Tensor:
        """query (B, Q, C); value (B, S, C) flattened levels; reference_points (B, Q, L, A, 2) in [0, 1].

        Returns (B, Q, C) (output projection applied; no residual).
        """
        B, Q, C = query.shape
        L, M, P = self.num_levels, self.num_heads, self.num_points
        A = reference_points.shape[3]
        if reference_points.shape != (B, Q, L, A, 2) or P % A:
            raise ValueError(f"MSDeformAttention: reference_points {tuple(reference_points.shape)} must be "
                             f"(B={B}, Q={Q}, L={L}, A, 2) with num_points {P} divisible by A")
        value = self.value_proj(value).view(B, -1, M, C // M)
        offsets = self.sampling_offsets(query).view(B, Q, M, L, A, P // A, 2)
        weights = self.attention_weights(query).view(B, Q, M, L * P).softmax(-1).view(B, Q, M, L, P)
        normaliser = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, :, :, None, :] + offsets / normaliser[None, None, None, :, None, None, :]
        locations = locations.flatten(4, 5)  # (B, Q, M, L, P, 2)
        return self.output_proj(ms_deform_sample(value, spatial_shapes, locations, weights))
