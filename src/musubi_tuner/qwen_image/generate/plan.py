"""Per-job checks of ``qwen_image_generate_image.py`` (the ``validate`` hook of ``blissful_tuner.generation_loop``).

Runs on every job — command line, ``--from_file`` line, ``--interactive`` input — before any model is loaded, so a
bad line is reported with its file and line number and nothing is generated for a batch with errors (§9.1 item 5).
"""

from __future__ import annotations

from blissful_tuner.generation_loop import DEFAULT_FIELD_MAP, Job
from musubi_tuner.qwen_image.configs import ModelVersion
from musubi_tuner.utils.errors import UserError

DEFAULT_NEGATIVE = " "  # the releases' recommended negative prompt

# Per-line letters of specs/qwen_image.md §9: w h d s g l fs m n ci rcm_* (no f, i, ei, cn, ...).
FIELD_MAP: dict[str, tuple[str, ...]] = {
    key: DEFAULT_FIELD_MAP[key]
    for key in (
        "width",
        "height",
        "sample_steps",
        "guidance_scale",
        "cfg_scale",
        "discrete_flow_shift",
        "control_image_path",
        "mask_path",
        "cfg_schedule",
        "rcm_threshold",
        "rcm_relative_threshold",
        "rcm_kernel_size",
        "rcm_dilate_size",
    )
}


def controls_of(job: Job) -> list[str]:
    """The job's control image paths (command line or the line's ``--ci``)."""
    value = job.args.control_image_path
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def validate_job(job: Job) -> None:
    """Control-image rules of the model version, mask / RCM prerequisites; sets the default negative prompt."""
    a = job.args
    version: ModelVersion = a.version
    controls = controls_of(job)
    if version.is_edit and not controls:
        raise UserError(f"--model_version {version.name} needs a control image (--control_image_path, or --ci on the line)")
    if version.is_edit and not version.multi_image and len(controls) > 1:
        raise UserError(
            f"--model_version {version.name} takes one control image ({len(controls)} given; edit-2509/2511 take several)"
        )
    if version.is_layered and len(controls) != 1:
        raise UserError(f"--model_version layered takes exactly one control image (the input to split), {len(controls)} given")
    if not (version.is_edit or version.is_layered) and controls:
        raise UserError(f"control images are for edit / layered models; --model_version {version.name} takes none")
    if (a.mask_path or a.rcm_threshold is not None) and not version.is_edit:
        raise UserError("--mask_path and --rcm_threshold need an edit model and its control image")
    if a.mask_path and a.rcm_threshold is not None:
        raise UserError("--mask_path (inpainting) and --rcm_threshold (reference consistency mask) cannot be combined")
    if a.infer_steps < 1:
        raise UserError(f"steps must be >= 1 (got {a.infer_steps})")
    if a.negative_prompt is None:
        a.negative_prompt = DEFAULT_NEGATIVE
        job.negative_prompt = DEFAULT_NEGATIVE
