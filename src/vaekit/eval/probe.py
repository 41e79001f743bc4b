"""`vaekit probe`: train the same small denoiser on each VAE's latents of the same images, and compare the losses.

The question users ask of a latent space is how easily a diffusion model learns it; this answers
it cheaply by doing it at small scale. For every model, on the latents of the same images:

- the latents are standardised with one mean and one standard deviation measured on the training
  part (of z ~ q(z|x) when `sample`), so every model's denoiser sees unit-variance data;
- a small convolutional denoiser (residual blocks with dilated 3x3 convolutions, AdaGN time
  conditioning, vaekit's own: no library ships one this small) is trained with the rectified-flow
  objective of SD3 and FLUX: x_t = (1 - t) z + t eps, t ~ U(0, 1), loss ||v(x_t, t) - (eps - z)||^2;
- the weights (apart from the input and output layers, whose width is the latent channel count),
  batches, times and noise come from `seed` alone, and the budget (`steps` x `batch_size`) is the
  same for every model;
- the held-out loss is measured during training (the curve) and, at the end, at `noise_levels`
  fixed times t with fixed noise: the final loss per noise level.

Each loss is also given relative to the best loss on white-noise latents of unit variance (a
latent space with nothing to learn): 2 - (2t - 1)^2 / ((1 - t)^2 + t^2), the error of the best
linear estimate of eps - z from x_t when z and eps are independent standard normals. A relative
loss of 1 means the denoiser found no structure; lower is easier. docs/evaluation.md says what
the probe predicts and what it does not.
"""

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from torch import nn
from tqdm.auto import tqdm

from vaekit.cache.config import EncodeConfig
from vaekit.cache.encode import encode_dataset
from vaekit.cache.dataset import LatentDataset
from vaekit.cache.format import read_card
from vaekit.config import flat_overrides
from vaekit.device import resolve_device
from vaekit.errors import VaekitError
from vaekit.eval import report
from vaekit.eval.config import unique_labels
from vaekit.eval.diagnostics import model_folder
from vaekit.io import write_json
from vaekit.model.architecture import fingerprint
from vaekit.model.load import load_vae
from vaekit.seeds import derive_seed, numpy_rng, torch_generator

SPLIT_KEY = 0x5052  # the held-out split depends on the image keys only, never on the probe's seed

TIME_FEATURES = 64


# ---------------------------------------------------------------------------------------------------
# The denoiser


def time_embedding(t, dim=TIME_FEATURES):
    """Sinusoidal features of t in [0, 1] (Vaswani et al. 2017, section 3.5, as diffusion models embed time)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * 1000 * frequencies[None]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, dilated 3x3 convolution, twice, with the time as a per-channel scale and shift (AdaGN)."""

    def __init__(self, width, dilation):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)
        self.time = nn.Linear(width, 2 * width)
        self.norm2 = nn.GroupNorm(8, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)

    def forward(self, h, emb):
        scale, shift = self.time(emb)[:, :, None, None].chunk(2, dim=1)  # (B, width, 1, 1) each
        out = self.conv1(F.silu(self.norm1(h)))
        out = self.norm2(out) * (1 + scale) + shift
        return h + self.conv2(F.silu(out))


class Denoiser(nn.Module):
    """Velocity v(x_t, t) for latents (B, C, h, w): conv in, residual blocks (dilations 1, 2, 4, ...), conv out."""

    def __init__(self, channels, width=32, blocks=4):
        super().__init__()
        self.time = nn.Sequential(nn.Linear(TIME_FEATURES, width), nn.SiLU(), nn.Linear(width, width))
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(width, 2 ** (i % 3)) for i in range(blocks))
        self.norm_out = nn.GroupNorm(8, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # starts by predicting 0: every model begins at the same loss
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t):
        emb = self.time(time_embedding(t))
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def build_denoiser(channels, config):
    """The denoiser for `channels`-channel latents; its blocks are initialised identically for every model."""
    torch.manual_seed(derive_seed(config.seed, 1))
    body = Denoiser(8, config.width, config.blocks)  # the shared part, drawn before anything channel-dependent
    torch.manual_seed(derive_seed(config.seed, 2))
    model = Denoiser(channels, config.width, config.blocks)
    state = {k: v for k, v in body.state_dict().items() if not k.startswith(("conv_in.", "conv_out."))}
    model.load_state_dict(state, strict=False)
    return model


def white_noise_loss(t):
    """The lowest loss on white-noise latents of unit variance at time t (see the module docstring)."""
    return 2 - (2 * t - 1) ** 2 / ((1 - t) ** 2 + t ** 2)


# ---------------------------------------------------------------------------------------------------
# Latents


@dataclasses.dataclass
class LatentSet:
    """One model's latents of the probe's images, in key order: posterior means and standard deviations (N, C, h, w)."""

    label: str
    model: str
    keys: list
    mean: torch.Tensor
    std: torch.Tensor | None = None  # None: the cache holds only the posterior mode
    source: str = ""  # where the latents came from

    def subset(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        return dataclasses.replace(self, keys=[self.keys[i] for i in indices.tolist()], mean=self.mean[indices],
                                   std=self.std[indices] if self.std is not None else None)


def read_cache(cache_dir, label, model, wanted_fingerprint=None):
    """A LatentSet from a vaekit latent cache: the unflipped latents of its most common shape."""
    card = read_card(cache_dir)
    if wanted_fingerprint is not None and card["key"]["vae_fingerprint"] != wanted_fingerprint:
        raise VaekitError(f"{cache_dir} holds latents of another VAE than {model} (its fingerprint differs); pass the "
                          "model that encoded it, or drop --cache to encode --data with this one.")
    dataset = LatentDataset(cache_dir, sample=False, normalize=False, flips="none")
    if not len(dataset):
        raise VaekitError(f"{cache_dir} holds no latents; fill it with `vaekit encode`.")
    buckets = [tuple(b) for b in dataset.buckets.tolist()]
    common = max(set(buckets), key=buckets.count)  # aspect buckets: the probe compares one grid size
    chosen = sorted((dataset.field(i, "key"), i) for i in range(len(dataset)) if buckets[i] == common)
    stored = [dataset.stored(i) for _, i in chosen]
    mean = torch.stack([m for m, _ in stored])  # (N, C, h, w)
    std = torch.stack([lv for _, lv in stored]).mul(0.5).exp() if card["key"]["store"] == "mean_logvar" else None
    entries = [{"key": k} for k, _ in chosen]
    return LatentSet(label, model or card.get("vae", {}).get("source", str(cache_dir)), [e["key"] for e in entries],
                     mean, std, source=str(cache_dir))


def encode_into_cache(config, spec, vae, folder, progress):
    """Encode config.data with `vae` into a vaekit cache at `folder` (what an earlier run left there is reused)."""
    encode_config = EncodeConfig(data=config.data, out=str(folder), vae=spec, override=list(config.override),
                                 weights=config.weights, limit=config.limit, resolution=config.size, dtype="fp32",
                                 compute_dtype="fp32", batch_size=16, num_workers=0, store="mean_logvar")
    encode_dataset(encode_config, vae=vae, progress=progress)


def latent_sets(config, progress=True):
    """Each model's LatentSet, restricted to the keys every model has: from --cache, or encoded into out/latents/."""
    count = len(config.vae) or len(config.cache)
    labels = list(config.label) or unique_labels(config.vae or config.cache)
    sets = []
    for index in range(count):
        spec = config.vae[index] if config.vae else None
        cache = Path(config.cache[index]) if config.cache else None
        wanted = None
        if spec is not None:
            vae = load_vae(spec, flat_overrides(config.override), weights=config.weights)
            wanted = fingerprint(vae)
            if cache is None:
                cache = Path(config.out) / "latents" / model_folder(index, labels[index])
                encode_into_cache(config, spec, vae, cache, progress)
        sets.append(read_cache(cache, labels[index], spec, wanted))
    common = set(sets[0].keys).intersection(*(s.keys for s in sets[1:]))
    if len(common) < 4:
        raise VaekitError(f"The models' latents share only {len(common)} images; the probe needs the latents of the "
                          "same images (encode the same --data for each, or pass caches of the same source).")
    order = sorted(common)
    order = [order[i] for i in numpy_rng(SPLIT_KEY).permutation(len(order))]  # mixed, so the held-out part is typical
    order = order[:config.limit] if config.limit else order
    aligned = []
    for latents in sets:
        index = {key: i for i, key in enumerate(latents.keys)}
        aligned.append(latents.subset([index[key] for key in order]))
    return aligned


# ---------------------------------------------------------------------------------------------------
# Training and measuring


def standardisation(latents, sample):
    """(mean, std) of every latent value of a set (of z ~ q(z|x) when `sample`): one number each, as a scaling factor."""
    mean = latents.mean.double()
    centre = mean.mean()
    variance = (mean - centre).square().mean()
    if sample and latents.std is not None:
        variance = variance + latents.std.double().square().mean()
    return float(centre), float(variance.sqrt().clamp(min=1e-12))


def draw(latents, indices, sample, generator, centre, scale):
    """Standardised latents of `indices`, sampled from the posterior with `generator` when `sample`."""
    z = latents.mean[indices]
    if sample and latents.std is not None:
        z = z + latents.std[indices] * torch.randn(z.shape, generator=generator)
    return (z - centre) / scale


@torch.no_grad()
def held_out_loss(model, latents, config, times, centre, scale, device):
    """Mean loss per time in `times` on the held-out latents, with fixed noise (the same at every call)."""
    model.eval()
    losses = []
    for level, t in enumerate(times):
        generator = torch_generator(config.seed, 3, level)
        total = 0.0
        for start in range(0, len(latents.keys), config.batch_size):
            indices = torch.arange(start, min(start + config.batch_size, len(latents.keys)))
            z = draw(latents, indices, config.sample, generator, centre, scale)
            eps = torch.randn(z.shape, generator=generator)
            tt = torch.full((len(indices),), float(t))
            x_t = (1 - t) * z + t * eps
            prediction = model(x_t.to(device), tt.to(device)).float().cpu()
            total += float((prediction - (eps - z)).square().mean(dim=(1, 2, 3)).sum())
        losses.append(total / len(latents.keys))
    model.train()
    return losses


def train_probe(train, held_out, config, device, progress=True):
    """Train one denoiser on `train` latents; returns its curve and its final held-out loss per noise level."""
    started = time.perf_counter()
    centre, scale = standardisation(train, config.sample)
    model = build_denoiser(train.mean.shape[1], config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=max(1, config.steps // 20),
                             num_training_steps=config.steps)
    curve_times = [(k + 0.5) / 4 for k in range(4)]  # a cheaper, coarser held-out loss for the curve
    curve = {"step": [], "train_loss": [], "held_out_loss": []}
    running, seen = 0.0, 0
    bar = tqdm(range(config.steps), desc=f"probe {train.label}"[:40], unit="step", disable=not progress,
               dynamic_ncols=True)
    for step in bar:
        generator = torch_generator(config.seed, 4, step)  # the same batches, times and noise for every model
        indices = torch.randint(len(train.keys), (config.batch_size,), generator=generator)
        z = draw(train, indices, config.sample, generator, centre, scale)
        t = torch.rand(config.batch_size, generator=generator)
        eps = torch.randn(z.shape, generator=generator)
        x_t = (1 - t[:, None, None, None]) * z + t[:, None, None, None] * eps
        z, x_t, eps, t = z.to(device), x_t.to(device), eps.to(device), t.to(device)
        loss = (model(x_t, t) - (eps - z)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running, seen = running + loss.item(), seen + 1
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            curve["step"].append(step + 1)
            curve["train_loss"].append(running / seen)
            curve["held_out_loss"].append(sum(held_out_loss(model, held_out, config, curve_times, centre, scale,
                                                            device)) / len(curve_times))
            running, seen = 0.0, 0
            bar.set_postfix(held_out=f"{curve['held_out_loss'][-1]:.4f}")
    bar.close()
    times = [(k + 0.5) / config.noise_levels for k in range(config.noise_levels)]
    final = held_out_loss(model, held_out, config, times, centre, scale, device)
    reference = [white_noise_loss(t) for t in times]
    relative = [a / b for a, b in zip(final, reference)]
    return {
        "label": train.label,
        "model": train.model,
        "latents": train.source,
        "latent_shape": list(train.mean.shape[1:]),
        "standardisation": {"mean": centre, "std": scale},
        "curve": curve,
        "final": {"t": times, "loss": final, "white_noise_loss": reference, "relative": relative,
                  "mean": sum(final) / len(final), "relative_mean": sum(relative) / len(relative)},
        "seconds": round(time.perf_counter() - started, 2),
    }


def run_probe(sets, config, progress=True):
    """Train and measure one denoiser per LatentSet (the same images, split alike); returns the results dict."""
    device = resolve_device(config.device)
    count = len(sets[0].keys)
    held = min(config.holdout, count - 2)
    results = []
    for latents in sets:
        held_out, train = latents.subset(range(held)), latents.subset(range(held, count))
        results.append(train_probe(train, held_out, config, device, progress))
    ranking = sorted(results, key=lambda r: r["final"]["mean"])
    return {
        "vaekit_probe": 1,
        "protocol": describe_protocol(config),
        "config": dataclasses.asdict(config),
        "data": {"images": count, "train": count - held, "held_out": held, "source": config.data or None},
        "models": results,
        "ranking": [r["label"] for r in ranking],
        "verdict": probe_verdict(ranking),
    }


def probe_verdict(ranking):
    """One sentence naming the easiest latent space and how much easier it is."""
    best = ranking[0]
    if len(ranking) == 1:
        return (f"{best['label']}: final loss {best['final']['mean']:.4f}, {best['final']['relative_mean']:.2f} of "
                "white noise's")
    others = ", ".join(f"{r['label']} {r['final']['mean']:.4f}" for r in ranking[1:])
    gap = ranking[1]["final"]["mean"] / best["final"]["mean"] - 1
    return (f"{best['label']} is the easiest latent space to denoise: final loss {best['final']['mean']:.4f} "
            f"({gap:.0%} below the next; {others})")


def describe_protocol(config):
    """The probe's protocol in sentences, for probe.json."""
    return {
        "images": f"centre crops of {config.size} px (when the probe encodes them), the same images for every model",
        "latents": ("z ~ q(z|x) drawn afresh per step" if config.sample else "posterior means")
        + ", standardised with one mean and std per model measured on the training part",
        "denoiser": f"{config.blocks} residual blocks of width {config.width}, dilated 3x3 convolutions, AdaGN time "
                    "conditioning; the same initial weights and data order for every model (seed "
                    f"{config.seed})",
        "objective": "rectified flow: x_t = (1 - t) z + t eps, t ~ U(0, 1), mean squared error of the velocity "
                     "eps - z",
        "budget": f"{config.steps} steps of {config.batch_size} latents, AdamW lr {config.lr:g}, 5% warm-up, cosine",
        "final loss": f"held-out latents at {config.noise_levels} times t = (k + 0.5) / {config.noise_levels} with "
                      "fixed noise; relative: over the lowest loss on unit white noise, "
                      "2 - (2t - 1)^2 / ((1 - t)^2 + t^2)",
    }


def probe_figure(result):
    """Held-out loss curves and final loss per noise level, side by side."""
    curves = [{"label": m["label"], "x": m["curve"]["step"], "y": m["curve"]["held_out_loss"]}
              for m in result["models"]]
    levels = [{"label": "white noise", "x": result["models"][0]["final"]["t"],
               "y": result["models"][0]["final"]["white_noise_loss"], "dashed": True}]
    levels += [{"label": m["label"], "x": m["final"]["t"], "y": m["final"]["loss"]} for m in result["models"]]
    return report.side_by_side([
        report.line_plot(curves, title="held-out denoising loss during training", x_label="step", y_label="loss"),
        report.line_plot(levels, title="final held-out loss per noise level", x_label="t (0: clean, 1: noise)",
                         y_label="loss", x_range=(0.0, 1.0)),
    ])


def probe(config, progress=True):
    """Run `vaekit probe`: latents (from caches, or encoded), one denoiser per model; writes probe.json and probe.png."""
    sets = latent_sets(config, progress)
    result = run_probe(sets, config, progress)
    out = Path(config.out)
    write_json(out / "probe.json", json.loads(json.dumps(result)))
    report.save_png(probe_figure(result), out / "probe.png")
    return result
