"""Adapters against the closed-form optimal denoiser of Gaussian data, grids and the CFG wrapper."""
import pytest
import torch
from torch import nn

from dstudio.distill.core.denoiser import CFGDenoiser, DiscreteDenoiser, FlowDenoiser
from dstudio.samplers import DiscreteSigmas, discrete_timesteps, karras_sigmas

MU, S = 0.3, 0.7  # data x0 ~ N(MU, S^2 I)


def optimal_x0(x_ve, sigma):
    """E[x0 | x0 + sigma eps = x] for Gaussian data: (S^2 x + sigma^2 MU) / (S^2 + sigma^2)."""
    return (S**2 * x_ve + sigma**2 * MU) / (S**2 + sigma**2)


def alphas_cumprod():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


class DiscreteOracle(nn.Module):
    """The exact eps / v / x0 prediction of a DDPM on Gaussian data, written in DDPM's own variables."""

    def __init__(self, prediction_type):
        super().__init__()
        self.prediction_type = prediction_type
        self.schedule = DiscreteSigmas(alphas_cumprod())
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x_vp, t, class_labels=None):
        sigma = self.schedule.t_to_sigma(t).view(-1, 1)
        alpha, sigma_vp = (1 + sigma**2).rsqrt(), sigma * (1 + sigma**2).rsqrt()
        x_ve = x_vp / alpha
        x0 = optimal_x0(x_ve, sigma)
        eps = (x_ve - x0) / sigma
        return {"epsilon": eps, "v_prediction": alpha * eps - sigma_vp * x0, "sample": x0}[self.prediction_type]


class FlowOracle(nn.Module):
    """The exact velocity of rectified flow x_t = t x1 + (1 - t) z between N(0, I) and Gaussian data."""

    def __init__(self, noise_at_one=False):
        super().__init__()
        self.noise_at_one = noise_at_one
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x_t, time, class_labels=None):
        t = (time / 1000).view(-1, 1)
        if self.noise_at_one:
            t = 1 - t
        sigma = (1 - t) / t
        x1 = optimal_x0(x_t / t, sigma)
        z = (x_t - t * x1) / (1 - t)
        v = x1 - z
        return -v if self.noise_at_one else v


@pytest.fixture
def x_and_sigma():
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.05, 0.3, 1.0, 4.0, 20.0], dtype=torch.float64)
    x = (MU + S * torch.randn(5, 3, generator=g, dtype=torch.float64)) + sigma.view(-1, 1) * torch.randn(
        5, 3, generator=g, dtype=torch.float64)
    return x, sigma


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_discrete_adapters_recover_optimal_denoiser(prediction_type, x_and_sigma):
    x, sigma = x_and_sigma
    D = DiscreteDenoiser(DiscreteOracle(prediction_type), alphas_cumprod(), prediction_type)
    torch.testing.assert_close(D(x, sigma), optimal_x0(x, sigma.view(-1, 1)), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("noise_at_one", [False, True])
def test_flow_adapter_recovers_optimal_denoiser(noise_at_one, x_and_sigma):
    x, sigma = x_and_sigma
    D = FlowDenoiser(FlowOracle(noise_at_one), time_scale=1000.0, noise_at_one=noise_at_one)
    torch.testing.assert_close(D(x, sigma), optimal_x0(x, sigma.view(-1, 1)), rtol=1e-9, atol=1e-9)


def test_all_adapters_agree_and_velocity_matches(x_and_sigma):
    x, sigma = x_and_sigma
    outs = [DiscreteDenoiser(DiscreteOracle(p), alphas_cumprod(), p)(x, sigma)
            for p in ("epsilon", "v_prediction", "sample")]
    outs.append(FlowDenoiser(FlowOracle())(x, sigma))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-9, atol=1e-9)
    flow = FlowDenoiser(FlowOracle())
    t = 1 / (1 + sigma)
    v = flow.velocity(x * t.view(-1, 1), t)
    # x0 = x_t + (1 - t) v
    torch.testing.assert_close(x * t.view(-1, 1) + (1 - t.view(-1, 1)) * v, outs[0], rtol=1e-9, atol=1e-9)


def test_unknown_prediction_type_is_named():
    with pytest.raises(ValueError, match="'x0'"):
        DiscreteDenoiser(DiscreteOracle("sample"), alphas_cumprod(), "x0")


def test_sigma_t_round_trip():
    sched = DiscreteSigmas(alphas_cumprod())
    a = alphas_cumprod()
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(sched.t_to_sigma(t), ((1 - a) / a).sqrt())
    t_frac = torch.tensor([0.0, 0.25, 17.5, 500.1, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sched.sigma_to_t(sched.t_to_sigma(t_frac)), t_frac)
    s = torch.tensor([0.02, 0.5, 3.0, 100.0], dtype=torch.float64).clamp(sched.sigma_min, sched.sigma_max)
    torch.testing.assert_close(sched.t_to_sigma(sched.sigma_to_t(s)), s)


def test_karras_grid_endpoints_and_order():
    s = karras_sigmas(10, 0.002, 80.0)
    assert len(s) == 10 and torch.all(s[:-1] > s[1:])
    torch.testing.assert_close(s[[0, -1]], torch.tensor([80.0, 0.002], dtype=torch.float64))
    # rho-th roots are evenly spaced (EDM eq. 5)
    r = s ** (1 / 7)
    torch.testing.assert_close(r[:-1] - r[1:], (r[0] - r[1]).expand(9))


def test_uniform_step_lists_match_diffusers_spacings():
    assert discrete_timesteps(1000, 4, "trailing") == [999, 749, 499, 249]
    assert discrete_timesteps(1000, 4, "leading") == [750, 500, 250, 0]
    with pytest.raises(ValueError, match="1001"):
        discrete_timesteps(1000, 1001)


class LabelEcho(nn.Module):
    """x0_hat = label value broadcast: makes the guidance arithmetic visible."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, cond=None):
        return cond.float().view(-1, 1).expand_as(x) + 0 * x


def test_cfg_wrapper():
    x = torch.zeros(3, 2)
    cond = torch.tensor([1, 2, 3])
    D = LabelEcho()
    assert torch.equal(CFGDenoiser(D, 1.0, torch.tensor(10))(x, 1.0, cond), D(x, 1.0, cond))
    w = 3.0
    out = CFGDenoiser(D, w, torch.tensor(10))(x, 1.0, cond)
    expected = 10 + w * (cond.float() - 10)
    torch.testing.assert_close(out, expected.view(-1, 1).expand_as(x))
