"""Kandinsky 5 sampling pipeline (musubi_tuner.kandinsky5.pipeline): CFG, I2V contract, first+last, TI2I/I2I, decode.

The DiT is the real ``DiffusionTransformer3D`` with tiny random weights; ``Recorder`` only records the inputs of each
call and forwards them unchanged.
"""

from __future__ import annotations

import pytest
import torch

from musubi_tuner.demo.bundles import randomize_k5_dit_, tiny_dit_config
from musubi_tuner.kandinsky5.conditioning import build_dit_input, normalize_first_frame
from musubi_tuner.kandinsky5.configs import get_task_config
from musubi_tuner.kandinsky5.models.dit import DiffusionTransformer3D
from musubi_tuner.kandinsky5.pipeline import (
    VIDEO_NEGATIVE_PROMPT,
    decode_latents,
    default_negative_prompt,
    initial_noise,
    prepare_reference_images,
    reference_image_size,
    sample_latents,
    template_mode_for_task,
    ti2i_step_count,
)
from musubi_tuner.kandinsky5.sampling import cfg_combine, euler_step, timestep_grid
from musubi_tuner.utils.errors import UserError

T2V = get_task_config("k5-lite-t2v-5s-sd")
I2V = get_task_config("k5-lite-i2v-5s-sd")
T2I = get_task_config("k5-lite-t2i-hd")
I2I = get_task_config("k5-lite-i2i-hd")


def _dit(task_name: str, seed: int = 0) -> DiffusionTransformer3D:
    model = DiffusionTransformer3D(**tiny_dit_config(task_name))
    randomize_k5_dit_(model, seed)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def video_dit() -> DiffusionTransformer3D:
    return _dit("k5-lite-t2v-5s-sd")


class Recorder(torch.nn.Module):
    """Forwards to the wrapped DiT and keeps a copy of every call's inputs."""

    def __init__(self, dit: DiffusionTransformer3D) -> None:
        super().__init__()
        self.dit = dit
        self.in_channels = dit.in_channels
        self.calls: list[dict] = []

    def forward(self, x, text_embed, pooled, time, scale_factor=(1.0, 1.0, 1.0), sparse_params=None, text_mask=None):
        self.calls.append(
            {"x": x.clone(), "text": text_embed.clone(), "pooled": pooled.clone(), "time": time.clone(), "sparse": sparse_params}
        )
        return self.dit(x, text_embed, pooled, time, scale_factor=scale_factor, sparse_params=sparse_params, text_mask=text_mask)


def _text(length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"text_embeds": torch.randn(length, 32, generator=g), "pooled_embed": torch.randn(24, generator=g)}


COND, UNCOND = _text(5, 1), _text(3, 2)


def _sample(dit, task=T2V, *, shape=(2, 4, 4), steps=3, guidance=5.0, seed=0, **kw):
    return sample_latents(
        dit,
        task,
        cond=kw.pop("cond", COND),
        uncond=kw.pop("uncond", UNCOND),
        latent_shape=shape,
        num_steps=steps,
        guidance_scale=guidance,
        scheduler_scale=kw.pop("scheduler_scale", 5.0),
        generator=torch.Generator().manual_seed(seed),
        device="cpu",
        dtype=torch.float32,
        progress=False,
        **kw,
    )


def _image_latents(h=4, w=4, seed=3) -> torch.Tensor:
    return torch.randn(16, 2, h, w, generator=torch.Generator().manual_seed(seed))


def test_guidance_one_never_runs_the_unconditional_pass(video_dit):
    rec = Recorder(video_dit)
    _sample(rec, guidance=1.0, steps=3)
    assert len(rec.calls) == 3
    rec = Recorder(video_dit)
    _sample(rec, guidance=5.0, steps=3, uncond=None)
    assert len(rec.calls) == 3
    rec = Recorder(video_dit)
    _sample(rec, guidance=5.0, steps=3)
    assert len(rec.calls) == 6
    # cond first, then uncond, each with one copy of its own prompt tokens (defect #1)
    assert [c["text"].shape[1] for c in rec.calls[:2]] == [5, 3]


def test_cfg_combine_and_grid_match_a_hand_written_loop(video_dit):
    out = _sample(video_dit, guidance=4.0, steps=3, shape=(2, 4, 4), scheduler_scale=5.0, seed=7)
    noise = initial_noise((2, 4, 4), torch.Generator().manual_seed(7))
    grid = timestep_grid(3, 5.0)
    x = noise[None]
    for i in range(3):
        inp = build_dit_input(x, None, [], True)
        t = torch.full((1,), float(grid[i]) * 1000.0)
        vc = video_dit(inp, COND["text_embeds"][None], COND["pooled_embed"][None], t, scale_factor=T2V.rope_scale)
        vu = video_dit(inp, UNCOND["text_embeds"][None], UNCOND["pooled_embed"][None], t, scale_factor=T2V.rope_scale)
        x = euler_step(x, cfg_combine(vc.float(), vu.float(), 4.0), grid[i], grid[i + 1])
    torch.testing.assert_close(out, x[0], rtol=0, atol=1e-6)


def test_seed_reproduces_and_timesteps_are_1000_t(video_dit):
    rec = Recorder(video_dit)
    a = _sample(rec, seed=11, steps=2, guidance=1.0)
    b = _sample(video_dit, seed=11, steps=2, guidance=1.0)
    c = _sample(video_dit, seed=12, steps=2, guidance=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    grid = timestep_grid(2, 5.0)
    assert [float(call["time"][0]) for call in rec.calls] == pytest.approx([1000 * float(grid[0]), 1000 * float(grid[1])])


def test_i2v_input_is_built_by_the_shared_function_every_step(video_dit):
    rec = Recorder(video_dit)
    img = _image_latents()
    states = []
    out = _sample(
        rec,
        I2V,
        shape=(3, 4, 4),
        steps=3,
        guidance=1.0,
        image_latents=img,
        step_callback=lambda i, x, t: states.append(x.clone()),
        seed=5,
    )
    clean = img.permute(1, 2, 3, 0)[:1][None]  # (1, 1, h, w, 16)
    noise = initial_noise((3, 4, 4), torch.Generator().manual_seed(5))
    inputs_expected = [noise] + states[:-1]
    for call, x_t in zip(rec.calls, inputs_expected):
        torch.testing.assert_close(call["x"], build_dit_input(x_t[None], clean, [0], True), rtol=0, atol=0)
        assert torch.equal(call["x"][0, 0, ..., :16], clean[0, 0])  # clean latent in the noisy stream
        assert not call["x"][..., 16:32].any()  # visual_cond stays zero
        assert call["x"][0, 0, ..., 32].eq(1).all() and not call["x"][0, 1:, ..., 32].any()
    # the result carries the clean first frame (F < 5: no normalize_first_frame)
    assert torch.equal(out[0], clean[0, 0])


def test_first_last_applies_the_last_image_at_frame_f_minus_1(video_dit):
    rec = Recorder(video_dit)
    img = _image_latents(seed=9)
    out = _sample(rec, I2V, shape=(4, 4, 4), steps=2, guidance=1.0, image_latents=img, i2v_mode="first_last")
    first, last = img[:, 0].permute(1, 2, 0), img[:, 1].permute(1, 2, 0)
    for call in rec.calls:
        x = call["x"][0]
        assert torch.equal(x[0, ..., :16], first) and torch.equal(x[3, ..., :16], last)
        assert x[[0, 3], ..., 32].eq(1).all() and not x[1:3, ..., 32].any()
    assert torch.equal(out[0], first) and torch.equal(out[3], last)


def test_normalize_first_frame_after_sampling_only_for_five_or_more_frames(video_dit):
    img = _image_latents()
    clean = img[:, 0].permute(1, 2, 0)
    short = _sample(video_dit, I2V, shape=(4, 4, 4), steps=2, image_latents=img)
    assert torch.equal(short[0], clean) and torch.isfinite(short).all()
    raw = _sample(video_dit, I2V, shape=(6, 4, 4), steps=2, image_latents=img, normalize_first=False, seed=1)
    assert torch.equal(raw[0], clean)
    normed = _sample(video_dit, I2V, shape=(6, 4, 4), steps=2, image_latents=img, seed=1)
    torch.testing.assert_close(normed, normalize_first_frame(raw), rtol=0, atol=0)
    assert not torch.equal(normed[0], clean) and torch.equal(normed[4:], raw[4:])


def test_extra_noise_moves_only_the_conditioning_latent(video_dit):
    img = _image_latents()
    base = _sample(video_dit, I2V, shape=(3, 4, 4), steps=2, image_latents=img, seed=4)
    noisy = _sample(video_dit, I2V, shape=(3, 4, 4), steps=2, image_latents=img, seed=4, image_extra_noise=0.05)
    delta = (noisy[0] - base[0]).abs()
    assert 0 < delta.max() < 0.5


def test_guidance_callbacks_see_every_step(video_dit):
    seen = []

    def guidance(i, vc, vu):
        seen.append((i, vu is None))
        return vc if vu is None else cfg_combine(vc, vu, 3.0)

    rec = Recorder(video_dit)
    _sample(rec, steps=4, guidance=3.0, guidance_fn=guidance, uncond_needed_fn=lambda i: i % 2 == 0)
    assert seen == [(0, False), (1, True), (2, False), (3, True)]
    assert len(rec.calls) == 6


def test_sparse_params_fn_gets_the_latent_shape(video_dit):
    shapes = []
    rec = Recorder(video_dit)
    _sample(rec, steps=1, guidance=1.0, shape=(2, 4, 6), sparse_params_fn=lambda s: shapes.append(s))
    assert shapes == [(2, 4, 6)] and rec.calls[0]["sparse"] is None


def test_t2i_model_takes_16_channels_and_refuses_image_conditioning():
    dit = _dit("k5-lite-t2i-hd")
    rec = Recorder(dit)
    out = _sample(rec, T2I, shape=(1, 4, 4), steps=2, guidance=1.0)
    assert out.shape == (1, 4, 4, 16) and rec.calls[0]["x"].shape[-1] == 16
    with pytest.raises(UserError, match="image-conditioning"):
        _sample(dit, T2I, shape=(1, 4, 4), steps=1, image_latents=_image_latents())


def test_ti2i_runs_the_last_steps_from_the_image():
    dit = _dit("k5-lite-t2i-hd")
    rec = Recorder(dit)
    init = torch.randn(1, 4, 4, 16)
    _sample(rec, T2I, shape=(1, 4, 4), steps=4, guidance=1.0, init_latents=init, denoise_strength=0.5, scheduler_scale=3.0, seed=2)
    grid = timestep_grid(4, 3.0)
    assert len(rec.calls) == 2 and float(rec.calls[0]["time"][0]) == pytest.approx(1000 * float(grid[2]))
    t0 = float(grid[2])
    noise = initial_noise((1, 4, 4), torch.Generator().manual_seed(2))
    torch.testing.assert_close(rec.calls[0]["x"][0], noise * t0 + (1 - t0) * init)
    assert ti2i_step_count(50, 0.3) == 15
    with pytest.raises(UserError, match="ti2i_denoise_percent"):
        ti2i_step_count(4, 0.1)


def test_i2i_input_is_noisy_source_and_ones():
    dit = _dit("k5-lite-i2i-hd")
    rec = Recorder(dit)
    source = torch.randn(1, 4, 4, 16)
    _sample(rec, I2I, shape=(1, 4, 4), steps=1, guidance=1.0, source_latents=source)
    x = rec.calls[0]["x"][0]
    assert x.shape[-1] == 33 and torch.equal(x[..., 16:32], source) and x[..., 32].eq(1).all()
    with pytest.raises(UserError, match="source image"):
        _sample(dit, I2I, shape=(1, 4, 4), steps=1)


def test_mismatched_image_size_is_a_user_error(video_dit):
    with pytest.raises(UserError, match="reference image"):
        _sample(video_dit, I2V, shape=(3, 4, 4), steps=1, image_latents=_image_latents(h=6))


def test_decode_latents_gives_pixel_frames_in_unit_range(k5_bundle):
    from musubi_tuner.kandinsky5.vae import load_k5_vae

    vae = load_k5_vae(k5_bundle.vae, "hunyuan_video", torch.float32)
    video = decode_latents(vae, torch.randn(2, 4, 6, 16))
    assert video.shape == (3, 5, 32, 48) and video.dtype == torch.float32
    assert video.min() >= 0 and video.max() <= 1 and video.device.type == "cpu"


def test_task_defaults():
    assert default_negative_prompt(T2V) == VIDEO_NEGATIVE_PROMPT and default_negative_prompt(T2I) == ""
    assert VIDEO_NEGATIVE_PROMPT.startswith("Static, 2D cartoon")
    assert template_mode_for_task(T2V, 5) == "video" and template_mode_for_task(T2V, 1) == "image"
    assert template_mode_for_task(I2I, 1) == "image_edit"


def test_reference_image_sizes():
    assert reference_image_size(1920, 1080, max_area=512 * 768) == (832, 464)  # scaled down, multiples of 16
    assert reference_image_size(100, 60, max_area=512 * 768) == (96, 64)  # never upscaled
    assert reference_image_size(100, 60, max_area=512 * 768, allow_upscale=True)[0] > 100
    assert reference_image_size(1000, 700, max_area=1024 * 1024, divisibility=128) == (1024, 640)
    assert reference_image_size(10, 10, max_area=512 * 768) == (16, 16)  # at least one unit


def test_prepare_reference_images(tmp_path):
    from PIL import Image

    Image.new("RGB", (100, 60), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (50, 50), (0, 0, 255)).save(tmp_path / "b.png")
    first, last, size = prepare_reference_images(I2V, tmp_path / "a.png", tmp_path / "b.png")
    assert size == (96, 64) and first.shape == last.shape == (1, 3, 64, 96)
    assert first[0, 0].min() == 1.0 and first[0, 2].max() == -1.0 and last[0, 2].min() == 1.0
    first, _, size = prepare_reference_images(I2V, tmp_path / "a.png", target_size=(64, 64), advanced=True)
    assert size == (64, 64) and first.shape == (1, 3, 64, 64)
    with pytest.raises(UserError, match="--image"):
        prepare_reference_images(I2V, tmp_path / "missing.png")
    with pytest.raises(UserError, match="NABLA"):
        prepare_reference_images(I2V, tmp_path / "a.png", target_size=(64, 64), advanced=True, nabla=True)
