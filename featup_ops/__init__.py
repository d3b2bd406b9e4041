"""FeatUp model code: backbones, JBU and implicit upsamplers, downsamplers, jitter, losses, checkpoints.

Pure torch (plus timm); knows nothing of Ray, Zarr or object storage. Names are imported lazily (PEP 562), so
``import featup_ops`` does no work and needs no GPU.
"""
from __future__ import annotations

from featup_ops._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    # backbones
    "load_backbone": "backbones",
    "Backbone": "backbones",
    "BackboneCfg": "backbones",
    "list_backbones": "backbones",
    "PRESETS": "backbones",
    # upsamplers
    "JBULayer": "jbu",
    "JBUUpsampler": "jbu",
    "BilateralUpsampler": "baselines",
    "BilinearUpsampler": "baselines",
    "ImplicitUpsampler": "implicit",
    "fit_implicit": "implicit_fit",
    "ImplicitFunctions": "implicit_function",
    "fit_implicit_functions": "implicit_fit",
    # training pieces
    "BlurDownsampler": "downsamplers",
    "AttentionDownsampler": "downsamplers",
    "Jitter": "jitter",
    "sample_jitter": "jitter",
    "apply_jitter": "jitter",
    "UncertaintyHead": "losses",
    "MultiViewObjective": "multiview",
    "reconstruction_error": "multiview",
    "fixed_views": "multiview",
    "build_upsampler": "checkpoint",
    # checkpoints
    "save_upsampler": "checkpoint",
    "load_upsampler": "checkpoint",
    "checkpoint_hash": "checkpoint",
    "register_upsampler": "checkpoint",
    "load_featup_checkpoint": "featup_checkpoints",
    "FEATUP_CHECKPOINTS": "featup_hub",
    "FeatUpCheckpoint": "featup_hub",
    "to_featup_state_dict": "featup_hub",
    "FeatUpUpsampler": "featup_hub",
    "load_featup": "featup_hub",
    "FEATUP_VARIANTS": "featup_hub",
    "default_upsampler_for": "defaults",
    "DEFAULT_UPSAMPLERS": "defaults",
    "list_upsamplers": "published",
    "PUBLISHED": "published",
    "PublishedUpsampler": "published",
    "parse_upsampler_spec": "upsampler_spec",
    "UpsamplerSpec": "upsampler_spec",
    "guidance_image": "guidance",
    "UpliftUpsampler": "uplift",
    "load_uplift": "uplift",
    "LoftUpUpsampler": "loftup",
    "AnyUpUpsampler": "anyup",
    "load_anyup": "anyup",
    "load_loftup": "loftup",
    # configuration and errors
    "JBUConfig": "config",
    "JitterConfig": "config",
    "LossConfig": "config",
    "ImplicitConfig": "config",
    "DownsamplerConfig": "config",
    "TrainConfig": "config",
    "IMPLICIT_PRESETS": "config",
    "FeatupError": "errors",
    "UnknownBackboneError": "errors",
    "WeightsNotFoundError": "errors",
    "WeightsMismatchError": "errors",
    "CheckpointError": "errors",
    "CheckpointNotFoundError": "errors",
    "InputSizeError": "errors",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
