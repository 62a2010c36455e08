"""Every Wan flag of musubi-tuner and blissful-tuner (specs/upstream_flags/wan_*.txt, listed here) is known to our
parsers: accepted with the same meaning or refused by name (checklist 6)."""

from __future__ import annotations

import pytest

# flag names per script, union of wan_musubi.txt and wan_blissful.txt
UPSTREAM = {
    "wan_cache_latents": "--vae_cache_cpu --i2v --clip --one_frame",
    "wan_cache_text_encoder_outputs": "--t5 --fp8_t5",
    "wan_generate_video": (
        "--ckpt_dir --task --sample_solver --dit --dit_high_noise --force_v2_1_time_embedding --offload_inactive_dit "
        "--lazy_loading --disable_numpy_memmap --vae --vae_dtype --vae_cache_cpu --t5 --clip --lora_weight --lora_multiplier "
        "--lora_weight_high_noise --lora_multiplier_high_noise --include_patterns --exclude_patterns --save_merged_model "
        "--prompt --negative_prompt --video_size --video_length --fps --infer_steps --save_path --seed --cpu_noise "
        "--timestep_boundary --guidance_scale --guidance_scale_high_noise --video_path --image_path --end_image_path "
        "--control_path --one_frame_inference --control_image_path --control_image_mask_path --trim_tail_frames "
        "--cfg_skip_mode --cfg_apply_ratio --slg_layers --slg_scale --slg_start --slg_end --slg_mode --flow_shift --fp8 "
        "--fp8_scaled --fp8_fast --fp8_t5 --device --attn_mode --blocks_to_swap --use_pinned_memory_for_block_swap "
        "--output_type --no_metadata --latent_path --lycoris --compile_args --from_file --interactive"
    ),
    "wan_train_network": (
        "--task --fp8_scaled --t5 --fp8_t5 --clip --vae_cache_cpu --one_frame --force_v2_1_time_embedding --dit_high_noise "
        "--timestep_boundary --offload_inactive_dit --rope_func --mixed_precision_transformer --simple_modulation "
        "--lower_precision_attention --optimized_compile --compile_args --disable_blockwise_quant"
    ),
}


@pytest.mark.parametrize("script", sorted(UPSTREAM))
def test_every_upstream_flag_is_known(script):
    import importlib

    mod = importlib.import_module(f"musubi_tuner.{script}")
    parser = mod.setup_parser()
    known = {s for a in parser._actions for s in a.option_strings}
    missing = [f for f in UPSTREAM[script].split() if f not in known]
    assert not missing, f"{script}: upstream flags unknown to our parser: {missing}"


def test_blissful_trainer_flags_are_refused_by_name():
    from musubi_tuner.utils.errors import UserError
    from musubi_tuner.wan.trainer import WanNetworkTrainer
    from musubi_tuner.wan_train_network import setup_parser

    for flag in ("--simple_modulation", "--optimized_compile"):
        args = setup_parser().parse_args(["--task", "t2v-1.3B", "--dit", "x", "--dataset_config", "d", flag])
        with pytest.raises(UserError, match=flag):
            WanNetworkTrainer().handle_model_specific_args(args)
