"""Per-architecture LoRA targets as data (specs/networks.md §3).

``TARGETS`` maps an architecture name to the block class names whose Linear/Conv layers are adapted and the default
exclude/include regexes (matched with ``fullmatch`` against dotted module paths). ``MODEL_CLASSES`` maps the class
name of a DiT to its architecture, so ``--network_module networks.lora`` / ``networks.loha`` pick the right targets
for any model; an unknown model gets every Linear layer of the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class ArchTargets:
    """Where adapters go for one architecture.

    ``target_modules``: block class names (``None`` = the whole model). ``default_excludes`` are always added to the
    user's exclude patterns; ``excludes_if_no_user_excludes`` only when the user gave none (FLUX family).
    ``default_includes`` apply only when the user gave neither include nor exclude patterns (so they never undo a
    user's exclusion). ``mod_excludes`` are the modulation excludes
    that ``network_args exclude_mod=False`` removes (empty: the architecture has no such switch).
    """

    name: str
    target_modules: tuple[str, ...] | None
    default_excludes: tuple[str, ...] = ()
    excludes_if_no_user_excludes: tuple[str, ...] = ()
    default_includes: tuple[str, ...] = ()
    mod_excludes: tuple[str, ...] = field(default=())


KANDINSKY5 = ArchTargets(
    name="kandinsky5",
    target_modules=("TransformerEncoderBlock", "TransformerDecoderBlock"),
    default_excludes=(r".*modulation.*",),
    default_includes=tuple(
        rf".*{block}\.{layer}.*"
        for block, layers in (
            ("self_attention", ("to_query", "to_key", "to_value", "out_layer")),
            ("cross_attention", ("to_query", "to_key", "to_value", "out_layer")),
            ("feed_forward", ("in_layer", "out_layer")),
        )
        for layer in layers
    ),
)

_FLUX_EXCLUDES = (r".*(img_mod\.lin|txt_mod\.lin|modulation\.lin).*",)

TARGETS: dict[str, ArchTargets] = {
    t.name: t
    for t in (
        KANDINSKY5,
        ArchTargets("flux_2", ("DoubleStreamBlock", "SingleStreamBlock"), (r".*(norm).*",), _FLUX_EXCLUDES),
        ArchTargets("flux_kontext", ("DoubleStreamBlock", "SingleStreamBlock"), (r".*(norm).*",), _FLUX_EXCLUDES),
        # Dotted-path form of the modulation exclude (musubi-tuner's `.*(_mod_).*` never matches a dotted path).
        ArchTargets("qwen_image", ("QwenImageTransformerBlock",), mod_excludes=(r".*\.(img_mod|txt_mod)\..*",)),
        ArchTargets(
            "wan",
            ("WanAttentionBlock",),
            (r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*",),
        ),
        ArchTargets("hunyuan_video", ("MMDoubleStreamBlock", "MMSingleStreamBlock"), (r".*(img_mod|txt_mod|modulation).*",)),
        ArchTargets("framepack", ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"), (r".*(norm).*",)),
        ArchTargets("z_image", ("ZImageTransformerBlock",), (r".*(_modulation|_refiner).*",)),
        ArchTargets("hunyuan_video_1_5", ("MMDoubleStreamBlock",), (r".*(_in).*",)),
        ArchTargets("ideogram4", ("Ideogram4TransformerBlock",), (r".*adaln_modulation.*",)),
        ArchTargets("krea2", None),
    )
}

# DiT class name -> architecture. Our own classes and the diffusers classes of the same models.
MODEL_CLASSES: dict[str, str] = {
    "DiffusionTransformer3D": "kandinsky5",
    "Kandinsky5Transformer3DModel": "kandinsky5",
    "Flux2": "flux_2",
    "Flux2Transformer": "flux_2",
    "QwenImageTransformer2DModel": "qwen_image",
    "QwenImageTransformer": "qwen_image",
    "WanModel": "wan",
    "HYVideoDiffusionTransformer": "hunyuan_video",
}

ALL_LINEAR = ArchTargets(name="generic", target_modules=None)


def register_model_class(class_name: str, arch: str) -> None:
    """Let an architecture package map its DiT class name to an entry of ``TARGETS``."""
    if arch not in TARGETS:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(sorted(TARGETS))}")
    MODEL_CLASSES[class_name] = arch


def targets_for_model(model: nn.Module | None) -> ArchTargets:
    """The targets of ``model``'s architecture; an unknown model class gets every Linear layer (logged)."""
    if model is None:
        return ALL_LINEAR
    arch = MODEL_CLASSES.get(type(model).__name__)
    if arch is not None:
        return TARGETS[arch]
    logger.info(f"model class {type(model).__name__} is not in the LoRA target table: adapting every Linear layer")
    return ALL_LINEAR
