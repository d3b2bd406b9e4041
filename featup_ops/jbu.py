"""FeatUp's joint bilateral upsampler (JBU): one learned layer and a stack that reaches any output size.

A :class:`JBULayer` (method notes 1.1) brings the source to its output size (bicubic), and replaces each pixel by a
7x7 weighted sum whose weights come from the guidance image only:
``softmax_taps(tau * <k_q, k_{q+p}>) * exp(-|p|^2 / (2 sigma^2))``, renormalised, with keys
``k = Conv1x1(3->32) -> GELU -> Dropout2d -> Conv1x1(32->32)`` of the guidance (reflect-padded), learned tau = exp(t)
and sigma, offsets on ``linspace(-1, 1, 7)``. The sum runs in ``kernels.jbu_fused`` (weights never reach memory);
with FeatUp's optional kernel fix-up the explicit weights come from ``kernels.jbu_weights_reference`` and the sum
from ``kernels.adaptive_conv``. Since one kernel serves every channel, the layer commutes with any linear map of the
channels: ``up(P f) = P up(f)``, which the projected multi-view loss relies on.

:class:`JBUUpsampler` plans stages from the feature grid to the output size: each stage doubles both sides and
the last goes straight to the exact size (stride 14 at 224 px: 16 -> 32 -> 64 -> 128 -> 224; non-square and
non-power-of-two ratios alike). The guidance of each stage is the image area-pooled to that stage's size (resized
bilinearly where a stage is larger than the image; the ``guidance_resize`` argument replaces that rule).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from featup_ops.baselines import check_upsample_args, resize_guidance
from featup_ops.config import JBUConfig
from featup_ops.errors import ConfigError

__all__ = ["JBULayer", "JBUUpsampler", "plan_stages"]


def _pad(x: torch.Tensor, r: int) -> torch.Tensor:
    """Reflect-pad by r (replicate where a side is too short to reflect)."""
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    return F.pad(x, (r, r, r, r), mode=mode)


class JBULayer(nn.Module):
    """One JBU layer (learned range kernel, learned spatial sigma, optional kernel fix-up).

    Args:
        cfg: layer constants (radius, key dim, dropout, tau/sigma init, fix-up); defaults are FeatUp's.
        device, dtype: factory kwargs of the parameters.
    """

    def __init__(self, *, cfg: JBUConfig | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or JBUConfig()
        fk = {"device": device, "dtype": dtype}
        g, d, taps = cfg.guidance_dim, cfg.key_dim, cfg.kernel_size**2
        self.range_proj = nn.Sequential(
            nn.Conv2d(g, d, 1, **fk), nn.GELU(), nn.Dropout2d(cfg.range_dropout), nn.Conv2d(d, d, 1, **fk)
        )
        self.log_temperature = nn.Parameter(torch.empty((), **fk))
        self.sigma = nn.Parameter(torch.empty((), **fk))
        if cfg.fixup:
            self.fixup = nn.Sequential(
                nn.Conv2d(taps + g, taps, 1, **fk),
                nn.GELU(),
                nn.Dropout2d(cfg.fixup_dropout),
                nn.Conv2d(taps, taps, 1, **fk),
            )
        else:
            self.fixup = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Convs: PyTorch's default init (the fix-up's last conv zero with ``fixup_zero_init``);
        t = log_temperature_init; sigma = sigma_init."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
        with torch.no_grad():
            if self.fixup is not None and self.cfg.fixup_zero_init:
                nn.init.zeros_(self.fixup[-1].weight)
                nn.init.zeros_(self.fixup[-1].bias)
            self.log_temperature.fill_(self.cfg.log_temperature_init)
            self.sigma.fill_(self.cfg.sigma_init)

    def temperature(self) -> torch.Tensor:
        """0-d tau = clamp(exp(t), temperature_min, temperature_max); multiplies the key dot products."""
        return self.log_temperature.exp().clamp(self.cfg.temperature_min, self.cfg.temperature_max)

    def spatial_kernel(self) -> torch.Tensor:
        """(K, K) exp(-(dy^2 + dx^2) / (2 sigma^2)) on offsets linspace(-1, 1, K), float32."""
        k = self.cfg.kernel_size
        lin = torch.linspace(-1.0, 1.0, k, device=self.sigma.device, dtype=torch.float32)
        d2 = lin[:, None] ** 2 + lin[None, :] ** 2
        return torch.exp(-d2 / (2 * self.sigma.float() ** 2))

    def keys(self, guidance: torch.Tensor) -> torch.Tensor:
        """Range-projection keys, reflect-padded by r.

        Args:
            guidance: (B, 3, H, W) guidance at the layer's output size.

        Returns:
            (B, key_dim, H+2r, W+2r).
        """
        return _pad(self.range_proj(guidance), self.cfg.radius)

    def kernel(self, guidance: torch.Tensor) -> torch.Tensor:
        """The explicit per-pixel taps (with the fix-up if enabled).

        Args:
            guidance: (B, 3, H, W).

        Returns:
            (B, H, W, K, K) float32 weights (normalised unless the fix-up changed them).
        """
        # kernels' export map does not list jbu_weights_reference (yet); it lives in kernels.reference
        from kernels.reference import jbu_weights_reference

        w = jbu_weights_reference(self.keys(guidance), self.temperature(), self.spatial_kernel())
        if self.fixup is not None:
            b, h, wd, k, _ = w.shape
            flat = w.reshape(b, h, wd, k * k).permute(0, 3, 1, 2)
            fix_in = torch.cat([flat, guidance.to(flat.dtype)], dim=1)
            # the MLP runs in its parameters' dtype (fp16/bf16 modules: the taps themselves are float32)
            delta = self.fixup(fix_in.to(self.fixup[0].weight.dtype)).to(flat.dtype)
            w = (flat + self.cfg.fixup_scale * delta).permute(0, 2, 3, 1).reshape(b, h, wd, k, k)
        return w

    def forward(self, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """Upsample ``source`` to the guidance's size.

        Args:
            source: (B, C, h, w) features.
            guidance: (B, 3, H, W) image at the output size (H >= h, W >= w).

        Returns:
            (B, C, H, W), source's dtype.
        """
        size = (int(guidance.shape[-2]), int(guidance.shape[-1]))
        r = self.cfg.radius
        if tuple(source.shape[-2:]) != size:
            source = F.interpolate(source, size=size, mode=self.cfg.source_mode, align_corners=False)
        src = _pad(source, r)
        if self.fixup is None:
            return kernels.jbu_fused(src, self.keys(guidance), self.temperature(), self.spatial_kernel())
        return kernels.adaptive_conv(src, self.kernel(guidance).to(src.dtype))


def plan_stages(in_size: tuple[int, int], out_size: tuple[int, int]) -> list[tuple[int, int]]:
    """Output sizes of the stages from the feature grid to ``out_size``.

    Each stage doubles both sides while doubling stays below the target on both axes; the last stage goes straight
    to ``out_size`` (a ratio in (1, 2]). Equal sizes give one stage (a guided filter at the same size).

    Args:
        in_size: (h, w) feature grid.
        out_size: (H, W), each >= the grid.

    Returns:
        List of (H_i, W_i), last == out_size.
    """
    h, w = in_size
    stages = []
    while 2 * h < out_size[0] and 2 * w < out_size[1]:
        h, w = 2 * h, 2 * w
        stages.append((h, w))
    stages.append((int(out_size[0]), int(out_size[1])))
    return stages


class JBUUpsampler(nn.Module):
    """A stack of JBU layers reaching any output size.

    ``cfg.n_layers`` layers have their own parameters (FeatUp: 4 = 16x). A call plans its stages with
    :func:`plan_stages`; the last ``n`` stages use the last ``n`` layers (so the finest stage always runs the layer
    trained at image resolution), and when more stages than layers are needed the first stages reuse layer 0.

    Args:
        dim: feature channels; None (default) = feature-agnostic: no parameter depends on C, so one trained
            upsampler serves any backbone. Required by ``cfg.final_mix``.
        cfg: layer and stack constants (``JBUConfig``); FeatUp's fix-up and final channel mix are options there.
        device, dtype: factory kwargs of the parameters.
        guidance_resize: ``(image (B,3,H,W), (h, w)) -> (B,3,h,w)`` making each stage's guidance; default
            :func:`~featup_ops.baselines.resize_guidance` (area-pooled when shrinking, bilinear when enlarging).
            Not part of the config or the state dict: FeatUp's published stacks pass ``F.adaptive_avg_pool2d``.
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        cfg: JBUConfig | None = None,
        device=None,
        dtype=None,
        guidance_resize: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.guidance_resize = guidance_resize or resize_guidance
        self.cfg = cfg = cfg or JBUConfig()
        if cfg.final_mix and dim is None:
            raise ConfigError("JBUUpsampler: final_mix=True needs dim (the feature channels); pass dim=C")
        if dim is not None and dim < 1:
            raise ConfigError(f"JBUUpsampler: dim must be a positive channel count or None, got {dim}")
        if cfg.n_layers < 1:
            raise ConfigError(f"JBUUpsampler: n_layers must be >= 1, got {cfg.n_layers}")
        self.dim = dim
        self.layers = nn.ModuleList(JBULayer(cfg=cfg, device=device, dtype=dtype) for _ in range(cfg.n_layers))
        if cfg.final_mix:
            self.final_dropout = nn.Dropout2d(cfg.final_dropout)
            self.final_conv = nn.Conv2d(dim, dim, 1, device=device, dtype=dtype)
        else:
            self.final_dropout = None
            self.final_conv = None

    @property
    def channel_agnostic(self) -> bool:
        """True for the feature-agnostic upsampler (dim None, no channel mixing): it accepts any channel count
        and ``up(P f) == P up(f)``, so the multi-view loss may project before upsampling."""
        return self.final_conv is None and self.dim is None

    def reset_parameters(self) -> None:
        """Re-initialise every layer and the final conv."""
        for layer in self.layers:
            layer.reset_parameters()
        if self.final_conv is not None:
            self.final_conv.reset_parameters()

    def layer_for_stages(self, n_stages: int) -> list[int]:
        """Index of the layer run at each of ``n_stages`` stages."""
        n = len(self.layers)
        return [max(0, n - n_stages + i) for i in range(n_stages)]

    def forward(
        self, feats: torch.Tensor, image: torch.Tensor, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Upsample.

        Args:
            feats: (B, C, h, w) low-res features (C == dim when dim is set).
            image: (B, 3, H, W) the normalised image the backbone saw (the guidance).
            output_size: (Ho, Wo) >= (h, w); default (H, W).

        Returns:
            (B, C, Ho, Wo), feats' dtype.
        """
        out_size = check_upsample_args(feats, image, output_size, name="JBUUpsampler", dim=self.dim)
        stages = plan_stages((int(feats.shape[-2]), int(feats.shape[-1])), out_size)
        x = feats
        img = image.to(feats.dtype)
        for size, idx in zip(stages, self.layer_for_stages(len(stages))):
            x = self.layers[idx](x, self.guidance_resize(img, size))
        if self.final_conv is not None:
            x = x + self.cfg.final_residual * self.final_conv(self.final_dropout(x))
        return x

    def config_dict(self) -> dict[str, Any]:
        """JSON-able description: ``{"kind": "jbu", "dim": dim or None, "jbu": JBUConfig fields}``."""
        return {"kind": "jbu", "dim": self.dim, "jbu": self.cfg.to_dict()}

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> "JBUUpsampler":
        """Rebuild (fresh parameters) from :meth:`config_dict` output."""
        if config.get("kind") != "jbu":
            raise ConfigError(f"JBUUpsampler.from_config_dict: kind must be 'jbu', got {config.get('kind')!r}")
        try:
            cfg = JBUConfig.from_dict(dict(config.get("jbu", {})))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"JBUUpsampler.from_config_dict: bad 'jbu' config: {e}") from None
        return cls(config.get("dim"), cfg=cfg)
