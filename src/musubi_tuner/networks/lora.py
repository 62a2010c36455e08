"""LoRA (kohya format): module math, module selection, the network the trainer drives, factories.

specs/networks.md §1 (math, forward patching, dropout, dtype bridging, inference module), §2 (selection by block
class names + regexes on dotted paths, kohya names, ``--network_args``), §7 (max-norm). ``--network_module
networks.lora`` works on any architecture: the targets come from ``arch_targets`` by the model class.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from musubi_tuner.networks.arch_targets import ArchTargets, targets_for_model
from musubi_tuner.networks.formats import AdapterModule, adapter_delta, add_hashes, detect_network_types, parse_adapter_state_dict
from musubi_tuner.networks.weight_merge import merge_delta_into_weight
from musubi_tuner.utils.atomic import save_safetensors_atomic
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

LORA_PREFIX = "lora_unet"
ADAPTABLE = (nn.Linear, nn.Conv2d, nn.Conv3d)

# network_args accepted by networks.lora (values arrive as strings from --network_args).
LORA_NETWORK_ARGS = (
    "conv_dim",
    "conv_alpha",
    "rank_dropout",
    "module_dropout",
    "loraplus_lr_ratio",
    "exclude_patterns",
    "include_patterns",
    "exclude_mod",
    "verbose",
)


# --- network_args parsing ------------------------------------------------------------------------------------------


def _as_float(key: str, value: Any) -> float | None:
    if value is None or value == "None":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"--network_args {key}={value!r}: expected a number") from None


def _as_int(key: str, value: Any) -> int | None:
    f = _as_float(key, value)
    if f is None:
        return None
    if f != int(f):
        raise UserError(f"--network_args {key}={value!r}: expected an integer")
    return int(f)


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise UserError(f"--network_args {key}={value!r}: expected True or False")


def _as_patterns(key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise UserError(
                f"--network_args {key}={value!r}: expected a Python list of regexes, e.g. \"{key}=[r'.*attn.*']\""
            ) from None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UserError(f"--network_args {key}: expected a list of strings, got {value!r}")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"--network_args {key}: invalid regex {pattern!r} ({e})") from None
    return list(value)


def parse_network_kwargs(kwargs: Mapping[str, Any], valid: Sequence[str], module_name: str) -> dict[str, Any]:
    """Check ``--network_args`` keys against ``valid`` (an unknown key is a ``UserError`` listing the valid ones)
    and convert the values to their types."""
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise UserError(f"--network_args {unknown[0]!r} is not an option of {module_name}; valid: {', '.join(valid)}")
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in ("conv_dim",):
            out[key] = _as_int(key, value)
        elif key in ("conv_alpha", "rank_dropout", "module_dropout", "loraplus_lr_ratio"):
            out[key] = _as_float(key, value)
        elif key in ("exclude_patterns", "include_patterns"):
            out[key] = _as_patterns(key, value)
        elif key in ("verbose", "exclude_mod"):
            out[key] = _as_bool(key, value)
        else:
            out[key] = value
    for key in ("rank_dropout", "module_dropout"):
        p = out.get(key)
        if p is not None and not 0.0 <= p < 1.0:
            raise UserError(f"--network_args {key}={p}: must be in [0, 1)")
    return out


def resolve_filters(targets: ArchTargets, args: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Exclude and include regexes for ``targets`` and parsed network args (§2.1, §3)."""
    user_ex = list(args.get("exclude_patterns") or [])
    excludes = list(targets.default_excludes) + user_ex
    if not user_ex:
        excludes += list(targets.excludes_if_no_user_excludes)
    if "exclude_mod" in args and not targets.mod_excludes:
        raise UserError(f"--network_args exclude_mod: only for architectures with modulation excludes, not {targets.name}")
    if args.get("exclude_mod", True):
        excludes += list(targets.mod_excludes)
    # Default includes never rescue a module the user excluded (musubi-tuner's Kandinsky 5 defaults made
    # "exclude_patterns=[...self_attention...]" silently ineffective).
    if args.get("include_patterns"):
        includes = list(args["include_patterns"])
    else:
        includes = [] if user_ex else list(targets.default_includes)
    return excludes, includes


# --- modules -------------------------------------------------------------------------------------------------------


def _alpha_value(alpha: Any, rank: int) -> float:
    if isinstance(alpha, torch.Tensor):
        alpha = float(alpha.detach().float().item())
    return float(rank) if alpha is None or alpha == 0 else float(alpha)


def _make_pair(org_module: nn.Module, rank: int, out_features: int | None = None) -> tuple[nn.Module, nn.Module]:
    if isinstance(org_module, nn.Linear):
        out = org_module.out_features if out_features is None else out_features
        return nn.Linear(org_module.in_features, rank, bias=False), nn.Linear(rank, out, bias=False)
    conv = nn.Conv2d if isinstance(org_module, nn.Conv2d) else nn.Conv3d
    down = conv(org_module.in_channels, rank, org_module.kernel_size, org_module.stride, org_module.padding, bias=False)
    return down, conv(rank, org_module.out_channels, 1, 1, bias=False)


class LoRAModule(nn.Module):
    """LoRA for one Linear / Conv2d / Conv3d: ``y = org(x) + up(down(x)) · multiplier · alpha/rank`` (§1.1)."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | torch.Tensor | None = 1,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        split_dims: Sequence[int] | None = None,
    ):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        self.split_dims = list(split_dims) if split_dims else None
        if self.split_dims:
            if not isinstance(org_module, nn.Linear) or sum(self.split_dims) != org_module.out_features:
                raise ValueError(f"{lora_name}: split_dims {self.split_dims} need a Linear with that many output features")
            pairs = [_make_pair(org_module, lora_dim, d) for d in self.split_dims]
            self.lora_down = nn.ModuleList(p[0] for p in pairs)
            self.lora_up = nn.ModuleList(p[1] for p in pairs)
        else:
            self.lora_down, self.lora_up = _make_pair(org_module, lora_dim)
        alpha = _alpha_value(alpha, lora_dim)
        self.scale = alpha / lora_dim
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        for down, up in zip(self._downs(), self._ups(), strict=True):
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.enabled = True
        self.is_conv = not isinstance(org_module, nn.Linear)
        self.org_module_ref = [org_module]  # a list so the base module is not registered as a submodule
        self.org_forward = None

    def _downs(self) -> list[nn.Module]:
        return list(self.lora_down) if self.split_dims else [self.lora_down]

    def _ups(self) -> list[nn.Module]:
        return list(self.lora_up) if self.split_dims else [self.lora_up]

    @property
    def org_module(self) -> nn.Module:
        """The adapted base module."""
        return self.org_module_ref[0]

    def apply_to(self) -> None:
        """Route the base module's forward through this module (§1.2); the module tree stays unchanged."""
        if self.org_forward is not None:
            return
        self.org_forward = self.org_module.forward
        self.org_module.forward = self.forward

    def remove(self) -> None:
        """Undo ``apply_to``: restore the base module's own forward."""
        if self.org_forward is not None:
            self.org_module.forward = self.org_forward
            self.org_forward = None

    def _rank_mask(self, h: torch.Tensor) -> torch.Tensor:
        r = h.shape[1] if self.is_conv else h.shape[-1]
        mask = (torch.rand((h.shape[0], r), device=h.device) > self.rank_dropout).to(h.dtype)
        if self.is_conv:
            return mask.view(*mask.shape, *([1] * (h.ndim - 2)))
        return mask.view(h.shape[0], *([1] * (h.ndim - 2)), r)

    def lora_branch(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(up(down(x)), scale)`` with the training-time dropouts applied (the caller multiplies)."""
        scale = self.scale
        training = self.training
        outs = []
        for down, up in zip(self._downs(), self._ups(), strict=True):
            h = down(x)
            if training and self.dropout:
                h = F.dropout(h, p=self.dropout, training=True)
            if training and self.rank_dropout:
                h = h * self._rank_mask(h)
            outs.append(up(h))
        if training and self.rank_dropout:
            scale = scale / (1.0 - self.rank_dropout)
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)), scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus the scaled LoRA branch; the sum is rounded once to the base output dtype (§1.4)."""
        org = self.org_forward(x, *args, **kwargs)
        if not self.enabled or self.multiplier == 0:
            return org
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return org
        w_dtype = self._downs()[0].weight.dtype
        if x.dtype != w_dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(w_dtype)
        branch, scale = self.lora_branch(x)
        return (org + branch * (self.multiplier * scale)).to(org.dtype)

    def get_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """ΔW in float32 including the multiplier (``self.multiplier`` when None)."""
        m = self.multiplier if multiplier is None else multiplier
        return adapter_delta(AdapterModule(self.lora_name, self.adapter_tensors()), self.alpha.device) * m

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """This module's tensors keyed by file suffix (``lora_down.weight`` ... ``alpha``)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def merge_to(self, sd: Mapping[str, torch.Tensor] | None, dtype: torch.dtype | None, device: torch.device | str) -> None:
        """``W += multiplier · ΔW`` in float32 on ``device``, ``sd`` holding this module's adapter tensors (None: its
        own). fp8-aware: a scaled fp8 weight is dequantised, merged and re-quantised."""
        tensors = dict(sd) if sd is not None else self.adapter_tensors()
        delta = adapter_delta(AdapterModule(self.lora_name, tensors), device) * self.multiplier
        merge_delta_into_module(self.org_module, delta, device)

    def scale_parameters(self, factor: float) -> None:
        """Multiply ΔW by ``factor`` (each factor by its square root)."""
        root = math.sqrt(factor)
        with torch.no_grad():
            for m in self._downs() + self._ups():
                m.weight.mul_(root)

    def up_parameters(self) -> list[nn.Parameter]:
        """Parameters that LoRA+ trains at a higher learning rate."""
        return [m.weight for m in self._ups()]


class LoRAInfModule(LoRAModule):
    """Inference LoRA: no dropout, switchable with ``enabled``, mergeable into the base weight (§1.5)."""

    def __init__(
        self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4, alpha: Any = 1, **kwargs: Any
    ):
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, split_dims=kwargs.get("split_dims"))

    def lora_branch(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        outs = [up(down(x)) for down, up in zip(self._downs(), self._ups(), strict=True)]
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)), self.scale


def merge_delta_into_module(module: nn.Module, delta: torch.Tensor, device: torch.device | str | None = None) -> None:
    """Add ``delta`` to ``module.weight`` in place of its storage, handling ``scale_weight`` (scaled fp8) modules."""
    weight = module.weight
    scale = getattr(module, "scale_weight", None)
    w = weight.detach().to(device) if device is not None else weight.detach()
    new_w, new_scale = merge_delta_into_weight(w, delta.reshape(weight.shape), scale)
    with torch.no_grad():
        module.weight = nn.Parameter(new_w.to(weight.device), requires_grad=weight.requires_grad)
        if new_scale is not None:
            module.scale_weight = new_scale.to(scale.device)


# --- network -------------------------------------------------------------------------------------------------------


def lora_name_of(path: str, prefix: str = LORA_PREFIX) -> str:
    """Kohya name of a dotted module path: ``prefix_`` + path with dots replaced by underscores."""
    return f"{prefix}_{path.replace('.', '_')}"


def select_modules(
    root: nn.Module,
    target_replace_modules: Iterable[str] | None,
    exclude_patterns: Sequence[str] = (),
    include_patterns: Sequence[str] = (),
    conv_ok: bool = True,
) -> list[tuple[str, nn.Module]]:
    """``(dotted path, module)`` of every adaptable layer under the target blocks that the filters keep (§2.1).

    A layer is skipped when its dotted path fullmatches an exclude pattern and no include pattern.
    """
    targets = None if target_replace_modules is None else set(target_replace_modules)
    excludes = [re.compile(p) for p in exclude_patterns]
    includes = [re.compile(p) for p in include_patterns]
    kinds = ADAPTABLE if conv_ok else (nn.Linear,)
    seen: dict[str, nn.Module] = {}
    blocks = [("", root)] if targets is None else [(n, m) for n, m in root.named_modules() if type(m).__name__ in targets]
    for block_name, block in blocks:
        for child_name, child in block.named_modules():
            if not isinstance(child, kinds):
                continue
            path = ".".join(p for p in (block_name, child_name) if p)
            if not path or path in seen:
                continue
            if any(e.fullmatch(path) for e in excludes) and not any(i.fullmatch(path) for i in includes):
                continue
            seen[path] = child
    return list(seen.items())


class LoRANetwork(nn.Module):
    """A set of adapter modules over one DiT, with the methods the trainer and generators call."""

    def __init__(
        self,
        target_replace_modules: Iterable[str] | None,
        unet: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | None = 1,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        conv_lora_dim: int | None = None,
        conv_alpha: float | None = None,
        module_class: type[LoRAModule] = LoRAModule,
        modules_dim: Mapping[str, int] | None = None,
        modules_alpha: Mapping[str, Any] | None = None,
        modules_class: Mapping[str, type[nn.Module]] | None = None,
        exclude_patterns: Sequence[str] = (),
        include_patterns: Sequence[str] = (),
        verbose: bool = False,
        loraplus_lr_ratio: float | None = None,
        prefix: str = LORA_PREFIX,
        conv_ok: bool = True,
    ):
        super().__init__()
        self.multiplier = multiplier
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.prefix = prefix
        from_weights = modules_dim is not None
        candidates = select_modules(unet, target_replace_modules, exclude_patterns, include_patterns, conv_ok)
        self.unet_loras: list[nn.Module] = []
        self.module_paths: dict[str, str] = {}
        skipped = []
        for path, module in candidates:
            name = lora_name_of(path, prefix)
            if from_weights and name not in modules_dim:
                continue
            if name in self.module_paths:
                raise ValueError(f"LoRA name {name!r} is produced by both {self.module_paths[name]!r} and {path!r}")
            is_small = isinstance(module, nn.Linear) or all(k == 1 for k in module.kernel_size)
            cls: type[nn.Module] = module_class
            if from_weights:
                dim, alpha_m = modules_dim[name], (modules_alpha or {}).get(name)
                cls = (modules_class or {}).get(name, module_class)
            elif is_small:
                dim, alpha_m = lora_dim, alpha
            elif conv_lora_dim:
                dim, alpha_m = conv_lora_dim, conv_alpha
            else:
                skipped.append(path)
                continue
            lora = cls(
                name, module, multiplier, dim, alpha_m, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout
            )
            self.module_paths[name] = path
            self.unet_loras.append(lora)
            self.add_module(name, lora)
            if verbose:
                logger.info(f"{name}: {type(lora).__name__} rank {dim}, alpha {float(lora.alpha)}")
        if from_weights:
            missing = sorted(set(modules_dim) - set(self.module_paths))
            if missing:
                raise UserError(f"{len(missing)} adapter module(s) match no layer of the model, e.g. {missing[:5]}")
        if not self.unet_loras:
            raise UserError("No LoRA modules found: the target blocks/filters select no Linear layer of the model")
        if skipped:
            logger.info(f"{len(skipped)} convolutions with kernel > 1 skipped (set network_args conv_dim to adapt them)")
        logger.info(f"created {type(self.unet_loras[0]).__name__} for {len(self.unet_loras)} modules")

    # trainer interface ------------------------------------------------------------------------------------------

    def prepare_network(self, args: Any) -> None:
        """Hook called by the trainer after creation (nothing to prepare for LoRA)."""

    def set_multiplier(self, multiplier: float) -> None:
        """Set the multiplier of every module."""
        self.multiplier = multiplier
        for lora in self.unet_loras:
            lora.multiplier = multiplier

    def set_enabled(self, is_enabled: bool) -> None:
        """Switch the adapter contribution on or off without unpatching."""
        for lora in self.unet_loras:
            lora.enabled = is_enabled

    def apply_to(
        self, text_encoders: Any = None, unet: nn.Module | None = None, apply_text_encoder: bool = False, apply_unet: bool = True
    ) -> None:
        """Patch the forwards of the selected base modules (text-encoder LoRA is not implemented)."""
        if apply_text_encoder:
            raise UserError("text-encoder LoRA is not supported (the text encoders are frozen and their outputs cached)")
        if apply_unet:
            for lora in self.unet_loras:
                lora.apply_to()

    def remove_from(self) -> None:
        """Restore the base modules' own forwards."""
        for lora in self.unet_loras:
            lora.remove()

    def is_mergeable(self) -> bool:
        """Adapters can be merged into the base weights."""
        return True

    def merge_to(
        self,
        text_encoders: Any,
        unet: nn.Module | None,
        weights_sd: Mapping[str, torch.Tensor],
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        """Merge ``weights_sd`` (an adapter state dict for these modules) into the base weights, fp8-aware."""
        by_module = parse_adapter_state_dict(weights_sd)
        for lora in self.unet_loras:
            m = by_module.get(lora.lora_name)
            if m is not None:
                lora.merge_to(m.tensors, dtype, device)
        logger.info(f"merged {len(by_module)} adapter modules into the model")

    def prepare_optimizer_params(
        self, unet_lr: float, text_encoder_lr: float | None = None, **kwargs: Any
    ) -> tuple[list[dict], list[str]]:
        """Parameter groups and their descriptions; with ``loraplus_lr_ratio`` the up weights get ``lr × ratio``."""
        self.requires_grad_(True)
        params = [p for p in self.parameters() if p.requires_grad]
        if not self.loraplus_lr_ratio:
            return [{"params": params, "lr": unet_lr}], ["unet"]
        ups = {id(p) for lora in self.unet_loras for p in lora.up_parameters()}
        plain = [p for p in params if id(p) not in ups]
        plus = [p for p in params if id(p) in ups]
        groups = [{"params": plain, "lr": unet_lr}, {"params": plus, "lr": unet_lr * self.loraplus_lr_ratio}]
        return groups, ["unet", "unet plus"]

    def prepare_grad_etc(self, unet: nn.Module | None = None) -> None:
        """Make the adapter trainable."""
        self.requires_grad_(True)

    def on_epoch_start(self, unet: nn.Module | None = None) -> None:
        """Training mode for the adapter modules (enables the dropouts)."""
        self.train()

    def on_step_start(self) -> None:
        """Per-step hook (nothing to do for LoRA)."""

    def get_trainable_params(self) -> list[nn.Parameter]:
        """The trainable parameters."""
        return list(self.parameters())

    def state_dict_for_save(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Detached CPU copy of the adapter tensors in kohya layout, floats cast to ``dtype`` when given."""
        out = {}
        for k, v in self.state_dict().items():
            v = v.detach().to("cpu")
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v.clone()
        return out

    def save_weights(self, file: str | Path, dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> None:
        """Save in kohya format (atomic); with metadata, ``sshs_model_hash`` / ``sshs_legacy_hash`` are added."""
        if Path(file).suffix != ".safetensors":
            raise UserError(f"{file}: LoRA weights are saved as .safetensors only")
        sd = self.state_dict_for_save(dtype)
        md = None if metadata is None else add_hashes(sd, dict(metadata))
        save_safetensors_atomic(sd, file, md)

    def load_weights(self, file: str | Path | Mapping[str, torch.Tensor]) -> Any:
        """Load adapter weights (a path or a state dict); returns the ``load_state_dict`` result."""
        source = "<state dict>" if isinstance(file, Mapping) else str(file)
        sd = load_adapter_file(file)[0] if not isinstance(file, Mapping) else dict(file)
        own = self.state_dict()
        for key, tensor in sd.items():
            if key in own and tuple(own[key].shape) != tuple(tensor.shape):
                raise UserError(
                    f"{source}: {key} has shape {list(tensor.shape)} but this network's is {list(own[key].shape)} "
                    "(another rank? pass the file's --network_dim, or --dim_from_weights)"
                )
        result = self.load_state_dict(sd, strict=False)
        if result.unexpected_keys:
            raise UserError(
                f"{source}: {len(result.unexpected_keys)} tensor(s) match no module of this network, "
                f"e.g. {result.unexpected_keys[:5]} (different architecture, network type or module filters?)"
            )
        if result.missing_keys:
            logger.warning(f"{source}: {len(result.missing_keys)} network tensors not in the file, e.g. {result.missing_keys[:3]}")
        return result

    def backup_weights(self) -> None:
        """Keep a copy of the base weights so ``pre_calculation`` can be undone."""
        for lora in self.unet_loras:
            org = lora.org_module
            if not hasattr(org, "_lora_org_weight"):
                org._lora_org_weight = org.weight.detach().clone()
                org._lora_org_scale = getattr(org, "scale_weight", None)

    def restore_weights(self) -> None:
        """Put back the base weights saved by ``backup_weights`` and re-enable the adapters."""
        for lora in self.unet_loras:
            org = lora.org_module
            if hasattr(org, "_lora_org_weight"):
                org.weight = nn.Parameter(org._lora_org_weight, requires_grad=False)
                if org._lora_org_scale is not None:
                    org.scale_weight = org._lora_org_scale
                del org._lora_org_weight, org._lora_org_scale
            lora.enabled = True

    def pre_calculation(self) -> None:
        """Merge the adapters into the base weights (after ``backup_weights``) and disable the adapter branches."""
        for lora in self.unet_loras:
            merge_delta_into_module(lora.org_module, lora.get_weight(), lora.alpha.device)
            lora.enabled = False

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device: torch.device | str) -> tuple[int, float, float]:
        """Scale every module whose ‖ΔW‖_F (multiplier 1) exceeds ``max_norm_value`` back onto it (§7).

        Returns ``(number of modules scaled, mean norm, max norm)`` of the norms after scaling.
        """
        keys_scaled = 0
        norms = []
        for lora in self.unet_loras:
            norm = lora.get_weight(1.0).to(device).norm()
            desired = torch.clamp(norm, max=max_norm_value)
            ratio = float(desired / norm) if norm > 0 else 1.0
            if ratio != 1.0:
                keys_scaled += 1
                lora.scale_parameters(ratio)
            norms.append(float(norm) * ratio)
        return keys_scaled, sum(norms) / max(len(norms), 1), max(norms, default=0.0)


# --- file helpers --------------------------------------------------------------------------------------------------


def load_adapter_file(file: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state dict, metadata)`` of an adapter file (``.safetensors``; ``.pt/.pth`` with ``weights_only``)."""
    from musubi_tuner.utils.safetensors_utils import open_weights

    with open_weights(file) as reader:
        return {k: reader.get_tensor(k) for k in reader.keys()}, reader.metadata()


def dims_from_weights(weights_sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, Any], dict[str, str]]:
    """Per module: rank, alpha (tensor or None) and adapter kind, from a kohya-format state dict."""
    modules = parse_adapter_state_dict(weights_sd)
    dims, alphas, kinds = {}, {}, {}
    for name, m in modules.items():
        if m.is_dotted:
            raise UserError(
                f"adapter module {name!r} uses the diffusers layout; convert it first with convert_lora.py --target default"
            )
        t = m.tensors
        if m.kind == "lora":
            first = "lora_down.weight" if "lora_down.weight" in t else "lora_down.0.weight"
            dims[name] = t[first].shape[0]
        else:
            dims[name] = m.rank
        alphas[name] = t.get("alpha")
        kinds[name] = m.kind
    return dims, alphas, kinds


# --- factories -----------------------------------------------------------------------------------------------------


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoders: Any,
    unet: nn.Module,
    *,
    target_replace_modules: Iterable[str] | None,
    default_excludes: Sequence[str] = (),
    default_includes: Sequence[str] = (),
    targets: ArchTargets | None = None,
    neuron_dropout: float | None = None,
    module_class: type[LoRAModule] = LoRAModule,
    network_class: type[LoRANetwork] = LoRANetwork,
    valid_args: Sequence[str] = LORA_NETWORK_ARGS,
    module_name: str = "networks.lora",
    conv_ok: bool = True,
    **kwargs: Any,
) -> LoRANetwork:
    """Create a training network over ``unet`` (generic factory; architecture modules pass their targets)."""
    if targets is None:
        targets = ArchTargets(
            "custom",
            tuple(target_replace_modules) if target_replace_modules is not None else None,
            tuple(default_excludes),
            (),
            tuple(default_includes),
        )
    args = parse_network_kwargs(kwargs, valid_args, module_name)
    excludes, includes = resolve_filters(targets, args)
    return network_class(
        targets.target_modules,
        unet,
        multiplier=multiplier,
        lora_dim=network_dim if network_dim is not None else 4,
        alpha=network_alpha,
        dropout=neuron_dropout,
        rank_dropout=args.get("rank_dropout"),
        module_dropout=args.get("module_dropout"),
        conv_lora_dim=args.get("conv_dim"),
        conv_alpha=args.get("conv_alpha"),
        module_class=module_class,
        exclude_patterns=excludes,
        include_patterns=includes,
        verbose=bool(args.get("verbose")),
        loraplus_lr_ratio=args.get("loraplus_lr_ratio"),
        conv_ok=conv_ok,
    )


def create_network_from_weights(
    multiplier: float,
    weights_sd: Mapping[str, torch.Tensor],
    unet: nn.Module,
    *,
    for_inference: bool = False,
    neuron_dropout: float | None = None,
    valid_args: Sequence[str] = LORA_NETWORK_ARGS,
    module_name: str = "networks.lora",
    **kwargs: Any,
) -> LoRANetwork:
    """A network whose modules, ranks and alphas come from ``weights_sd``; LoRA and LoHa modules may be mixed.

    Every module of the file must match a layer of the model by its exact name (module filters do not apply;
    the dropouts and LoRA+ of ``kwargs`` do). The weights are loaded into the network.
    """
    from musubi_tuner.networks import loha  # noqa: PLC0415 - loha imports this module

    args = parse_network_kwargs(kwargs, valid_args, module_name)
    dims, alphas, kinds = dims_from_weights(weights_sd)
    unsupported = sorted({k for k in kinds.values() if k not in ("lora", "loha")})
    if unsupported:
        raise UserError(f"adapter type(s) {unsupported} cannot be loaded as a network (merge them with merge_lora.py)")
    classes = {
        "lora": LoRAInfModule if for_inference else LoRAModule,
        "loha": loha.LoHaInfModule if for_inference else loha.LoHaModule,
    }
    modules_class = {name: classes[kind] for name, kind in kinds.items()}
    # Names in the file are exact, so the whole model is searched (a file may adapt layers outside the blocks).
    network = LoRANetwork(
        None,
        unet,
        multiplier=multiplier,
        modules_dim=dims,
        modules_alpha=alphas,
        modules_class=modules_class,
        module_class=classes["lora"],
        dropout=None if for_inference else neuron_dropout,
        rank_dropout=None if for_inference else args.get("rank_dropout"),
        module_dropout=None if for_inference else args.get("module_dropout"),
        loraplus_lr_ratio=args.get("loraplus_lr_ratio"),
    )
    network.load_state_dict(dict(weights_sd), strict=True)
    return network


def create_arch_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoders: Any,
    unet: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> LoRANetwork:
    """``--network_module networks.lora``: targets of ``unet``'s architecture (``arch_targets``), else every Linear."""
    targets = targets_for_model(unet)
    return create_network(
        multiplier,
        network_dim,
        network_alpha,
        vae,
        text_encoders,
        unet,
        target_replace_modules=targets.target_modules,
        targets=targets,
        neuron_dropout=neuron_dropout,
        **kwargs,
    )


def create_arch_network_from_weights(
    multiplier: float,
    weights_sd: Mapping[str, torch.Tensor],
    text_encoders: Any = None,
    unet: nn.Module | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> LoRANetwork:
    """Network from a kohya-format state dict (LoRA and/or LoHa modules) over ``unet``'s architecture targets."""
    if unet is None:
        raise ValueError("create_arch_network_from_weights needs the model (unet)")
    kinds = detect_network_types(weights_sd)
    if "peft" in kinds:
        raise UserError(
            "the adapter uses the diffusers lora_A/lora_B layout; convert it first with convert_lora.py --target default"
        )
    return create_network_from_weights(multiplier, weights_sd, unet, for_inference=for_inference, **kwargs)


def arch_network_functions(targets: ArchTargets, module_name: str) -> tuple[Any, Any]:
    """``create_arch_network`` and ``create_arch_network_from_weights`` of one ``networks.lora_<arch>`` module.

    The network adapts ``targets``'s blocks (whatever the model class) and records ``module_name`` as its
    ``ss_network_module``; state dicts may hold LoRA and LoHa modules alike.
    """

    def create(
        multiplier: float,
        network_dim: int | None,
        network_alpha: float | None,
        vae: Any,
        text_encoders: Any,
        unet: nn.Module,
        neuron_dropout: float | None = None,
        **kwargs: Any,
    ) -> LoRANetwork:
        return create_network(
            multiplier,
            network_dim,
            network_alpha,
            vae,
            text_encoders,
            unet,
            target_replace_modules=targets.target_modules,
            targets=targets,
            neuron_dropout=neuron_dropout,
            module_name=module_name,
            **kwargs,
        )

    def from_weights(
        multiplier: float,
        weights_sd: Mapping[str, torch.Tensor],
        text_encoders: Any = None,
        unet: nn.Module | None = None,
        for_inference: bool = False,
        **kwargs: Any,
    ) -> LoRANetwork:
        return create_arch_network_from_weights(
            multiplier, weights_sd, text_encoders, unet, for_inference, module_name=module_name, **kwargs
        )

    create.__name__, from_weights.__name__ = "create_arch_network", "create_arch_network_from_weights"
    create.__doc__ = f"LoRA over the {targets.name} transformer blocks ({module_name})."
    from_weights.__doc__ = f"Network from a kohya-format {targets.name} state dict (LoRA and/or LoHa modules)."
    return create, from_weights
