"""Train an AutoencoderKL from scratch or fine-tune its decoder: `vaekit train --config FILE [key=value ...]`.

`train(config)` reads top to bottom: set up, data, model, losses, optimizers, resume, loop, save. The
same code runs plainly, under `accelerate launch` or under `torchrun`.

Correctness rules this file keeps (each has a test in tests/test_train.py):
- every forward that needs gradients goes through the module Accelerate prepared, so DDP syncs them;
- trainable weights stay fp32; mixed precision only autocasts the forward;
- the generator step cannot put gradients into the discriminator (its parameters are frozen for the
  step) and the discriminator step cannot put gradients into the VAE (it sees detached images);
- a step is one global batch of `batch_size x processes x grad_accum` images, and which images (and
  which crops and posterior noise) it uses derives from (seed, epoch, index), so resuming at step k
  and training to n gives the weights of an uninterrupted run to n.

A checkpoint is a folder `checkpoint-NNNNNN/` holding `meta.json` (config, step, data position, loop
state) next to safetensors weights and weights-only `.pt` optimizer and RNG states.
"""

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch import nn

from vaekit import losses
from vaekit.config import load_config, save_config, to_dict
from vaekit.data import DataConfig
from vaekit.errors import VaekitError
from vaekit.io import atomic_path, save_safetensors, write_json, write_text

CHECKPOINT_FORMAT = "vaekit-train-checkpoint"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")

log = logging.getLogger("vaekit.train")


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    """What to start from and which part trains."""

    source: str = "preset:tiny"  # preset:NAME, a diffusers folder, a single file or a hub id
    overrides: dict = field(default_factory=dict)  # AutoencoderKL config fields, e.g. {latent_channels: 16}
    mode: Literal["scratch", "decoder"] = "scratch"  # decoder: encoder and quant_conv frozen
    sample_posterior: bool = True  # decode z ~ q(z|x) (latent-diffusion) rather than its mean
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the encoder and decoder


@dataclass
class LossConfig:
    """Loss terms; see vaekit.losses for the reduction convention."""

    reconstruction: Literal["l1", "l2"] = "l1"
    perceptual_weight: float = 0.0  # LPIPS; latent-diffusion uses 1.0, sd-vae-ft-mse 0.1 with l2
    perceptual_net: Literal["vgg", "alex"] = "vgg"
    lpips_path: Optional[str] = None  # LPIPS backbone weights; default: vaekit's cache (`vaekit weights`)
    # What to do when LPIPS weights are missing and perceptual_weight > 0: stop with a message
    # saying how to get them, or (demo only) drop the term with a warning.
    perceptual_if_missing: Literal["error", "skip"] = "error"
    # latent-diffusion's kl_weight 1e-6 for f8 with 4 channels: 1e-6 * C / (3 * f^2), see vaekit.losses.
    kl_weight: float = 1e-6 * 4 / 192
    kl_warmup_steps: int = 0  # linear KL annealing from 0
    free_bits: float = 0.0  # nats per latent element, per channel


@dataclass
class DiscConfig:
    """PatchGAN discriminator, its loss and its own optimizer; weight 0 switches it off."""

    weight: float = 0.0  # latent-diffusion: disc_weight 0.5
    start: int = 0  # first step with the adversarial term (latent-diffusion: disc_start 50001)
    loss: Literal["hinge", "non_saturating"] = "hinge"
    adaptive: bool = True  # scale by the taming-transformers gradient-norm ratio
    max_adaptive_weight: float = 1e4
    r1_weight: float = 0.0  # gamma of the R1 penalty (gamma / 2 * E||grad D(x)||^2)
    n_layers: int = 3
    base_channels: int = 64
    norm: Literal["batch", "group", "none"] = "batch"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    scheduler: str = "constant"  # any name diffusers.optimization.get_scheduler accepts
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0: no clipping


@dataclass
class OptimConfig:
    """AdamW for the VAE."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # latent-diffusion's autoencoder betas
    weight_decay: float = 0.0
    eps: float = 1e-8
    scheduler: str = "constant"  # constant, constant_with_warmup, cosine, linear, ... (diffusers)
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max global grad norm; 0: no clipping


@dataclass
class EMAConfig:
    """Exponential moving average of the VAE weights (diffusers' EMAModel); exported when on."""

    enabled: bool = False
    decay: float = 0.999
    update_after_step: int = 0
    warmup: bool = False  # EMAModel's use_ema_warmup: decay ramps as 1 - (1 + step / inv_gamma)^-power
    inv_gamma: float = 1.0
    power: float = 2 / 3


@dataclass
class RunConfig:
    """Steps, batch, precision, checkpoints."""

    steps: int = 1000  # optimizer steps, each one global batch
    batch_size: int = 4  # images per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    tf32: bool = True  # TF32 matmuls and convolutions on Ampere and newer GPUs
    seed: int = 0  # weights, data order and posterior noise (crops and flips use data.seed)
    checkpoint_every: int = 500
    keep_last: int = 3  # checkpoints kept; 0 keeps all
    max_nonfinite_in_row: int = 20  # consecutive skipped steps before the run stops


@dataclass
class ValidationConfig:
    """Held-out reconstructions: PNG grid and PSNR / SSIM / LPIPS."""

    every: int = 500  # steps; 0: only at the end
    num_images: int = 8  # held-out images shown and scored during training
    final_images: int = 256  # held-out images scored at the end (metrics.json)
    batch_size: int = 4
    lpips_net: Literal["vgg", "alex"] = "vgg"


@dataclass
class LogConfig:
    """Console, log file and experiment tracker."""

    every: int = 10  # steps between tracker and log-file lines
    tracker: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    project: str = "vaekit"
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class TrainConfig:
    """Everything `vaekit train` reads; saved resolved as out_dir/config.yaml before the first step."""

    out_dir: str = "runs/vae"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: RunConfig = field(default_factory=RunConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    log: LogConfig = field(default_factory=LogConfig)


def check_config(config):
    """Reject values that would only fail later, deep inside the loop."""
    t = config.train
    positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
                "train.checkpoint_every": t.checkpoint_every, "log.every": config.log.every,
                "validation.batch_size": config.validation.batch_size}
    for key, value in positive.items():
        if value < 1:
            raise VaekitError(f"{key} must be at least 1, got {value}.")
    for key in ("loss.perceptual_weight", "loss.kl_weight", "loss.free_bits", "disc.weight", "disc.r1_weight"):
        section, name = key.split(".")
        if getattr(getattr(config, section), name) < 0:
            raise VaekitError(f"{key} must not be negative.")
    for key, betas in (("optim.betas", config.optim.betas), ("disc.betas", config.disc.betas)):
        if len(betas) != 2:
            raise VaekitError(f"{key} must be two numbers, like [0.5, 0.9].")


# ----------------------------------------------------------------------------------------------
# Model wrapper and data order


class AutoencoderForTraining(nn.Module):
    """Encode, sample and decode in one forward, so the prepared (DDP) module sees every trainable use.

    diffusers' AutoencoderKL.forward returns only the reconstruction; the KL term also needs the
    posterior, and calling `vae.encode` on the unwrapped model would bypass DDP's gradient sync.
    """

    def __init__(self, vae, freeze_encoder=False, sample_posterior=True):
        super().__init__()
        self.vae = vae
        self.freeze_encoder = freeze_encoder
        self.sample_posterior = sample_posterior
        if freeze_encoder:
            self.encoder_modules().requires_grad_(False)

    def encoder_modules(self):
        """The encoder and quant_conv: what decoder fine-tuning keeps fixed."""
        quant = self.vae.quant_conv if self.vae.quant_conv is not None else nn.Identity()
        return nn.ModuleList([self.vae.encoder, quant])

    def train(self, mode=True):
        """Train mode, except that a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder_modules().eval()
        return self

    def forward(self, x, generator=None):
        """(B, 3, H, W) images -> (reconstruction, posterior mean, posterior logvar)."""
        with torch.no_grad() if self.freeze_encoder else contextlib.nullcontext():
            posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=generator) if self.sample_posterior else posterior.mean
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


def derive_seed(*parts):
    """A 63-bit seed mixed from integers (numpy's SeedSequence), for per-epoch and per-sample streams."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class StepBatchSampler(torch.utils.data.Sampler):
    """This process's micro-batches of (index, epoch) pairs, one optimizer step after another, endlessly.

    Epoch e shuffles with a generator seeded from (seed, e). Step s of the epoch takes the s-th block
    of `global_batch` indices; micro-batch m of process r takes slot m * processes + r of that block.
    So the images of a step do not depend on how it is split across processes and micro-batches,
    and a run resumed at (epoch, step) continues with exactly the items it would have used. The
    epoch travels with each index because TrainImageDataset derives crops and flips from
    (data seed, epoch, index).
    """

    def __init__(self, dataset_size, batch_size, grad_accum, num_processes, rank, seed, epoch=0, start_step=0):
        self.n, self.b, self.accum = dataset_size, batch_size, grad_accum
        self.world, self.rank, self.seed, self.epoch, self.start = num_processes, rank, seed, epoch, start_step
        self.global_batch = batch_size * grad_accum * num_processes
        # A data set smaller than one global batch is repeated within the epoch.
        self.repeats = max(1, math.ceil(self.global_batch / self.n))
        self.steps_per_epoch = self.repeats * self.n // self.global_batch

    def __iter__(self):
        epoch, start = self.epoch, self.start
        while True:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(self.repeats)])
            for s in range(start, self.steps_per_epoch):
                block = order[s * self.global_batch:(s + 1) * self.global_batch]
                for m in range(self.accum):
                    slot = m * self.world + self.rank
                    yield [(i, epoch) for i in block[slot * self.b:(slot + 1) * self.b].tolist()]
            epoch, start = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# One generator and one discriminator micro-step


@contextlib.contextmanager
def frozen(module):
    """Turn off gradients of `module`'s parameters for the block, restoring each flag afterwards."""
    if module is None:
        yield
        return
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def generator_step(accelerator, model, x, *, loss_cfg, disc_cfg, kl_weight, perceptual=None, disc=None,
                   last_layer=None, generator=None, scale=1.0):
    """VAE loss on one micro-batch and its backward; returns (detached reconstruction, float logs).

    `model` is the prepared AutoencoderForTraining. `disc`, when given, is the *unwrapped*
    discriminator: its parameters are frozen for this step, so the adversarial term sends gradients
    only to the VAE, and no DDP reducer waits for discriminator gradients. `scale` divides the loss
    for gradient accumulation.
    """
    with accelerator.autocast():
        recon, mean, logvar = model(x, generator=generator)
        rec = losses.reconstruction_loss(recon.float(), x.float(), loss_cfg.reconstruction)
        nll = rec
        logs = {"rec": rec.detach()}
        if perceptual is not None and loss_cfg.perceptual_weight > 0:
            p = perceptual(recon, x)
            nll = nll + loss_cfg.perceptual_weight * p
            logs["lpips"] = p.detach()
        kl = losses.kl_loss(mean, logvar, loss_cfg.free_bits)
        loss = nll + kl_weight * kl
        logs["kl"] = kl.detach()
        if disc is not None:
            with frozen(disc):
                g = losses.generator_loss(disc(recon), disc_cfg.loss)
                if disc_cfg.adaptive:
                    weight = losses.adaptive_weight(nll, g, last_layer, disc_cfg.max_adaptive_weight)
                else:
                    weight = torch.tensor(1.0, device=g.device)
                weight = weight * disc_cfg.weight
                loss = loss + weight * g
            logs["g"], logs["g_weight"] = g.detach(), weight.detach()
        logs["loss"] = loss.detach()
    accelerator.backward(loss * scale)
    return recon.detach(), logs


def discriminator_step(accelerator, disc, x, recon, *, disc_cfg, scale=1.0):
    """Discriminator loss on real images and detached reconstructions, and its backward; returns float logs.

    `disc` is the prepared discriminator. The reconstructions arrive detached, so nothing reaches the VAE.
    """
    real = x.detach().requires_grad_(disc_cfg.r1_weight > 0)
    with accelerator.autocast():
        real_logits = disc(real)
        fake_logits = disc(recon.detach())
        loss = losses.disc_loss(real_logits.float(), fake_logits.float(), disc_cfg.loss)
        logs = {"d": loss.detach(), "logits_real": real_logits.detach().float().mean(),
                "logits_fake": fake_logits.detach().float().mean()}
        if disc_cfg.r1_weight > 0:
            r1 = losses.r1_penalty(real_logits, real)
            loss = loss + 0.5 * disc_cfg.r1_weight * r1
            logs["r1"] = r1.detach()
    accelerator.backward(loss * scale)
    return logs


# ----------------------------------------------------------------------------------------------
# Checkpoints


def state_with_ema(vae, ema):
    """The VAE's state dict with each parameter replaced by its EMA shadow."""
    state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    for (name, _), shadow in zip(vae.named_parameters(), ema.shadow_params):
        state[name] = shadow.detach().clone()
    return state


def tensors_cpu(state):
    """A state dict as contiguous CPU tensors, ready for safetensors."""
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def rng_state():
    """Python, numpy and torch RNG states in a form `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state() saved."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(out_dir):
    """Finished checkpoint folders under `out_dir`, oldest step first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found) if (p / "meta.json").is_file()]


def resolve_resume(resume, out_dir):
    """`latest` -> newest checkpoint in out_dir (None when there is none), or a checked PATH."""
    if resume in (None, ""):
        return None
    if resume == "latest":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise VaekitError(f"--resume {resume}: not a training checkpoint (no meta.json). Pass a checkpoint-NNNNNN "
                          f"folder or 'latest'.")
    return path


def read_meta(path):
    """meta.json of a training checkpoint, checked."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VaekitError(f"Cannot read {path}/meta.json ({e}); is this a vaekit training checkpoint?") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise VaekitError(f"{path}/meta.json is not a vaekit training checkpoint (format {meta.get('format')!r}).")
    return meta


def load_training_checkpoint(path, weights="ema", overrides=None):
    """An AutoencoderKL (eval mode) from a training checkpoint folder: EMA weights when it has them, or raw."""
    from safetensors.torch import load_file

    from vaekit.model import load_state_dict_checked, make_config
    from diffusers import AutoencoderKL

    path = Path(path)
    meta = read_meta(path)
    if weights not in ("ema", "raw"):
        raise VaekitError(f"weights must be 'ema' or 'raw', got {weights!r}.")
    vae = AutoencoderKL(**make_config(meta["vae_config"], overrides))
    file = path / "ema.safetensors"
    if weights == "raw" or not file.is_file():
        file = path / "vae.safetensors"
    return load_state_dict_checked(vae, load_file(str(file)), str(file)).eval()


def replica_fingerprint(module):
    """sha256 over this process's parameters; every DDP replica must give the same one."""
    digest = hashlib.sha256()
    for name, p in module.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def prune_checkpoints(out_dir, keep_last):
    """Delete the oldest checkpoints beyond `keep_last` (0 keeps all)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def validate(vae, images, lpips_net=None, batch_size=4):
    """Reconstruct held-out images with the posterior mean; returns (metrics dict, reconstructions)."""
    from vaekit import metrics
    from vaekit.evaluate import encode_decode

    device = next(vae.parameters()).device
    recons, psnr, ssim, lp = [], [], [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)  # (b, 3, H, W)
        y = encode_decode(vae, x).clamp(-1, 1)
        recons.append(y.cpu())
        psnr.append(metrics.psnr(y, x, max_db=100.0).cpu())
        ssim.append(metrics.ssim(y, x).cpu())
        if lpips_net is not None:
            lp.append(lpips_net(y, x).flatten().cpu())  # (b, 1, 1, 1) -> (b,)
    values = {"psnr": torch.cat(psnr).mean().item(), "ssim": torch.cat(ssim).mean().item(),
              "lpips": torch.cat(lp).mean().item() if lp else None, "images": len(images)}
    return values, torch.cat(recons)


def save_grid(originals, recons, path, pairs_per_row=4):
    """PNG grid: each held-out original with its reconstruction to its right."""
    from PIL import Image
    from torchvision.utils import make_grid

    pairs = torch.stack([originals, recons], dim=1).flatten(0, 1)  # (N, 2, 3, H, W) -> (2N, 3, H, W)
    grid = make_grid((pairs.float() + 1) / 2, nrow=2 * pairs_per_row, padding=2, pad_value=1.0)
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)


def take_images(dataset, limit):
    """Up to `limit` decodable images of a dataset as one (N, 3, H, W) tensor, plus the keys skipped."""
    images, errors = [], []
    for i in range(len(dataset)):
        if len(images) >= limit:
            break
        item = dataset[i]
        if "error" in item:
            errors.append(f"{item.get('key')}: {item['error']}")
        else:
            images.append(item["pixels"])
    return (torch.stack(images) if images else None), errors


# ----------------------------------------------------------------------------------------------
# Setup helpers


def build_perceptual(loss_cfg):
    """The LPIPS training loss, or None when its weight is 0 or (demo only) its weights are missing."""
    if loss_cfg.perceptual_weight <= 0:
        return None
    try:
        return losses.PerceptualLoss(net=loss_cfg.perceptual_net, path=loss_cfg.lpips_path)
    except VaekitError as e:
        if loss_cfg.perceptual_if_missing == "error":
            raise VaekitError(f"{e} Or train without the perceptual term: loss.perceptual_weight=0.") from None
        log.warning("LPIPS weights unavailable, training WITHOUT the perceptual term (loss.perceptual_if_missing="
                    "skip): %s", e)
        return None


def build_lpips_metric(net, path, perceptual):
    """An LPIPS network for validation: the training one when it matches, else loaded, else None."""
    if perceptual is not None and perceptual.lpips.pnet_type == net:
        return perceptual.lpips
    try:
        return losses.PerceptualLoss(net=net, path=path).lpips
    except VaekitError as e:
        log.warning("Validation LPIPS unavailable (%s); reporting PSNR and SSIM only.", e)
        return None


def step_scheduler(scheduler):
    """Advance a schedule by one training step, also when that step's update was skipped."""
    import warnings

    with warnings.catch_warnings():
        # The schedule follows the step counter, so after a skipped (non-finite) first update this
        # order is intended; PyTorch would warn that the optimizer has not stepped yet.
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        scheduler.step()


def has_accelerator():
    """Whether torch sees a GPU (or another accelerator) to train on."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def make_tracker_kwargs(log_cfg):
    """Accelerator `log_with`, checking the tracker's package is installed."""
    import importlib.util

    if log_cfg.tracker == "none":
        return None
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}[log_cfg.tracker]
    if importlib.util.find_spec(package) is None:
        if log_cfg.tracker == "wandb":  # asked for by name: the user wants it, so stop
            raise VaekitError("log.tracker=wandb needs the 'wandb' package: pip install wandb, or set log.tracker=none.")
        # The default tracker is not worth stopping a run for; train.log still gets every line.
        log.warning("log.tracker=tensorboard but the 'tensorboard' package is missing (pip install tensorboard); "
                    "logging to train.log only.")
        return None
    return log_cfg.tracker


def flat_hparams(config):
    """The config as one level of scalar values, for trackers that show hyperparameters."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (int, float, str, bool)):
            out[prefix] = value
        else:
            out[prefix] = json.dumps(value)

    walk("", to_dict(config))
    return out


def setup_logging(out_dir, is_main):
    """Rank-0 log lines to the console (through tqdm) and to out_dir/train.log."""
    from tqdm.auto import tqdm

    class TqdmHandler(logging.Handler):
        def emit(self, record):
            tqdm.write(self.format(record))

    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.ERROR)
    console = TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if is_main:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(out_dir) / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file)


def ignore_stop_signals(worker_id):
    """DataLoader workers ignore SIGTERM and SIGINT, which schedulers and Ctrl-C send to the whole process group.

    Otherwise the workers die first and the main process fails with a DataLoader error instead of
    finishing its step and saving a checkpoint; the loader still shuts its workers down on exit.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def stop_on_signals():
    """Catch SIGTERM and SIGINT as a request to checkpoint and stop; a second signal stops at once."""
    requested = {"signal": None}

    def handler(signum, frame):
        if requested["signal"] is not None:
            raise KeyboardInterrupt
        requested["signal"] = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step, then stopping.", requested["signal"])

    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# The training run


def train(config, resume=None):
    """Run one training job; returns a dict with the run's output paths and final metrics."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from vaekit.data import build_train_val, collate_images
    from vaekit.discriminator import DiscriminatorConfig, PatchDiscriminator
    from vaekit.model import cast_vae, load_vae, vae_config

    check_config(config)
    cfg, out_dir = config, Path(config.out_dir)

    # --- set up: processes, precision, logging -------------------------------------------------
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        # Under torchrun / `accelerate launch --multi_gpu` on a machine without an accelerator,
        # Accelerate would otherwise start N unaware single-process runs; cpu=True makes it use gloo.
        cpu=launched > 1 and not has_accelerator(),
        mixed_precision=cfg.train.mixed_precision,
        log_with=make_tracker_kwargs(cfg.log),
        project_dir=str(out_dir),
        # Every trainable parameter is used in every forward, so DDP need not search for unused ones.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    # Gradient accumulation is done by hand (no_sync on all but the last micro-batch) rather than with
    # accelerator.accumulate: the discriminator's micro-steps run after the VAE's optimizer step, and
    # Accelerate's single accumulation counter would interleave the two.
    is_main, world, rank, device = (accelerator.is_main_process, accelerator.num_processes,
                                    accelerator.process_index, accelerator.device)
    setup_logging(out_dir, is_main)
    if launched != world:
        raise VaekitError(f"{launched} processes were launched but Accelerate runs {world}; check the launcher flags.")
    if cfg.train.mixed_precision == "fp16" and device.type == "cpu":
        log.warning("train.mixed_precision=fp16 needs a GPU: this CPU run computes in fp32 (bf16 works on a CPU).")
    if cfg.train.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.train.seed)  # same seed on every process: identical initial weights and EMA
    checkpoint = resolve_resume(resume, out_dir)
    if resume == "latest" and checkpoint is None:
        log.info("--resume latest: no checkpoint in %s yet, starting from step 0.", out_dir)
    elif checkpoint is None and list_checkpoints(out_dir):
        # Starting over here would mix two runs' checkpoints (and pruning would delete the new ones).
        raise VaekitError(f"{out_dir} already holds checkpoints of an earlier run ({list_checkpoints(out_dir)[-1].name}). "
                          f"Continue it with --resume latest, or set out_dir to a new folder (or delete this one).")
    meta = read_meta(checkpoint) if checkpoint else None
    if is_main:
        save_config(cfg, out_dir / "config.yaml")

    # --- data ----------------------------------------------------------------------------------
    train_ds, val_ds = build_train_val(cfg.data)
    if len(train_ds) == 0:
        raise VaekitError(f"No training images found in {cfg.data.path}.")
    val_limit = max(cfg.validation.num_images, cfg.validation.final_images)
    val_images, val_errors = take_images(val_ds, val_limit) if val_ds is not None else (None, [])
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world

    # --- model ---------------------------------------------------------------------------------
    if meta is not None:
        vae = load_training_checkpoint(checkpoint, weights="raw")  # architecture from the checkpoint
    else:
        vae = load_vae(cfg.model.source, overrides=cfg.model.overrides or None)
    cast_vae(vae, device=device, dtype=torch.float32)  # fp32 master weights, whatever the checkpoint's dtype
    if cfg.model.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if cfg.model.compile:
        vae.encoder.compile()  # in place: state-dict keys stay those of AutoencoderKL
        vae.decoder.compile()
    model = AutoencoderForTraining(vae, freeze_encoder=cfg.model.mode == "decoder",
                                   sample_posterior=cfg.model.sample_posterior)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    last_layer = vae.decoder.conv_out.weight  # where the adaptive adversarial weight compares gradients
    use_disc = cfg.disc.weight > 0
    disc = None
    if use_disc:
        disc = PatchDiscriminator(DiscriminatorConfig(n_layers=cfg.disc.n_layers, base_channels=cfg.disc.base_channels,
                                                      norm=cfg.disc.norm)).to(device)
    perceptual = build_perceptual(cfg.loss)
    if perceptual is not None:
        perceptual.to(device)
    ema = None
    if cfg.ema.enabled:
        ema = EMAModel(vae.parameters(), decay=cfg.ema.decay, update_after_step=cfg.ema.update_after_step,
                       use_ema_warmup=cfg.ema.warmup, inv_gamma=cfg.ema.inv_gamma, power=cfg.ema.power)

    # --- optimizers ----------------------------------------------------------------------------
    opt_g = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                              weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
    # Schedulers are stepped once per optimizer step by this loop, not by Accelerate (which would step
    # them once per process), so their length is in optimizer steps.
    sched_g = get_scheduler(cfg.optim.scheduler, opt_g, num_warmup_steps=cfg.optim.warmup_steps,
                            num_training_steps=cfg.train.steps)
    opt_d = sched_d = None
    if use_disc:
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc.lr, betas=tuple(cfg.disc.betas),
                                  weight_decay=cfg.disc.weight_decay)
        sched_d = get_scheduler(cfg.disc.scheduler, opt_d, num_warmup_steps=cfg.disc.warmup_steps,
                                num_training_steps=max(1, cfg.train.steps - cfg.disc.start))
    if use_disc:
        model, disc_ddp, opt_g, opt_d = accelerator.prepare(model, disc, opt_g, opt_d)
    else:
        model, opt_g = accelerator.prepare(model, opt_g)
        disc_ddp = None
    bad = [n for n, p in vae.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if bad:  # the STYLE.md failure: trainable weights cast to half precision lose small updates
        raise VaekitError(f"Trainable parameter {bad[0]} is {vae.get_parameter(bad[0]).dtype}, not float32.")

    # --- resume --------------------------------------------------------------------------------
    step, epoch, batch_in_epoch = 0, 0, 0
    # Counters are the same on every process, except images_seen: this process's images since the start
    # or the resume, summed over processes (plus images_resumed) when a checkpoint is written.
    counters = {"images_seen": 0, "nonfinite_skips": 0, "nonfinite_in_row": 0, "disc_updates": 0}
    images_resumed = 0
    skipped_images = []
    if meta is not None:
        from safetensors.torch import load_file

        step = meta["step"]
        counters.update({k: meta["loop"][k] for k in counters if k in meta["loop"] and k != "images_seen"})
        images_resumed = meta["loop"]["images_seen"]
        skipped_images = list(meta.get("skipped_images", []))
        position = meta["data"]
        if position["global_batch"] == global_batch and position["dataset_size"] == len(train_ds):
            epoch, batch_in_epoch = position["epoch"], position["batch_in_epoch"]
        else:  # the order of a different batch layout would not match; start its next epoch cleanly
            epoch, batch_in_epoch = position["epoch"] + 1, 0
            log.warning("Batch size, process count or data set changed since the checkpoint; continuing from the "
                        "start of epoch %d.", epoch)
        states = torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True)
        opt_g.load_state_dict(states["vae"])
        sched_g.load_state_dict(meta["schedulers"]["vae"])
        if use_disc:
            if (checkpoint / "disc.safetensors").is_file():
                accelerator.unwrap_model(disc_ddp).load_state_dict(load_file(str(checkpoint / "disc.safetensors")))
                opt_d.load_state_dict(states["disc"])
                sched_d.load_state_dict(meta["schedulers"]["disc"])
            else:
                log.warning("The checkpoint has no discriminator; starting a new one.")
        if ema is not None:
            if (checkpoint / "ema.safetensors").is_file():
                shadow = load_file(str(checkpoint / "ema.safetensors"))
                ema.load_state_dict({**meta["ema"], "shadow_params": [shadow[n] for n, _ in vae.named_parameters()]})
                ema.to(device)
            else:
                log.warning("The checkpoint has no EMA; starting the EMA from its raw weights.")
        if accelerator.scaler is not None and meta.get("scaler"):
            accelerator.scaler.load_state_dict(meta["scaler"])
        set_rng_state(torch.load(checkpoint / "rng.pt", weights_only=True))
        log.info("Resumed from %s at step %d.", checkpoint, step)

    def save_checkpoint(interrupted=False):
        """Write checkpoint-<step>/ atomically (temporary folder, then rename) and prune old ones."""
        images = images_resumed + accelerator.reduce(torch.tensor([counters["images_seen"]], device=device), "sum").item()
        fingerprints = gather_object([replica_fingerprint(vae)])
        skipped = sorted(set(skipped_images).union(*gather_object([skipped_images])))
        if len(set(fingerprints)) > 1:
            raise VaekitError("The processes hold different weights (DDP replicas diverged); this is a bug in vaekit.")
        final = out_dir / f"checkpoint-{step:06d}"
        if not is_main:
            accelerator.wait_for_everyone()
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out_dir))
        try:
            save_safetensors(tensors_cpu(vae.state_dict()), tmp / "vae.safetensors")
            if ema is not None:
                save_safetensors(tensors_cpu(state_with_ema(vae, ema)), tmp / "ema.safetensors")
            if use_disc:
                save_safetensors(tensors_cpu(accelerator.unwrap_model(disc_ddp).state_dict()), tmp / "disc.safetensors")
            optim_states = {"vae": opt_g.state_dict(), "disc": opt_d.state_dict() if use_disc else {}}
            with atomic_path(tmp / "optimizer.pt") as path:
                torch.save(optim_states, path)
            with atomic_path(tmp / "rng.pt") as path:
                torch.save(rng_state(), path)
            ema_meta = None
            if ema is not None:
                ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            write_json(tmp / "meta.json", {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "interrupted": interrupted,
                "config": to_dict(cfg),
                "vae_config": vae_config(vae),
                "data": {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "global_batch": global_batch,
                         "dataset_size": len(train_ds), "processes": world},
                "loop": {**counters, "images_seen": int(images)},
                "schedulers": {"vae": sched_g.state_dict(), "disc": sched_d.state_dict() if use_disc else None},
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "ema": ema_meta,
                "replica_fingerprints": fingerprints,
                "skipped_images": skipped,
            })
            if final.exists():  # re-saving the same step (e.g. resumed and stopped at once)
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if skipped:
            write_text(out_dir / "skipped_images.txt", "\n".join(skipped) + "\n")
        prune_checkpoints(out_dir, cfg.train.keep_last)
        accelerator.wait_for_everyone()
        return final

    # --- validation ----------------------------------------------------------------------------
    lpips_metric = None
    eval_vae = None
    if is_main and val_images is not None:
        lpips_metric = build_lpips_metric(cfg.validation.lpips_net, cfg.loss.lpips_path, perceptual)
        if lpips_metric is not None:
            lpips_metric.to(device)
        eval_vae = _copy_vae(vae)
    for error in val_errors:
        log.warning("Held-out image skipped: %s", error)

    def run_validation(limit, grid_path):
        """Score held-out images with the weights being exported (EMA when on); rank 0 only."""
        eval_vae.load_state_dict(state_with_ema(vae, ema) if ema is not None else vae.state_dict())
        images = val_images[:limit]
        values, recons = validate(eval_vae, images, lpips_metric, cfg.validation.batch_size)
        save_grid(images, recons, grid_path)
        return values

    # --- loop ----------------------------------------------------------------------------------
    if cfg.log.tracker != "none":
        accelerator.init_trackers(cfg.log.project, config=flat_hparams(cfg))
    log.info("Training %s (%s mode) for %d steps: %d images per step = %d per process x %d processes x %d "
             "accumulation; %d training and %d held-out images; run folder %s",
             cfg.model.source, cfg.model.mode, cfg.train.steps, global_batch, cfg.train.batch_size, world,
             cfg.train.grad_accum, len(train_ds), 0 if val_images is None else len(val_images), out_dir)

    sampler = StepBatchSampler(len(train_ds), cfg.train.batch_size, cfg.train.grad_accum, world, rank,
                               cfg.train.seed, epoch, batch_in_epoch)
    steps_per_epoch = sampler.steps_per_epoch
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate_images,
                                         num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                                         worker_init_fn=ignore_stop_signals)
    batches = iter(loader)
    # Stands in, with loss weight 0, for a micro-batch whose images all failed to decode: every
    # process must still run a backward, or DDP's gradient all-reduce would wait forever.
    stand_in = torch.zeros(1, 3, cfg.data.size, cfg.data.size)
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not (is_main and cfg.log.progress), dynamic_ncols=True,
               desc="train")
    last_saved, last_time, images_since, rate = None, time.perf_counter(), 0, None
    history = []
    with stop_on_signals() as stop:
        while step < cfg.train.steps:
            model.train()
            if disc_ddp is not None:
                disc_ddp.train()
            kl_weight = losses.kl_weight_at(step, cfg.loss.kl_weight, cfg.loss.kl_warmup_steps)
            disc_active = use_disc and step >= cfg.disc.start
            raw_disc = accelerator.unwrap_model(disc_ddp) if disc_active else None
            kept, logs_sum = [], {}
            for m in range(cfg.train.grad_accum):
                batch = next(batches)
                for error in batch["errors"]:
                    text = f"{error['key']}: {error['error']}"
                    log.warning("Skipped an image that cannot be used: %s", text)
                    skipped_images.append(text)
                pixels, weight = batch["pixels"], 1.0
                if len(pixels) == 0:
                    pixels, weight = stand_in, 0.0
                else:
                    counters["images_seen"] += len(pixels)
                    images_since += len(pixels)
                x = pixels.to(device, non_blocking=True)
                slot = m * world + rank
                generator = torch.Generator().manual_seed(derive_seed(cfg.train.seed, step, slot))
                sync = m == cfg.train.grad_accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    recon, logs = generator_step(
                        accelerator, model, x, loss_cfg=cfg.loss, disc_cfg=cfg.disc, kl_weight=kl_weight,
                        perceptual=perceptual, disc=raw_disc, last_layer=last_layer, generator=generator,
                        scale=weight / cfg.train.grad_accum)
                kept.append((x, recon, weight))
                for k, v in logs.items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + v.float().item() / cfg.train.grad_accum

            # The VAE update. A non-finite gradient norm means a non-finite loss or gradient somewhere
            # (DDP has already averaged the gradients, so every process sees the same norm).
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.optim.grad_clip or float("inf"))
            finite = math.isfinite(float(grad_norm))
            if finite or accelerator.scaler is not None:
                opt_g.step()  # with fp16 the GradScaler skips a non-finite step itself and lowers its scale
            updated = finite and not getattr(opt_g, "step_was_skipped", False)
            opt_g.zero_grad(set_to_none=True)
            step_scheduler(sched_g)
            if updated and ema is not None:
                ema.step(vae.parameters())

            # The discriminator update, on the same real images and the reconstructions just made.
            if disc_active:
                for m, (x, recon, weight) in enumerate(kept):
                    sync = m == len(kept) - 1
                    with contextlib.nullcontext() if sync else accelerator.no_sync(disc_ddp):
                        logs = discriminator_step(accelerator, disc_ddp, x, recon, disc_cfg=cfg.disc,
                                                  scale=weight / cfg.train.grad_accum)
                    for k, v in logs.items():
                        logs_sum[k] = logs_sum.get(k, 0.0) + v.float().item() / cfg.train.grad_accum
                d_norm = accelerator.clip_grad_norm_(disc_ddp.parameters(), cfg.disc.grad_clip or float("inf"))
                d_finite = math.isfinite(float(d_norm))
                if d_finite or accelerator.scaler is not None:
                    opt_d.step()
                if d_finite and not getattr(opt_d, "step_was_skipped", False):
                    counters["disc_updates"] += 1
                finite = finite and d_finite
                opt_d.zero_grad(set_to_none=True)
                step_scheduler(sched_d)

            step += 1
            batch_in_epoch += 1
            if batch_in_epoch >= steps_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0

            # Skipped steps and stop requests are agreed across processes so they never diverge.
            flags = torch.tensor([0.0 if finite else 1.0, 1.0 if stop["signal"] else 0.0], device=device)
            if world > 1:
                flags = accelerator.reduce(flags, "max")
            if flags[0] > 0:
                counters["nonfinite_skips"] += 1
                counters["nonfinite_in_row"] += 1
                log.warning("Step %d: non-finite loss or gradient, update skipped (%d in a row).", step,
                            counters["nonfinite_in_row"])
            else:
                counters["nonfinite_in_row"] = 0

            # Progress, logs, validation, checkpoints.
            logs_sum["grad_norm"] = float(grad_norm)
            logs_sum["lr"] = sched_g.get_last_lr()[0]
            logs_sum["kl_weight"] = kl_weight
            bar.update(1)
            if step % cfg.log.every == 0 or step == cfg.train.steps:
                now = time.perf_counter()
                rate = images_since * world / max(now - last_time, 1e-9)
                last_time, images_since = now, 0
                logs_sum["images_per_s"] = rate
                accelerator.log({f"train/{k}": v for k, v in logs_sum.items()}, step=step)
                log.info("step %d  %s", step, "  ".join(f"{k} {v:.4g}" for k, v in logs_sum.items()))
            if is_main and cfg.log.progress:
                postfix = {k: f"{logs_sum[k]:.4g}" for k in ("loss", "rec", "lpips", "kl", "g", "d") if k in logs_sum}
                if rate is not None:
                    postfix["img/s"] = f"{rate:.3g}"
                bar.set_postfix(postfix, refresh=False)
            if val_images is not None and cfg.validation.every and step % cfg.validation.every == 0 \
                    and step < cfg.train.steps:
                if is_main:
                    values = run_validation(cfg.validation.num_images, out_dir / "samples" / f"step-{step:06d}.png")
                    history.append({"step": step, **values})
                    accelerator.log({f"val/{k}": v for k, v in values.items() if v is not None}, step=step)
                    log.info("step %d  validation  %s", step, format_metrics(values))
                accelerator.wait_for_everyone()
            if counters["nonfinite_in_row"] >= cfg.train.max_nonfinite_in_row:
                path = save_checkpoint(interrupted=True)
                raise VaekitError(
                    f"{counters['nonfinite_in_row']} steps in a row had a non-finite loss or gradient; stopped at "
                    f"step {step} (checkpoint {path}). Lower optim.lr, use train.mixed_precision=bf16 instead of "
                    f"fp16, or lower the loss weights.")
            if flags[1] > 0:
                path = save_checkpoint(interrupted=True)
                bar.close()
                log.info("Stopped at step %d; checkpoint %s. Continue with --resume latest.", step, path)
                accelerator.end_training()
                return {"checkpoint": path, "step": step, "interrupted": True}
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                last_saved = save_checkpoint()
    bar.close()
    if last_saved is None and step > 0:
        last_saved = save_checkpoint()  # resumed at the final step: keep a checkpoint of it anyway

    # --- save: diffusers export, final held-out grid and metrics -------------------------------
    result = {"checkpoint": last_saved, "step": step, "interrupted": False}
    if is_main:
        from vaekit.model import save_diffusers

        export_vae = _copy_vae(vae)
        export_vae.load_state_dict(state_with_ema(vae, ema) if ema is not None else vae.state_dict())
        result["export"] = save_diffusers(export_vae.to("cpu"), out_dir / "vae")
        lines = [f"Finished {step} steps. Outputs in {out_dir}:",
                 f"  diffusers export ({'EMA' if ema is not None else 'trained'} weights)  {result['export']}"]
        if val_images is not None:
            values = run_validation(len(val_images), out_dir / "reconstructions.png")
            values["step"] = step
            values["weights"] = "ema" if ema is not None else "raw"
            values["lpips_net"] = cfg.validation.lpips_net if values["lpips"] is not None else None
            write_json(out_dir / "metrics.json", values)
            if history:
                write_text(out_dir / "validation_history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
            accelerator.log({f"val/{k}": v for k, v in values.items() if isinstance(v, float)}, step=step)
            result.update(metrics=values, grid=out_dir / "reconstructions.png", metrics_file=out_dir / "metrics.json")
            lines.append(f"  held-out originals | reconstructions  {result['grid']}")
            lines.append(f"  held-out metrics  {result['metrics_file']}  ({values['images']} images: "
                         f"{format_metrics(values)})")
        else:
            lines.append("  no held-out images (data.holdout=0): no grid or metrics")
        lines.append(f"  checkpoint  {last_saved}")
        if skipped_images:
            lines.append(f"  {len(set(skipped_images))} unusable images skipped, listed in {out_dir / 'skipped_images.txt'}")
        log.info("\n".join(lines))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _copy_vae(vae):
    """A separate fp32 AutoencoderKL of the same architecture (for validation and export)."""
    from diffusers import AutoencoderKL

    from vaekit.model import vae_config

    copy = AutoencoderKL(**vae_config(vae)).to(next(vae.parameters()).device)
    return copy.eval().requires_grad_(False)


def format_metrics(values):
    """'PSNR 24.1 dB  SSIM 0.712  LPIPS 0.210' (LPIPS omitted when unavailable)."""
    text = f"PSNR {values['psnr']:.2f} dB  SSIM {values['ssim']:.4f}"
    if values.get("lpips") is not None:
        text += f"  LPIPS {values['lpips']:.4f}"
    return text


# ----------------------------------------------------------------------------------------------
# Command line


def run_train(args):
    """`vaekit train`: load the config, apply key=value overrides, train."""
    config = load_config(TrainConfig, args.config, args.overrides)
    result = train(config, resume=args.resume)
    return 0 if result else 1


def add_commands(subparsers):
    """Register `vaekit train`."""
    parser = subparsers.add_parser(
        "train", help="train a VAE from scratch or fine-tune its decoder",
        description="Train an AutoencoderKL from a YAML config; key=value arguments override config keys "
                    "(e.g. train.steps=200 data.path=photos/). The resolved config is saved in out_dir.",
    )
    parser.add_argument("--config", help="YAML config (see configs/train/); defaults apply to keys it leaves out")
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="continue from the newest checkpoint in out_dir, or from a checkpoint folder")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=200")
    parser.set_defaults(func=run_train)
