"""kohya ⇄ dotted-path (diffusers / ComfyUI / "diffusion-pipe") adapter layouts, through exact name tables (§6).

Turning ``lora_unet_visual_transformer_blocks_0_self_attention_to_query`` back into a dotted path is ambiguous
(``self_attention``, ``to_query`` ... contain underscores), so conversion never guesses: each architecture lists
the module paths of its model in ``NAME_TABLES`` and names are mapped through that table; an unknown name is a
``UserError`` listing examples.

``--target other``: ``<prefix>.<path>.lora_A.weight = down · sqrt(alpha/r)``, ``lora_B.weight = up · sqrt(alpha/r)``
(no alpha key); LoHa/LoKr tensors are copied with their alpha. ``--target default``: ``lora_A → lora_down``,
``lora_B → lora_up``, ``alpha = rank`` where none is stored; hashes are recomputed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from musubi_tuner.networks.formats import (
    LOHA,
    LOKR,
    LORA,
    MAX_EXAMPLES,
    PEFT,
    AdapterModule,
    add_hashes,
    detect_adapter_architecture,
    fold_alpha,
    parse_adapter_state_dict,
    strip_dotted_prefix,
    with_peft_alphas,
)
from musubi_tuner.utils.errors import UserError

KOHYA_PREFIX = "lora_unet_"


@dataclass(frozen=True)
class NameTable:
    """The adaptable module paths of one architecture: per block list, the paths under ``<list>.{i}``; plus
    top-level paths. The official and converted (dotted) paths are the same for every architecture listed here."""

    arch: str
    blocks: tuple[tuple[str, tuple[str, ...]], ...]
    top_level: tuple[str, ...] = ()

    def to_dotted(self, kohya_name: str) -> str | None:
        """Dotted module path of a kohya name (``lora_unet_...``), or None when not a module of this model."""
        if not kohya_name.startswith(KOHYA_PREFIX):
            return None
        rest = kohya_name[len(KOHYA_PREFIX) :]
        for path in self.top_level:
            if rest == path.replace(".", "_"):
                return path
        for block, members in self.blocks:
            head = block.replace(".", "_") + "_"
            if not rest.startswith(head):
                continue
            m = re.fullmatch(r"(\d+)_(.+)", rest[len(head) :])
            if not m:
                continue
            for member in members:
                if m[2] == member.replace(".", "_"):
                    return f"{block}.{m[1]}.{member}"
        return None

    def is_module(self, path: str) -> bool:
        """Whether ``path`` (dotted, no prefix) is a module of this model."""
        if path in self.top_level:
            return True
        for block, members in self.blocks:
            m = re.fullmatch(re.escape(block) + r"\.(\d+)\.(.+)", path)
            if m and m[2] in members:
                return True
        return False


def _attn(prefix: str, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{prefix}.{n}" for n in names)


# top-level Linear modules of the FLUX.2 DiT (LoRAs from other trainers may adapt them; ours adapts the blocks only)
_F2_TOP_OFFICIAL = (
    "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
    "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
    "final_layer.linear", "final_layer.adaLN_modulation.1",
)  # fmt: skip
_K5_ATTN = ("to_query", "to_key", "to_value", "out_layer")
_K5_FF = ("feed_forward.in_layer", "feed_forward.out_layer")

NAME_TABLES: dict[str, NameTable] = {
    "kandinsky5": NameTable(
        "kandinsky5",
        (
            ("text_transformer_blocks", (*_attn("self_attention", _K5_ATTN), *_K5_FF, "text_modulation.out_layer")),
            (
                "visual_transformer_blocks",
                (*_attn("self_attention", _K5_ATTN), *_attn("cross_attention", _K5_ATTN), *_K5_FF, "visual_modulation.out_layer"),
            ),
        ),
        (
            "time_embeddings.in_layer",
            "time_embeddings.out_layer",
            "text_embeddings.in_layer",
            "pooled_text_embeddings.in_layer",
            "visual_embeddings.in_layer",
            "out_layer.modulation.out_layer",
            "out_layer.out_layer",
        ),
    ),
    "qwen_image": NameTable(
        "qwen_image",
        (
            (
                "transformer_blocks",
                (
                    *_attn("attn", ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")),
                    "img_mlp.net.0.proj",
                    "img_mlp.net.2",
                    "txt_mlp.net.0.proj",
                    "txt_mlp.net.2",
                    "img_mod.1",
                    "txt_mod.1",
                ),
            ),
        ),
    ),
    "wan": NameTable(
        "wan",
        (
            (
                "blocks",
                (
                    *_attn("self_attn", ("q", "k", "v", "o")),
                    *_attn("cross_attn", ("q", "k", "v", "o", "k_img", "v_img")),
                    "ffn.0",
                    "ffn.2",
                ),
            ),
        ),
    ),
    "flux_2": NameTable(
        "flux_2",
        (
            (
                "double_blocks",
                tuple(f"{s}_{m}" for s in ("img", "txt") for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")),
            ),
            ("single_blocks", ("linear1", "linear2")),
        ),
        tuple(_F2_TOP_OFFICIAL),
    ),
}


@dataclass(frozen=True)
class DiffusersRenames:
    """Official → diffusers module paths of an architecture whose diffusers model splits fused layers.

    ``blocks``: ``(official list, diffusers list, {member: diffusers member(s)})``; a member mapped to n diffusers
    modules is a fused Linear whose output rows are split in n equal parts (the LoRA ``lora_A`` is shared, ``lora_B``
    is split row-wise — exact, since ΔW = B·A). ``top``: top-level official path → diffusers path(s).
    ``swapped``: official paths whose two output halves diffusers stores in the other order (``lora_B`` rows swapped).
    """

    blocks: tuple[tuple[str, str, dict[str, tuple[str, ...]]], ...]
    top: dict[str, tuple[str, ...]] = field(default_factory=dict)
    swapped: frozenset[str] = frozenset()

    def targets(self, path: str) -> tuple[str, ...] | None:
        """The diffusers module path(s) of the official module ``path``, or None."""
        if path in self.top:
            return self.top[path]
        for official, diffusers, members in self.blocks:
            m = re.fullmatch(re.escape(official) + r"\.(\d+)\.(.+)", path)
            if m and m[2] in members:
                return tuple(f"{diffusers}.{m[1]}.{d}" for d in members[m[2]])
        return None

    def source(self, path: str) -> tuple[str, int, int] | None:
        """``(official path, part index, number of parts)`` of the diffusers module ``path``, or None."""
        for official, parts in self.top.items():
            if path in parts:
                return official, parts.index(path), len(parts)
        for official, diffusers, members in self.blocks:
            m = re.fullmatch(re.escape(diffusers) + r"\.(\d+)\.(.+)", path)
            if not m:
                continue
            for member, parts in members.items():
                if m[2] in parts:
                    return f"{official}.{m[1]}.{member}", parts.index(m[2]), len(parts)
        return None


_F2_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.linear_in",),
    "img_mlp.2": ("ff.linear_out",),
    "txt_mlp.0": ("ff_context.linear_in",),
    "txt_mlp.2": ("ff_context.linear_out",),
}
_F2_TOP = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_guidance_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_guidance_embed.timestep_embedder.linear_2",),
    "guidance_in.in_layer": ("time_guidance_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_guidance_embed.guidance_embedder.linear_2",),
    "double_stream_modulation_img.lin": ("double_stream_modulation_img.linear",),
    "double_stream_modulation_txt.lin": ("double_stream_modulation_txt.linear",),
    "single_stream_modulation.lin": ("single_stream_modulation.linear",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),  # official (shift, scale), diffusers (scale, shift)
}
DIFFUSERS_RENAMES: dict[str, DiffusersRenames] = {
    "flux_2": DiffusersRenames(
        (
            ("double_blocks", "transformer_blocks", _F2_DOUBLE),
            ("single_blocks", "single_transformer_blocks", {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}),
        ),
        _F2_TOP,
        frozenset({"final_layer.adaLN_modulation.1"}),
    ),
}


def swap_row_halves(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the two halves of its rows exchanged (its own inverse)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_diffusers(
    sd: Mapping[str, torch.Tensor], arch: str, prefix: str = "transformer", source: str = "<state dict>"
) -> dict[str, torch.Tensor]:
    """Any supported layout → diffusers module names (``DIFFUSERS_RENAMES``), ``lora_A/lora_B`` with alpha folded.

    Only plain LoRA modules can be written (diffusers' PEFT loader has no LoHa/LoKr); others are a ``UserError``.
    """
    renames = DIFFUSERS_RENAMES[arch]
    head = f"{prefix}." if prefix else ""
    out = {}
    for path, tensors in _canonical(sd, name_table(arch), source).items():
        if "lora_down.weight" not in tensors:
            raise UserError(f"{source}: module {path!r} is not a plain LoRA (LoHa/LoKr); the diffusers layout cannot hold it")
        targets = renames.targets(path)
        if targets is None:
            raise UserError(f"{source}: module {path!r} has no diffusers name for {arch}")
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        alpha = tensors.get("alpha")
        f = fold_alpha(None if alpha is None else float(alpha.float()), down.shape[0])
        a = (down.float() * f).to(down.dtype)
        up = swap_row_halves(up) if path in renames.swapped else up
        ups = (up.float() * f).to(up.dtype).chunk(len(targets), dim=0)
        for name, b in zip(targets, ups):
            out[f"{head}{name}.lora_A.weight"] = a.clone()
            out[f"{head}{name}.lora_B.weight"] = b.contiguous()
    return out


def _factors(m: AdapterModule, source: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(down, up, alpha/rank)`` of a single-pair LoRA or PEFT module; ``UserError`` for anything else."""
    t = m.tensors
    if m.kind == PEFT:
        down, up = t["lora_A.weight"], t["lora_B.weight"]
    elif m.kind == LORA and "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
    else:
        raise UserError(
            f"{source}: module {m.name!r} is not a plain LoRA (LoHa/LoKr); it cannot be fused into or reordered for the "
            "official layer its diffusers name maps to"
        )
    alpha = m.alpha
    return down, up, (alpha / down.shape[0]) if alpha else 1.0


def _fuse(path: str, parts: dict[int, AdapterModule], n: int, source: str) -> dict[str, torch.Tensor]:
    """One LoRA for a fused Linear from LoRAs on its ``n`` equal row slices (missing slices: zero ΔW).

    ΔW = B·A, so slice i contributes ``B_i·A_i`` to rows i: stacking the ``A_i`` and placing the ``B_i`` block-diagonally
    gives the fused ΔW exactly, with rank Σ r_i (alpha/r of each part folded into its ``B_i``; alpha = rank). When all
    parts share one ``A`` and one scale (what ``to_diffusers`` writes), ``A`` is kept and the ``B_i`` concatenated:
    rank r, alpha unchanged — the exact inverse of the split.
    """
    factors = {i: _factors(m, source) for i, m in sorted(parts.items())}
    rows = {up.shape[0] for _, up, _ in factors.values()}
    cols = {down.shape[1:] for down, _, _ in factors.values()}
    if len(rows) != 1 or len(cols) != 1:
        shapes = {parts[i].name: (list(u.shape), list(d.shape)) for i, (d, u, _) in factors.items()}
        raise UserError(f"{source}: the parts of {path!r} have different shapes (lora_B, lora_A): {shapes}")
    (r_out,) = rows
    first_down, _, first_scale = factors[min(factors)]
    dtype = first_down.dtype
    if len(factors) == n and all(torch.equal(d, first_down) and s == first_scale for d, _, s in factors.values()):
        alpha = parts[min(parts)].alpha or float(first_down.shape[0])
        up = torch.cat([u for _, u, _ in factors.values()], dim=0)
        return {"lora_down.weight": first_down, "lora_up.weight": up.to(dtype), "alpha": torch.tensor(alpha)}
    rank = sum(d.shape[0] for d, _, _ in factors.values())
    up = torch.zeros(n * r_out, rank, *first_down.shape[2:], dtype=torch.float32)
    col = 0
    for i, (d, u, s) in factors.items():
        up[i * r_out : (i + 1) * r_out, col : col + d.shape[0]] = u.float() * s
        col += d.shape[0]
    down = torch.cat([d for d, _, _ in factors.values()], dim=0)
    return {"lora_down.weight": down, "lora_up.weight": up.to(dtype), "alpha": torch.tensor(float(rank))}


def official_modules(modules: Mapping[str, AdapterModule], arch: str, source: str) -> dict[str, AdapterModule]:
    """Adapter modules with diffusers module names of ``arch`` renamed to official paths, split layers fused.

    Other modules (kohya or official dotted names) are returned unchanged. Names are looked up in
    ``DIFFUSERS_RENAMES`` (the model's own module list), never guessed.
    """
    renames = DIFFUSERS_RENAMES.get(arch)
    if renames is None:
        return dict(modules)
    out: dict[str, AdapterModule] = {}
    groups: dict[str, tuple[int, dict[int, AdapterModule]]] = {}
    for name, module in modules.items():
        found = renames.source(strip_dotted_prefix(name)) if module.is_dotted else None
        if found is None:
            out[name] = module
            continue
        path, part, n = found
        _, parts = groups.setdefault(path, (n, {}))
        if part in parts:
            raise UserError(f"{source}: {path!r} is adapted twice ({parts[part].name!r} and {name!r})")
        parts[part] = module
    for path, (n, parts) in groups.items():
        if path in out:
            raise UserError(f"{source}: module {path!r} appears under its official and its diffusers name")
        tensors = dict(parts[0].tensors) if n == 1 else _fuse(path, parts, n, source)
        if path in renames.swapped:
            down, up, scale = _factors(AdapterModule(path, tensors), source)
            tensors = {
                "lora_down.weight": down,
                "lora_up.weight": swap_row_halves(up),
                "alpha": torch.tensor(scale * down.shape[0]),
            }
        out[path] = AdapterModule(path, tensors)
    return out


def name_table(arch: str) -> NameTable:
    """The table of ``arch``; ``UserError`` listing the known ones."""
    if arch not in NAME_TABLES:
        raise UserError(f"no LoRA name table for architecture {arch!r}; known: {', '.join(sorted(NAME_TABLES))}")
    return NAME_TABLES[arch]


def _canonical(sd: Mapping[str, torch.Tensor], table: NameTable, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Dotted path → tensors with kohya/LyCORIS suffixes (PEFT ``lora_A/B`` renamed, alpha = rank added)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for name, module in official_modules(parse_adapter_state_dict(sd, source), table.arch, source).items():
        path = strip_dotted_prefix(name) if module.is_dotted or table.is_module(name) else table.to_dotted(name)
        if path is None or not table.is_module(path):
            unknown.append(name)
            continue
        tensors = dict(module.tensors)
        if module.kind == PEFT:
            down, up = tensors.pop("lora_A.weight"), tensors.pop("lora_B.weight")
            tensors = {
                "lora_down.weight": down,
                "lora_up.weight": up,
                "alpha": tensors.get("alpha", torch.tensor(float(down.shape[0]))),
            }
        elif module.kind not in (LOHA, LOKR) and "alpha" not in tensors:
            tensors["alpha"] = torch.tensor(float(module.rank))
        if path in out:
            raise UserError(f"{source}: module {path!r} appears twice (as kohya and dotted names?)")
        out[path] = tensors
    if unknown:
        raise UserError(f"{source}: {len(unknown)} module name(s) are not {table.arch} modules, e.g. {unknown[:MAX_EXAMPLES]}")
    return out


def to_default(sd: Mapping[str, torch.Tensor], arch: str, source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Any supported layout → kohya layout (``lora_unet_*`` names, ``lora_down/lora_up/alpha``)."""
    table = name_table(arch)
    out = {}
    for path, tensors in _canonical(sd, table, source).items():
        name = KOHYA_PREFIX + path.replace(".", "_")
        for suffix, t in tensors.items():
            out[f"{name}.{suffix}"] = t
    return out


def to_other(
    sd: Mapping[str, torch.Tensor], arch: str, prefix: str = "diffusion_model", source: str = "<state dict>"
) -> dict[str, torch.Tensor]:
    """Any supported layout → ``<prefix>.<path>.lora_A/lora_B.weight`` with alpha folded into both factors."""
    table = name_table(arch)
    head = f"{prefix}." if prefix else ""
    out = {}
    for path, tensors in _canonical(sd, table, source).items():
        if "lora_down.weight" not in tensors:
            if any(s.startswith("lora_down") for s in tensors):
                raise UserError(f"{source}: module {path!r} has split LoRA factors (lora_down.N), which lora_A/lora_B cannot hold")
            for suffix, t in tensors.items():  # LoHa / LoKr: copied with their alpha
                out[f"{head}{path}.{suffix}"] = t
            continue
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        alpha = tensors.get("alpha")
        f = fold_alpha(None if alpha is None else float(alpha.float()), down.shape[0])
        out[f"{head}{path}.lora_A.weight"] = (down.float() * f).to(down.dtype)
        out[f"{head}{path}.lora_B.weight"] = (up.float() * f).to(up.dtype)
    return out


def resolve_architecture(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], arch: str | None, source: str) -> str:
    """``arch`` when given, else the architecture detected from metadata / key names (``UserError`` if unknown)."""
    if arch:
        return arch
    found = detect_adapter_architecture(sd.keys(), metadata)
    if found is None:
        raise UserError(
            f"{source}: cannot tell the architecture of this LoRA; pass --architecture ({', '.join(sorted(NAME_TABLES))})"
        )
    return found


def convert_file_tensors(
    sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], target: str, arch: str, prefix: str, source: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Convert a loaded adapter file; returns ``(tensors, metadata)`` ready to save."""
    md = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    sd = with_peft_alphas(sd, metadata, source)
    if target == "default":
        out = to_default(sd, arch, source)
        return out, add_hashes(out, md)
    if target == "other":
        return to_other(sd, arch, prefix, source), md
    if target == "diffusers":  # diffusers module names (split fused layers where the architecture has them)
        if arch in DIFFUSERS_RENAMES:
            return to_diffusers(sd, arch, prefix, source), md
        return to_other(sd, arch, prefix, source), md
    raise UserError(f"--target {target!r}: expected 'default', 'other' or 'diffusers'")
