"""Builders for the networks, all from MONAI.

- eps_theta: `monai.networks.nets.DiffusionModelUNet`; for classifier-free guidance the same UNet
  with class embeddings (`num_class_embeds`), wrapped as `LabelConditionalUNet`.
- p(y | x_t, t): `NoiseAwareClassifier`, MONAI's `DiffusionModelEncoder` trunk (time embedding,
  ResNet and attention down blocks) with its fixed-size head replaced by global pooling, so it
  works at any image size the config sets (MONAI's own head is a Linear sized for one input shape).
"""

from __future__ import annotations

import math

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder
from torch import nn

from anomaly_diffusion.config import ClassifierConfig, UNetConfig
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.labels import LABEL_NAMES, NULL_LABEL, NUM_CLASS_EMBEDS, PATHOLOGICAL


def build_unet(cfg: UNetConfig, image_channels: int, spatial_dims: int = 2, conditional: bool = False) -> nn.Module:
    """The DDPM denoiser eps_theta(x_t, t): (B, C, *spatial), (B,) -> (B, C, *spatial).

    `conditional`: a `LabelConditionalUNet` eps(x_t, t, y) for classifier-free guidance.
    """
    unet = DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=image_channels,
        out_channels=image_channels,
        channels=cfg.channels,
        attention_levels=cfg.attention_levels,
        num_res_blocks=cfg.num_res_blocks,
        num_head_channels=cfg.num_head_channels,
        norm_num_groups=cfg.norm_num_groups,
        num_class_embeds=NUM_CLASS_EMBEDS if conditional else None,
    )
    return LabelConditionalUNet(unet) if conditional else unet


class LabelConditionalUNet(nn.Module):
    """eps(x_t, t, y) with y in {HEALTHY, PATHOLOGICAL, NULL_LABEL}: MONAI's UNet with class embeddings.

    Called without labels it is the unconditional denoiser eps(x_t, t, null), so every caller of a
    plain eps_theta(x_t, t) (encoding, snapshots) works unchanged.
    """

    def __init__(self, unet: DiffusionModelUNet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (B, C, *spatial), t (B,), y (B,) or None (null) -> eps (B, C, *spatial)."""
        if y is None:
            y = torch.full((x_t.shape[0],), NULL_LABEL, dtype=torch.long, device=x_t.device)
        eps: torch.Tensor = self.unet(x_t, t, class_labels=y)
        return eps


class NoiseAwareClassifier(nn.Module):
    """p(y | x_t, t) over (HEALTHY, PATHOLOGICAL) for noised images, at any spatial size.

    The MONAI encoder flattens its last feature map (B, C_L, *s) to (B, C_L * prod(s)) before its
    head; with the head set to identity the features are viewed back as (B, C_L, prod(s)) and
    pooled over positions:
    - "mean" / "attention": average (or learned attention weights), then a Linear gives the logits;
    - "lse" (multiple-instance learning): every position p gets an abnormality logit a_p, and the
      slice's pathological logit is the smooth maximum log(mean_p exp(a_p)) against a healthy
      logit of 0: a slice is pathological if some region is, so the evidence (and the guidance
      gradient) stays where the lesion is, while the labels stay slice-level.
    """

    def __init__(self, cfg: ClassifierConfig, image_channels: int, spatial_dims: int = 2) -> None:
        super().__init__()
        self.trunk = DiffusionModelEncoder(
            spatial_dims=spatial_dims,
            in_channels=image_channels,
            out_channels=len(LABEL_NAMES),
            channels=cfg.channels,
            attention_levels=cfg.attention_levels,
            num_res_blocks=cfg.num_res_blocks,
            num_head_channels=cfg.num_head_channels,
            norm_num_groups=cfg.norm_num_groups,
            input_shape=(8,) * spatial_dims,  # only sizes the head we replace below
        )
        self.trunk.out = nn.Identity()
        width = cfg.channels[-1]
        self.width = width
        self.pooling = cfg.pooling
        self.attention = nn.Linear(width, 1) if cfg.pooling == "attention" else None
        if cfg.pooling == "lse":
            self.head = nn.Sequential(nn.GroupNorm(1, width), nn.SiLU(), nn.Conv1d(width, 1, kernel_size=1))
        else:
            self.head = nn.Sequential(nn.GroupNorm(1, width), nn.SiLU(), nn.Linear(width, len(LABEL_NAMES)))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2) for x_t (B, C, *spatial) at timesteps t (B,)."""
        if self.pooling == "lse":
            return self._mil_logits(self.region_logits(x_t, t))
        features = self.trunk(x_t, t).reshape(x_t.shape[0], self.width, -1)  # (B, C_L, positions)
        if self.attention is None:
            pooled = features.mean(dim=2)
        else:
            weights = torch.softmax(self.attention(features.transpose(1, 2)), dim=1)  # (B, positions, 1)
            pooled = (features * weights.transpose(1, 2)).sum(dim=2)
        logits: torch.Tensor = self.head(pooled)
        return logits

    def region_logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The `lse` head's per-region abnormality logits a_p (B, P), P = positions of the last feature map.

        sigmoid(a_p) reads as p(region p is abnormal | x_t, t); trained only through the pooled slice label.
        """
        if self.pooling != "lse":
            raise ConfigError(f"region logits need classifier.pooling=lse, this classifier pools by {self.pooling!r}")
        features = self.trunk(x_t, t).reshape(x_t.shape[0], self.width, -1)  # (B, C_L, positions)
        regions: torch.Tensor = self.head(features)[:, 0]
        return regions

    @staticmethod
    def _mil_logits(abnormality: torch.Tensor) -> torch.Tensor:
        """Per-position abnormality logits (B, P) -> slice logits (B, 2) = (0, log mean_p exp(a_p))."""
        positions = abnormality.shape[1]
        pathological = torch.logsumexp(abnormality, dim=1) - math.log(positions)
        logits = torch.zeros(abnormality.shape[0], len(LABEL_NAMES), dtype=abnormality.dtype, device=abnormality.device)
        logits[:, PATHOLOGICAL] = pathological
        return logits


def build_classifier(cfg: ClassifierConfig, image_channels: int, spatial_dims: int = 2) -> NoiseAwareClassifier:
    """The noise-aware classifier; call `.eval()` before using its gradients (it has dropout)."""
    return NoiseAwareClassifier(cfg, image_channels, spatial_dims)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
