"""The common command line of every ``<arch>_train_network.py`` and ``--config_file`` TOML handling.

Architecture trainers call ``setup_parser_common()`` and add their own group. ``read_config_from_file`` loads a TOML
file whose sections are flattened into one namespace; options given on the command line override it.
"""

from __future__ import annotations

import argparse
import ast
import math
from pathlib import Path
from typing import Any

from musubi_tuner.memory.options import add_memory_args
from musubi_tuner.utils.errors import UserError

TIMESTEP_METHODS = (
    "sigma",
    "uniform",
    "sigmoid",
    "shift",
    "flux_shift",
    "flux2_shift",
    "qwen_shift",
    "krea2_shift",
    "ideogram4_shift",
    "logsnr",
    "qinglong_flux",
    "qinglong_qwen",
)
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")
HF_OPTIONS = (
    "huggingface_repo_id",
    "huggingface_repo_type",
    "huggingface_path_in_repo",
    "huggingface_token",
    "huggingface_repo_visibility",
    "save_state_to_huggingface",
    "resume_from_huggingface",
    "async_upload",
)


def _int_or_str_seed(value: str) -> int:
    """``--seed`` accepts integers or any string (hashed to a 32-bit integer, blissful-tuner behaviour)."""
    try:
        return int(value)
    except ValueError:
        import hashlib

        return int.from_bytes(hashlib.sha256(value.encode("utf-8")).digest()[:4], "little")


def _steps_spec(value: str) -> str:
    """Validate ``--lr_warmup_steps``/``--lr_decay_steps``: an int, a float < 1, or a percentage like ``10%``."""
    from musubi_tuner.training.lr_schedulers import parse_step_count

    parse_step_count(value, 100, "value")  # raises on malformed input
    return value


def _bounded(kind: type, *, low: float, inclusive: bool = True, high: float | None = None) -> Any:
    """An argparse ``type`` converting to ``kind`` and refusing values outside the bound at parse time.

    The message is what argparse prints after ``argument --flag:``; a ``--config_file`` value goes through the same
    converter (``_convert``), so both name the option.
    """

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
        ok = (value >= low if inclusive else value > low) and (high is None or value <= high)
        if not ok:
            bound = f"{'>=' if inclusive else '>'} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound} (got {text})")
        return value

    convert.__name__ = f"{kind.__name__}_bounded"
    return convert


POSITIVE_INT = _bounded(int, low=1)
NON_NEGATIVE_INT = _bounded(int, low=0)
POSITIVE_FLOAT = _bounded(float, low=0, inclusive=False)
NON_NEGATIVE_FLOAT = _bounded(float, low=0)
FRACTION = _bounded(float, low=0, high=1)
TIMESTEP = _bounded(float, low=0, high=1000)


class _Parser(argparse.ArgumentParser):
    """A parser whose errors are one line (the trainer's usage text is hundreds of options long)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def setup_parser_common() -> argparse.ArgumentParser:
    """The options every architecture's network-training script shares (specs/training.md §4).

    Numeric options are range-checked while parsing (``--network_dim 0``, a negative ``--learning_rate``...): one line
    naming the option, exit status 2.
    """
    p = _Parser(description="Train a LoRA/LoHa network on cached latents and text-encoder outputs")

    g = p.add_argument_group("general")
    g.add_argument("--config_file", type=str, default=None, help="TOML file of options (.toml appended if missing); CLI wins")
    g.add_argument("--dataset_config", type=str, default=None, help="dataset config (.toml/.json); required")

    g = p.add_argument_group("attention")
    g.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    g.add_argument("--flash_attn", action="store_true", help="FlashAttention 2")
    g.add_argument("--flash3", action="store_true", help="FlashAttention 3")
    g.add_argument("--sage_attn", action="store_true", help="SageAttention (inference only: refused for training)")
    g.add_argument("--xformers", action="store_true", help="xformers memory-efficient attention")
    g.add_argument("--split_attn", action="store_true", help="run attention one sample at a time (lower peak memory)")

    g = p.add_argument_group("compile / CUDA / dynamo")
    g.add_argument("--compile", action="store_true", help="torch.compile every transformer block")
    g.add_argument("--compile_backend", type=str, default="inductor", help="torch.compile backend")
    g.add_argument(
        "--compile_mode",
        type=str,
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode",
    )
    g.add_argument("--compile_dynamic", type=str, default=None, choices=["true", "false", "auto"], help="dynamic shapes")
    g.add_argument("--compile_fullgraph", action="store_true", help="torch.compile fullgraph=True")
    g.add_argument("--compile_cache_size_limit", type=POSITIVE_INT, default=None, help="torch._dynamo cache_size_limit")
    g.add_argument("--cuda_allow_tf32", action="store_true", help="allow TF32 matmuls and convolutions")
    g.add_argument("--cuda_cudnn_benchmark", action="store_true", help="cudnn.benchmark = True")
    g.add_argument("--dynamo_backend", type=str, default="NO", help="accelerate dynamo backend (NO = off)")
    g.add_argument("--dynamo_mode", type=str, default=None, help="accelerate dynamo mode")
    g.add_argument("--dynamo_fullgraph", action="store_true", help="accelerate dynamo fullgraph")
    g.add_argument("--dynamo_dynamic", action="store_true", help="accelerate dynamo dynamic shapes")

    g = p.add_argument_group("training")
    g.add_argument("--max_train_steps", type=POSITIVE_INT, default=1600, help="total optimizer steps (a total, also on resume)")
    g.add_argument("--max_train_epochs", type=POSITIVE_INT, default=None, help="total epochs (overrides --max_train_steps)")
    g.add_argument(
        "--max_data_loader_n_workers", type=NON_NEGATIVE_INT, default=8, help="DataLoader workers (capped at the CPU count)"
    )
    g.add_argument("--persistent_data_loader_workers", action="store_true", help="keep DataLoader workers between epochs")
    g.add_argument("--seed", type=_int_or_str_seed, default=None, help="random seed (integer or string; random if absent)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute block activations in backward")
    g.add_argument("--gradient_checkpointing_cpu_offload", action="store_true", help="keep checkpointed activations in host memory")
    g.add_argument("--gradient_accumulation_steps", type=POSITIVE_INT, default=1, help="batches per optimizer step")
    g.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="autocast precision")
    g.add_argument(
        "--fp16_accumulation",
        action="store_true",
        help="CUDA fp16 matmuls accumulate in fp16 (faster, less exact; generally harmful for training — blissful-tuner)",
    )
    g.add_argument(
        "--save_precision",
        type=str,
        default=None,
        choices=["float", "fp32", "fp16", "bf16"],
        help="dtype of saved LoRA weights (default fp32)",
    )

    g = p.add_argument_group("logging")
    g.add_argument("--logging_dir", type=str, default=None, help="log directory (enables TensorBoard)")
    g.add_argument(
        "--log_with",
        type=str,
        default=None,
        choices=["tensorboard", "wandb", "all", "jsonl"],
        help="trackers (tensorboard and wandb need their packages; jsonl writes <logging_dir>/<run>/metrics.jsonl)",
    )
    g.add_argument("--log_prefix", type=str, default=None, help="prefix of the run directory name")
    g.add_argument("--log_tracker_name", type=str, default=None, help="tracker project name (default network_train)")
    g.add_argument("--wandb_run_name", type=str, default=None, help="wandb run name")
    g.add_argument("--log_tracker_config", type=str, default=None, help="TOML of tracker init kwargs")
    g.add_argument("--wandb_api_key", type=str, default=None, help="log in to wandb with this key")
    g.add_argument("--log_config", action="store_true", help="log the (sanitised) arguments to the trackers")

    g = p.add_argument_group("DDP")
    g.add_argument("--ddp_timeout", type=POSITIVE_INT, default=None, help="process-group timeout in minutes")
    g.add_argument("--ddp_gradient_as_bucket_view", action="store_true", help="DDP gradient_as_bucket_view")
    g.add_argument("--ddp_static_graph", action="store_true", help="DDP static_graph")

    g = p.add_argument_group("sampling")
    g.add_argument("--sample_every_n_steps", type=POSITIVE_INT, default=None, help="sample every N steps")
    g.add_argument("--sample_every_n_epochs", type=POSITIVE_INT, default=None, help="sample every N epochs")
    g.add_argument("--sample_at_first", action="store_true", help="sample before the first step")
    g.add_argument("--sample_prompts", type=str, default=None, help="prompt file (.txt, .toml or .json)")

    g = p.add_argument_group("validation")
    g.add_argument("--validate_every_n_steps", type=POSITIVE_INT, default=None, help="validation loss every N steps")
    g.add_argument("--validate_every_n_epochs", type=POSITIVE_INT, default=None, help="validation loss every N epochs")
    g.add_argument(
        "--validation_quantiles",
        type=FRACTION,
        nargs="+",
        default=[0.1, 0.3, 0.5, 0.7, 0.9],
        help="quantiles of the training timestep distribution at which validation loss is measured",
    )
    g.add_argument("--validation_seed", type=NON_NEGATIVE_INT, default=42, help="seed of the fixed validation noise")

    g = p.add_argument_group("optimizer / learning rate")
    g.add_argument(
        "--optimizer_type", type=str, default="AdamW", help="AdamW (default), AdamW8bit, Adafactor, torch name, module.Class"
    )
    g.add_argument("--optimizer_args", type=str, nargs="*", default=None, help="key=value (values are Python literals)")
    g.add_argument("--learning_rate", type=POSITIVE_FLOAT, default=2e-6, help="learning rate")
    g.add_argument("--max_grad_norm", type=NON_NEGATIVE_FLOAT, default=1.0, help="gradient clipping norm (0 = off)")
    g.add_argument("--lr_scheduler", type=str, default="constant", help="transformers scheduler name, piecewise_constant, rex")
    g.add_argument("--lr_warmup_steps", type=_steps_spec, default="0", help="int steps, float < 1 fraction, or N%%")
    g.add_argument("--lr_decay_steps", type=_steps_spec, default="0", help="decay steps of warmup_stable_decay (same forms)")
    g.add_argument("--lr_scheduler_num_cycles", type=POSITIVE_INT, default=1, help="cycles of cosine_with_restarts")
    g.add_argument("--lr_scheduler_power", type=POSITIVE_FLOAT, default=1.0, help="power of polynomial")
    g.add_argument("--lr_scheduler_timescale", type=POSITIVE_INT, default=None, help="timescale of inverse_sqrt")
    g.add_argument("--lr_scheduler_min_lr_ratio", type=FRACTION, default=None, help="floor ratio (cosine_with_min_lr, rex...)")
    g.add_argument("--lr_scheduler_type", type=str, default="", help="torch.optim.lr_scheduler.X or module.Class")
    g.add_argument("--lr_scheduler_args", type=str, nargs="*", default=None, help="key=value for --lr_scheduler_type")

    g = p.add_argument_group("memory")
    g.add_argument("--fp8_base", action="store_true", help="DiT weights in fp8")
    g.add_argument("--fp8_scaled", action="store_true", help="scaled fp8 quantisation while loading (needs --fp8_base)")
    g.add_argument("--blocks_to_swap", type=NON_NEGATIVE_INT, default=None, help="blocks kept in host memory and swapped in")
    g.add_argument("--use_pinned_memory_for_block_swap", action="store_true", help="pinned host memory for block swap")
    g.add_argument("--block_swap_h2d_only", action="store_true", help="H2D-only ring buffer (not implemented yet)")
    g.add_argument("--block_swap_ring_size", type=POSITIVE_INT, default=2, help="ring size of the H2D-only swap")
    g.add_argument(
        "--disable_numpy_memmap",
        action="store_true",
        help="accepted for old command lines; no effect (no numpy memory maps are used)",
    )

    g = p.add_argument_group("noise (blissful-tuner extras)")
    g.add_argument(
        "--noise_offset", type=NON_NEGATIVE_FLOAT, default=None, help="add offset·N(0,1) per (batch, channel) to the noise"
    )
    g.add_argument("--noise_offset_random_strength", action="store_true", help="offset drawn uniformly in [0, --noise_offset)")
    g.add_argument("--adaptive_noise_scale", type=float, default=None, help="offset += A·|mean(latent)| (needs --noise_offset)")
    g.add_argument("--multires_noise_iterations", type=POSITIVE_INT, default=None, help="pyramid noise iterations (6-10 typical)")
    g.add_argument("--multires_noise_discount", type=FRACTION, default=0.3, help="weight decay per pyramid level")

    g = p.add_argument_group("timesteps")
    g.add_argument("--guidance_scale", type=float, default=1.0, help="embedded guidance during training")
    g.add_argument(
        "--timestep_sampling",
        type=str,
        default="sigma",
        choices=TIMESTEP_METHODS,
        help="timestep distribution; 'sigma' ignores --discrete_flow_shift (musubi-tuner compatibility), 'shift' uses it",
    )
    g.add_argument("--discrete_flow_shift", type=POSITIVE_FLOAT, default=1.0, help="shift of --timestep_sampling shift")
    g.add_argument(
        "--image_flow_shift",
        type=POSITIVE_FLOAT,
        default=None,
        help="shift for single-frame batches of a video model (image datasets mixed into video training); "
        "default --discrete_flow_shift (blissful-tuner)",
    )
    g.add_argument("--sigmoid_scale", type=POSITIVE_FLOAT, default=1.0, help="scale of sigmoid/shift sampling")
    g.add_argument("--weighting_scheme", type=str, default="none", choices=WEIGHTING_SCHEMES, help="loss weighting / sigma density")
    g.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal / logsnr mean")
    g.add_argument("--logit_std", type=POSITIVE_FLOAT, default=1.0, help="logit_normal / logsnr std")
    g.add_argument("--mode_scale", type=float, default=1.29, help="scale of the 'mode' weighting")
    g.add_argument("--min_timestep", type=TIMESTEP, default=None, help="lowest timestep (0..1000)")
    g.add_argument("--max_timestep", type=TIMESTEP, default=None, help="highest timestep (0..1000)")
    g.add_argument("--preserve_distribution_shape", action="store_true", help="range limits by rejection, not rescaling")
    g.add_argument(
        "--num_timestep_buckets", type=POSITIVE_INT, default=None, help="stratified timestep pool with K buckets per epoch"
    )
    g.add_argument("--show_timesteps", type=str, default=None, choices=["image", "console"], help="show the distribution, exit")

    g = p.add_argument_group("network")
    g.add_argument("--no_metadata", action="store_true", help="save only the minimal metadata")
    g.add_argument("--network_weights", type=str, default=None, help="initial network weights")
    g.add_argument("--network_module", type=str, default=None, help="network module (networks.lora, networks.loha, ...)")
    g.add_argument("--network_dim", type=POSITIVE_INT, default=None, help="rank")
    g.add_argument("--network_alpha", type=NON_NEGATIVE_FLOAT, default=1, help="alpha (scale = alpha / dim)")
    g.add_argument("--network_dropout", type=FRACTION, default=None, help="neuron dropout")
    g.add_argument("--network_args", type=str, nargs="*", default=None, help="key=value network options")
    g.add_argument("--training_comment", type=str, default=None, help="ss_training_comment metadata")
    g.add_argument("--dim_from_weights", action="store_true", help="rank/alpha from --network_weights")
    g.add_argument("--scale_weight_norms", type=POSITIVE_FLOAT, default=None, help="max-norm regularisation")
    g.add_argument("--base_weights", type=str, nargs="*", default=None, help="LoRAs merged into the DiT before training")
    g.add_argument("--base_weights_multiplier", type=float, nargs="*", default=None, help="multipliers of --base_weights")

    g = p.add_argument_group("save / load")
    g.add_argument("--output_dir", type=str, default=None, help="output directory")
    g.add_argument("--output_name", type=str, default=None, help="base name of saved files")
    g.add_argument("--resume", type=str, default=None, help="state directory to resume from")
    g.add_argument("--save_every_n_epochs", type=POSITIVE_INT, default=None, help="save every N epochs")
    g.add_argument("--save_every_n_steps", type=POSITIVE_INT, default=None, help="save every N steps")
    g.add_argument("--save_last_n_epochs", type=POSITIVE_INT, default=None, help="keep the last N epoch LoRAs")
    g.add_argument("--save_last_n_epochs_state", type=POSITIVE_INT, default=None, help="keep the last N epoch states")
    g.add_argument("--save_last_n_steps", type=POSITIVE_INT, default=None, help="keep step LoRAs of the last N steps")
    g.add_argument("--save_last_n_steps_state", type=POSITIVE_INT, default=None, help="keep step states of the last N steps")
    g.add_argument("--save_state", action="store_true", help="save a resumable state with every LoRA")
    g.add_argument("--save_state_on_train_end", action="store_true", help="save a state at the end of training")
    g.add_argument(
        "--lora_format",
        type=str,
        default="kohya",
        choices=["kohya", "comfyui", "diffusers"],
        help="layout of saved LoRA files: kohya (musubi-tuner native, default), comfyui (diffusion_model.<path>.lora_A/B), "
        "diffusers (transformer.<path>.lora_A/B); state directories always hold the native layout",
    )

    g = p.add_argument_group("Hugging Face (not supported: offline product)")
    for name in HF_OPTIONS:
        if name in ("save_state_to_huggingface", "resume_from_huggingface", "async_upload"):
            g.add_argument(f"--{name}", action="store_true", help="not supported (offline); using it is an error")
        else:
            g.add_argument(f"--{name}", type=str, default=None, help="not supported (offline); using it is an error")

    g = p.add_argument_group("metadata")
    g.add_argument("--metadata_title", type=str, default=None, help="modelspec.title")
    g.add_argument("--metadata_author", type=str, default=None, help="modelspec.author")
    g.add_argument("--metadata_description", type=str, default=None, help="modelspec.description")
    g.add_argument("--metadata_license", type=str, default=None, help="modelspec.license")
    g.add_argument("--metadata_tags", type=str, default=None, help="modelspec.tags (comma separated)")
    g.add_argument("--metadata_reso", type=str, default=None, help='modelspec.resolution "W,H"')
    g.add_argument("--metadata_arch", type=str, default=None, help="modelspec.architecture override")

    g = p.add_argument_group("model")
    g.add_argument("--dit", type=str, default=None, help="DiT weights; required")
    g.add_argument("--vae", type=str, default=None, help="VAE weights (needed for sampling)")
    g.add_argument("--vae_dtype", type=str, default=None, help="VAE dtype (default: the architecture's)")
    add_memory_args(p)
    return p


def _flatten(table: dict[str, Any], path: Path, out: dict[str, Any]) -> dict[str, Any]:
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(value, path, out)
        else:
            if key in out:
                raise UserError(f"{path}: key {key!r} appears in more than one section")
            out[key] = value
    return out


def _cli_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations the user set on the command line (so the config file must not override them)."""
    by_flag = {flag: action.dest for action in parser._actions for flag in action.option_strings}
    given = set()
    for token in argv:
        if token.startswith("-"):
            flag = token.split("=", 1)[0]
            if flag in by_flag:
                given.add(by_flag[flag])
            else:  # argparse prefix matching
                matches = {d for f, d in by_flag.items() if f.startswith(flag)}
                if len(matches) == 1:
                    given |= matches
    return given


def read_config_from_file(
    args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> argparse.Namespace:
    """Apply ``--config_file``: flatten its TOML sections; every option given on the command line keeps its value.

    ``argv`` is the command line that produced ``args`` (``sys.argv[1:]`` when None). Unknown keys are an error
    naming the file and key. Values are type-checked by re-parsing them through the parser's own converters.
    """
    import sys

    if not getattr(args, "config_file", None):
        return args
    path = Path(args.config_file)
    if path.suffix != ".toml":
        path = path.with_name(path.name + ".toml") if not path.is_file() else path
    if not path.is_file():
        raise UserError(f"--config_file: file not found: {path}")
    import toml

    try:
        data = toml.loads(path.read_text(encoding="utf-8"))
    except toml.TomlDecodeError as e:
        raise UserError(f"{path}: TOML syntax error: {e}") from None
    values = _flatten(data, path, {})
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    cli = _cli_dests(parser, sys.argv[1:] if argv is None else argv)
    for key, value in values.items():
        if key not in actions:
            raise UserError(f"{path}: unknown option {key!r}")
        if key == "config_file" or key in cli:
            continue
        setattr(args, key, _convert(actions[key], value, path, key))
    return args


def _convert_one(action: argparse.Action, value: Any) -> Any:
    if isinstance(value, (dict, list)):
        raise ValueError("expected a single value")
    if action.type is None:
        return value
    if action.type in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return action.type(value)
    return action.type(str(value))


def _convert(action: argparse.Action, value: Any, path: Path, key: str) -> Any:
    """Check a config value against the option's type, arity and choices."""
    try:
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if action.nargs in ("*", "+"):
            items = value if isinstance(value, list) else [value]
            result = [_convert_one(action, v) for v in items]
            bad = [r for r in result if action.choices is not None and r not in action.choices]
        else:
            result = _convert_one(action, value)
            bad = [result] if action.choices is not None and result not in action.choices else []
        if bad:
            raise ValueError(f"must be one of {list(action.choices)}")
        return result
    except (ValueError, TypeError, argparse.ArgumentTypeError, UserError) as e:
        raise UserError(f"{path}: option {key!r}: invalid value {value!r} ({e})") from None


def parse_kv_args(items: list[str] | None, option: str) -> dict[str, Any]:
    """Parse ``key=value`` items (``--optimizer_args``, ``--lr_scheduler_args``); values are Python literals.

    A value that is not a literal is an error naming the option and item (plain words are not silently strings).
    """
    result: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{option}: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            result[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            raise UserError(f"{option}: value of {key!r} is not a Python literal: {raw!r} (quote strings: {key}='{raw}')") from None
    return result


def parse_network_args(items: list[str] | None) -> dict[str, Any]:
    """``--network_args key=value``: values stay strings (the network module converts them), like the reference."""
    result: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--network_args: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        result[key.strip()] = value.strip()
    return result


def check_unsupported_hf(args: argparse.Namespace) -> None:
    """Hugging Face upload/download options are accepted for command-line compatibility but refused when used."""
    used = [name for name in HF_OPTIONS if getattr(args, name, None)]
    if used:
        flags = ", ".join("--" + n for n in used)
        raise UserError(f"{flags}: Hugging Face upload/download is not supported (offline product); save and resume locally")


# (option, the options of which one must be given for it to have an effect)
DEPENDENT_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gradient_checkpointing_cpu_offload", ("gradient_checkpointing",)),
    ("use_pinned_memory_for_block_swap", ("blocks_to_swap",)),
    ("block_swap_ring_size", ("block_swap_h2d_only",)),
    ("compile_backend", ("compile",)),
    ("compile_mode", ("compile",)),
    ("compile_dynamic", ("compile",)),
    ("compile_fullgraph", ("compile",)),
    ("compile_cache_size_limit", ("compile",)),
    ("sample_at_first", ("sample_prompts",)),
    ("sample_every_n_steps", ("sample_prompts",)),
    ("sample_every_n_epochs", ("sample_prompts",)),
    ("validation_quantiles", ("validate_every_n_steps", "validate_every_n_epochs")),
    ("validation_seed", ("validate_every_n_steps", "validate_every_n_epochs")),
    ("save_last_n_epochs", ("save_every_n_epochs",)),
    ("save_last_n_steps", ("save_every_n_steps",)),
    ("save_last_n_epochs_state", ("save_state",)),
    ("save_last_n_steps_state", ("save_state",)),
    ("lr_scheduler_args", ("lr_scheduler_type",)),
    ("preserve_distribution_shape", ("min_timestep", "max_timestep")),
    ("multires_noise_discount", ("multires_noise_iterations",)),
    ("log_prefix", ("logging_dir",)),
    ("log_tracker_name", ("logging_dir", "log_with")),
    ("log_tracker_config", ("logging_dir", "log_with")),
    ("log_config", ("logging_dir", "log_with")),
    ("wandb_run_name", ("log_with",)),
    ("wandb_api_key", ("log_with",)),
)


def _given(args: argparse.Namespace, defaults: dict[str, Any], dest: str) -> bool:
    value = getattr(args, dest, defaults.get(dest))
    return value not in (None, False) and value != defaults.get(dest)


def check_dependent_options(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> None:
    """Refuse an option that has no effect because the option it belongs to is absent (no flag is silently ignored).

    ``parser`` supplies the defaults (the common trainer parser when None): an option counts as given when its value
    differs from its default.
    """
    defaults = vars((parser or setup_parser_common()).parse_args([]))
    for dest, parents in DEPENDENT_OPTIONS:
        if dest == "lr_scheduler_args" and getattr(args, "lr_scheduler", None) == "piecewise_constant":
            continue  # piecewise_constant reads its step_rules from --lr_scheduler_args
        if _given(args, defaults, dest) and not any(_given(args, defaults, p) for p in parents):
            needs = " or ".join("--" + p for p in parents)
            raise UserError(f"--{dest} has no effect without {needs}; add {needs} or drop --{dest}")
    if args.sample_prompts and not (args.sample_at_first or args.sample_every_n_steps or args.sample_every_n_epochs):
        raise UserError(
            "--sample_prompts has no effect without --sample_at_first, --sample_every_n_steps or --sample_every_n_epochs"
        )
