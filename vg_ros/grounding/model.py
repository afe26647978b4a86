"""VG-LAW (Su et al., CVPR 2023): a ViT whose attention weights are generated from the referring expression.

Parts, as in the paper and its notes (../shared/papers/README.md, "VG-LAW"):

* `LanguageWeightGenerator`: per visual layer i a learnable query e_i attends over the token features in
  G groups (softmax of dot products) -> h0_i (d_l); h1_i = GELU(W1_i h0_i) (d_l / r); Phi_i(h1_i) is a
  d_w x d_w matrix (Phi zero-initialised, so training starts from the plain backbone).
* `LAWBlock`: a pre-norm ViT block whose q/k/v projection is [W_q, W_k, W_v]_i = W0_i + P Phi(h1_i) Q^T,
  P (3C, d_w) and Q (C, d_w) shared by all blocks. No cross-modal fusion module.
* `BoxHead`: language-adaptive pooling (attention over visual tokens, the [CLS] feature as query, both
  projected to k dims) -> 3-layer MLP -> sigmoid (cx, cy, w, h), normalised to the input size.
* `MaskHead`: two stride-2 transposed convs (1/16 -> 1/4), per-pixel dot product with the (projected)
  [CLS] feature, bilinear x4 to the input size; sigmoid and threshold 0.35 at inference.
* Losses: L1 + GIoU (1, 1) on boxes, focal + Dice (4, 4) on masks.

Per-command caching: `generate(text_feats, valid)` gives `LanguageWeights`; `merge()` folds them into
one plain (3C, C) matrix per block and the [CLS] kernel into the mask head's last linear layers, so each
frame is an ordinary ViT forward (`forward_visual`).

Scaled-down choice (said in the model card): the mask head's per-pixel features have `mask_dim` channels
and the [CLS] feature is linearly projected to `mask_dim` before the dot product (the paper uses d_l).
Aids for training from scratch on a CPU, in `tiny` only (`base` is the paper's): a convolutional stem
(`ConvStem`), the box centre anchored at the pooling's centre of mass, the mask head's skip joins from
the stem's 1/8 and 1/4 maps (`mask_skip`), and a point-wise refinement of the mask logits at 1/2 resolution
(`mask_refine`, `MaskRefiner`). Not in the paper, optional: `PresenceHead`, P(the command's referent is in
the image), on detached inputs, for "not found".
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MASK_THRESHOLD = 0.35
STEMS = ("patch", "conv")


@dataclass(frozen=True)
class VGLAWSpec:
    """Architecture of one VG-LAW network. Input images are (3, img_h, img_w); patch must divide both."""

    img_h: int = 176
    img_w: int = 320
    patch: int = 16
    width: int = 96
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    text_dim: int = 384
    groups: int = 8        # G of the grouped token attention
    reduction: int = 16    # r: h1 has text_dim / r features
    d_w: int = 32          # Phi(h1) is d_w x d_w
    lap_dim: int = 64      # k of language-adaptive pooling
    mask_dim: int = 64     # channels of the mask head's per-pixel features
    stem: str = "patch"    # "patch": one patch x patch projection (ViT); "conv": early 3x3 convolutions
    box_reference: bool = False  # box centre as an offset from the pooling's centre of mass (BoxHead)
    mask_skip: bool = False  # mask head also reads the conv stem's 1/8 and 1/4 feature maps (MaskHead)
    mask_refine: bool = False  # mask logits refined at 1/2 resolution from the stem's 1/2 map (MaskRefiner)
    presence_head: bool = False  # P(the referent is in the image), for "not found" (PresenceHead; not in the paper)

    def __post_init__(self) -> None:
        for name in ("img_h", "img_w", "patch", "width", "depth", "heads", "text_dim", "groups",
                     "reduction", "d_w", "lap_dim", "mask_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"VGLAWSpec.{name} = {getattr(self, name)}: must be positive")
        if self.img_h % self.patch or self.img_w % self.patch:
            raise ValueError(f"VGLAWSpec: patch {self.patch} must divide img_h {self.img_h} and img_w {self.img_w}")
        if self.width % self.heads:
            raise ValueError(f"VGLAWSpec: width {self.width} not divisible by heads {self.heads}")
        if self.text_dim % self.groups:
            raise ValueError(f"VGLAWSpec: text_dim {self.text_dim} not divisible by groups {self.groups}")
        if self.text_dim // self.reduction < 1:
            raise ValueError(f"VGLAWSpec: reduction {self.reduction} too large for text_dim {self.text_dim}")
        if self.stem not in STEMS:
            raise ValueError(f"VGLAWSpec.stem = {self.stem!r}: choose one of {STEMS}")
        if self.stem == "conv" and self.patch & (self.patch - 1):
            raise ValueError(f"VGLAWSpec: the conv stem needs a power-of-two patch, got {self.patch}")
        if self.mask_skip and (self.stem != "conv" or self.patch < 16):
            raise ValueError("VGLAWSpec.mask_skip reads the conv stem's 1/8 and 1/4 maps: "
                             "needs stem 'conv', patch >= 16")
        if self.mask_refine and self.stem != "conv":
            raise ValueError("VGLAWSpec.mask_refine reads the conv stem's 1/2 map: needs stem 'conv'")

    @property
    def grid(self) -> tuple[int, int]:
        return self.img_h // self.patch, self.img_w // self.patch

    def to_dict(self) -> dict:
        return asdict(self)


# `tiny`: CPU-trainable. `base`: ViT-B at 448 x 448 as in the paper.
SPECS: dict[str, VGLAWSpec] = {
    "tiny": VGLAWSpec(stem="conv", box_reference=True, mask_skip=True, mask_refine=True),
    "base": VGLAWSpec(img_h=448, img_w=448, patch=16, width=768, depth=12, heads=12, groups=8, lap_dim=256,
                      mask_dim=256),
}


def spec_by_name(name: str, **overrides) -> VGLAWSpec:
    if name not in SPECS:
        raise ValueError(f"model config {name!r}: choose one of {sorted(SPECS)}")
    values = SPECS[name].to_dict()
    values.update(overrides)
    return VGLAWSpec(**values)


class ConvStem(nn.Module):
    """Early convolutions in place of the single patch projection (Xiao et al., NeurIPS 2021, "Early
    convolutions help transformers see better"): log2(patch) 3x3 stride-2 conv + BatchNorm + ReLU layers,
    then a 1x1 projection to the ViT width. Same token grid (1/patch) as the patch projection; a ViT
    trained from scratch on a few thousand images converges much faster with it."""

    def __init__(self, width: int, patch: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for i in range(int(math.log2(patch))):
            out_ch = min(width, 24 * 2 ** i)
            layers += [nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                       nn.ReLU(inplace=True)]
            in_ch = out_ch
        layers.append(nn.Conv2d(in_ch, width, 1))
        # channels-last: oneDNN's convolutions run about 1.4x faster on CPU in training, 2x at inference
        # with the BatchNorms folded (`fuse_for_inference`); the output is the same tensor either way
        self.layers = nn.Sequential(*layers).to(memory_format=torch.channels_last)
        self.fused = False

    def forward(self, images: torch.Tensor, skips: tuple[int, ...] = ()) -> torch.Tensor | tuple:
        """(B, 3, H, W) normalised -> (B, width, H / patch, W / patch) in channels-last memory (so
        `.permute(0, 2, 3, 1)` is a free view); with `skips` (strides, e.g. (8, 4)) also {stride: the stem's
        activation at 1/stride, channels-last} for the mask head. The final 1x1 projection runs as a matrix
        product over the channels (oneDNN has no fast path for it here)."""
        x = images.contiguous(memory_format=torch.channels_last)
        *convs, project = self.layers
        maps, stride = {}, 1
        for layer in convs:
            x = layer(x)
            if isinstance(layer, nn.Conv2d) and layer.stride[0] == 2:
                stride *= 2
            elif isinstance(layer, nn.ReLU) and stride in skips:
                maps[stride] = x
        x = _pointwise(x.permute(0, 2, 3, 1), project).permute(0, 3, 1, 2)
        return (x, maps) if skips else x

    def channels(self, stride: int) -> int:
        """Channels of the activation at 1/stride."""
        convs = [m for m in self.layers if isinstance(m, nn.Conv2d) and m.stride[0] == 2]
        return convs[int(math.log2(stride)) - 1].out_channels

    @torch.no_grad()
    def fuse_for_inference(self) -> None:
        """Fold every BatchNorm into the convolution before it (its running statistics: eval only). The
        state dict loses the BatchNorm keys, so a fused stem is for inference, never for saving or training."""
        if self.fused:
            return
        from torch.nn.utils.fusion import fuse_conv_bn_eval
        mods, out = list(self.layers), []
        while mods:
            mod = mods.pop(0)
            if isinstance(mod, nn.Conv2d) and mods and isinstance(mods[0], nn.BatchNorm2d):
                mod = fuse_conv_bn_eval(mod.eval(), mods.pop(0).eval())
            out.append(mod)
        self.layers = nn.Sequential(*out).to(memory_format=torch.channels_last)
        self.fused = True

    def train(self, mode: bool = True) -> "ConvStem":
        if mode and self.fused:
            raise RuntimeError("ConvStem: the BatchNorms were folded for inference; load a fresh model to train")
        return super().train(mode)


@dataclass
class LanguageWeights:
    """What an expression contributes. `phi` (B, depth, d_w, d_w); `cls` (B, text_dim) the [CLS] feature;
    only after `VGLAW.merge` for one command (B = 1): `merged` (depth tensors of (3C, C)) and `head` (the
    mask head's `command_tensors`)."""

    phi: torch.Tensor
    cls: torch.Tensor
    merged: list[torch.Tensor] | None = field(default=None)
    head: dict[str, torch.Tensor] | None = field(default=None)


class LanguageWeightGenerator(nn.Module):
    """Grouped token attention per layer -> h1_i -> Phi_i(h1_i) (d_w x d_w), Phi zero-initialised."""

    def __init__(self, spec: VGLAWSpec) -> None:
        super().__init__()
        self.spec = spec
        d_l, d_h = spec.text_dim, spec.text_dim // spec.reduction
        self.layer_queries = nn.Parameter(torch.randn(spec.depth, d_l) * 0.02)  # e_i
        self.reduce = nn.ModuleList(nn.Linear(d_l, d_h) for _ in range(spec.depth))  # W1_i
        self.phi = nn.ModuleList(nn.Linear(d_h, spec.d_w * spec.d_w) for _ in range(spec.depth))
        self.reset_phi()

    def reset_phi(self) -> None:
        for layer in self.phi:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, text_feats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """text_feats (B, L, d_l), valid (B, L) bool -> Phi matrices (B, depth, d_w, d_w)."""
        B, L, d_l = text_feats.shape
        G = self.spec.groups
        tokens = text_feats.view(B, L, G, d_l // G)                           # F_l^g
        queries = self.layer_queries.view(self.spec.depth, G, d_l // G)       # e_i^g
        logits = torch.einsum("blgc,dgc->bdgl", tokens, queries) / math.sqrt(d_l // G)
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        alpha = logits.softmax(dim=-1)                                        # (B, depth, G, L)
        h0 = torch.einsum("bdgl,blgc->bdgc", alpha, tokens).reshape(B, self.spec.depth, d_l)
        phis = []
        for i in range(self.spec.depth):
            h1 = F.gelu(self.reduce[i](h0[:, i]))
            phis.append(self.phi[i](h1).view(B, self.spec.d_w, self.spec.d_w))
        return torch.stack(phis, dim=1)


class LAWAttention(nn.Module):
    """Multi-head self-attention with qkv weight W0 + P Phi Q^T (P, Q passed in: shared across blocks)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # W0_i and its bias
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, phi: torch.Tensor | None, P: torch.Tensor, Q: torch.Tensor,
                merged: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C); phi (B, d_w, d_w) or None (plain W0); merged (3C, C) replaces W0 + P phi Q^T."""
        B, N, C = x.shape
        if merged is not None:
            qkv = F.linear(x, merged, self.qkv.bias)
        else:
            qkv = self.qkv(x)
            if phi is not None:  # x (P phi Q^T)^T = ((x Q) phi^T) P^T, without forming per-sample matrices
                qkv = qkv + torch.bmm(x @ Q, phi.transpose(1, 2)) @ P.t()
        qkv = qkv.view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(attn.transpose(1, 2).reshape(B, N, C))


class LAWBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = LAWAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x, phi, P, Q, merged=None):
        x = x + self.attn(self.norm1(x), phi, P, Q, merged)
        return x + self.mlp(self.norm2(x))


class BoxHead(nn.Module):
    """Language-adaptive pooling + 3-layer MLP -> (B, 4) sigmoid (cx, cy, w, h); also the pooling map.

    `anchored` (a convergence aid, not in the paper): the MLP's first two outputs are offsets, in logit
    space, from the pooling's centre of mass over the token grid, as reference points do for DETR-style
    heads (Deformable / DAB-DETR). Plain regression of the centre from a pooled feature took hundreds of
    passes over even 64 training samples; anchored, the box follows wherever the pooling attends."""

    def __init__(self, width: int, text_dim: int, lap_dim: int, grid: tuple[int, int] = (1, 1),
                 anchored: bool = False) -> None:
        super().__init__()
        self.anchored = anchored
        self.visual_key = nn.Linear(width, lap_dim)
        self.text_query = nn.Linear(text_dim, lap_dim)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 4))
        gh, gw = grid
        rows, cols = torch.meshgrid((torch.arange(gh) + 0.5) / gh, (torch.arange(gw) + 0.5) / gw, indexing="ij")
        self.register_buffer("token_centres", torch.stack([cols.flatten(), rows.flatten()], 1), persistent=False)

    def reset_pooling(self) -> None:
        """Unit-variance projections, so the pooling logits start O(1): with the ViT's std-0.02 init they
        start near 0, the attention stays uniform (mean pooling) and the box never leaves the mean box."""
        for layer in (self.visual_key, self.text_query):
            nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
            nn.init.zeros_(layer.bias)

    def pool(self, visual: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The language-adaptive pooling: visual (B, N, C), cls (B, d_l) -> attention (B, N), pooled (B, C)."""
        keys = self.visual_key(visual)
        query = self.text_query(cls)
        attention = torch.einsum("bnk,bk->bn", keys, query).div(math.sqrt(keys.shape[-1])).softmax(dim=-1)
        return attention, torch.einsum("bn,bnc->bc", attention, visual)

    def forward(self, visual: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """visual (B, N, C), cls (B, d_l) -> boxes (B, 4), attention (B, N)."""
        attention, pooled = self.pool(visual, cls)
        return self.regress(attention, pooled), attention

    def regress(self, attention: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The box (B, 4) from the pooling's `attention` (B, N) and `pooled` feature (B, C)."""
        raw = self.mlp(pooled)
        if not self.anchored:
            return raw.sigmoid()
        if attention.shape[1] != self.token_centres.shape[0]:
            raise ValueError(f"BoxHead: {attention.shape[1]} tokens, but the grid has {self.token_centres.shape[0]}")
        reference = attention @ self.token_centres                                   # (B, 2) in (0, 1)
        centre = (torch.logit(reference, eps=1e-4) + raw[:, :2]).sigmoid()
        return torch.cat([centre, raw[:, 2:].sigmoid()], dim=1)


class PresenceHead(nn.Module):
    """P(the command's referent is in the image), from what the network already computed: not in the paper.

    The mask head always paints something, and its mean probability (the pipeline's `score`) stays high for
    a command about an object the image does not show: it paints the nearest look-alike. This head reads the
    box head's language-adaptive pooling (where the command looks, and what it finds there), the [CLS]
    feature, the best match of any visual token with the command (a per-token score, its max and soft max),
    and statistics of the mask logits and the pooling attention (`presence_stats`), and is trained
    with a binary cross-entropy on whether the referent is present (`train --presence-only`: commands about
    absent objects and commands with their relation turned around are the negatives). Its inputs are
    detached: it never changes the network's masks or boxes."""

    STATS = 6

    def __init__(self, width: int, text_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.text = nn.Linear(text_dim, width)
        self.norm = nn.LayerNorm(width)
        # every token scored against the command: is anything in the image what the command names?
        self.token_text = nn.Linear(text_dim, width)
        self.token_norm = nn.LayerNorm(width)
        self.token_score = nn.Linear(width, 1)
        self.mlp = nn.Sequential(nn.Linear(3 * width + self.STATS + 2, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, pooled: torch.Tensor, cls: torch.Tensor, stats: torch.Tensor,
                tokens: torch.Tensor) -> torch.Tensor:
        """pooled (B, C), cls (B, d_l), stats (B, STATS), tokens (B, N, C) the final visual tokens -> logits (B,)."""
        visual, text = self.norm(pooled), self.text(cls)
        match = self.token_score(F.gelu(self.token_norm(tokens) * self.token_text(cls)[:, None]))[..., 0]   # (B, N)
        best = torch.stack([match.max(1).values, torch.logsumexp(match, 1) - math.log(match.shape[1])], dim=1)
        return self.mlp(torch.cat([visual, text, visual * text, stats, best], dim=1))[:, 0]


def presence_stats(mask_logits: torch.Tensor, attention: torch.Tensor,
                   threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """(B, PresenceHead.STATS) from mask logits (B, H, W) and the pooling attention (B, N): the peak mask
    probability, the mean probability over the pixels above `threshold`, log of their share of the image,
    log of the mean probability (soft area), the attention's peak and its normalised entropy."""
    prob = mask_logits.flatten(1).float().sigmoid()
    above = (prob > threshold).float()
    count = above.sum(1)
    inside_mean = (prob * above).sum(1) / count.clamp(min=1)
    entropy = -(attention * attention.clamp(min=1e-9).log()).sum(1) / math.log(attention.shape[1])
    return torch.stack([prob.max(1).values, inside_mean, torch.log(count / prob.shape[1] + 1e-4),
                        torch.log(prob.mean(1) + 1e-4), attention.max(1).values, entropy], dim=1)


class MaskHead(nn.Module):
    """(B, h, w, C) at 1/16 -> two stride-2 transposed convs -> (B, 4h, 4w, mask_dim) . cls -> logits
    (B, 16h, 16w) after bilinear x4 (input resolution). Channels-last throughout.

    `skip_channels` (c8, c4): the conv stem's 1/8 and 1/4 maps join the two upsampling stages (U-Net
    style; language-free edges and colours at the resolution the mask is read at). Both joins are
    zero-initialised, so a head with them starts as the plain head (and loads its weights unchanged).
    `refine_channels` (c2): the logits are also refined at 1/2 from the stem's 1/2 map (`MaskRefiner`).

    What does not depend on the frame (the projected [CLS] kernel and its products with the layers after
    the last nonlinearity) comes from `command_tensors`, computed once per command by `VGLAW.merge`."""

    def __init__(self, width: int, text_dim: int, mask_dim: int, skip_channels: tuple[int, int] | None = None,
                 refine_channels: int = 0) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2)
        self.norm = nn.GroupNorm(1, width // 2)
        self.up2 = nn.ConvTranspose2d(width // 2, mask_dim, kernel_size=2, stride=2)
        self.text_proj = nn.Linear(text_dim, mask_dim)
        self.skip8 = self.skip4 = None
        if skip_channels is not None:
            c8, c4 = skip_channels
            self.skip8 = nn.Conv2d(c8, width // 2, 1)
            self.skip4 = nn.Sequential(nn.Conv2d(c4 + mask_dim, mask_dim, 1), nn.GroupNorm(1, mask_dim), nn.GELU(),
                                       nn.Conv2d(mask_dim, mask_dim, 1))
            for conv in (self.skip8, self.skip4[-1]):
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
        self.refine = MaskRefiner(refine_channels, text_dim) if refine_channels else None

    def command_tensors(self, cls: torch.Tensor) -> dict[str, torch.Tensor]:
        """The head's frame-independent tensors for the [CLS] features cls (B, d_l).

        The 1/4 pixels are up2(eighth) (+ skip4's residual last(hidden)); the logits are their dot product
        with the kernel k = text_proj(cls) / sqrt(D). up2 and skip4's last conv are linear, so k folds into
        them: "up2" (B, C/2, 4) gives each 1/8 pixel's four 1/4 logits, "up2_bias" (B,); "out" (B, D) and
        "out_bias" (B,) dot with skip4's hidden features. skip4's first conv reads [up2(eighth), skip]: its
        up2 half folds into up2 ("join_up2" (C/2, 4D) in (i, j, channel) order, "join_bias" (D,)), so up2's
        own 1/4 output is never formed. "refine" (B, HIDDEN): the refiner's kernel."""
        kernel = self.text_proj(cls) / math.sqrt(self.up2.out_channels)                  # (B, D)
        up2 = self.up2.weight.permute(0, 2, 3, 1)                                         # (C/2, 2, 2, D)
        tensors = {"up2": torch.einsum("cijd,bd->bcij", up2, kernel).flatten(2), "up2_bias": kernel @ self.up2.bias}
        if self.skip4 is not None:
            join, _, _, last = self.skip4
            join_up2 = join.weight.flatten(1)[:, :self.up2.out_channels]                  # (D, D)
            tensors.update(out=kernel @ last.weight.flatten(1), out_bias=kernel @ last.bias,
                           join_up2=(up2 @ join_up2.t()).flatten(1), join_bias=join_up2 @ self.up2.bias + join.bias)
        if self.refine is not None:
            tensors["refine"] = self.refine.text_proj(cls)
        return tensors

    def forward(self, fmap: torch.Tensor, command: dict[str, torch.Tensor], out_hw: tuple[int, int],
                skips: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """fmap (B, h, w, C) channels last, `command` from `command_tensors` (batch B or 1), skips {8: (B, 2h,
        2w, c8), 4: (B, 4h, 4w, c4), 2: (B, 8h, 8w, c2)} channels last -> mask logits (B, *out_hw). Every 1x1
        convolution is one matrix product over the last axis."""
        x = _upsample2(fmap, self.up1)
        if self.skip8 is not None:
            x = x + _pointwise(skips[8], self.skip8)
        eighth = F.gelu(_norm_channels_last(self.norm, x))                            # (B, H/8, W/8, C/2)
        B, h, w, c = eighth.shape
        quarter = _shuffle2((eighth.reshape(B, h * w, c) @ command["up2"]).view(B, h, w, 4, 1))[..., 0]
        quarter = quarter + command["up2_bias"][:, None, None]                        # (B, H/4, W/4)
        if self.skip4 is not None:
            join, norm, _, _ = self.skip4
            # join([up2(eighth), skip]) = skip . W_skip^T + join_bias + eighth . join_up2, the last shuffled to 1/4
            from_skip = F.linear(skips[4].to(eighth.dtype), join.weight.flatten(1)[:, self.up2.out_channels:],
                                 command["join_bias"])
            joined = from_skip + _shuffle2((eighth @ command["join_up2"]).view(B, h, w, 4, -1))
            hidden = F.gelu(_norm_channels_last(norm, joined))
            quarter = quarter + _dot(hidden, command["out"]) + command["out_bias"][:, None, None]
        logits = F.interpolate(quarter[:, None], size=out_hw, mode="bilinear", align_corners=False)[:, 0]
        if self.refine is not None:
            logits = self.refine(quarter, skips[2], command["refine"], logits)
        return logits


class MaskRefiner(nn.Module):
    """Point-wise refinement of the mask logits at 1/2 resolution (PointRend's idea, Kirillov et al., CVPR
    2020: predict finer only where the coarse mask may be, from fine features and the coarse prediction).

    Why: the head's logits live at 1/4 of the input (a 6 x 6 pixel cell of the 480x270 camera image at
    320x176), and even a perfect 1/4 map, bilinearly upsampled, caps mask mIoU at 79.8 % on the dev seeds
    (targets under 200 px: 72 % reach IoU 0.5); a perfect 1/2 map caps it at 92.2 %.

    At the 1/2 pixels where the coarse logit, bilinearly upsampled, exceeds `GATE_LOGIT` (the target's
    surroundings; elsewhere nothing changes): features = [the stem's 1/2 activation, the coarse logit] ->
    2-layer MLP (`HIDDEN`, GELU) -> dot product with a kernel projected from the [CLS] feature (per
    command, as the head's own kernel) -> a logit correction, bilinearly upsampled to the output and added.
    Only the gated pixels are computed, in training and at inference alike. The kernel projection is
    zero-initialised: a network grown with the refiner (`VGLAW.grown_from`) computes exactly what it did."""

    HIDDEN = 32
    GATE_LOGIT = -4.0     # sigmoid 0.018: pixels the coarse mask leaves clearly out stay out
    COARSE_SCALE = 5.0    # the coarse logit enters the MLP clamped to +-10 and divided by this

    def __init__(self, channels: int, text_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels + 1, self.HIDDEN), nn.GELU(),
                                 nn.Linear(self.HIDDEN, self.HIDDEN), nn.GELU())
        self.text_proj = nn.Linear(text_dim, self.HIDDEN)
        self.reset_kernel()

    def reset_kernel(self) -> None:
        """Zero the kernel projection: no correction until training moves it."""
        nn.init.zeros_(self.text_proj.weight)
        nn.init.zeros_(self.text_proj.bias)

    def forward(self, quarter: torch.Tensor, fine: torch.Tensor, kernel: torch.Tensor,
                logits: torch.Tensor) -> torch.Tensor:
        """quarter (B, h, w) coarse logits at 1/4, fine (B, 2h, 2w, c) the stem's 1/2 map channels-last,
        kernel (B or 1, HIDDEN) `text_proj` of the [CLS] feature, logits (B, 4h, 4w) the coarse logits at the
        input size -> the refined logits.

        Computed in the window of 1/4 cells around every cell above the gate (2 cells of margin, the union
        over the batch): outside it every coarse cell is <= GATE_LOGIT, so no 1/2 pixel is gated there and
        the correction (zero there) upsamples to zero; inside it the bilinear x2 steps see the same cells as
        over the whole map. Same numbers as computing everything everywhere, for the window's cost.
        Without autograd (inference) `logits` is updated in place and returned."""
        B, h, w = quarter.shape
        if fine.shape[1:3] != (2 * h, 2 * w) or logits.shape[-2:] != (4 * h, 4 * w):
            raise ValueError(f"MaskRefiner: fine {tuple(fine.shape)} and logits {tuple(logits.shape)} must be 2x "
                             f"and 4x the coarse map {tuple(quarter.shape)}")
        above = (quarter > self.GATE_LOGIT).any(dim=0).cpu().numpy()     # (h, w): a few thousand cells
        rows, cols = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
        if not len(rows):
            return logits
        r0, r1 = max(int(rows[0]) - 2, 0), min(int(rows[-1]) + 3, h)
        c0, c1 = max(int(cols[0]) - 2, 0), min(int(cols[-1]) + 3, w)
        coarse = F.interpolate(quarter[:, None, r0:r1, c0:c1], scale_factor=2, mode="bilinear",
                               align_corners=False)[:, 0]                                  # (B, 2h', 2w')
        gate = coarse > self.GATE_LOGIT
        coarse_in = coarse[gate].clamp(-10.0, 10.0)[:, None] / self.COARSE_SCALE
        window = fine[:, 2 * r0:2 * r1, 2 * c0:2 * c1][gate].to(coarse.dtype)
        hidden = self.mlp(torch.cat([window, coarse_in], dim=-1))                         # (n, HIDDEN)
        # one kernel (one command, as in the pipeline): a matrix-vector product; else each pixel uses its image's
        values = hidden @ kernel[0] if len(kernel) == 1 else (hidden * kernel[gate.nonzero()[:, 0]]).sum(-1)
        delta = coarse.new_zeros(coarse.shape).masked_scatter(gate, values)
        delta = F.interpolate(delta[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
        logits = logits.clone() if torch.is_grad_enabled() else logits    # in place when nothing needs the input
        logits[:, 4 * r0:4 * r1, 4 * c0:4 * c1] += delta
        return logits


def _pointwise(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 convolution `conv` applied to channels-last x (B, H, W, C_in) -> (B, H, W, C_out)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def _norm_channels_last(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm` on channels-last x (B, H, W, C): as an NCHW view in channels-last memory, which PyTorch's
    channels-last GroupNorm kernel reads without a copy (4x faster than normalising and scaling here)."""
    return norm(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def _dot(pixels: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-pixel dot product of channels-last pixels (B, H, W, D) with one kernel (B, D) per image -> (B, H, W)."""
    B, H, W, D = pixels.shape
    return (pixels.reshape(B, H * W, D) @ kernel[:, :, None]).view(B, H, W)


def _upsample2(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """`conv` (a kernel-2, stride-2 transposed convolution) on channels-last x (B, H, W, C_in) -> (B, 2H,
    2W, C_out), computed as one matrix product (each input pixel's 2x2 output block): the same numbers
    (`test_mask_head_matches_its_modules`), faster on CPU than oneDNN's transposed convolution here."""
    B, H, W, C = x.shape
    out = conv.weight.shape[1]
    weight = conv.weight.permute(0, 2, 3, 1).reshape(C, 4 * out)                      # (C_in, (i, j, C_out))
    return _shuffle2(F.linear(x, weight.t(), conv.bias.repeat(4)).view(B, H, W, 4, out))


def _shuffle2(blocks: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 4, C), each pixel's 2x2 output block in (i, j) order -> (B, 2H, 2W, C): pixel (2y + i, 2x + j)."""
    B, H, W, _, C = blocks.shape
    return blocks.view(B, H, W, 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(B, 2 * H, 2 * W, C)


class VGLAW(nn.Module):
    """The grounding network. Text features come from `TextEncoder` (frozen or not; outside this module)."""

    def __init__(self, spec: VGLAWSpec) -> None:
        super().__init__()
        self.spec = spec
        C = spec.width
        gh, gw = spec.grid
        self.patch_embed = (ConvStem(C, spec.patch) if spec.stem == "conv"
                            else nn.Conv2d(3, C, kernel_size=spec.patch, stride=spec.patch))
        self.pos_embed = nn.Parameter(torch.randn(1, gh * gw, C) * 0.02)
        self.weight_generator = LanguageWeightGenerator(spec)
        self.P = nn.Parameter(torch.randn(3 * C, spec.d_w) / math.sqrt(spec.d_w))
        self.Q = nn.Parameter(torch.randn(C, spec.d_w) / math.sqrt(C))
        self.blocks = nn.ModuleList(LAWBlock(C, spec.heads, spec.mlp_ratio) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(C)
        self.box_head = BoxHead(C, spec.text_dim, spec.lap_dim, spec.grid, anchored=spec.box_reference)
        skip_channels = ((self.patch_embed.channels(8), self.patch_embed.channels(4)) if spec.mask_skip else None)
        refine_channels = self.patch_embed.channels(2) if spec.mask_refine else 0
        self.mask_head = MaskHead(C, spec.text_dim, spec.mask_dim, skip_channels, refine_channels)
        self.presence = PresenceHead(C, spec.text_dim) if spec.presence_head else None
        self.register_buffer("pixel_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.apply(self._init)
        self.weight_generator.reset_phi()
        self.box_head.reset_pooling()
        if self.mask_head.refine is not None:
            self.mask_head.refine.reset_kernel()

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @classmethod
    def grown_from(cls, model: "VGLAW", spec: VGLAWSpec) -> "VGLAW":
        """A `spec` network carrying `model`'s weights, where `spec` only adds ViT blocks (a larger `depth`),
        the mask head's skip joins (`mask_skip`), its refiner (`mask_refine`) and/or the presence head
        (`presence_head`). Added blocks go after the existing ones, each with its attention output projection
        and its MLP's last layer at zero (a residual block that adds nothing) and, in the weight generator,
        a fresh layer query and reduction with Phi at zero; the skip joins and the refiner start at zero too:
        the result computes exactly what `model` did. The presence head starts untrained. ValueError for
        any other change of architecture (fewer blocks included)."""
        added = ("mask_skip", "mask_refine", "presence_head")
        old_depth = model.spec.depth
        if (replace(model.spec, depth=spec.depth, **{k: getattr(spec, k) for k in added}) != spec
                or spec.depth < old_depth or any(getattr(model.spec, k) and not getattr(spec, k) for k in added)):
            raise ValueError("grown_from: the specs differ in more than added blocks (depth) / mask_skip / "
                             "mask_refine / presence_head")
        grown = cls(spec)
        state = dict(model.state_dict())
        queries = grown.weight_generator.layer_queries.detach().clone()
        queries[:old_depth] = state["weight_generator.layer_queries"]
        state["weight_generator.layer_queries"] = queries   # the old layers' queries, the new ones as drawn
        new_layers = tuple(f"{part}.{i}." for i in range(old_depth, spec.depth)
                           for part in ("blocks", "weight_generator.reduce", "weight_generator.phi"))
        missing, unexpected = grown.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith(("mask_head.skip8.", "mask_head.skip4.", "mask_head.refine.",
                                               "presence.") + new_layers)
                             for k in missing):
            raise ValueError(f"grown_from: cannot map the weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
        with torch.no_grad():
            for block in grown.blocks[old_depth:]:
                for layer in (block.attn.proj, block.mlp[2]):
                    layer.weight.zero_()
                    layer.bias.zero_()
        return grown.to(next(model.parameters()).device)

    @classmethod
    def resized_to(cls, model: "VGLAW", img_h: int, img_w: int) -> "VGLAW":
        """`model` for another input size (a finer or coarser token grid over the same camera image): every
        weight as it was, the learnt position embeddings resampled bicubically from the old token grid to
        the new one (the one part of the network tied to the grid). ValueError when the patch does not
        divide the new size."""
        spec = replace(model.spec, img_h=img_h, img_w=img_w)   # checks the size against the patch
        resized = cls(spec)
        state = dict(model.state_dict())
        (gh, gw), (nh, nw) = model.spec.grid, spec.grid
        grid = state["pos_embed"].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        state["pos_embed"] = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False
                                           ).permute(0, 2, 3, 1).reshape(1, nh * nw, -1)
        resized.load_state_dict(state)
        return resized.to(next(model.parameters()).device)

    # -- language side: once per command -------------------------------------------------------------
    def for_inference(self) -> "VGLAW":
        """Eval mode with the inference-only speed-ups (a conv stem's BatchNorms folded); returns self."""
        self.eval()
        if isinstance(self.patch_embed, ConvStem):
            self.patch_embed.fuse_for_inference()
        return self

    def generate(self, text_feats: torch.Tensor, valid: torch.Tensor) -> LanguageWeights:
        """text_feats (B, L, d_l) with [CLS] first, valid (B, L) bool -> LanguageWeights."""
        if text_feats.dim() != 3 or text_feats.shape[-1] != self.spec.text_dim:
            raise ValueError(f"text_feats: expected (B, L, {self.spec.text_dim}), got {tuple(text_feats.shape)}")
        if valid.shape != text_feats.shape[:2]:
            raise ValueError(f"valid: expected {tuple(text_feats.shape[:2])}, got {tuple(valid.shape)}")
        valid = valid.bool()
        if not valid[:, 0].all():
            raise ValueError("valid: the first token ([CLS]) must be valid in every row")
        return LanguageWeights(phi=self.weight_generator(text_feats, valid), cls=text_feats[:, 0])

    def merge(self, weights: LanguageWeights) -> LanguageWeights:
        """Fold W0_i + P Phi_i Q^T into one (3C, C) matrix per block and compute the mask head's
        frame-independent tensors, for a single command (B = 1)."""
        if weights.phi.shape[0] != 1:
            raise ValueError(f"merge: one command at a time, got a batch of {weights.phi.shape[0]}")
        merged = [blk.attn.qkv.weight + self.P @ weights.phi[0, i] @ self.Q.t() for i, blk in enumerate(self.blocks)]
        return LanguageWeights(phi=weights.phi, cls=weights.cls, merged=merged,
                               head=self.mask_head.command_tensors(weights.cls))

    # -- visual side: every frame ---------------------------------------------------------------------
    def forward_visual(self, images: torch.Tensor, weights: LanguageWeights, use_language_weights: bool = True,
                       box_head: bool = True) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) float in [0, 1] at the spec's size -> {"boxes" (B, 4) cx cy w h in [0, 1],
        "mask_logits" (B, H, W), "pool" (B, N), "visual" (B, N, C) the final tokens, "fmap_hw" the token grid
        (gh, gw)}, and with a presence head "presence_logits" (B,) and its (detached) "presence_inputs".
        `use_language_weights=False` runs the plain W0 backbone (the Phi = 0 ablation); heads still
        see the [CLS] feature. `box_head=False` leaves out "boxes" and "pool" (a caller that needs the box
        only sometimes runs `self.box_head(out["visual"], weights.cls)` then)."""
        spec = self.spec
        if images.dim() != 4 or images.shape[1:] != (3, spec.img_h, spec.img_w):
            raise ValueError(f"images: expected (B, 3, {spec.img_h}, {spec.img_w}), got {tuple(images.shape)}")
        B = images.shape[0]
        if weights.cls.shape[0] not in (1, B):
            raise ValueError(f"weights: batch {weights.cls.shape[0]} does not match images batch {B}")
        phi, cls = weights.phi, weights.cls
        if phi.shape[0] == 1 and B > 1:
            phi, cls = phi.expand(B, -1, -1, -1), cls.expand(B, -1)
        x = (images - self.pixel_mean) / self.pixel_std
        skips = None
        strides = (8, 4) * spec.mask_skip + (2,) * spec.mask_refine
        if strides:
            x, maps = self.patch_embed(x, skips=strides)
            skips = {stride: m.permute(0, 2, 3, 1) for stride, m in maps.items()}   # channels last
        else:
            x = self.patch_embed(x)
        x = x.permute(0, 2, 3, 1).reshape(B, -1, spec.width) + self.pos_embed   # (a view for the conv stem)
        for i, block in enumerate(self.blocks):
            if not use_language_weights:
                x = block(x, None, self.P, self.Q)
            elif weights.merged is not None:
                x = block(x, None, self.P, self.Q, merged=weights.merged[i])
            else:
                x = block(x, phi[:, i], self.P, self.Q)
        visual = self.norm(x)
        gh, gw = spec.grid
        head = weights.head if weights.head is not None else self.mask_head.command_tensors(cls)
        mask_logits = self.mask_head(visual.view(B, gh, gw, spec.width), head, (spec.img_h, spec.img_w), skips)
        out = {"mask_logits": mask_logits, "visual": visual, "fmap_hw": (gh, gw)}
        if box_head or self.presence is not None:
            attention, pooled = self.box_head.pool(visual, cls)
        if box_head:
            out["boxes"], out["pool"] = self.box_head.regress(attention, pooled), attention
        if self.presence is not None:
            inputs = (pooled.detach(), cls.detach(), presence_stats(mask_logits.detach(), attention.detach()),
                      visual.detach())
            out["presence_inputs"], out["presence_logits"] = inputs, self.presence(*inputs)
        return out

    def forward(self, images, text_feats, valid, use_language_weights: bool = True):
        return self.forward_visual(images, self.generate(text_feats, valid), use_language_weights)


# -- losses ---------------------------------------------------------------------------------------------

def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Paired GIoU of xyxy boxes a (B, 4), b (B, 4) -> (B,)."""
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-9)
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-9)


def box_loss(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor, w_l1: float = 1.0, w_giou: float = 1.0
             ) -> torch.Tensor:
    """L1 + GIoU on normalised boxes (B, 4), mean over the batch."""
    l1 = F.l1_loss(pred_cxcywh, target_cxcywh, reduction="none").sum(-1).mean()
    giou = (1 - generalized_box_iou(cxcywh_to_xyxy(pred_cxcywh), cxcywh_to_xyxy(target_cxcywh))).mean()
    return w_l1 * l1 + w_giou * giou


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
                       ) -> torch.Tensor:
    """Per-image focal loss (B,), mean over pixels. logits, target (B, H, W)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(1).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image Dice loss (B,). logits, target (B, H, W)."""
    prob = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    return 1 - (2 * (prob * target).sum(-1) + 1) / (prob.sum(-1) + target.sum(-1) + 1)


def mask_loss(logits: torch.Tensor, target: torch.Tensor, w_focal: float = 4.0, w_dice: float = 4.0) -> torch.Tensor:
    return w_focal * sigmoid_focal_loss(logits, target).mean() + w_dice * dice_loss(logits, target).mean()


def pooling_loss(pool: torch.Tensor, target_masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cross-entropy (B,) between the box head's pooling attention `pool` (B, N) over the (gh, gw) token grid
    and the target's share of each token's patch (from `target_masks` (B, H, W)). A training aid, not a
    part of the paper's objective: it tells the pooling where the target is directly, instead of only
    through the box regression's gradient, which alone left the pooling uniform for thousands of steps
    when the ViT is trained from scratch. Images without target pixels contribute 0."""
    cover = F.adaptive_avg_pool2d(target_masks[:, None].float(), grid).flatten(1)   # (B, N)
    total = cover.sum(1, keepdim=True)
    share = cover / total.clamp(min=1e-9)
    return -(share * pool.clamp(min=1e-9).log()).sum(1) * (total[:, 0] > 0)


def total_loss(out: dict[str, torch.Tensor], target_boxes_cxcywh: torch.Tensor, target_masks: torch.Tensor,
               w_pool: float = 0.0, present: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{"box", "mask", "total"} (+ "pool" when `w_pool` > 0): L_det (L1 + GIoU, 1:1) + L_seg (focal + Dice,
    4:4) [+ w_pool * `pooling_loss`]. `present` (B,) bool, False where the command's referent is not in the
    image: those have an empty target mask and no box term (L_det is the mean over the others)."""
    if present is None or bool(present.all()):
        det = box_loss(out["boxes"], target_boxes_cxcywh)
    elif bool(present.any()):
        det = box_loss(out["boxes"][present], target_boxes_cxcywh[present])
    else:
        det = out["boxes"].sum() * 0.0
    seg = mask_loss(out["mask_logits"], target_masks.float())
    losses = {"box": det, "mask": seg, "total": det + seg}
    if w_pool > 0:
        losses["pool"] = pooling_loss(out["pool"], target_masks, out["fmap_hw"]).mean()
        losses["total"] = losses["total"] + w_pool * losses["pool"]
    return losses
