"""The one home of the method's constants: frozen dataclasses whose defaults are FeatUp's values.

Every number the JBU upsampler, the downsamplers, the jitter model, the losses, JBU training and the implicit fit
use is a named field here, with the value the public FeatUp code uses (see
``shared/reference/featup-method.md``; section numbers below refer to it). Code elsewhere takes a config object and
never repeats a constant. Override with ``dataclasses.replace(cfg, field=value)``; configs round-trip through
``to_dict()`` / ``from_dict()`` so checkpoints and jobs can record them as JSON.

Implicit fitting has three named presets in :data:`IMPLICIT_PRESETS`: ``"paper"`` (the method's values, 1,200
steps over 3,000 views), ``"fast"`` and ``"lite"`` (``"fast"`` rendered at 1/4 size while fitting; the default of
:func:`featup_ops.fit_implicit`, see :data:`DEFAULT_IMPLICIT_PRESET`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

__all__ = [
    "JBUConfig",
    "JitterConfig",
    "LossConfig",
    "DownsamplerConfig",
    "TrainConfig",
    "ImplicitConfig",
    "IMPLICIT_PRESETS",
    "DEFAULT_IMPLICIT_PRESET",
    "implicit_preset",
]

_T = TypeVar("_T")


class _ConfigMixin:
    """``to_dict`` / ``from_dict`` for (nested) frozen config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field (nested configs become dicts)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_T], data: dict[str, Any]) -> _T:
        """Rebuild from :meth:`to_dict` output; unknown keys raise ``ValueError`` naming them."""
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; known keys are {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            default = known[name].default_factory if known[name].default_factory is not dataclasses.MISSING else None
            sub = default() if callable(default) else None
            if isinstance(sub, _ConfigMixin) and isinstance(value, dict):
                value = type(sub).from_dict(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class JBUConfig(_ConfigMixin):
    """One JBU layer and the stack (section 1.1, 1.2).

    Attributes:
        radius: window radius r; the window is (2r+1)^2 = 49 taps at r=3.
        key_dim: channels of the learned range projection of the guidance image.
        guidance_dim: channels of the guidance (RGB image).
        range_dropout: Dropout2d inside the range projection MLP.
        log_temperature_init: init of t, temperature tau = exp(t) (t=0 -> tau=1); tau multiplies the logits.
        temperature_min / temperature_max: clamp of tau.
        sigma_init: init of the learned spatial-Gaussian sigma (offsets are linspace(-1, 1, 2r+1), not pixels).
        weight_sum_min: renormalisation denominator clamp.
        n_layers: number of layers with their own parameters (FeatUp: 4 layers of 2x = 16x). Any output size is
            reached by planning stages (each 2x, the last one straight to the exact size); extra stages reuse
            layers (see ``JBUUpsampler``).
        fixup: FeatUp's kernel "fix-up" MLP (code only, not in the paper): W <- W + fixup_scale * MLP([W, G]).
            Off in this layer default (it makes the kernel non-normalised and rules out the fused kernel); on in
            :class:`TrainConfig`, as in FeatUp's released training code: it lets the kernel sharpen, which the
            multi-view error needs (measured in docs/training.md: held-out error 1.04 -> 0.90 of bilinear's).
        fixup_scale / fixup_dropout: its residual scale and dropout.
        fixup_zero_init: start the fix-up MLP's last conv at zero, so an untrained layer equals the plain JBU
            (FeatUp: PyTorch's default init, which adds a random perturbation to every kernel; measured here, that
            untrained start scored 1.16-1.33 of bilinear's held-out error, the plain JBU's 1.04-1.07).
        final_mix: FeatUp's final residual channel mix y = x + final_residual * Conv1x1(Dropout2d(x)); needs
            ``dim`` and makes the upsampler backbone-specific. Off in the feature-agnostic default.
        final_residual / final_dropout: its residual scale and dropout.
        source_mode: interpolation bringing the source to each layer's output size (FeatUp: bicubic).
    """

    radius: int = 3
    key_dim: int = 32
    guidance_dim: int = 3
    range_dropout: float = 0.1
    log_temperature_init: float = 0.0
    temperature_min: float = 1e-4
    temperature_max: float = 1e4
    sigma_init: float = 1.0
    weight_sum_min: float = 1e-7
    n_layers: int = 4
    fixup: bool = False
    fixup_scale: float = 0.1
    fixup_dropout: float = 0.1
    fixup_zero_init: bool = True
    final_mix: bool = False
    final_residual: float = 0.1
    final_dropout: float = 0.2
    source_mode: Literal["bicubic", "bilinear"] = "bicubic"

    @property
    def kernel_size(self) -> int:
        """Window diameter K = 2r + 1."""
        return 2 * self.radius + 1


@dataclass(frozen=True)
class JitterConfig(_ConfigMixin):
    """Random view transforms: flip, reflect-pad, zoom-crop (section 4, "One training step").

    Attributes:
        max_pad: reflect padding in pixels of the reference (image) size on each side; the crop offset then
            shifts the view by up to +-max_pad.
        max_zoom: zoom factor drawn from U[1, max_zoom] when zooming.
        flip_p: probability of a horizontal flip.
        zoom_p: probability of zooming (otherwise zoom 1).
    """

    max_pad: int = 20
    max_zoom: float = 2.0
    flip_p: float = 0.5
    zoom_p: float = 0.5


@dataclass(frozen=True)
class LossConfig(_ConfigMixin):
    """Weights and constants of the multi-view loss and its regularisers (sections 2 and 4).

    Attributes:
        rec_weight: weight of the multi-view reconstruction term.
        uncertainty: learned per-pixel scale s (Gaussian NLL, FeatUp's "outlier_detection"); False = plain MSE.
        uncertainty_init_scale: the uncertainty 1x1 conv's default init is multiplied by this.
        uncertainty_offset: s = clamp_min(exp(conv(target) + offset), uncertainty_min).
        uncertainty_min: lower clamp of s.
        crf_weight: weight of the sampled CRF loss (JBU training, first jitter only).
        crf_samples: random pixels per image for the CRF loss.
        crf_w_appearance / crf_pos_var_appearance / crf_col_var: appearance kernel
            w * exp(-|dp|^2 / (2 pos_var) - |dI|^2 / (2 col_var)) (normalised coordinates, image units).
        crf_w_smooth / crf_pos_var_smooth: smoothness kernel w * exp(-|dp|^2 / (2 pos_var)).
        tv_weight: total variation of the high-res map (JBU training: 0).
        magnitude_weight: implicit only: (downsampled magnitude channel - |target|)^2.
        magnitude_tv_weight: implicit only: TV of the per-pixel magnitude of the high-res map.
        blur_pin_weight: implicit only: mean((GaussianBlur(F) - F)^2), discourages high-frequency noise.
        blur_kernel / blur_sigma: that Gaussian.
    """

    rec_weight: float = 1.0
    uncertainty: bool = True
    uncertainty_init_scale: float = 0.1
    uncertainty_offset: float = 0.1
    uncertainty_min: float = 1e-4
    crf_weight: float = 0.001
    crf_samples: int = 1000
    crf_w_appearance: float = 10.0
    crf_pos_var_appearance: float = 0.1
    crf_col_var: float = 0.15
    crf_w_smooth: float = 3.0
    crf_pos_var_smooth: float = 0.005
    tv_weight: float = 0.0
    magnitude_weight: float = 0.0
    magnitude_tv_weight: float = 0.0
    blur_pin_weight: float = 0.0
    blur_kernel: int = 5
    blur_sigma: float = 1.0


@dataclass(frozen=True)
class DownsamplerConfig(_ConfigMixin):
    """The learned downsampler that maps a jittered high-res map onto the backbone's grid (section 3).

    The stride follows FeatUp's rule per axis, s = (H - k) // (h - 1), no padding.

    Attributes:
        kind: "attention" (FeatUp's default) or "blur" (learned |theta| / sum |theta| kernel).
        kernel_size: k; None = the backbone stride (non-overlapping patches, FeatUp's JBU training setting).
        blur_input: attention only: Gaussian pre-blur (5x5, sigma 1, from ``LossConfig``) of the input.
        saliency_dropout: attention only: Dropout on the features before the saliency Linear(C->1).
        patch_dropout: attention only: fraction of output cells whose saliency logits are zeroed in training.
            FeatUp also applies it in eval mode; here eval is deterministic (no patch dropout).
        init_noise: attention only: w = 1 + init_noise * N(0,1), b = init_noise * N(0,1).
        blur_kernel / blur_sigma: the pre-blur Gaussian (5x5, sigma 1).
    """

    kind: Literal["attention", "blur"] = "attention"
    kernel_size: int | None = None
    blur_input: bool = True
    saliency_dropout: float = 0.2
    patch_dropout: float = 0.2
    init_noise: float = 0.01
    blur_kernel: int = 5
    blur_sigma: float = 1.0


@dataclass(frozen=True)
class TrainConfig(_ConfigMixin):
    """JBU training (section 4): the values of FeatUp's ``jbu_upsampler.yaml`` and the paper's 2,000 steps.

    Attributes:
        batch_size: images per step (per worker).
        lr: NAdam learning rate.
        n_jitters: jittered views per image per step; the upsampler is re-run for each (fresh dropout).
        projection_dim: random projection dim of features in the loss, drawn anew for every jitter.
        steps: optimizer steps.
        grad_clip_steps / grad_clip_norm: clip the gradient norm to grad_clip_norm for the first steps.
        image_size: training crop (Resize + CenterCrop).
        val_every / ckpt_every: validation and checkpoint interval in steps.
        jbu / jitter / loss / downsampler: the nested configs; ``jbu`` has FeatUp's kernel fix-up on (its code's
            trained upsamplers have it).
    """

    batch_size: int = 4
    lr: float = 1e-3
    n_jitters: int = 5
    projection_dim: int = 30
    steps: int = 2000
    grad_clip_steps: int = 10
    grad_clip_norm: float = 1e-4
    image_size: int = 224
    val_every: int = 100
    ckpt_every: int = 100
    jbu: JBUConfig = field(default_factory=lambda: JBUConfig(fixup=True))
    jitter: JitterConfig = field(default_factory=JitterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    downsampler: DownsamplerConfig = field(default_factory=DownsamplerConfig)


def _implicit_loss() -> LossConfig:
    # Implicit fitting (section 2): NLL + magnitude 0.001 + magnitude TV 0.05 + blur pin 0.1; no CRF.
    return LossConfig(crf_weight=0.0, magnitude_weight=0.001, magnitude_tv_weight=0.05, blur_pin_weight=0.1)


def _implicit_jitter() -> JitterConfig:
    # The implicit view bank jitters less in zoom and more in padding than JBU training (section 2).
    return JitterConfig(max_pad=30, max_zoom=1.8)


@dataclass(frozen=True)
class ImplicitConfig(_ConfigMixin):
    """The per-image implicit upsampler and its fit (section 2). Defaults = the method ("paper" preset).

    Attributes:
        n_freqs / log_freq_min / log_freq_max: Fourier frequencies exp(linspace(min, max, n_freqs)).
        color_feats: append the raw (min-max scaled) colour; input channels = 5*n_freqs*2 + 3 = 303.
        hidden_dim: MLP width.
        dropout: Dropout2d in the MLP.
        proj_dim: PCA dimension of the targets; the network predicts these channels.
        pca_views: jittered maps the PCA is fitted on.
        n_views: size of the per-image bank of jittered views (backbone run once per view).
        view_batch: backbone batch size when filling the bank (views of all images of a call are batched).
        steps: optimizer steps (maximum when early stopping).
        views_per_step: views drawn (with replacement) from the bank per step.
        lr: NAdam learning rate (PyTorch's default 2e-3).
        downsampler_kernel: attention-downsampler kernel; None = 2*stride - 3 (29 at stride 16, the method's).
        amp: "auto" = bfloat16 autocast on CUDA, fp32 on CPU; "off"; "on" (bfloat16 also on CPU).
        early_stop: stop an image when its reconstruction error stalls (judged on windows of
            ``early_stop_window`` steps: relative improvement below ``early_stop_tol`` for
            ``early_stop_patience`` windows in a row).
        group_size: images fitted at once as one grouped network (batched MLPs); None = all given.
        train_scale: the networks are rendered at this fraction of the input size while fitting (the training
            target's resolution; the attention downsampler's default kernel, 2 * stride - 3, follows the scaled
            stride); the result is still rendered at the requested output size. 1.0 = the method.
        cuda_graph: on CUDA, capture the training step (forward, backward, optimizer) as one CUDA graph after a
            few eager steps, so a step costs one launch instead of hundreds: "auto" = capture, and fit eagerly if
            capture fails; "on" = capture or raise; "off" = eager. Ignored (eager) on the CPU.
        jitter / loss / downsampler: nested configs.
    """

    n_freqs: int = 30
    log_freq_min: float = -2.0
    log_freq_max: float = 10.0
    color_feats: bool = True
    hidden_dim: int = 128
    dropout: float = 0.2
    proj_dim: int = 128
    pca_views: int = 50
    n_views: int = 3000
    view_batch: int = 64
    steps: int = 1200
    views_per_step: int = 10
    lr: float = 2e-3
    downsampler_kernel: int | None = None
    amp: Literal["auto", "on", "off"] = "off"
    early_stop: bool = False
    early_stop_window: int = 25
    early_stop_tol: float = 0.01
    early_stop_patience: int = 2
    group_size: int | None = None
    train_scale: float = 1.0
    cuda_graph: Literal["auto", "on", "off"] = "auto"
    jitter: JitterConfig = field(default_factory=_implicit_jitter)
    loss: LossConfig = field(default_factory=_implicit_loss)
    downsampler: DownsamplerConfig = field(default_factory=DownsamplerConfig)

    @property
    def in_channels(self) -> int:
        """Channels of the Fourier + colour input to the MLP (303 at the defaults)."""
        return 5 * self.n_freqs * 2 + (3 if self.color_feats else 0)


#: Named implicit presets. "paper": FeatUp's values. "fast": a 1/10 view bank, at most 1/5 of the steps (early
#: stopping), 8 views per step, 64 PCA dims, bfloat16 on CUDA. Measured in one run of
#: benchmarks/implicit_quality.py (CPU, 128 px, 2 photos): 13.5x fewer CPU seconds per image than "paper", with a
#: held-out multi-view error 0.866 of the fixed JBU's and 0.922 of bilinear's. 240 steps, not 300: on those photos
#: early stopping never fired by 300, and 240 steps gave equal or lower error (docs/implicit.md).
#: "lite" (issue 15): "fast" rendered at 1/4 of the input size while fitting (``train_scale=0.25``). Measured side
#: by side with "fast" (benchmarks/implicit_quality.py --presets lite fast, CPU, 1 thread, 128 px, plant and
#: skate): 11.9x fewer CPU seconds per image (17.2 vs 204.3) and a lower held-out error on both photos (mean 0.441
#: vs 0.480; 0.796 of the fixed JBU's, 0.846 of bilinear's); docs/implicit.md.
_FAST = ImplicitConfig(
    n_views=300,
    view_batch=150,
    steps=240,
    views_per_step=8,
    proj_dim=64,
    amp="auto",
    early_stop=True,
)
IMPLICIT_PRESETS: dict[str, ImplicitConfig] = {
    "paper": ImplicitConfig(),
    "fast": _FAST,
    "lite": dataclasses.replace(_FAST, train_scale=0.25),  # "fast" rendered at 1/4 of the input size while fitting
}

#: The preset :func:`featup_ops.fit_implicit` uses when no config is given.
DEFAULT_IMPLICIT_PRESET = "lite"


def implicit_preset(name: str) -> ImplicitConfig:
    """Look up an implicit preset by name ("paper", "fast", "lite"); an unknown name raises ``ValueError``."""
    try:
        return IMPLICIT_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown implicit preset {name!r}; choose one of {sorted(IMPLICIT_PRESETS)}") from None
