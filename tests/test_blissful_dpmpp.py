"""DPM-Solver++ for flow matching against Euler on an analytic velocity field with a known exact endpoint."""

from __future__ import annotations

import pytest
import torch

from blissful_tuner.flow_dpmpp import dpmpp_sample, flow_sigmas, make_flow_dpmpp_scheduler

MU, S = 2.0, 0.5  # data ~ N(MU, S²), noise ~ N(0, 1)


def exact_velocity(x, t_model, _step):
    """E[ε − x0 | x_t] for x_t = (1−t)·x0 + t·ε with Gaussian x0: affine in x, computed in closed form."""
    t = float(t_model[0]) / 1000.0
    var = (1 - t) ** 2 * S**2 + t**2
    return (t - (1 - t) * S**2) * (x - (1 - t) * MU) / var - MU


def euler(x, n, shift):
    grid = flow_sigmas(n, shift).double()
    for i in range(n):
        x = x + (grid[i + 1] - grid[i]) * exact_velocity(x, grid[i : i + 1] * 1000, i)
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpmpp_and_euler_converge_to_the_exact_endpoint_and_dpmpp_is_closer_with_few_steps(shift):
    x1 = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = MU + S * x1  # the probability-flow ODE maps noise z to MU + S·z
    err = {}
    for n in (8, 400):
        err["dpm", n] = (dpmpp_sample(exact_velocity, x1.clone(), n, shift) - exact).abs().max().item()
        err["euler", n] = (euler(x1.clone(), n, shift) - exact).abs().max().item()
    assert err["dpm", 400] < 2e-3 and err["euler", 400] < 2e-2
    assert err["dpm", 8] <= err["euler", 8]


def test_scheduler_uses_the_euler_grid_and_float_model_times():
    sched = make_flow_dpmpp_scheduler(10, 3.0)
    t = torch.linspace(1, 0, 11)
    assert torch.allclose(sched.sigmas, 3 * t / (1 + 2 * t))
    assert sched.config.prediction_type == "flow_prediction" and sched.config.use_flow_sigmas
    assert torch.allclose(sched.timesteps, sched.sigmas[:-1] * 1000)
    seen = []
    out = dpmpp_sample(
        lambda x, tm, i: (seen.append(float(tm[0])), torch.zeros_like(x))[1],
        torch.ones(1, 2),
        4,
        1.0,
        step_callback=lambda i, x, s: seen.append(("cb", i, s)),
    )
    assert seen[0] == 1000.0 and ("cb", 3, 0.0) in seen and torch.isfinite(out).all()


def test_dpmpp_and_euler_agree_on_the_tiny_kandinsky5_dit_with_many_steps():
    """The generate script's ``--scheduler dpm++`` path (``sampler_fn``) vs the default Euler on a real tiny DiT."""
    from musubi_tuner.demo.bundles import randomize_k5_dit_, tiny_dit_config
    from musubi_tuner.kandinsky5.configs import get_task_config
    from musubi_tuner.kandinsky5.models.dit import DiffusionTransformer3D
    from musubi_tuner.kandinsky5.pipeline import sample_latents

    task = get_task_config("k5-lite-t2v-5s-sd")
    dit = DiffusionTransformer3D(**tiny_dit_config(task.name))
    randomize_k5_dit_(dit, 0)
    dit.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    cond = {"text_embeds": torch.randn(4, 32, generator=g), "pooled_embed": torch.randn(24, generator=g)}

    def run(steps: int, dpmpp: bool) -> torch.Tensor:
        def sampler_fn(velocity_fn, x, grid, callback):
            return dpmpp_sample(velocity_fn, x, len(grid) - 1, 3.0, step_callback=callback)

        return sample_latents(
            dit, task, cond=cond, uncond=None, latent_shape=(2, 4, 4), num_steps=steps, guidance_scale=1.0,
            scheduler_scale=3.0, generator=torch.Generator().manual_seed(0), device="cpu", dtype=torch.float32,
            sampler_fn=sampler_fn if dpmpp else None, progress=False,
        )  # fmt: skip

    euler = {n: run(n, False) for n in (4, 100)}
    gap = {n: (run(n, True) - euler[n]).abs().max().item() for n in (4, 100)}
    scale = euler[100].abs().max().item()
    assert gap[100] < 0.02 * scale and gap[100] < gap[4] / 4, (gap, scale)
