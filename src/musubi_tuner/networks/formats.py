"""Adapter files: per-module parsing, network-type detection, ΔW computation, architecture detection, hashes.

specs/networks.md §4.4: the type is decided per module from the key suffixes (files may mix types); an unknown
suffix is an error naming the key. ΔW is always computed in float32 and never includes the user multiplier.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from musubi_tuner.utils.errors import UserError

LORA, LOHA, LOKR, PEFT = "lora", "loha", "lokr", "peft"

_SUFFIX = re.compile(
    r"^(?P<module>.+?)\.(?P<suffix>lora_down(?:\.\d+)?\.weight|lora_up(?:\.\d+)?\.weight|alpha|hada_w[12]_[ab]"
    r"|lokr_w[12](?:_[ab])?|lora_A\.weight|lora_B\.weight)$"
)
_KIND_OF_SUFFIX = (("lora_down", LORA), ("lora_up", LORA), ("hada_", LOHA), ("lokr_", LOKR), ("lora_A", PEFT), ("lora_B", PEFT))
# Prefixes of the dotted (diffusers / PEFT / ComfyUI) layout; kohya names have no dots before the suffix.
DOTTED_PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.", "model.diffusion_model.")
MAX_EXAMPLES = 5


@dataclass
class AdapterModule:
    """The tensors of one adapted module, keyed by suffix (``lora_down.weight``, ``hada_w1_a``, ``alpha`` ...)."""

    name: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``lora``, ``loha``, ``lokr`` or ``peft`` (``lora_A``/``lora_B``)."""
        kinds = {k for s in self.tensors for prefix, k in _KIND_OF_SUFFIX if s.startswith(prefix)}
        if len(kinds) != 1:
            raise UserError(
                f"adapter module {self.name!r} has tensors of {sorted(kinds) or 'no'} adapter types: {sorted(self.tensors)}"
            )
        return kinds.pop()

    @property
    def alpha(self) -> float | None:
        """The stored alpha, or None."""
        a = self.tensors.get("alpha")
        return None if a is None else float(a.float().item())

    @property
    def rank(self) -> int:
        """The adapter rank (for LoKr with a full ``w2``: the smaller side of ``w2``)."""
        t = self.tensors
        kind = self.kind
        if kind == LORA:
            downs = [v for s, v in t.items() if s.startswith("lora_down")]
            return sum(d.shape[0] for d in downs)
        if kind == PEFT:
            return t["lora_A.weight"].shape[0]
        if kind == LOHA:
            return t["hada_w1_b"].shape[0]
        if "lokr_w2_b" in t:
            return t["lokr_w2_b"].shape[0]
        if "lokr_w1_b" in t:
            return t["lokr_w1_b"].shape[0]
        return min(t["lokr_w2"].shape[:2])

    @property
    def is_dotted(self) -> bool:
        """True when the module is named by a dotted path (diffusers layout) rather than a kohya name."""
        return "." in self.name


def split_key(key: str) -> tuple[str, str] | None:
    """``'<module>.<suffix>'`` → ``(module, suffix)`` for known adapter suffixes, else None."""
    m = _SUFFIX.match(key)
    return (m["module"], m["suffix"]) if m else None


def parse_adapter_state_dict(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> dict[str, AdapterModule]:
    """Group an adapter state dict by module; an unknown suffix is a ``UserError`` naming ``source`` and the keys."""
    modules: dict[str, AdapterModule] = {}
    unknown: list[str] = []
    for key, t in sd.items():
        parts = split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        name, suffix = parts
        modules.setdefault(name, AdapterModule(name)).tensors[suffix] = t
    if unknown:
        raise UserError(
            f"{source}: {len(unknown)} key(s) are not LoRA/LoHa/LoKr tensors, e.g. {unknown[:MAX_EXAMPLES]} "
            "(DoRA, full-diff and Tucker tensors are not supported)"
        )
    for m in modules.values():
        if set(m.tensors) == {"alpha"}:
            raise UserError(f"{source}: module {m.name!r} has an alpha but no weights")
        _check_complete(m, source)
    return modules


# diffusers/PEFT files keep the LoraConfig (r, lora_alpha, alpha_pattern, use_rslora ...) as JSON under this metadata
# key, prefixed by the pipeline component ("transformer.lora_alpha") when written by ``save_lora_weights``.
PEFT_METADATA_KEY = "lora_adapter_metadata"


def with_peft_alphas(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> dict[str, torch.Tensor]:
    """``sd`` plus an ``<module>.alpha`` for every alpha-less ``lora_A/lora_B`` module whose PEFT config in the
    metadata gives ``lora_alpha`` (or an ``alpha_pattern`` entry), so the scale alpha/r is the one PEFT applies.

    ``use_rslora`` (scale alpha/sqrt(r)) is stored as the equivalent alpha·sqrt(r); DoRA is refused.
    Without that metadata PEFT uses ``lora_alpha = r`` (scale 1), which is what an absent alpha means here too.
    """
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return dict(sd)
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: metadata {PEFT_METADATA_KEY!r} is not valid JSON ({e})") from e
    cfg = {k.split(".", 1)[1]: v for k, v in packed.items() if k.startswith("transformer.")} or packed
    if cfg.get("use_dora"):
        raise UserError(f"{source}: a DoRA adapter (use_dora in {PEFT_METADATA_KEY}); DoRA is not supported")
    lora_alpha, patterns = cfg.get("lora_alpha"), cfg.get("alpha_pattern") or {}
    out = dict(sd)
    for key, t in sd.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        if f"{module}.alpha" in sd:
            continue
        path = strip_dotted_prefix(module)
        alpha = next((a for p, a in patterns.items() if re.match(rf"(.*\.)?({p})$", path)), lora_alpha)
        if alpha is None:
            continue
        alpha = float(alpha) * (math.sqrt(t.shape[0]) if cfg.get("use_rslora") else 1.0)
        out[f"{module}.alpha"] = torch.tensor(alpha)
    return out


def _check_complete(m: AdapterModule, source: str) -> None:
    kind = m.kind
    t = m.tensors
    pairs: list[tuple[str, str]] = []  # (left, right) factors multiplied as left @ right: inner sizes must agree
    if kind == LORA:
        downs = sorted(s for s in t if s.startswith("lora_down"))
        ups = sorted(s for s in t if s.startswith("lora_up"))
        if [s.replace("down", "") for s in downs] != [s.replace("up", "") for s in ups]:
            missing = "lora_up" if len(ups) < len(downs) else "lora_down"
            raise UserError(f"{source}: module {m.name!r} lacks its {missing} tensor(s) (has {sorted(t)})")
        pairs = [(s.replace("down", "up"), s) for s in downs]
    elif kind == LOHA:
        need = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
        if not need <= set(t):
            raise UserError(f"{source}: LoHa module {m.name!r} lacks {sorted(need - set(t))}")
        pairs = [("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")]
    elif kind == PEFT:
        if not {"lora_A.weight", "lora_B.weight"} <= set(t):
            raise UserError(f"{source}: module {m.name!r} needs both lora_A.weight and lora_B.weight (has {sorted(t)})")
        pairs = [("lora_B.weight", "lora_A.weight")]
    else:
        has_w1 = "lokr_w1" in t or {"lokr_w1_a", "lokr_w1_b"} <= set(t)
        has_w2 = "lokr_w2" in t or {"lokr_w2_a", "lokr_w2_b"} <= set(t)
        if not (has_w1 and has_w2):
            raise UserError(f"{source}: LoKr module {m.name!r} is incomplete (has {sorted(t)})")
        pairs = [(f"lokr_w{i}_a", f"lokr_w{i}_b") for i in (1, 2) if f"lokr_w{i}_a" in t]
    for left, right in pairs:
        a, b = t[left], t[right]
        if a.ndim < 2 or b.ndim < 2 or a.shape[1] != b.shape[0]:
            raise UserError(
                f"{source}: module {m.name!r}: {left} has shape {list(a.shape)} and {right} has shape {list(b.shape)}; "
                f"their ranks ({a.shape[1] if a.ndim > 1 else '?'} vs {b.shape[0] if b.ndim else '?'}) differ "
                "(damaged or hand-edited file)"
            )
    if kind == LOHA and (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]) != (t["hada_w2_a"].shape[0], t["hada_w2_b"].shape[1]):
        raise UserError(
            f"{source}: LoHa module {m.name!r}: hada_w1 gives {t['hada_w1_a'].shape[0]}x{t['hada_w1_b'].shape[1]} but "
            f"hada_w2 gives {t['hada_w2_a'].shape[0]}x{t['hada_w2_b'].shape[1]}"
        )


def detect_network_types(sd: Mapping[str, torch.Tensor] | Iterable[str]) -> set[str]:
    """The adapter types present in a state dict (or its keys): a subset of ``{'lora', 'loha', 'lokr', 'peft'}``."""
    found: set[str] = set()
    for key in sd:
        parts = split_key(key)
        if parts is None:
            continue
        found.update(k for prefix, k in _KIND_OF_SUFFIX if parts[1].startswith(prefix))
    return found


def _scale(alpha: float | None, rank: int) -> float:
    return 1.0 if not alpha or rank == 0 else alpha / rank


def lora_pair_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``up @ down`` for Linear (2-D) and conv (4-D / 5-D) LoRA factors, with the conv kernel composed."""
    if down.ndim == 2:
        return up @ down
    if down.shape[2:].numel() == 1:  # 1x1 conv
        shape = (up.shape[0], down.shape[1], *down.shape[2:])
        return (up.flatten(1) @ down.flatten(1)).reshape(shape)
    conv = F.conv2d if down.ndim == 4 else F.conv3d
    # Compose the k×k down kernel with the 1×1 up weights: each output channel is a rank-mix of down kernels.
    return conv(down.permute(1, 0, *range(2, down.ndim)), up).permute(1, 0, *range(2, down.ndim))


def adapter_delta(m: AdapterModule, device: torch.device | str = "cpu") -> torch.Tensor:
    """ΔW of one module in float32 on ``device`` (scale alpha/rank included, multiplier not)."""
    t = {k: v.to(device=device, dtype=torch.float32) for k, v in m.tensors.items()}
    kind, alpha = m.kind, m.alpha
    if kind == LORA:
        downs = sorted((s for s in t if s.startswith("lora_down")), key=_split_index)
        deltas = [lora_pair_delta(t[s], t[s.replace("down", "up")]) for s in downs]
        rank = sum(t[s].shape[0] for s in downs)
        # split_dims: each pair covers a slice of the output rows; alpha applies per pair rank (kohya convention)
        if len(deltas) > 1:
            return torch.cat([d * _scale(alpha, t[s].shape[0]) for d, s in zip(deltas, downs, strict=True)], dim=0)
        return deltas[0] * _scale(alpha, rank)
    if kind == PEFT:
        a, b = t["lora_A.weight"], t["lora_B.weight"]
        return lora_pair_delta(a, b) * _scale(alpha, a.shape[0])
    if kind == LOHA:
        w1 = t["hada_w1_a"] @ t["hada_w1_b"]
        w2 = t["hada_w2_a"] @ t["hada_w2_b"]
        return w1 * w2 * _scale(alpha, t["hada_w1_b"].shape[0])
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2, scale = t["lokr_w2"], (1.0 if "lokr_w1" in t else _scale(alpha, t["lokr_w1_b"].shape[0]))
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        scale = _scale(alpha, t["lokr_w2_b"].shape[0])
    if w2.ndim > 2:
        w1 = w1.reshape(*w1.shape, *([1] * (w2.ndim - 2)))
    return torch.kron(w1, w2) * scale


def _split_index(suffix: str) -> int:
    m = re.search(r"\.(\d+)\.weight$", suffix)
    return int(m[1]) if m else 0


# --- architecture detection (§4.4 product rule) ---------------------------------------------------------------------

# Key-prefix signatures of kohya LoRA names and of checkpoint keys, most specific first.
_LORA_SIGNATURES = (
    ("kandinsky5", re.compile(r"^lora_unet_(visual|text)_transformer_blocks_\d+_")),
    ("flux_2", re.compile(r"^lora_unet_(double|single)_blocks_\d+_")),
    ("qwen_image", re.compile(r"^lora_unet_transformer_blocks_\d+_(img|txt)_(mlp|mod)_")),
    ("wan", re.compile(r"^lora_unet_blocks_\d+_(self|cross)_attn_")),
)
_CKPT_SIGNATURES = (
    ("kandinsky5", re.compile(r"^(visual|text)_transformer_blocks\.\d+\.")),
    ("flux_2", re.compile(r"^(double|single)_blocks\.\d+\.")),
    ("qwen_image", re.compile(r"^transformer_blocks\.\d+\.(img|txt)_(mlp|mod)\.")),
    ("wan", re.compile(r"^blocks\.\d+\.(self|cross)_attn\.")),
)
# diffusers module names found only in one architecture (FLUX.2's q/k/v-only names are shared with Qwen-Image)
_DIFFUSERS_LORA_SIGNATURES = (
    (
        "flux_2",
        re.compile(
            r"^(single_transformer_blocks\.\d+\.attn\.to_qkv_mlp_proj|transformer_blocks\.\d+\.ff(_context)?\.linear_(in|out))\."
        ),
    ),
)
# Architecture names found in metadata → the family names used above.
_FAMILY_WORDS = (
    ("kandinsky", "kandinsky5"),
    ("flux", "flux_2"),
    ("qwen", "qwen_image"),
    ("wan", "wan"),
    ("hunyuan", "hunyuan_video"),
)


def _family(name: str) -> str | None:
    low = name.lower()
    return next((fam for word, fam in _FAMILY_WORDS if word in low), None)


def strip_dotted_prefix(path: str) -> str:
    """Remove one known checkpoint/adapter prefix (``diffusion_model.``, ``transformer.`` ...) from a dotted path."""
    for p in sorted(DOTTED_PREFIXES, key=len, reverse=True):
        if path.startswith(p):
            return path[len(p) :]
    return path


def detect_adapter_architecture(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str | None:
    """Architecture family of an adapter file: metadata first, then key signatures; None when unknown."""
    md = metadata or {}
    for field_name in ("ss_base_model_version", "modelspec.architecture"):
        fam = _family(md.get(field_name, ""))
        if fam:
            return fam
    keys = list(keys)
    for fam, pattern in _LORA_SIGNATURES:
        if any(pattern.match(k) for k in keys):
            return fam
    dotted = [p[0] + "." for k in keys if (p := split_key(k)) and "." in p[0]]
    for fam, pattern in _DIFFUSERS_LORA_SIGNATURES:
        if any(pattern.match(strip_dotted_prefix(k)) for k in dotted):
            return fam
    return detect_checkpoint_architecture(dotted)


def detect_checkpoint_architecture(keys: Iterable[str]) -> str | None:
    """Architecture family of a DiT checkpoint from its key layout; None when unknown."""
    keys = [strip_dotted_prefix(k) for k in keys]
    for fam, pattern in _CKPT_SIGNATURES:
        if any(pattern.match(k) for k in keys):
            return fam
    return None


# --- sd-webui-additional-networks hashes (§2.2) ----------------------------------------------------------------------


def precalculate_safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` of ``tensors`` serialised with only the ``ss_*`` metadata.

    Model hash: SHA-256 of the data section (everything after the header). Legacy hash: the first 8 hex digits of
    SHA-256 over the 64 KiB at offset 1 MiB of the serialisation.
    """
    from safetensors.torch import save

    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=ss_only)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(memoryview(data)[8 + header_len :]).hexdigest()
    buf = io.BytesIO(data)
    buf.seek(0x100000)
    legacy_hash = hashlib.sha256(buf.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy_hash


def add_hashes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """Return ``metadata`` with fresh ``sshs_model_hash`` / ``sshs_legacy_hash`` entries."""
    model_hash, legacy_hash = precalculate_safetensors_hashes(tensors, metadata)
    return {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}


def fold_alpha(alpha: float | None, rank: int) -> float:
    """``sqrt(alpha / rank)``: the factor that folds alpha into both LoRA factors (alpha None/0 → 1)."""
    return math.sqrt(_scale(alpha, rank))
