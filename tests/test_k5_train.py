"""Kandinsky 5 LoRA training (``kandinsky5_train_network.py``) on the tiny bundles, from caches written by the real
caching scripts: a T2V run with saving/metadata/resume, the I2V DiT input equal to the inference pipeline's, block
swap + checkpointing parity, sampling during training, one ``accelerate launch`` of the root wrapper, NABLA checks."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from musubi_tuner.demo.bundles import K5Bundle, tiny_dit_config, write_k5_bundle, write_tiny_dit
from musubi_tuner.demo.synthetic_data import write_synthetic_video_dataset
from musubi_tuner.kandinsky5.configs import get_task_config
from musubi_tuner.kandinsky5.training import resolve_nabla_settings
from musubi_tuner.kandinsky5_train_network import Kandinsky5NetworkTrainer, main, setup_parser
from musubi_tuner.training.args import read_config_from_file
from musubi_tuner.utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
I2V_TASK = "k5-lite-i2v-5s-sd"


@dataclass
class K5Data:
    config: Path  # video dataset (2 clips, 17 frames, 64x64), caches written
    start_image: Path
    end_image: Path
    root: Path


def _cache(bundle: K5Bundle, config: Path, *extra: str) -> None:
    from musubi_tuner.kandinsky5_cache_latents import main as cache_latents
    from musubi_tuner.kandinsky5_cache_text_encoder_outputs import main as cache_text

    cache_latents(["--dataset_config", str(config), "--vae", str(bundle.vae), "--device", "cpu", "--vae_dtype", "float32",
                   "--seed", "0", *extra])  # fmt: skip
    cache_text(["--dataset_config", str(config), "--text_encoder_qwen", str(bundle.text_encoder_qwen),
                "--text_encoder_clip", str(bundle.text_encoder_clip), "--device", "cpu"])  # fmt: skip


@pytest.fixture(scope="session")
def k5_data(tmp_path_factory, k5_bundle) -> K5Data:
    """Two 17-frame 64x64 clips with latent (latents + latents_image) and text caches from the caching scripts."""
    ds = write_synthetic_video_dataset(tmp_path_factory.mktemp("k5_train") / "data", n_videos=2, n_images=0, seed=1)
    _cache(k5_bundle, ds.video_toml)
    return K5Data(ds.video_toml, ds.start_image, ds.end_image, ds.root)


@pytest.fixture(scope="session")
def i2v_bundle(tmp_path_factory) -> K5Bundle:
    return write_k5_bundle(tmp_path_factory.mktemp("k5_i2v") / "bundle", task=I2V_TASK, seed=0)


def argv_for(bundle: K5Bundle, data: K5Data, out: Path, *extra: str, task: str = "k5-lite-t2v-5s-sd", dit=None) -> list[str]:
    return [
        "--task", task, "--dit", str(dit or bundle.dit), "--dataset_config", str(data.config),
        "--network_module", "networks.lora_kandinsky", "--network_dim", "4", "--network_alpha", "4",
        "--output_dir", str(out), "--output_name", "k5", "--learning_rate", "1e-3", "--max_data_loader_n_workers", "0",
        "--seed", "1", "--dit_dtype", "float32", "--max_train_steps", "3", *extra,
    ]  # fmt: skip


def parse(argv: list[str]) -> argparse.Namespace:
    parser = setup_parser()
    return read_config_from_file(parser.parse_args(argv), parser, argv)


class Recorder(Kandinsky5NetworkTrainer):
    """Records the training losses (the real trainer otherwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def on_train_start(self, args, accelerator, transformer, network) -> None:
        # weight dtypes as trained (after the trainer's cast): (time embedding, a visual block Linear)
        block = transformer.visual_transformer_blocks[0].self_attention.to_query.weight
        self.dtypes = (transformer.time_embeddings.in_layer.weight.dtype, block.dtype)

    def process_batch(self, *args, **kwargs):
        loss, metrics = super().process_batch(*args, **kwargs)
        if torch.is_grad_enabled():
            self.losses.append(float(loss.detach()))
        return loss, metrics


def train(argv: list[str], trainer: Kandinsky5NetworkTrainer | None = None) -> dict[str, torch.Tensor]:
    args = parse(argv)
    (trainer or Kandinsky5NetworkTrainer()).train(args)
    return load_file(str(Path(args.output_dir) / f"{args.output_name}.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), k


def expected_modules(visual_blocks: int, text_blocks: int) -> set[str]:
    attn = ("to_query", "to_key", "to_value", "out_layer")
    names = set()
    for i in range(visual_blocks):
        names |= {
            f"lora_unet_visual_transformer_blocks_{i}_{kind}_{n}" for kind in ("self_attention", "cross_attention") for n in attn
        }
        names |= {f"lora_unet_visual_transformer_blocks_{i}_feed_forward_{n}" for n in ("in_layer", "out_layer")}
    for i in range(text_blocks):
        names |= {f"lora_unet_text_transformer_blocks_{i}_self_attention_{n}" for n in attn}
        names |= {f"lora_unet_text_transformer_blocks_{i}_feed_forward_{n}" for n in ("in_layer", "out_layer")}
    return names


# ---------------------------------------------------------------------------------------------------------------------
# (1) T2V: loss, LoRA file, naming, metadata, resume


def test_t2v_training_saves_named_lora_and_resumes(k5_bundle, k5_data, tmp_path):
    rec = Recorder()
    full = train(argv_for(k5_bundle, k5_data, tmp_path / "full", "--max_train_steps", "4", "--save_every_n_steps", "3",
                          "--save_state"), rec)  # fmt: skip
    assert len(rec.losses) == 4 and all(torch.isfinite(torch.tensor(rec.losses)))

    modules = {k.split(".")[0] for k in full}
    cfg = k5_bundle.dit_config
    assert len(modules) == cfg["num_visual_blocks"] * 10 + cfg["num_text_blocks"] * 6
    assert modules == expected_modules(cfg["num_visual_blocks"], cfg["num_text_blocks"])  # no modulation Linears
    assert any(float(v.abs().max()) > 0 for k, v in full.items() if "lora_up" in k)  # it trained
    with safe_open(str(tmp_path / "full" / "k5.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_base_model_version"] == "kandinsky5" and md["ss_network_module"] == "networks.lora_kandinsky"
    assert md["ss_k5_task"] == "k5-lite-t2v-5s-sd" and md["ss_k5_attention"] == "dense"
    assert md["modelspec.architecture"] == "Kandinsky-5/lora" and md["ss_steps"] == "4"

    # resume from step 3 (mid-epoch: 2 batches per epoch) continues at step 4 and ends where the full run ended
    state = tmp_path / "full" / "k5-step00000003-state"
    assert json.loads((state / "train_state.json").read_text())["current_step"] == 3
    resumed = train(argv_for(k5_bundle, k5_data, tmp_path / "resumed", "--max_train_steps", "4", "--save_every_n_steps", "3",
                             "--save_state", "--resume", str(state)))  # fmt: skip
    assert json.loads((tmp_path / "resumed" / "k5-state" / "train_state.json").read_text())["current_step"] == 4
    assert not (tmp_path / "resumed" / "k5-step00000003.safetensors").exists()  # step 3 is not redone
    assert_same(full, resumed, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# (2) I2V: the training DiT input equals the inference pipeline's; conditioned frames excluded from the loss


def _prepared_i2v_trainer(bundle: K5Bundle, data: K5Data, tmp_path: Path, *extra: str):
    from musubi_tuner.dataset.config import load_dataset_group
    from musubi_tuner.training.timesteps import TimestepConfig, TimestepSampler

    args = parse(argv_for(bundle, data, tmp_path, "--i2v_mode", "first_last", *extra, task=I2V_TASK))
    trainer = Kandinsky5NetworkTrainer()
    trainer.handle_model_specific_args(args)
    trainer.timestep_sampler = TimestepSampler(TimestepConfig.from_args(args))
    dit = trainer.load_transformer(None, args, args.dit, "sdpa", False, "cpu", torch.float32)
    batch = load_dataset_group(args.dataset_config, architecture="k5", training=False)[0]
    return args, trainer, dit, batch


class _Accel:
    """The two attributes of an accelerator that ``call_dit`` / ``process_batch`` read (CPU)."""

    device = torch.device("cpu")


def test_i2v_training_input_equals_inference_pipeline(i2v_bundle, k5_data, tmp_path):
    from musubi_tuner.kandinsky5.caching import text_from_batch
    from musubi_tuner.kandinsky5.pipeline import sample_latents

    args, trainer, dit, batch = _prepared_i2v_trainer(i2v_bundle, k5_data, tmp_path)
    assert trainer._i2v_training and trainer.i2v_mode == "first_last"
    captured = []
    dit.register_forward_pre_hook(lambda m, a, kw: captured.append((a, kw)), with_kwargs=True)

    latents = batch["latents"].float()
    f, h, w = latents.shape[2:]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        # t = 1: the first sampling step of any grid (shift(1) = 1), so x_t is the noise in both paths
        trainer.process_batch(args, _Accel(), dit, latents, batch, noise, torch.float32, timesteps=torch.ones(1))
    text, pooled = text_from_batch(batch, 0)
    sample_latents(
        dit, trainer.task, cond={"text_embeds": text, "pooled_embed": pooled}, uncond=None, latent_shape=(f, h, w),
        num_steps=1, guidance_scale=1.0, scheduler_scale=10.0, generator=torch.Generator().manual_seed(0), device="cpu",
        dtype=torch.float32, image_latents=batch["latents_image"][0].float(), i2v_mode="first_last",
        noise=noise[0].permute(1, 2, 3, 0), progress=False,
    )  # fmt: skip
    (train_args, train_kw), (infer_args, infer_kw) = captured
    x_train, x_infer = train_args[0], infer_args[0]
    assert x_train.shape == (1, f, h, w, 33)
    torch.testing.assert_close(x_train, x_infer, rtol=0, atol=0)
    # the official layout: clean first/last latents in frames 0 and F-1, mask 1 there, visual_cond zero
    image = batch["latents_image"].float().permute(0, 2, 3, 4, 1)
    torch.testing.assert_close(x_train[:, [0, f - 1], ..., :16], image[:, [0, 1]])
    assert torch.equal(x_train[..., 32], torch.tensor([1.0, 0, 0, 0, 1.0]).view(1, f, 1, 1).expand(1, f, h, w))
    assert not x_train[..., 16:32].any()
    for i in (1, 2, 3):  # text tokens once (defect #1), pooled vector, time = 1000·t exactly (defect #15)
        torch.testing.assert_close(train_args[i].float(), infer_args[i].float(), rtol=0, atol=0)
    assert float(train_args[3][0]) == 1000.0
    assert train_args[1].shape[1] == text.shape[0]
    assert tuple(train_kw["scale_factor"]) == tuple(infer_kw["scale_factor"]) == (1.0, 2.0, 2.0)
    assert train_kw["sparse_params"] is None and infer_kw["sparse_params"] is None
    assert bool(train_kw["text_mask"].all())  # one prompt: nothing masked, as in inference (no mask)


def test_i2v_loss_excludes_conditioned_frames(i2v_bundle, k5_data, tmp_path):
    args, trainer, dit, batch = _prepared_i2v_trainer(i2v_bundle, k5_data, tmp_path)
    latents = batch["latents"].float()
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.5])
    with torch.no_grad():
        out = trainer.call_dit(args, _Accel(), dit, latents, batch, noise, 0.5 * latents + 0.5 * noise, t * 1000, torch.float32)
    assert out.extra["frame_weights"] == [0.0, 1.0, 1.0, 1.0, 0.0]
    base = trainer.compute_loss(args, out, t, batch)
    out.pred[:, :, [0, -1]] += 100.0  # predictions on the conditioned frames do not count
    assert torch.allclose(trainer.compute_loss(args, out, t, batch), base)
    # --loss_on_conditioned_frames includes them
    args.loss_on_conditioned_frames = True
    with torch.no_grad():
        out2 = trainer.call_dit(args, _Accel(), dit, latents, batch, noise, 0.5 * latents + 0.5 * noise, t * 1000, torch.float32)
    assert out2.extra["frame_weights"] == [1.0] * 5
    assert not torch.allclose(trainer.compute_loss(args, out2, t, batch), base)


# ---------------------------------------------------------------------------------------------------------------------
# (3) block swap + gradient checkpointing do not change training


def test_block_swap_with_checkpointing_gives_same_lora(k5_bundle, k5_data, tmp_path):
    config = {**tiny_dit_config("k5-lite-t2v-5s-sd"), "num_visual_blocks": 4}  # 2 of 4 visual blocks can swap
    dit, _ = write_tiny_dit(tmp_path / "dit4", config, seed=3)
    base = train(argv_for(k5_bundle, k5_data, tmp_path / "base", dit=dit))
    swapped = train(argv_for(k5_bundle, k5_data, tmp_path / "swap", "--blocks_to_swap", "2", "--gradient_checkpointing", dit=dit))
    assert len({k.split(".")[0] for k in base}) == 4 * 10 + 1 * 6
    assert_same(base, swapped, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# (4) sampling during training


def test_sampling_during_training_writes_video_png_and_latents(k5_bundle, k5_data, tmp_path):
    import av

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball rolling --w 64 --h 64 --f 9 --s 2 --d 3\na blue cube --w 32 --h 48 --s 2 --d 4 --l 1.0\n")
    common = ("--max_train_steps", "2", "--sample_prompts", str(prompts), "--sample_every_n_steps", "2")
    tes = ("--text_encoder_qwen", str(k5_bundle.text_encoder_qwen), "--text_encoder_clip", str(k5_bundle.text_encoder_clip))
    train(argv_for(k5_bundle, k5_data, tmp_path / "s", *common, *tes, "--vae", str(k5_bundle.vae), "--offload_dit_during_sampling"))
    files = sorted(p.name for p in (tmp_path / "s" / "sample").iterdir())
    assert len(files) == 2 and re.fullmatch(r"k5_000002_00_\d{14}_3\.mp4", files[0]) and files[1].endswith("_4.png"), files
    with av.open(str(tmp_path / "s" / "sample" / files[0])) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == 9 and (frames[0].width, frames[0].height) == (64, 64)

    # --no_vae_load: no VAE at all, the samples are kept as latents (F, h, w, 16)
    train(argv_for(k5_bundle, k5_data, tmp_path / "lat", *common, *tes, "--no_vae_load"))
    latents = sorted((tmp_path / "lat" / "sample").glob("*_latent.safetensors"))
    assert [load_file(str(p))["latent"].shape for p in latents] == [(3, 8, 8, 16), (1, 6, 4, 16)]
    with pytest.raises(UserError, match="--sample_prompts needs --vae"):
        train(argv_for(k5_bundle, k5_data, tmp_path / "x", *common, *tes))


def test_i2v_first_last_training_with_samples(i2v_bundle, k5_data, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a ball --w 64 --h 64 --f 9 --s 2 --d 1 --i {k5_data.start_image} --ei {k5_data.end_image}\n")
    rec = Recorder()
    train(argv_for(i2v_bundle, k5_data, tmp_path, "--i2v_mode", "first_last", "--max_train_steps", "2", "--sample_at_first",
                   "--sample_prompts", str(prompts), "--vae", str(i2v_bundle.vae), "--text_encoder_qwen",
                   str(i2v_bundle.text_encoder_qwen), "--text_encoder_clip", str(i2v_bundle.text_encoder_clip),
                   "--dit_dtype", "bfloat16", task=I2V_TASK), rec)  # fmt: skip
    assert len(rec.losses) == 2 and all(torch.isfinite(torch.tensor(rec.losses)))
    assert rec.dtypes == (torch.float32, torch.bfloat16)  # bf16 DiT, float32 islands kept through the trainer's cast
    assert [p.suffix for p in (tmp_path / "sample").iterdir()] == [".mp4"]
    with safe_open(str(tmp_path / "k5.safetensors"), "pt") as f:
        assert f.metadata()["ss_k5_i2v_mode"] == "first_last"


def test_i2i_edit_training_and_sample(tmp_path):
    from musubi_tuner.kandinsky5.training import build_training_dit_inputs
    from musubi_tuner.kandinsky5_cache_latents import main as cache_latents
    from musubi_tuner.kandinsky5_cache_text_encoder_outputs import main as cache_text

    task = "k5-lite-i2i-hd"
    bundle = write_k5_bundle(tmp_path / "bundle", task=task, seed=0)
    ds = write_synthetic_video_dataset(tmp_path / "data", n_videos=0, n_images=2, seed=2)
    controls = tmp_path / "controls"
    shutil.copytree(ds.image_dir, controls)
    config = tmp_path / "edit.toml"
    config.write_text(
        f'[general]\nresolution = [64, 64]\ncaption_extension = ".txt"\nbatch_size = 1\n\n[[datasets]]\n'
        f'image_directory = "{ds.image_dir}"\ncontrol_directory = "{controls}"\ncache_directory = "{tmp_path / "cache"}"\n'
    )
    cache_latents(["--dataset_config", str(config), "--vae", str(bundle.flux_vae), "--device", "cpu", "--vae_dtype", "float32",
                   "--task", task])  # fmt: skip
    cache_text(["--dataset_config", str(config), "--text_encoder_qwen", str(bundle.text_encoder_qwen), "--text_encoder_clip",
                str(bundle.text_encoder_clip), "--device", "cpu", "--task", task, "--image_edit_training"])  # fmt: skip
    source = next(controls.glob("*.png"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"make it blue --w 64 --h 64 --s 2 --d 1 --ci {source}\n")
    data = K5Data(config, ds.start_image, ds.end_image, ds.root)
    rec = Recorder()
    train(argv_for(bundle, data, tmp_path / "out", "--max_train_steps", "2", "--sample_at_first", "--sample_prompts", str(prompts),
                   "--vae", str(bundle.flux_vae), "--text_encoder_qwen", str(bundle.text_encoder_qwen), "--text_encoder_clip",
                   str(bundle.text_encoder_clip), task=task), rec)  # fmt: skip
    assert len(rec.losses) == 2 and all(torch.isfinite(torch.tensor(rec.losses)))
    assert [p.suffix for p in (tmp_path / "out" / "sample").iterdir()] == [".png"]
    # the I2I input: concat(noisy, source latent, ones) (specs/kandinsky5.md §9)
    g = torch.Generator().manual_seed(0)
    noisy, control = torch.randn(1, 16, 1, 8, 8, generator=g), torch.randn(1, 16, 1, 8, 8, generator=g)
    batch = {"latents_control_0": control, "text_embeds": [torch.randn(3, 32)], "pooled_embed": [torch.randn(24)]}
    x = build_training_dit_inputs(get_task_config(task), noisy, batch, torch.tensor([500.0]), visual_cond=True).x
    assert torch.equal(x[..., :16], noisy.permute(0, 2, 3, 4, 1)) and torch.equal(x[..., 16:32], control.permute(0, 2, 3, 4, 1))
    assert bool((x[..., 32] == 1).all())


# ---------------------------------------------------------------------------------------------------------------------
# (5) a real `accelerate launch` of the root wrapper


@pytest.mark.slow
def test_accelerate_launch_root_wrapper(k5_bundle, k5_data, tmp_path):
    env = {**os.environ, "BLISSFUL_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate_cpu.yaml"),
           "--main_process_port", "29541", "kandinsky5_train_network.py",
           *argv_for(k5_bundle, k5_data, tmp_path, "--max_train_steps", "2")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(load_file(str(tmp_path / "k5.safetensors"))) == 26 * 3  # down, up, alpha per module


# ---------------------------------------------------------------------------------------------------------------------
# (6) NABLA


def test_nabla_with_unaligned_buckets_exits_2(k5_bundle, k5_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv_for(k5_bundle, k5_data, tmp_path, "--force_nabla_attention"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "NABLA attention needs frame sizes that are multiples of 128 px" in err and "64x64" in err
    assert "--nabla_resize" in err and "Traceback" not in err
    assert not (tmp_path / "k5.safetensors").exists()


def test_nabla_training_on_nabla_resized_caches(k5_bundle, k5_data, tmp_path):
    # the same clips cached with --nabla_resize (64 → 128 px): NABLA trains, via the upstream spelling and the alias
    config = tmp_path / "nabla.toml"
    config.write_text(k5_data.config.read_text().replace(str(k5_data.root / "cache"), str(tmp_path / "cache")))
    _cache(k5_bundle, config, "--nabla_resize")
    data = K5Data(config, k5_data.start_image, k5_data.end_image, k5_data.root)
    rec = Recorder()
    train(argv_for(k5_bundle, data, tmp_path / "a", "--use_nabla_attention", "--nabla_P", "0.5", "--max_train_steps", "2"), rec)
    assert rec.nabla is not None and rec.nabla.P == 0.5 and rec.resolution_step == 128
    assert all(torch.isfinite(torch.tensor(rec.losses)))
    with safe_open(str(tmp_path / "a" / "k5.safetensors"), "pt") as f:
        assert f.metadata()["ss_k5_attention"].startswith("NABLA P=0.5 wT=11 wH=3 wW=3 method=topcdf")


def test_nabla_flag_semantics():
    dense, hd = get_task_config("k5-lite-t2v-5s-sd"), get_task_config("k5-pro-t2v-10s-hd")
    assert resolve_nabla_settings(dense) is None
    assert resolve_nabla_settings(hd).P == 0.7  # the task's P, not a silent 0.9 (defect #14)
    assert resolve_nabla_settings(dense, force=True).P == 0.9
    assert resolve_nabla_settings(hd, P=0.5).P == 0.5
    assert resolve_nabla_settings(hd, dense=True) is None
    s = resolve_nabla_settings(hd, wT=5, method="topk", add_sta=False)
    assert (s.task.nabla_wT, s.task.nabla_method, s.task.nabla_add_sta) == (5, "topk", False)
    with pytest.raises(UserError, match="cannot be combined"):
        resolve_nabla_settings(hd, force=True, dense=True)
    with pytest.raises(UserError, match="--nabla_P only apply to NABLA"):
        resolve_nabla_settings(dense, P=0.5)
    with pytest.raises(UserError, match=r"--nabla_P must be in \(0, 1\]"):
        resolve_nabla_settings(hd, P=1.5)
    a = parse(["--use_nabla_attention", "--nabla_p", "0.8", "--no_nabla_add_sta"])
    b = parse(["--force_nabla_attention", "--nabla_P", "0.8", "--nabla_add_sta"])
    assert a.force_nabla_attention and b.force_nabla_attention and a.nabla_P == b.nabla_P == 0.8
    assert (a.nabla_add_sta, b.nabla_add_sta, parse([]).nabla_add_sta) == (False, True, None)


# ---------------------------------------------------------------------------------------------------------------------
# options


def test_task_defaults_and_option_errors(tmp_path):
    def handled(*argv: str) -> Kandinsky5NetworkTrainer:
        trainer = Kandinsky5NetworkTrainer()
        trainer.handle_model_specific_args(parse(list(argv)))
        return trainer

    t = handled("--task", "k5-pro-i2v-5s-hd")
    assert (t.default_guidance_scale, t.default_discrete_flow_shift, t.vae_frame_stride) == (5.0, 5.0, 4)
    assert t._i2v_training and t.i2v_mode == "first" and t.nabla is not None and t.resolution_step == 128
    assert t.default_vae_dtype == torch.bfloat16
    t = handled("--task", "k5-lite-t2v-5s-distil-sd", "--scheduler_scale", "3")
    assert (t.default_guidance_scale, t.default_discrete_flow_shift, t._i2v_training, t.nabla) == (1.0, 3.0, False, None)
    assert handled("--task", "k5-lite-t2i-hd").vae_frame_stride == 1
    args = parse(["--task", "k5-lite-t2v-5s-sd", "--fp8_base"])
    Kandinsky5NetworkTrainer().handle_model_specific_args(args)
    assert args.fp8_scaled  # --fp8_base implies block-scaled fp8 for K5
    for argv, match in (
        ([], "--task is required"),
        (["--task", "k5-lite-t2v-5s-sd", "--i2v_mode", "first_last"], "--i2v_mode is for image-to-video"),
        (["--task", "k5-lite-t2v-5s-sd", "--override_dit", '{"model_dimm": 3}'], "unknown DiT field"),
        (["--task", "k5-lite-t2v-5s-sd", "--override_dit", "{bad"], "not valid JSON"),
        (["--task", "k5-lite-t2v-5s-sd", "--no_vae_load"], "only affects sampling"),
        (["--task", "k5-lite-t2v-5s-sd", "--split_attn"], "--split_attn is not supported"),
        (["--task", "k5-lite-t2v-5s-sd", "--text_encoder_cpu", "--text_encoder_auto"], "cannot be combined"),
        (["--task", "k5-lite-t2v-5s-sd", "--sample_prompts", "p.txt"], "--text_encoder_qwen and --text_encoder_clip"),
    ):
        with pytest.raises(UserError, match=match):
            handled(*argv)


def test_override_dit_is_applied(k5_bundle, tmp_path):
    args = parse(["--task", "k5-lite-t2v-5s-sd", "--dit", str(k5_bundle.dit), "--override_dit", '{"attention_type": "nabla"}'])
    trainer = Kandinsky5NetworkTrainer()
    trainer.handle_model_specific_args(args)
    dit = trainer.load_transformer(None, args, args.dit, "sdpa", False, "cpu", torch.float32)
    assert dit.config["attention_type"] == "nabla" and dit.config["model_dim"] == k5_bundle.dit_config["model_dim"]
    assert dit.time_embeddings.in_layer.weight.dtype == torch.float32  # float32 islands kept (bf16 default DiT dtype)
    assert dit.text_embeddings.in_layer.weight.dtype == torch.bfloat16


def test_every_k5_option_is_consumed():
    """No dead flags (defect #8): each option of the Kandinsky 5 group is read by the trainer code."""
    src = ROOT / "src" / "musubi_tuner"
    # the script, the trainer hooks, and the text-encoder factory they hand their args to (Kandinsky5TextEncoder.from_args)
    code = "".join(
        (src / f).read_text() for f in ("kandinsky5_train_network.py", "kandinsky5/trainer.py", "kandinsky5/text_encoders.py")
    )
    common = {a.dest for a in __import__("musubi_tuner.training.args", fromlist=["x"]).setup_parser_common()._actions}
    unused = [
        a.dest
        for a in setup_parser()._actions
        if a.option_strings and a.dest not in common and not re.search(rf"args\.{a.dest}\b", code)
    ]
    assert not unused


def test_root_wrapper_is_four_lines():
    lines = (ROOT / "kandinsky5_train_network.py").read_text().strip().splitlines()
    assert lines[0] == "from musubi_tuner.kandinsky5_train_network import main" and len(lines) == 4


def test_example_configs_parse():
    from musubi_tuner.utils.prompt_lines import load_prompt_file

    args = parse(["--config_file", str(ROOT / "configs" / "k5_train_example.toml")])
    assert (args.task, args.network_module, args.network_dim, args.discrete_flow_shift) == (
        "k5-lite-t2v-5s-sd", "networks.lora_kandinsky", 32, 5.0,
    )  # fmt: skip
    specs = load_prompt_file(ROOT / "configs" / "k5_sample_prompts.txt")
    assert [s.frame_count for s in specs] == [49, 25, 1] and specs[1].cfg_scale == 5.0
    i2v = load_prompt_file(ROOT / "configs" / "k5_i2v_sample_prompts.txt")
    assert all(s.image_path for s in i2v) and i2v[1].end_image_path


def test_loha_trains_on_kandinsky5_and_generates(k5_bundle, k5_data, tmp_path):
    """LoHa is not limited to training: `networks.loha` trains on the K5 DiT and the file loads in the generator."""
    argv = argv_for(k5_bundle, k5_data, tmp_path / "loha")
    argv[argv.index("networks.lora_kandinsky")] = "networks.loha"
    sd = train(argv)
    names = {k.split(".")[0] for k in sd}
    assert len(names) == 2 * 10 + 1 * 6  # tiny DiT: 2 visual blocks x 10 + 1 text block x 6, modulations excluded
    assert "lora_unet_visual_transformer_blocks_0_self_attention_to_query.hada_w1_a" in sd

    from musubi_tuner.kandinsky5_generate_video import main as generate

    b = k5_bundle
    common = ["--task", "k5-lite-t2v-5s-sd", "--dit", str(b.dit), "--vae", str(b.vae), "--text_encoder_qwen",
              str(b.text_encoder_qwen), "--text_encoder_clip", str(b.text_encoder_clip), "--prompt", "x", "--seed", "3",
              "--video_length", "5", "--steps", "2", "--width", "64", "--height", "64", "--output_type", "latent",
              "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    generate(common + ["--output", str(tmp_path / "base.safetensors")])
    generate(common + ["--lora_weight", str(tmp_path / "loha" / "k5.safetensors"), "--output", str(tmp_path / "loha.safetensors")])
    base, with_loha = (
        load_file(str(tmp_path / "base.safetensors"))["latent"],
        load_file(str(tmp_path / "loha.safetensors"))["latent"],
    )
    assert not torch.equal(base, with_loha)


def test_sample_prompts_are_encoded_once_per_run(k5_bundle, k5_data, tmp_path, monkeypatch):
    """Defect 9: the text encoders are built once and every prompt / negative is encoded once, however often we sample."""
    from musubi_tuner.kandinsky5.text_encoders import Kandinsky5TextEncoder

    built, encoded = [], []
    original_init, original_encode = Kandinsky5TextEncoder.__init__, Kandinsky5TextEncoder.encode

    def counting_init(self, *args, **kwargs):
        built.append(1)
        original_init(self, *args, **kwargs)

    def counting_encode(self, prompts, *args, **kwargs):
        encoded.extend(prompts)
        return original_encode(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Kandinsky5TextEncoder, "__init__", counting_init)
    monkeypatch.setattr(Kandinsky5TextEncoder, "encode", counting_encode)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a red ball --w 32 --h 32 --f 1 --s 1 --d 3 --n dull\na blue cube --w 32 --h 32 --f 1 --s 1 --d 4 --n dull\n"
    )
    argv = argv_for(k5_bundle, k5_data, tmp_path / "s", "--max_train_steps", "3", "--sample_prompts", str(prompts),
                    "--sample_every_n_steps", "1", "--sample_at_first", "--vae", str(k5_bundle.vae),
                    "--text_encoder_qwen", str(k5_bundle.text_encoder_qwen),
                    "--text_encoder_clip", str(k5_bundle.text_encoder_clip))  # fmt: skip
    train(argv)
    assert len(list((tmp_path / "s" / "sample").glob("*.png"))) == 2 * 4  # sampled at steps 0, 1, 2, 3
    assert len(built) == 1
    assert sorted(encoded) == ["a blue cube", "a red ball", "dull"]  # each distinct text once
