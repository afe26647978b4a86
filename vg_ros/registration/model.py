"""The VBReg network (Jiang et al., CVPR 2023): a variational non-local network that scores putative
correspondences as inliers.

Per iteration l = 1..L:
  * three GRU cells update hidden states h_q, h_k, h_v (B*N, H) from the current features;
  * a prior encoder p(z | h) and, in training, a label-conditioned posterior encoder q(z | h, y) give
    Gaussians over random features z_q, z_k, z_v (B*N, Z);
  * Q, K, V = f(z, h) (B, N, C); attention = softmax_j(beta_ij * <Q_i, K_j> / sqrt(C)), where beta is
    the spatial compatibility of the correspondences; the aggregated values pass a residual MLP.
An inlier classifier reads the last features. Training maximises the ELBO: the labels' Bernoulli
log-likelihood minus KL(posterior || prior) summed over iterations (`elbo_loss`). Inference uses the
prior means, so it is deterministic.

Besides the paper's 6-d coordinate input (source and target points, each centred and scaled by
their RMS radius), the embedding sees two rotation-invariant channels: the first- and second-order
compatibility degree. They make the network useful across scenes after a short CPU training run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F


def spatial_compatibility(src: torch.Tensor, dst: torch.Tensor, tau: float) -> torch.Tensor:
    """beta (B, N, N) = max(0, 1 - d_ij^2 / tau^2), d_ij = | |x_i - x_j| - |y_i - y_j| |.

    src, dst: (B, N, 3) matched points. The diagonal is zero (a match does not support itself).
    """
    if src.shape != dst.shape or src.ndim != 3 or src.shape[-1] != 3:
        raise ValueError(f"spatial_compatibility: src {tuple(src.shape)} and dst {tuple(dst.shape)} must both be (B, N, 3)")
    d_src = torch.cdist(src, src)
    d_dst = torch.cdist(dst, dst)
    beta = torch.clamp(1.0 - (d_src - d_dst) ** 2 / (tau * tau), min=0.0)
    eye = torch.eye(src.shape[1], dtype=torch.bool, device=src.device)
    return beta.masked_fill(eye, 0.0)


def second_order_compatibility(beta: torch.Tensor) -> torch.Tensor:
    """beta2 (B, N, N) = beta * (beta @ beta), normalised to max 1 per batch: pairs that also share
    compatible neighbours (SC2-PCR's second-order measure); outlier clusters lose support."""
    beta2 = beta * torch.bmm(beta, beta)
    scale = beta2.flatten(1).amax(dim=1).clamp(min=1e-12)
    return beta2 / scale[:, None, None]


def correspondence_input(src: torch.Tensor, dst: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Per-correspondence input (B, N, 8): centred, RMS-scaled source and target coordinates (6) and the
    normalised first- and second-order compatibility degree (2)."""
    def normalise(points: torch.Tensor) -> torch.Tensor:
        centred = points - points.mean(dim=1, keepdim=True)
        rms = centred.pow(2).sum(-1).mean(dim=1, keepdim=True).sqrt().clamp(min=1e-9)
        return centred / rms[..., None]

    n = beta.shape[-1]
    degree = beta.sum(-1) / max(n - 1, 1)
    degree = degree / degree.amax(dim=1, keepdim=True).clamp(min=1e-12)
    degree2 = second_order_compatibility(beta).sum(-1)
    degree2 = degree2 / degree2.amax(dim=1, keepdim=True).clamp(min=1e-12)
    return torch.cat([normalise(src), normalise(dst), degree[..., None], degree2[..., None]], dim=-1)


@dataclass
class VBRegDims:
    """Network sizes. Paper code: feature 128, random feature 128, hidden 256, 12 iterations."""

    feature_dim: int = 64
    random_dim: int = 32
    hidden_dim: int = 64
    num_layers: int = 6
    input_dim: int = 8


class GaussianEncoder(nn.Module):
    """(.., in_dim) -> mean, log-variance (.., out_dim) of a diagonal Gaussian."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, 2 * out_dim))

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.net(inputs).chunk(2, dim=-1)
        return mean, logvar.clamp(-8.0, 8.0)


class VariationalNonLocalBlock(nn.Module):
    """One iteration: GRU hidden states, prior/posterior random features, compatibility-guided
    non-local attention and a residual MLP. Features (B, N, C) in, (B, N, C) out."""

    KINDS = ("q", "k", "v")

    def __init__(self, dims: VBRegDims) -> None:
        super().__init__()
        C, Z, H = dims.feature_dim, dims.random_dim, dims.hidden_dim
        self.gru = nn.ModuleDict({k: nn.GRUCell(C, H) for k in self.KINDS})
        self.prior = nn.ModuleDict({k: GaussianEncoder(H, H, Z) for k in self.KINDS})
        self.posterior = nn.ModuleDict({k: GaussianEncoder(H + 1, H, Z) for k in self.KINDS})
        self.project = nn.ModuleDict({k: nn.Linear(Z + H, C) for k in self.KINDS})
        self.mlp = nn.Sequential(nn.Linear(C, C), nn.LayerNorm(C), nn.ReLU(inplace=True), nn.Linear(C, C))
        self.norm = nn.LayerNorm(C)
        self.scale = 1.0 / math.sqrt(C)

    def forward(self, feats: torch.Tensor, hidden: dict[str, torch.Tensor], beta: torch.Tensor,
                labels: torch.Tensor | None, sample: bool) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
        """feats (B, N, C); hidden {kind: (B*N, H)}; beta (B, N, N); labels (B, N) in {0, 1} or None.

        Returns new feats (B, N, C), new hidden, attention (B, N, N), KL (B,) (zero without labels).
        """
        B, N, C = feats.shape
        flat = feats.reshape(B * N, C)
        kl = feats.new_zeros(B)
        proj: dict[str, torch.Tensor] = {}
        new_hidden: dict[str, torch.Tensor] = {}
        for kind in self.KINDS:
            h = self.gru[kind](flat, hidden[kind])
            new_hidden[kind] = h
            prior_mean, prior_logvar = self.prior[kind](h)
            if labels is not None:
                post_in = torch.cat([h, labels.reshape(B * N, 1).to(h.dtype)], dim=-1)
                post_mean, post_logvar = self.posterior[kind](post_in)
                kl_per = 0.5 * (prior_logvar - post_logvar
                                + (post_logvar.exp() + (post_mean - prior_mean) ** 2) / prior_logvar.exp() - 1.0)
                kl = kl + kl_per.sum(-1).reshape(B, N).mean(-1)
                mean, logvar = post_mean, post_logvar
            else:
                mean, logvar = prior_mean, prior_logvar
            z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
            proj[kind] = self.project[kind](torch.cat([z, h], dim=-1)).reshape(B, N, C)
        logits = torch.bmm(proj["q"], proj["k"].transpose(1, 2)) * self.scale
        attention = torch.softmax(beta * logits, dim=-1)
        message = torch.bmm(attention, proj["v"])
        feats = self.norm(feats + self.mlp(message))
        return feats, new_hidden, attention, kl


class VBRegNet(nn.Module):
    """Inlier confidence for putative correspondences.

    forward(src (B, N, 3), dst (B, N, 3), beta (B, N, N), labels (B, N) | None) ->
      {"logits": (B, N), "attention": [L x (B, N, N)], "features": [L x (B, N, C)], "kl": (B,)}
    """

    def __init__(self, dims: VBRegDims | None = None) -> None:
        super().__init__()
        self.dims = dims or VBRegDims()
        C, H = self.dims.feature_dim, self.dims.hidden_dim
        self.embed = nn.Sequential(nn.Linear(self.dims.input_dim, C), nn.LayerNorm(C), nn.ReLU(inplace=True), nn.Linear(C, C))
        self.init_hidden = nn.Linear(C, 3 * H)
        self.blocks = nn.ModuleList(VariationalNonLocalBlock(self.dims) for _ in range(self.dims.num_layers))
        self.classifier = nn.Sequential(nn.Linear(C, C), nn.ReLU(inplace=True), nn.Linear(C, 1))

    def forward(self, src: torch.Tensor, dst: torch.Tensor, beta: torch.Tensor,
                labels: torch.Tensor | None = None, sample: bool | None = None) -> dict:
        if src.ndim != 3 or src.shape != dst.shape or beta.shape != (src.shape[0], src.shape[1], src.shape[1]):
            raise ValueError(f"VBRegNet: src {tuple(src.shape)}, dst {tuple(dst.shape)} must be (B, N, 3) and "
                             f"beta {tuple(beta.shape)} (B, N, N)")
        if labels is not None and labels.shape != src.shape[:2]:
            raise ValueError(f"VBRegNet: labels {tuple(labels.shape)} must be (B, N) = {tuple(src.shape[:2])}")
        sample = self.training if sample is None else sample
        B, N, _ = src.shape
        feats = self.embed(correspondence_input(src, dst, beta))
        h0 = torch.tanh(self.init_hidden(feats.reshape(B * N, -1))).chunk(3, dim=-1)
        hidden = dict(zip(VariationalNonLocalBlock.KINDS, h0))
        attentions, features = [], []
        kl_total = feats.new_zeros(B)
        for block in self.blocks:
            feats, hidden, attention, kl = block(feats, hidden, beta, labels, sample)
            attentions.append(attention)
            features.append(feats)
            kl_total = kl_total + kl
        logits = self.classifier(feats).squeeze(-1)
        return {"logits": logits, "attention": attentions, "features": features, "kl": kl_total}


def elbo_loss(output: dict, labels: torch.Tensor, kl_weight: float = 1.0, pos_weight: float | None = None,
              prior_output: dict | None = None, prior_weight: float = 1.0) -> dict:
    """Negative ELBO: BCE(labels | logits with posterior z) + KL(posterior || prior) summed over
    iterations. labels (B, N) in {0, 1}.

    `prior_output` (the same batch run with prior means, as at inference) adds `prior_weight` x its
    BCE: the hybrid objective of conditional VAEs (Sohn et al. 2015), which keeps the classifier from
    relying on label information that only the posterior carries. `pos_weight` balances rare inliers
    (default: negatives / positives, capped at 10)."""
    labels = labels.to(output["logits"].dtype)
    if pos_weight is None:
        pos = labels.sum().clamp(min=1.0)
        pos_weight = float(((labels.numel() - pos) / pos).clamp(max=10.0))
    weight = torch.tensor(pos_weight, dtype=labels.dtype, device=labels.device)
    nll = F.binary_cross_entropy_with_logits(output["logits"], labels, pos_weight=weight)
    kl = output["kl"].mean()
    loss = nll + kl_weight * kl
    terms = {"nll": nll.detach(), "kl": kl.detach()}
    if prior_output is not None:
        prior_nll = F.binary_cross_entropy_with_logits(prior_output["logits"], labels, pos_weight=weight)
        loss = loss + prior_weight * prior_nll
        terms["prior_nll"] = prior_nll.detach()
    terms["loss"] = loss
    return terms
