"""Every upstream FLUX.2 flag (specs/upstream_flags/flux_2_*.txt) is accepted by our scripts (or refused by name)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SPECS = Path(__file__).resolve().parents[2] / "shared" / "specs" / "upstream_flags"  # ../shared from the repository root
SCRIPTS = {
    "flux_2_cache_latents.py": "musubi_tuner.flux_2_cache_latents",
    "flux_2_cache_text_encoder_outputs.py": "musubi_tuner.flux_2_cache_text_encoder_outputs",
    "flux_2_generate_image.py": "musubi_tuner.flux_2.generate.args",
    "flux_2_train_network.py": "musubi_tuner.flux_2_train_network",
}
# the flag lists as of the upstream versions named in specs/flux2.md (copied so CI does not need /work/shared)
UPSTREAM = {
    "flux_2_cache_text_encoder_outputs.py": ["--text_encoder", "--fp8_text_encoder", "--model_version"],
    "flux_2_cache_latents.py": ["--model_version"],
    "flux_2_train_network.py": ["--fp8_scaled", "--text_encoder", "--fp8_text_encoder", "--model_version"],
    "flux_2_generate_image.py": [
        "--dit", "--disable_numpy_memmap", "--vae", "--text_encoder", "--lora_weight", "--lora_multiplier",
        "--include_patterns", "--exclude_patterns", "--save_merged_model", "--guidance_scale", "--prompt",
        "--negative_prompt", "--image_size", "--control_image_path", "--no_resize_control", "--infer_steps", "--save_path",
        "--seed", "--embedded_cfg_scale", "--flow_shift", "--fp8", "--fp8_scaled", "--fp8_text_encoder", "--device",
        "--attn_mode", "--blocks_to_swap", "--use_pinned_memory_for_block_swap", "--output_type", "--no_metadata",
        "--latent_path", "--lycoris", "--from_file", "--interactive", "--model_version",
    ],
}  # fmt: skip


def _parser(script: str):
    import importlib

    mod = importlib.import_module(SCRIPTS[script])
    return mod.setup_parser()


def _options(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("script", sorted(UPSTREAM))
def test_upstream_flags_are_accepted(script):
    missing = [f for f in UPSTREAM[script] if f not in _options(_parser(script))]
    assert not missing, f"{script}: {missing}"


def test_copied_lists_match_the_spec_when_available():
    if not SPECS.is_dir():
        pytest.skip("the shared specs are not mounted here; the copied lists above are what CI checks")
    text = (SPECS / "flux_2_musubi.txt").read_text(encoding="utf-8")
    for block in re.split(r"^### ", text, flags=re.M)[1:]:
        name, body = block.split("\n", 1)
        if name.strip() not in UPSTREAM:
            continue
        flags = set(re.findall(r"^\s+(--\w+)", body, flags=re.M))
        assert flags <= set(UPSTREAM[name.strip()]), (name, flags - set(UPSTREAM[name.strip()]))


def test_generator_attn_mode_values():
    parser = _parser("flux_2_generate_image.py")
    action = next(a for a in parser._actions if "--attn_mode" in a.option_strings)
    assert {"flash", "torch", "sageattn", "xformers", "sdpa"} <= set(action.choices)
