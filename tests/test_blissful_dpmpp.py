"""DPM-Solver++ for flow matching (``musubi_tuner.modules.flow_dpmpp``: the generators and the trainers' samples share it)
against Euler on an analytic velocity field with a known exact endpoint; its SDE variant against the formula."""

from __future__ import annotations

import math

import pytest
import torch

from musubi_tuner.modules.flow_dpmpp import dpmpp_sample, flow_sigmas, make_flow_dpmpp_scheduler

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


def test_generators_and_trainers_share_one_solver():
    from musubi_tuner.kandinsky5.generate import generator as k5_generator
    from musubi_tuner.wan.sampling import make_sampler

    assert k5_generator.dpmpp_sample is dpmpp_sample
    wan = make_sampler("dpm++", 6, 5.0)
    ref = make_flow_dpmpp_scheduler(6, 5.0)
    assert torch.equal(wan.sigmas, ref.sigmas) and wan.scheduler.config == ref.config


def _lam(s: float) -> float:
    """λ = log(α/σ) with α = 1 − σ (−inf at pure noise, +inf at data)."""
    return -math.inf if s >= 1.0 else (math.inf if s <= 0.0 else math.log((1 - s) / s))


def sde_dpmpp_2m_by_hand(velocity_fn, x, n, shift, seed):
    """SDE-DPM-Solver++(2M), midpoint, written out from the formula in float64 (noise drawn each step, in order)."""
    g = torch.Generator().manual_seed(seed)
    sig = [shift * t / (1 + (shift - 1) * t) for t in (1 - i / n for i in range(n + 1))]
    prev_x0, prev_lam = None, None
    x = x.double()
    for i in range(n):
        s, s1 = sig[i], sig[i + 1]
        x0 = x - s * velocity_fn(x, torch.tensor([s * 1000.0]), i).double()
        z = torch.randn(x.shape, generator=g, dtype=torch.float32).double()
        if s1 == 0.0:  # last step, first order: α' = 1, σ' = 0
            x = x0
        else:
            h = _lam(s1) - _lam(s)
            e = math.exp(-h)
            d = x0
            if prev_x0 is not None and math.isfinite(prev_lam):  # a step from σ = 1 gives no slope
                r = (_lam(s) - prev_lam) / h
                d = x0 + 0.5 * (x0 - prev_x0) / r
            x = (s1 / s) * e * x + (1 - s1) * (1 - e * e) * d + s1 * math.sqrt(1 - e * e) * z
        prev_x0, prev_lam = x0, _lam(s)
    return x


def _field(x, t_model, _i):
    t = float(t_model[0]) / 1000.0
    return torch.tanh(x) * (0.5 + t) + 0.3 * x - 1.0


@pytest.mark.parametrize("n, shift", [(6, 3.0), (9, 1.0)])
def test_dpmpp_sde_matches_the_formula_with_the_same_noise(n, shift):
    x1 = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    got = dpmpp_sample(_field, x1.clone(), n, shift, sde=True, generator=torch.Generator().manual_seed(7))
    want = sde_dpmpp_2m_by_hand(_field, x1.clone(), n, shift, 7)
    assert (got.double() - want).abs().max() < 1e-4
    again = dpmpp_sample(_field, x1.clone(), n, shift, sde=True, generator=torch.Generator().manual_seed(7))
    other = dpmpp_sample(_field, x1.clone(), n, shift, sde=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(got, again) and (got - other).abs().max() > 1e-3


def test_dpmpp_sde_samples_the_data_distribution():
    """With the exact velocity of Gaussian data N(MU, S²) the stochastic sampler ends on that distribution (not on the
    ODE's endpoint of the given noise)."""
    x1 = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = dpmpp_sample(exact_velocity, x1, 100, 3.0, sde=True, generator=torch.Generator().manual_seed(1)).flatten()
    assert abs(out.mean().item() - MU) < 0.02 and abs(out.std().item() - S) < 0.02
    assert (out - (MU + S * x1.flatten())).abs().mean() > 0.05
