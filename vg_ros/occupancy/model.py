"""TPVFormer (Huang et al., CVPR 2023): surround camera images -> tri-perspective view -> semantic occupancy.

Parts, as in the paper and its released code, scaled by the named configs (`MODEL_CONFIGS`):

* `ResNetBackbone` + `FPN`: a plain-torch ResNet-style image encoder (BasicBlocks) and a feature pyramid
  of `fpn_levels` maps of `embed_dim` channels (strides 8, 16, 32 [, 64]).
* TPV queries: one learnable query per cell of the three planes `xy` (top, X x Y), `xz` (side, X x Z)
  and `yz` (front, Y x Z), with learnable positional embeddings.
* `TPVBlock`: cross-view hybrid attention (deformable self-attention whose three "levels" are the three
  planes, reference points = the query's pillar projected onto each plane) and, in HCAB blocks, image
  cross-attention (reference points along each query's pillar projected into every camera; multi-scale
  deformable attention over that camera's FPN maps; cameras no point reaches are skipped; results are
  averaged over the cameras that see the query). HAB blocks have no image cross-attention.
* `TPVDecoder`: a 3D point's feature is the sum of bilinear samples of its three projections; then
  Linear(C, 2C) -> Softplus -> Linear(2C, C) -> classifier over 18 classes (17 = free).
* `occupancy_loss`: cross-entropy + Lovasz-softmax.

Frames: everything is in `base_link` (x forward, y left, z up); the grid is `GridSpec` (Occ3D by
default: [-40, -40, -1]..[40, 40, 5.4] m, 0.4 m). Plane `xy` is stored (B, C, X, Y), `xz` (B, C, X, Z),
`yz` (B, C, Y, Z); normalised coordinates are (p - lower) / (upper - lower) in [0, 1].
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vg_ros.occupancy.deformable import MSDeformAttention
from vg_ros.types import NUM_OCC_CLASSES, GridSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_LABEL = 255


@dataclass
class TPVConfig:
    """Sizes of one TPVFormer. `tpv_shape` (X, Y, Z) plane cells; voxels = tpv_shape * upsample."""

    name: str = "tiny"
    image_size: tuple[int, int] = (256, 144)  # model input (width, height)
    backbone_channels: tuple[int, ...] = (16, 32, 64, 128)
    backbone_blocks: tuple[int, ...] = (1, 1, 1, 1)
    fpn_levels: int = 3
    embed_dim: int = 32
    num_heads: int = 4
    tpv_shape: tuple[int, int, int] = (100, 100, 8)
    upsample: int = 2
    pillar_points: tuple[int, int, int] = (4, 8, 8)  # ICA reference points for the xy, xz, yz queries
    points_per_anchor: int = 1  # ICA sampling points per reference point and level
    cross_view_anchors: int = 2  # CVHA reference points along a query's pillar
    cross_view_points: int = 2  # CVHA sampling points per plane
    num_hcab: int = 1
    num_hab: int = 1
    ffn_ratio: int = 2
    num_classes: int = NUM_OCC_CLASSES
    grid_lower: tuple[float, float, float] = (-40.0, -40.0, -1.0)
    grid_upper: tuple[float, float, float] = (40.0, 40.0, 5.4)

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"TPVConfig({self.name!r}).{what}")
        need(len(self.image_size) == 2 and min(self.image_size) >= 32, "image_size must be (width, height) >= 32")
        need(len(self.backbone_channels) == 4 and len(self.backbone_blocks) == 4, "backbone_* need 4 stages")
        need(self.fpn_levels in (3, 4), "fpn_levels must be 3 or 4")
        need(self.embed_dim % self.num_heads == 0, "embed_dim must be divisible by num_heads")
        need(len(self.tpv_shape) == 3 and min(self.tpv_shape) >= 2, "tpv_shape must be 3 sizes >= 2")
        need(self.upsample >= 1, "upsample must be >= 1")
        need(self.cross_view_points % self.cross_view_anchors == 0, "cross_view_points must be a multiple of anchors")
        need(self.num_hcab >= 1 and self.num_hab >= 0, "num_hcab >= 1, num_hab >= 0")
        need(all(u > l for l, u in zip(self.grid_lower, self.grid_upper)), "grid_upper must exceed grid_lower")

    @property
    def grid(self) -> GridSpec:
        """The output voxel grid (X, Y, Z) = tpv_shape * upsample over the configured range."""
        size = (self.grid_upper[0] - self.grid_lower[0]) / (self.tpv_shape[0] * self.upsample)
        return GridSpec(tuple(self.grid_lower), tuple(self.grid_upper), size)

    @property
    def voxel_shape(self) -> tuple[int, int, int]:
        return tuple(n * self.upsample for n in self.tpv_shape)  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TPVConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TPVConfig: unknown key(s) {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


MODEL_CONFIGS: dict[str, TPVConfig] = {
    # Runs on 2 CPU cores: planes 100x100x8 upsampled x2 to the 200x200x16 Occ3D grid.
    "tiny": TPVConfig(),
    # The paper's "small" layout (100x100x8 planes upsampled x2) with a wider encoder at the rig's 480x270.
    "small": TPVConfig(name="small", image_size=(480, 270), backbone_channels=(32, 64, 128, 256),
                       backbone_blocks=(2, 2, 2, 2), fpn_levels=4, embed_dim=64, num_heads=8, points_per_anchor=2,
                       pillar_points=(4, 16, 16), cross_view_anchors=4, cross_view_points=8,
                       num_hcab=3, num_hab=2),
    # The paper's base structure: 200x200x16 planes, C = 128, 8 heads, 3 HCAB + 2 HAB, pillars [4, 32, 32].
    "base": TPVConfig(name="base", image_size=(1600, 896), backbone_channels=(64, 128, 256, 512),
                      backbone_blocks=(3, 4, 23, 3), fpn_levels=4, embed_dim=128, num_heads=8,
                      tpv_shape=(200, 200, 16), upsample=1, pillar_points=(4, 32, 32), points_per_anchor=2,
                      cross_view_anchors=4, cross_view_points=8, num_hcab=3, num_hab=2),
}


def model_config(name: str) -> TPVConfig:
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown TPVFormer config {name!r}; choose one of {sorted(MODEL_CONFIGS)}")
    return dataclasses.replace(MODEL_CONFIGS[name])


# ------------------------------------------------------------------------------------------- image encoder


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: training batches are one frame of a few cameras on a CPU.
    return nn.GroupNorm(min(8, channels), channels)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a (projected) identity shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.norm1 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.norm2 = _norm(out_ch)
        self.shortcut = nn.Identity() if stride == 1 and in_ch == out_ch else nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), _norm(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class ResNetBackbone(nn.Module):
    """images (B, 3, H, W) -> feature maps at strides 8, 16, 32 with channels[1:]."""

    def __init__(self, channels: tuple[int, ...], blocks: tuple[int, ...]):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels[0], 7, 2, 3, bias=False), _norm(channels[0]), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        stages, in_ch = [], channels[0]
        for i, (ch, n) in enumerate(zip(channels, blocks)):
            layers = [BasicBlock(in_ch, ch, 1 if i == 0 else 2)] + [BasicBlock(ch, ch, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            in_ch = ch
        self.stages = nn.ModuleList(stages)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(images)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:
                outs.append(x)
        return outs


class FPN(nn.Module):
    """Feature pyramid: lateral 1x1 + top-down sum + 3x3; a 4th level by a stride-2 conv when asked."""

    def __init__(self, in_channels: tuple[int, ...], out_ch: int, num_levels: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_ch, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_ch, out_ch, 3, 1, 1) for _ in in_channels)
        self.extra = nn.Conv2d(out_ch, out_ch, 3, 2, 1) if num_levels > len(in_channels) else None

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.output, laterals)]
        if self.extra is not None:
            outs.append(self.extra(outs[-1]))
        return outs


# ------------------------------------------------------------------------------------------- TPV encoder


class PlanePositionalEmbedding(nn.Module):
    """Learned positional embedding of an A x B plane: row + column embeddings, (A*B, C)."""

    def __init__(self, rows: int, cols: int, dim: int):
        super().__init__()
        self.rows = nn.Parameter(torch.randn(rows, dim) * 0.02)
        self.cols = nn.Parameter(torch.randn(cols, dim) * 0.02)

    def forward(self) -> torch.Tensor:
        return (self.rows[:, None, :] + self.cols[None, :, :]).flatten(0, 1)


def _centres(n: int) -> torch.Tensor:
    """Normalised centres of n cells: (n,) in (0, 1)."""
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n


def plane_pillars(tpv_shape: tuple[int, int, int], pillar_points: tuple[int, int, int]) -> list[torch.Tensor]:
    """Normalised 3D reference points along each query's pillar, per plane.

    Returns [xy (X*Y, Nxy, 3), xz (X*Z, Nxz, 3), yz (Y*Z, Nyz, 3)], columns (x, y, z) in [0, 1]; the
    pillar runs along the plane's normal (z for xy, y for xz, x for yz).
    """
    X, Y, Z = tpv_shape
    n_xy, n_xz, n_yz = pillar_points
    x, y, z = _centres(X), _centres(Y), _centres(Z)
    xy = torch.stack(torch.meshgrid(x, y, _centres(n_xy), indexing="ij"), -1).reshape(X * Y, n_xy, 3)
    # xz queries: cell (i, k), points along y
    gx, gz, gy = torch.meshgrid(x, z, _centres(n_xz), indexing="ij")
    xz = torch.stack([gx, gy, gz], -1).reshape(X * Z, n_xz, 3)
    gy, gz, gx = torch.meshgrid(y, z, _centres(n_yz), indexing="ij")
    yz = torch.stack([gx, gy, gz], -1).reshape(Y * Z, n_yz, 3)
    return [xy, xz, yz]


def plane_locations(points: torch.Tensor) -> list[torch.Tensor]:
    """Normalised 3D points (..., 3) -> their grid_sample locations (..., 2) on planes xy, xz, yz.

    Plane xy is stored (X, Y): column = y, row = x; xz (X, Z): column = z, row = x; yz (Y, Z): column = z,
    row = y.
    """
    x, y, z = points.unbind(-1)
    return [torch.stack([y, x], -1), torch.stack([z, x], -1), torch.stack([z, y], -1)]


class ImageCrossAttention(nn.Module):
    """ICA: each plane's queries attend to the FPN maps of every camera their pillar projects into."""

    def __init__(self, cfg: TPVConfig):
        super().__init__()
        self.attn = nn.ModuleList(
            MSDeformAttention(cfg.embed_dim, cfg.num_heads, cfg.fpn_levels, n * cfg.points_per_anchor)
            for n in cfg.pillar_points)

    def forward(self, queries: list[torch.Tensor], pillars_m: list[torch.Tensor], cam_feats: torch.Tensor,
                spatial_shapes: list[tuple[int, int]], K: torch.Tensor, T_cam_base: torch.Tensor,
                cam_valid: torch.Tensor, image_size: tuple[int, int]) -> list[torch.Tensor]:
        """queries: 3 x (B, Qp, C) (positional embedding added); pillars_m: 3 x (Qp, Np, 3) metres in
        base_link; cam_feats (B, N, S, C) flattened FPN levels; K (B, N, 3, 3) and T_cam_base (B, N, 4, 4)
        at the model input size; cam_valid (B, N) bool. Returns 3 x (B, Qp, C)."""
        W, H = image_size
        B, N = cam_valid.shape
        L = len(spatial_shapes)
        outs = []
        for attn, query, pillar in zip(self.attn, queries, pillars_m):
            Qp, Np, _ = pillar.shape
            sums = torch.zeros_like(query)
            counts = query.new_zeros(B, Qp, 1)
            for b in range(B):
                for n in range(N):
                    if not bool(cam_valid[b, n]):
                        continue
                    cam_pts = pillar @ T_cam_base[b, n, :3, :3].T + T_cam_base[b, n, :3, 3]
                    depth = cam_pts[..., 2]
                    pix = (cam_pts / depth.clamp(min=1e-5)[..., None]) @ K[b, n].T
                    uv = torch.stack([pix[..., 0] / W, pix[..., 1] / H], -1)
                    inside = (depth > 0.1) & (uv >= 0).all(-1) & (uv <= 1).all(-1)
                    seen = inside.any(-1)
                    if not bool(seen.any()):
                        continue  # no point of any pillar reaches this camera
                    idx = seen.nonzero(as_tuple=True)[0]
                    # Points of a seen pillar that miss the image read zeros (placed far outside).
                    ref = torch.where(inside[idx, :, None], uv[idx], torch.full_like(uv[idx], -2.0))
                    ref = ref[None, :, None].expand(1, idx.numel(), L, Np, 2)
                    out = attn(query[b:b + 1, idx], cam_feats[b:b + 1, n], spatial_shapes, ref)[0]
                    sums[b].index_add_(0, idx, out)
                    counts[b].index_add_(0, idx, torch.ones_like(out[:, :1]))
            outs.append(sums / counts.clamp(min=1.0))
        return outs


class CrossViewHybridAttention(nn.Module):
    """CVHA: deformable self-attention of every plane's queries over all three planes (three levels)."""

    def __init__(self, cfg: TPVConfig):
        super().__init__()
        self.attn = nn.ModuleList(
            MSDeformAttention(cfg.embed_dim, cfg.num_heads, 3, cfg.cross_view_points) for _ in range(3))

    def forward(self, queries: list[torch.Tensor], pos: list[torch.Tensor], ref_points: list[torch.Tensor],
                plane_shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """queries 3 x (B, Qp, C); pos 3 x (Qp, C); ref_points 3 x (Qp, 3, A, 2). Returns 3 x (B, Qp, C)."""
        value = torch.cat(queries, dim=1)
        B = value.shape[0]
        return [attn(q + p, value, plane_shapes, r[None].expand(B, *r.shape))
                for attn, q, p, r in zip(self.attn, queries, pos, ref_points)]


class TPVBlock(nn.Module):
    """HCAB (with_image=True): CVHA -> norm -> ICA -> norm -> FFN -> norm. HAB: CVHA -> norm -> FFN -> norm."""

    def __init__(self, cfg: TPVConfig, with_image: bool):
        super().__init__()
        C = cfg.embed_dim
        self.cross_view = CrossViewHybridAttention(cfg)
        self.image = ImageCrossAttention(cfg) if with_image else None
        self.norm_cv = nn.LayerNorm(C)
        self.norm_img = nn.LayerNorm(C) if with_image else None
        self.ffn = nn.Sequential(nn.Linear(C, C * cfg.ffn_ratio), nn.ReLU(), nn.Linear(C * cfg.ffn_ratio, C))
        self.norm_ffn = nn.LayerNorm(C)

    def forward(self, queries: list[torch.Tensor], pos: list[torch.Tensor], ctx: dict) -> list[torch.Tensor]:
        cv = self.cross_view(queries, pos, ctx["cross_view_refs"], ctx["plane_shapes"])
        queries = [self.norm_cv(q + o) for q, o in zip(queries, cv)]
        if self.image is not None:
            img = self.image([q + p for q, p in zip(queries, pos)], ctx["pillars_m"], ctx["cam_feats"],
                             ctx["spatial_shapes"], ctx["K"], ctx["T_cam_base"], ctx["cam_valid"], ctx["image_size"])
            queries = [self.norm_img(q + o) for q, o in zip(queries, img)]
        return [self.norm_ffn(q + self.ffn(q)) for q in queries]


# ------------------------------------------------------------------------------------------- decoder


class TPVDecoder(nn.Module):
    """Sum of the three planes' features at a point -> Linear(C,2C) -> Softplus -> Linear(2C,C) -> classes."""

    def __init__(self, cfg: TPVConfig):
        super().__init__()
        C = cfg.embed_dim
        self.upsample = cfg.upsample
        self.mlp = nn.Sequential(nn.Linear(C, 2 * C), nn.Softplus(), nn.Linear(2 * C, C))
        self.classifier = nn.Linear(C, cfg.num_classes)

    def upsampled(self, planes: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.upsample == 1:
            return planes
        return [F.interpolate(p, scale_factor=self.upsample, mode="bilinear", align_corners=False) for p in planes]

    def point_logits(self, planes: list[torch.Tensor], points: torch.Tensor) -> torch.Tensor:
        """planes [xy (B,C,X,Y), xz (B,C,X,Z), yz (B,C,Y,Z)]; points (B, P, 3) normalised. -> (B, P, classes)."""
        feats = 0.0
        for plane, loc in zip(self.upsampled(planes), plane_locations(points)):
            grid = (2.0 * loc - 1.0)[:, :, None, :]  # (B, P, 1, 2)
            feats = feats + F.grid_sample(plane, grid, mode="bilinear", padding_mode="border",
                                          align_corners=False)[..., 0].transpose(1, 2)
        return self.classifier(self.mlp(feats))

    def voxel_logits(self, planes: list[torch.Tensor], x_chunk: int = 25) -> torch.Tensor:
        """Every voxel: (B, classes, X, Y, Z), computed in slabs of `x_chunk` along x to bound memory."""
        xy, xz, yz = self.upsampled(planes)
        X = xy.shape[2]
        slabs = []
        for x0 in range(0, X, x_chunk):
            # (B, C, x, Y, 1) + (B, C, x, 1, Z) + (B, C, 1, Y, Z) -> (B, x, Y, Z, C)
            feats = (xy[:, :, x0:x0 + x_chunk, :, None] + xz[:, :, x0:x0 + x_chunk, None, :] + yz[:, :, None])
            logits = self.classifier(self.mlp(feats.permute(0, 2, 3, 4, 1)))
            slabs.append(logits.permute(0, 4, 1, 2, 3))
        return torch.cat(slabs, dim=2)


# ------------------------------------------------------------------------------------------- the model


class TPVFormer(nn.Module):
    """images + calibration -> TPV planes -> logits at points or voxels.

    forward(images (B, N, 3, H, W) uint8 or float in [0, 1], K (B, N, 3, 3) at the model input size,
    T_cam_base (B, N, 4, 4) mapping base_link into each optical frame, cam_valid (B, N) bool)
    -> planes [xy (B, C, X, Y), xz (B, C, X, Z), yz (B, C, Y, Z)].
    """

    def __init__(self, cfg: TPVConfig):
        super().__init__()
        self.cfg = cfg
        X, Y, Z = cfg.tpv_shape
        C = cfg.embed_dim
        self.backbone = ResNetBackbone(cfg.backbone_channels, cfg.backbone_blocks)
        self.fpn = FPN(cfg.backbone_channels[1:], C, cfg.fpn_levels)
        self.level_embed = nn.Parameter(torch.randn(cfg.fpn_levels, C) * 0.02)
        self.plane_sizes = [(X, Y), (X, Z), (Y, Z)]
        self.queries = nn.ParameterList(nn.Parameter(torch.randn(a * b, C) * 0.02) for a, b in self.plane_sizes)
        self.pos = nn.ModuleList(PlanePositionalEmbedding(a, b, C) for a, b in self.plane_sizes)
        self.blocks = nn.ModuleList([TPVBlock(cfg, True) for _ in range(cfg.num_hcab)]
                                    + [TPVBlock(cfg, False) for _ in range(cfg.num_hab)])
        self.decoder = TPVDecoder(cfg)
        lower, upper = torch.tensor(cfg.grid_lower), torch.tensor(cfg.grid_upper)
        self.register_buffer("grid_lower", lower, persistent=False)
        self.register_buffer("grid_extent", upper - lower, persistent=False)
        for i, pillar in enumerate(plane_pillars(cfg.tpv_shape, cfg.pillar_points)):
            self.register_buffer(f"pillar_{i}", pillar, persistent=False)
        for i, ref in enumerate(self._cross_view_refs()):
            self.register_buffer(f"cross_view_ref_{i}", ref, persistent=False)
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _cross_view_refs(self) -> list[torch.Tensor]:
        """Per plane (Qp, 3 planes, A, 2): the query's pillar (A points) projected onto each plane."""
        A = self.cfg.cross_view_anchors
        refs = []
        for pillar in plane_pillars(self.cfg.tpv_shape, (A, A, A)):
            refs.append(torch.stack(plane_locations(pillar), dim=1))  # (Qp, 3, A, 2)
        return refs

    def pillars_metric(self) -> list[torch.Tensor]:
        return [getattr(self, f"pillar_{i}") * self.grid_extent + self.grid_lower for i in range(3)]

    def normalise_points(self, points_m: torch.Tensor) -> torch.Tensor:
        """Metric base_link points (..., 3) -> normalised grid coordinates (..., 3)."""
        return (points_m - self.grid_lower) / self.grid_extent

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """images (B, N, 3, H, W) -> flattened FPN features (B, N, S, C) and the level shapes."""
        B, N = images.shape[:2]
        x = images.flatten(0, 1)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = (x - self.image_mean) / self.image_std
        levels = self.fpn(self.backbone(x))
        shapes = [tuple(f.shape[-2:]) for f in levels]
        flat = torch.cat([f.flatten(2).transpose(1, 2) + self.level_embed[i] for i, f in enumerate(levels)], dim=1)
        return flat.view(B, N, flat.shape[1], -1), shapes

    def forward(self, images: torch.Tensor, K: torch.Tensor, T_cam_base: torch.Tensor,
                cam_valid: torch.Tensor | None = None) -> list[torch.Tensor]:
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"TPVFormer: images must be (B, N, 3, H, W), got {tuple(images.shape)}")
        B, N, _, H, W = images.shape
        if (W, H) != tuple(self.cfg.image_size):
            raise ValueError(f"TPVFormer: images are {W}x{H}, model input is {self.cfg.image_size[0]}x"
                             f"{self.cfg.image_size[1]} (resize and scale K first)")
        if K.shape != (B, N, 3, 3) or T_cam_base.shape != (B, N, 4, 4):
            raise ValueError(f"TPVFormer: K {tuple(K.shape)} / T_cam_base {tuple(T_cam_base.shape)} must be "
                             f"({B}, {N}, 3, 3) / ({B}, {N}, 4, 4)")
        if cam_valid is None:
            cam_valid = torch.ones(B, N, dtype=torch.bool, device=images.device)
        cam_feats, spatial_shapes = self.encode_images(images)
        ctx = {"cam_feats": cam_feats, "spatial_shapes": spatial_shapes, "K": K.float(),
               "T_cam_base": T_cam_base.float(), "cam_valid": cam_valid, "image_size": (W, H),
               "pillars_m": self.pillars_metric(), "plane_shapes": self.plane_sizes,
               "cross_view_refs": [getattr(self, f"cross_view_ref_{i}") for i in range(3)]}
        pos = [p() for p in self.pos]
        queries = [q[None].expand(B, -1, -1) for q in self.queries]
        for block in self.blocks:
            queries = block(queries, pos, ctx)
        return [q.transpose(1, 2).reshape(B, -1, a, b) for q, (a, b) in zip(queries, self.plane_sizes)]


# ------------------------------------------------------------------------------------------- loss


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors (Berman et al. 2018)."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor, ignore: int = IGNORE_LABEL) -> torch.Tensor:
    """Lovasz-softmax over classes present in `labels`. probs (P, classes); labels (P,) long."""
    keep = labels != ignore
    probs, labels = probs[keep], labels[keep]
    if probs.numel() == 0:
        return probs.sum() * 0.0
    losses = []
    for c in labels.unique():
        fg = (labels == c).float()
        errors = (fg - probs[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, lovasz_grad(fg[perm])))
    return torch.stack(losses).mean()


def occupancy_loss(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None,
                   lovasz_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """CE + Lovasz-softmax. logits (P, classes); labels (P,) long with IGNORE_LABEL for unlabelled."""
    ce = F.cross_entropy(logits, labels, weight=class_weights, ignore_index=IGNORE_LABEL)
    lovasz = lovasz_softmax(logits.softmax(-1), labels)
    total = ce + lovasz_weight * lovasz
    return total, {"ce": float(ce.detach()), "lovasz": float(lovasz.detach())}
