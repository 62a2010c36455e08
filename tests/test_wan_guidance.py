"""Wan generation extras: perpendicular negative guidance (three passes per CFG step, the formula written out here) and
``--sample_solver dpm++sde`` (seeded) through ``wan_generate_video.py``."""

from __future__ import annotations

import pytest
import torch

from blissful_tuner.guidance import perp_neg_combine
from musubi_tuner.demo.wan_bundle import randomize_, tiny_dit_params
from musubi_tuner.utils.errors import UserError
from musubi_tuner.wan.configs import get_task_config
from musubi_tuner.wan.models.dit import WanModel
from musubi_tuner.wan.pipeline import sample_latents

TASK = get_task_config("t2v-1.3B")


def _perp_by_hand(c: torch.Tensor, u: torch.Tensor, n: torch.Tensor, g: float, s: float) -> torch.Tensor:
    """``ε∅ + g·(pos − S·neg⊥)`` over the whole sample, in float64 with plain vector algebra."""
    pos, neg = (c - n).double().flatten(), (u - n).double().flatten()
    neg_perp = neg - (neg @ pos) / (pos @ pos) * pos
    return (n.double().flatten() + g * (pos - s * neg_perp)).view(c.shape)


def test_perp_neg_runs_the_empty_prompt_pass_and_combines_per_the_formula():
    dit = WanModel(**tiny_dit_params(TASK.name))
    randomize_(dit, 0)
    dit.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    cond, uncond, nocond = (torch.randn(k, 32, generator=g) for k in (5, 7, 2))
    noise = torch.randn(16, 2, 4, 4, generator=g)
    seen: list[int] = []
    forward = dit.forward
    dit.forward = lambda *a, **k: (seen.append(a[2][0].shape[0]), forward(*a, **k))[1]  # records the text length

    def guidance(n, v_c, v_u, scale, v_n):
        return perp_neg_combine(v_c, v_u, v_n, scale, 1.5)

    out = sample_latents(
        dit, TASK, cond=cond, uncond=uncond, nocond=nocond, latent_shape=(16, 2, 4, 4), num_steps=1, guidance_scale=4.0,
        shift=3.0, generator=torch.Generator().manual_seed(0), device="cpu", solver="vanilla", noise=noise,
        guidance_fn=guidance, progress=False,
    )  # fmt: skip
    assert seen == [5, 7, 2]  # prompt, negative prompt, empty prompt
    t = torch.tensor([1000.0])
    v = [forward(noise[None], t, [c]).float()[0] for c in (cond, uncond, nocond)]
    want = noise.double() - _perp_by_hand(*v, 4.0, 1.5)  # one Euler step from σ = 1 to 0
    assert (out.double() - want).abs().max() < 1e-4
    # S = 0 keeps only the positive direction: plain CFG around the empty prompt
    torch.testing.assert_close(perp_neg_combine(*v, 4.0, 0.0), v[2] + 4.0 * (v[0] - v[2]))


def _generate(bundle, out, *extra):
    from blissful_tuner.media_output import load_latent_file
    from musubi_tuner.wan_generate_video import main as generate

    generate(["--task", "t2v-1.3B", "--dit", str(bundle.dit), "--vae", str(bundle.vae), "--t5", str(bundle.t5),
              "--prompt", "a red ball", "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "3",
              "--seed", "4", "--output_type", "latent", "--save_path", str(out), "--device", "cpu", *extra])  # fmt: skip
    (f,) = list(out.glob("*.safetensors"))
    return load_latent_file(f)


def test_generate_with_perp_neg_and_dpmpp_sde(wan_t2v_bundle, tmp_path):
    plain, _ = _generate(wan_t2v_bundle, tmp_path / "plain")
    perp, md = _generate(wan_t2v_bundle, tmp_path / "perp", "--perp_neg", "1.5")
    assert md["bt_perp_neg"] == "1.5" and (perp - plain).abs().max() > 1e-4
    sde, md = _generate(wan_t2v_bundle, tmp_path / "sde", "--sample_solver", "dpm++sde")
    assert md["bt_sample_solver"] == "dpm++sde" and torch.isfinite(sde).all() and (sde - plain).abs().max() > 1e-4


def test_dpmpp_sde_sampler_repeats_with_the_seed():
    from musubi_tuner.wan.sampling import make_sampler

    def run(seed: int) -> torch.Tensor:
        f = make_sampler("dpm++sde", 5, 3.0, generator=torch.Generator().manual_seed(seed))
        x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
        for i in range(f.num_steps):
            x = f.step(torch.tanh(x) - 0.5, i, x)
        return x

    assert torch.equal(run(1), run(1)) and (run(1) - run(2)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--perp_neg", "1.5", "--cfgzerostar_scaling"], "cannot be combined"),
        (["--perp_neg", "1.5", "--slg_layers", "0"], "--slg_mode original"),
        (["--perp_neg", "-1"], "--perp_neg must be >= 0"),
        (["--sample_solver", "dpm++sde", "--preview_latent_every", "1"], "SDE"),
    ],
)
def test_perp_neg_and_sde_refuse_what_they_cannot_do(extra, msg, tmp_path):
    from musubi_tuner.wan.generate.args import parse_args

    base = ["--task", "t2v-1.3B", "--dit", "d", "--vae", "v", "--t5", "t", "--prompt", "x", "--save_path", str(tmp_path),
            "--video_size", "32", "32", "--video_length", "5", "--device", "cpu"]  # fmt: skip
    with pytest.raises(UserError, match=msg):
        parse_args([*base, *extra])
