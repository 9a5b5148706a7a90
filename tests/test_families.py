"""Teachers by family (#31): tiny SD 1.5, SDXL, SD3, FLUX (schnell-like, dev-like), PixArt-Sigma and DiT pipelines,
saved by their own classes and loaded back with plain diffusers, seen through their family adapters.

dstudio's DDIM over an adapter's Denoiser draws the pipeline's own images on the same noise (with the stock DDIM
trailing / FlowMatchEuler scheduler), classifier-free guidance against the adapter's null condition draws its guided
images, and the adapter's export loads and draws them in plain diffusers. Tolerance on images in [0, 1]: 1e-4 (float
summation order); flow matching 5e-4, since dstudio's VE grid reads the scheduler's first level s = 1 (pure noise) at
its largest finite sigma 1e5, a timestep 0.01 below the pipeline's 1000.
"""
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline

from dstudio.distill.core.denoiser import CFGDenoiser, start_state
from dstudio.distill.core.conditioning import Conditioning, backbone_call
from dstudio.distill.core.families import family_of, stock_scheduler
from dstudio.samplers import SearchedScheduler, sample_ddim, scheduler_from_teacher
from tiny_families import CALL_KWARGS, FAMILIES, SIZE

PROMPTS = ["a red cat", "photo of digit one"]
LABELS = [1, 7]
SEED, STEPS, W = 0, 2, 3.0
FLOW = ("sd3", "flux-schnell", "flux-dev")
CLASSES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
           "flux-schnell": "FluxPipeline", "flux-dev": "FluxPipeline", "pixart_sigma": "PixArtSigmaPipeline",
           "dit": "DiTPipeline"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny networks, one intra-op thread


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tiny_family):
    """A tiny family pipeline as a user loads it, its adapter, and what its __call__ needs at 16x16."""
    name = request.param
    pipe = DiffusionPipeline.from_pretrained(tiny_family(name))
    pipe.set_progress_bar_config(disable=True)
    kwargs = CALL_KWARGS.get(name, {})
    return SimpleNamespace(name=name, pipe=pipe, kwargs=kwargs,
                           family=family_of(pipe, kwargs.get("height"), kwargs.get("width")))


def inputs(case) -> dict:
    return {"class_labels": LABELS} if case.name == "dit" else {"prompt": PROMPTS}


def condition(case) -> Conditioning:
    return case.family.encode_labels(LABELS) if case.name == "dit" else case.family.encode_prompts(PROMPTS)


def guidance(case, w: float) -> dict:
    """The pipeline's CFG at scale w; FLUX's is true CFG against the empty negative prompt (its guidance_scale is the
    distilled guidance embedding, left at its default)."""
    if case.name.startswith("flux"):
        return {} if w == 1 else {"true_cfg_scale": w, "negative_prompt": [""] * len(PROMPTS)}
    return {"guidance_scale": w}


def unit_noise(case) -> torch.Tensor:
    return torch.randn((len(LABELS), *case.family.sample_shape), generator=torch.Generator().manual_seed(SEED))


def noise_kwargs(case, z: torch.Tensor) -> dict:
    """How the pipeline is handed the noise z: latents (FLUX: packed), or for DiTPipeline, which takes no latents,
    the generator that draws the same z."""
    if case.name == "dit":
        return {"generator": torch.Generator().manual_seed(SEED)}
    if case.name.startswith("flux"):
        return {"latents": FluxPipeline._pack_latents(z, len(z), *z.shape[1:])}
    return {"latents": z}


def pipeline_images(case, pipe, z, w: float = 1.0) -> torch.Tensor:
    return pipe(**inputs(case), num_inference_steps=STEPS, output_type="pt", **noise_kwargs(case, z),
                **guidance(case, w), **case.kwargs).images


def stock_images(case, z, w: float = 1.0) -> torch.Tensor:
    """The pipeline's images with its stock scheduler (the same class around the same components)."""
    pipe = case.family.with_network(case.family.network, stock_scheduler(case.pipe.scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipeline_images(case, pipe, z, w)


def dstudio_images(case, z, sigmas, w: float = 1.0) -> torch.Tensor:
    """dstudio's DDIM (Euler in sigma) over the adapter's Denoiser from unit noise z, decoded to [0, 1]."""
    d = case.family.denoiser()
    guided = d if w == 1 else CFGDenoiser(d, w, case.family.null())  # the core's CFG on a Conditioning null
    x = sample_ddim(guided, start_state(d, z, sigmas[0]), sigmas, condition(case))
    with torch.no_grad():
        return (case.family.decode(x / float(d.noise_scale(sigmas[-1]))) / 2 + 0.5).clamp(0, 1)


def assert_same(case, got, ref):
    torch.testing.assert_close(got, ref, atol=5e-4 if case.name in FLOW else 1e-4, rtol=0)


def test_tiny_pipeline_loads_and_draws_in_plain_diffusers(case):
    assert type(case.pipe).__name__ == CLASSES[case.name]
    images = case.pipe(**inputs(case), num_inference_steps=STEPS, output_type="pt",
                       generator=torch.Generator().manual_seed(SEED), **case.kwargs).images
    assert images.shape == (len(LABELS), 3, SIZE, SIZE) and torch.isfinite(images).all()


def test_dstudio_sampler_draws_the_pipeline_images(case):
    z = unit_noise(case)
    assert_same(case, dstudio_images(case, z, case.family.sigmas(STEPS)), stock_images(case, z))


def test_guidance_with_the_null_condition_draws_the_pipeline_guided_images(case):
    z = unit_noise(case)
    guided = dstudio_images(case, z, case.family.sigmas(STEPS), W)
    assert_same(case, guided, stock_images(case, z, W))
    assert (guided - dstudio_images(case, z, case.family.sigmas(STEPS))).abs().max() > 1e-3  # guidance did act


def test_export_loads_and_draws_in_plain_diffusers(case, tmp_path):
    f = case.family
    folder = f.export(f.network, stock_scheduler(case.pipe.scheduler), tmp_path / "export")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == CLASSES[case.name]
    assert {spec[0] for spec in index.values() if isinstance(spec, list)} <= {"diffusers", "transformers", None}
    loaded = DiffusionPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(case.pipe)
    z = unit_noise(case)
    assert_same(case, pipeline_images(case, loaded, z), dstudio_images(case, z, f.sigmas(STEPS)))


def test_searched_schedule_plugs_into_every_family_without_dstudio(tiny_family, tmp_path):
    """A searched two-step schedule (SearchedScheduler on the family's grid: DDPM steps, SD3's shifted flow, FLUX's
    dynamic shift resolved at the sampled size), shipped in the folder around the family's network: each family's
    own pipeline class draws dstudio's DDIM images in one process that cannot import dstudio."""
    from test_exports import plain_diffusers_many

    timesteps, runs, refs = [999, 499], [], []
    for name in FAMILIES:
        pipe = DiffusionPipeline.from_pretrained(tiny_family(name))
        kwargs = CALL_KWARGS.get(name, {})
        f = family_of(pipe, kwargs.get("height"), kwargs.get("width"))
        sched = scheduler_from_teacher(SearchedScheduler, f.fixed_scheduler(), timesteps=timesteps)
        folder = f.export(f.network, sched, tmp_path / name)
        case = SimpleNamespace(name=name, family=f, kwargs=kwargs)
        call = {**inputs(case), **guidance(case, 1.0), "num_inference_steps": len(timesteps), **kwargs}
        runs.append({"pipeline": str(folder), "calls": [(SEED, call)]})
        d = f.denoiser()
        sigmas = torch.cat([d.t_to_sigma(torch.tensor(timesteps, dtype=torch.float64)), torch.zeros(1).double()])
        refs.append((case, dstudio_images(case, unit_noise(case), sigmas)))
    for got, (case, ref) in zip(plain_diffusers_many(tmp_path, runs), refs):
        assert got["pipeline"] == CLASSES[case.name] and got["classes"]["scheduler"].endswith("SearchedScheduler")
        images = got["images"][0]
        images = images.permute(0, 3, 1, 2) if images.shape[-1] == 3 else images  # DiTPipeline: numpy (B, H, W, C)
        assert_same(case, images, ref)


def test_vae_encode_inverts_decode_scaling(case):
    """encode(images) lands in the Denoiser's (C, H, W) latents, and decode reads the VAE as the pipeline does:
    z = x / scaling_factor + shift_factor."""
    f, vae = case.family, case.pipe.vae
    images = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        x = f.encode(images)
        assert x.shape == (1, *f.sample_shape)
        z = vae.encode(images).latent_dist.mean
        torch.testing.assert_close(x / vae.config.scaling_factor + (vae.config.shift_factor or 0), z)
        torch.testing.assert_close(f.decode(x), vae.decode(z).sample)


def test_conditioning_algebra():
    """index / expand / cat / to act on every set field, batch-first; masks and labels keep their dtype."""
    c = Conditioning(embeds=torch.randn(3, 4, 2), mask=torch.ones(3, 4, dtype=torch.long), guidance=torch.ones(3))
    assert len(c) == 3 and len(Conditioning()) == 0
    assert torch.equal(c.index(torch.tensor([2, 0])).embeds, c.embeds[[2, 0]])
    null = c.index(slice(0, 1))
    both = Conditioning.cat([c, null.expand(3)])
    assert both.embeds.shape == (6, 4, 2) and torch.equal(both.mask[3:], c.mask[:1].expand(3, 4))
    half = c.to(dtype=torch.float16)
    assert half.embeds.dtype == torch.float16 and half.mask.dtype == torch.long and half.labels is None
    with pytest.raises(ValueError, match="different fields"):
        Conditioning.cat([c, Conditioning(embeds=c.embeds)])


def test_learned_sigma_channels_are_dropped(tiny_family):
    """DiT's and PixArt's out_channels = 2 in_channels: the Denoiser gets the first half, the eps prediction."""
    pipe = DiffusionPipeline.from_pretrained(tiny_family("dit"))
    f, x, t = family_of(pipe), torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0])
    cond = f.encode_labels(LABELS)
    full = pipe.transformer(x, timestep=t, class_labels=cond.labels).sample
    assert full.shape[1] == 8
    torch.testing.assert_close(backbone_call(pipe.transformer, x, t, cond), full[:, :4])


def test_flux_dev_dynamic_shift_is_exp_mu_at_the_sampled_size(tiny_family):
    """FLUX.1-dev: mu from the 16 tokens of an 8x8 latent (packed 2x2) by the config's base/max shift; the
    scheduler's exponential time shift e^mu / (e^mu + 1 / s - 1) is the fixed shift exp(mu) of the Denoiser's grid."""
    import math

    pipe = DiffusionPipeline.from_pretrained(tiny_family("flux-dev"))
    f = family_of(pipe, SIZE, SIZE)
    cfg = pipe.scheduler.config
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    mu = cfg.base_shift + slope * (16 - cfg.base_image_seq_len)
    assert f.image_seq_len() == 16 and f.denoiser().shift == pytest.approx(math.exp(mu))
    s = f.sigmas(STEPS)
    ours = s[1] / (1 + s[1])  # the second level as a noise fraction
    assert float(ours) == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / 0.5 - 1), rel=1e-6)
    assert f.encode_prompts(PROMPTS).guidance.tolist() == [3.5, 3.5]
    assert family_of(DiffusionPipeline.from_pretrained(tiny_family("flux-schnell"))).encode_prompts(
        PROMPTS).guidance is None
