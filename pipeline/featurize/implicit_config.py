"""The implicit stage's settings: :class:`ImplicitStageConfig` (what the stage does), :class:`ImplicitFlags` (its
``--implicit-*`` flags, shared by the featurize job and the second pass) and :class:`FitImplicitConfig` (the second
pass's flags, ``jobs/fit_implicit.py``). No Ray, no torch at import: the jobs build their parsers from these."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from featup_ops.config import DEFAULT_IMPLICIT_PRESET, ImplicitConfig
from pipeline.cli import flag
from pipeline.errors import ConfigError
from pipeline.store.schema import IMPLICIT_STORE_AS

__all__ = ["DEFAULT_CPUS_PER_ACTOR", "DEFAULT_IMAGES_PER_FIT", "FitImplicitConfig", "ImplicitFlags",
           "ImplicitStageConfig"]

DEFAULT_IMAGES_PER_FIT = 4
"""Images per ``fit_implicit`` call: fitting is batched over images, so a few at once use the device better; more
only adds memory (results per image do not depend on the grouping)."""
DEFAULT_CPUS_PER_ACTOR = 1.0
"""CPUs reserved per ImplicitFitter actor. On GPU actors they feed the device; on CPU actors they are also the
torch threads the fit uses. Fractional values pack actors (a 2-core machine must leave room for decode tasks)."""


@dataclass(frozen=True)
class ImplicitStageConfig:
    """Settings of the implicit stage, shared by the featurize job and the second pass.

    Attributes:
        preset: name in ``featup_ops.config.IMPLICIT_PRESETS`` (default ``featup_ops.config.DEFAULT_IMPLICIT_PRESET``, "lite"; "fast"; "paper" = the method's values).
        implicit_cfg: an explicit ``featup_ops.ImplicitConfig``; overrides ``preset`` (e.g. tiny test configs).
        output_size: ``(Hi, Wi)`` of the implicit features; None = the store's hires output size. Any size,
            non-square allowed.
        gpus: GPUs per ImplicitFitter actor (fractional packs actors on one GPU); 0 = CPU actors; None = 1 when the
            cluster has GPUs, else 0.
        actors: size of the ImplicitFitter actor pool.
        cpus_per_actor: CPUs reserved per actor.
        torch_threads: torch intra-op threads of a CPU actor; None = ``ceil(cpus_per_actor)``.
        seed: fitting seed (the same for every image; the result of an image does not depend on its group).
        images_per_fit: images per ``fit_implicit`` call.
        store_as: what the store keeps per row (``--implicit-store``): ``"array"`` the features at
            ``output_size``; ``"function"`` the fitted network and its basis (``implicit_params``, with the
            ``guidance`` image), rendered by readers at any size; ``"both"``.
    """

    preset: str = DEFAULT_IMPLICIT_PRESET
    implicit_cfg: Any = None
    output_size: tuple[int, int] | None = None
    gpus: float | None = 0.0
    actors: int = 1
    cpus_per_actor: float = DEFAULT_CPUS_PER_ACTOR
    torch_threads: int | None = None
    seed: int = 0
    images_per_fit: int = DEFAULT_IMAGES_PER_FIT
    store_as: str = "array"

    def __post_init__(self) -> None:
        if self.store_as not in IMPLICIT_STORE_AS:
            raise ConfigError(f"--implicit-store {self.store_as!r} is not one of {', '.join(IMPLICIT_STORE_AS)}")
        if self.output_size is not None:
            size = tuple(int(s) for s in self.output_size)
            if len(size) != 2 or min(size) < 1:
                raise ConfigError(f"--implicit-size {self.output_size!r} must be two positive ints (H W)")
            object.__setattr__(self, "output_size", size)
        if self.gpus is not None and self.gpus < 0:
            raise ConfigError(f"--implicit-gpus {self.gpus} must be >= 0 (0 = CPU actors)")
        if self.actors < 1:
            raise ConfigError(f"--implicit-actors {self.actors} must be >= 1")
        if self.cpus_per_actor <= 0:
            raise ConfigError(f"--implicit-cpus {self.cpus_per_actor} must be > 0")
        if self.images_per_fit < 1:
            raise ConfigError(f"--images-per-fit {self.images_per_fit} must be >= 1")
        if self.implicit_cfg is None:
            from featup_ops.config import IMPLICIT_PRESETS

            if self.preset not in IMPLICIT_PRESETS:
                raise ConfigError(
                    f"--implicit-preset {self.preset!r} is not one of {', '.join(sorted(IMPLICIT_PRESETS))}"
                )

    def fit_config(self) -> Any:
        """The ``featup_ops.ImplicitConfig`` to fit with (``implicit_cfg`` or the named preset)."""
        if self.implicit_cfg is not None:
            return self.implicit_cfg
        from featup_ops.config import IMPLICIT_PRESETS

        return IMPLICIT_PRESETS[self.preset]

    def fit_identity(self) -> dict[str, Any]:
        """What the store records about this fit (:func:`pipeline.store.implicit.add_implicit_arrays`' keywords)."""
        return {
            "preset": self.preset_label(), "config": self.fit_config(), "output_size": self.output_size,
            "seed": self.seed, "store_as": self.store_as,
        }

    def preset_label(self) -> str:
        """The preset name, or ``"custom"`` when an explicit config is given."""
        return "custom" if self.implicit_cfg is not None else self.preset


@dataclass(frozen=True, kw_only=True)
class ImplicitFlags:
    """The implicit stage's flags, one declaration shared by the featurize job (``--implicit``) and the second pass
    (``jobs/fit_implicit.py``): a config that inherits these fields takes the same ``--implicit-*`` flags.

    ``implicit_preset`` is a preset name, or through the API a ``featup_ops.ImplicitConfig`` (e.g. tiny test fits);
    ``implicit_gpus`` None is resolved against the cluster when the plan is built.
    """

    implicit_size: tuple[int, int] | None = flag(
        None, "implicit feature size, any H W (default: the hires output size)", metavar=("H", "W"))
    implicit_gpus: float | None = flag(
        None, "GPUs per implicit actor, fractional allowed (default: 1 if the cluster has GPUs, else 0 = CPU actors)")
    implicit_preset: str | ImplicitConfig = flag(
        DEFAULT_IMPLICIT_PRESET, "implicit fit preset: lite (default), fast, or paper (the method's values)")
    implicit_actors: int = flag(1, "implicit fitting actors")
    implicit_cpus: float = flag(DEFAULT_CPUS_PER_ACTOR, "CPUs reserved per implicit actor")
    implicit_seed: int = flag(0, "implicit fitting seed")
    images_per_fit: int = flag(DEFAULT_IMAGES_PER_FIT, "images fitted together per implicit fit call")
    implicit_store: Literal["array", "function", "both"] = flag(
        "array", "keep the implicit features (array), each image's fitted network rendered on read at any size "
        "(function, 40-75x smaller at 224^2), or both")

    def __post_init__(self) -> None:
        self.stage_config()  # validates every implicit flag, one message each, when the config is made

    def stage_config(self) -> ImplicitStageConfig:
        """These flags as the stage's :class:`ImplicitStageConfig` (validated there, one message per value)."""
        preset = self.implicit_preset
        return ImplicitStageConfig(
            preset=preset if isinstance(preset, str) else DEFAULT_IMPLICIT_PRESET,
            implicit_cfg=None if isinstance(preset, str) else preset,
            output_size=tuple(self.implicit_size) if self.implicit_size else None,
            gpus=None if self.implicit_gpus is None else float(self.implicit_gpus),
            actors=int(self.implicit_actors),
            cpus_per_actor=float(self.implicit_cpus),
            seed=int(self.implicit_seed),
            images_per_fit=int(self.images_per_fit),
            store_as=str(self.implicit_store),
        )


@dataclass(frozen=True)
class FitImplicitConfig(ImplicitFlags):
    """Settings of the second pass (``jobs/fit_implicit.py``; its flags are these fields, the ``implicit_*`` ones
    shared with the featurize job through :class:`ImplicitFlags`)."""

    store: str = flag(help="feature store URI (local path or s3://...)", path="output")
    rows: tuple[int, ...] | None = flag(None, "only these row indices (default: all complete rows)")
    limit: int | None = flag(None, "at most this many rows")
    weights: str | None = flag(None, "backbone weights the store was made with (default: the store's record)",
                               path="input")
    storage_options: dict[str, Any] | None = flag(
        None, 'fsspec options as JSON for the store, the images and the weights, e.g. \'{"anon": true}\'',
        compare=False)
    progress_interval_s: float = flag(10.0, "seconds between progress lines")
    quiet: bool = flag(False, "print only the final line")
