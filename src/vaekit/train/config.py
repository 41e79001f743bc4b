"""Everything `vaekit train` reads (`TrainConfig`), one dataclass per section, and its up-front checks.

No torch here: the command line and config tools load it without the trainer.
"""

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Literal, Optional

from vaekit.data.config import DataConfig
from vaekit.errors import VaekitError

# The schedules diffusers.optimization.get_scheduler builds (its SchedulerType values).
Schedule = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


@dataclass
class ModelConfig:
    """What to start from and which part trains."""

    source: str = "preset:tiny"  # preset:NAME, a diffusers folder, a single file or a hub id
    overrides: dict = field(default_factory=dict)  # AutoencoderKL config fields, e.g. {latent_channels: 16}
    # decoder: encoder and quant_conv frozen; fp16_safe: the fp16-safe fine-tune against the source (section fp16)
    mode: Literal["scratch", "decoder", "fp16_safe"] = "scratch"
    sample_posterior: bool = True  # decode z ~ q(z|x) (latent-diffusion) rather than its mean
    # A preset built afresh starts with this posterior log-variance (e.g. -6: noise std 0.05) instead of about 0
    # (std 1), so a short run does not spend its steps decoding noisy latents. None: as initialised. A model
    # with weights (a folder, a file, a checkpoint to resume) is never changed by it.
    init_logvar: Optional[float] = None
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the encoder and decoder


@dataclass
class DistillConfig:
    """Distillation (vaekit.train.distill): model.source becomes a student that keeps a frozen teacher's latent space.

    The student is an AutoencoderKL (a preset plus overrides, e.g. half the widths) or an AutoencoderTiny
    (preset:taesd); it takes the teacher's latent channels, and a KL student also its normalisation.
    """

    teacher: Optional[str] = None  # model argument of the teacher; set, the run distils into model.source
    teacher_weights: Literal["ema", "raw"] = "ema"  # for a teacher that is a training checkpoint
    teacher_dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 in a bf16 run, else fp32; never fp16
    # Encoder: squared 2-Wasserstein distance between the student's and the teacher's posteriors in the
    # normalised latent space (mean and standard deviation errors; a tiny student's encoder is deterministic).
    latent_weight: float = 1.0
    # Decoder: besides reconstruction + LPIPS (+ GAN) against the image, loss.reconstruction against the
    # teacher's own decode of the same latents, with this weight (0: off).
    teacher_decode_weight: float = 0.0
    # A `vaekit encode` cache of the teacher over data.path: the teacher's latents come from it, so its
    # encoder never runs. Its card must carry the teacher's fingerprint.
    cache: Optional[str] = None


@dataclass
class LossConfig:
    """Loss terms; see vaekit.train.losses for the reduction convention."""

    reconstruction: Literal["l1", "l2"] = "l1"
    perceptual_weight: float = 0.0  # LPIPS; latent-diffusion uses 1.0, sd-vae-ft-mse 0.1 with l2
    perceptual_net: Literal["vgg", "alex"] = "vgg"
    lpips_path: Optional[str] = None  # LPIPS backbone weights; default: vaekit's cache (`vaekit weights`)
    # What to do when LPIPS weights are missing and perceptual_weight > 0: stop with a message
    # saying how to get them, or (demo only) drop the term with a warning.
    perceptual_if_missing: Literal["error", "skip"] = "error"
    # latent-diffusion's kl_weight 1e-6 for f8 with 4 channels: 1e-6 * C / (3 * f^2), see vaekit.train.losses.
    kl_weight: float = 1e-6 * 4 / 192
    kl_warmup_steps: int = 0  # linear KL annealing from 0
    free_bits: float = 0.0  # nats per latent element, per channel
    # Latent regularisers for diffusability (vaekit.train.regularizers, docs/training.md), all off by default.
    # EQ-VAE (Kouzelis et al. 2025): share of micro-batches whose latent is downscaled (and rotated) before
    # decoding and scored against the same transform of the image, instead of the plain reconstruction. Paper: 0.5.
    equivariance_prob: float = 0.0
    equivariance_min_scale: float = 0.25  # scales drawn from {k/32 : min_scale <= k/32 < 1}; EQ-VAE: [0.25, 1)
    equivariance_rotate: bool = True  # also rotate by 90, 180 or 270 degrees, as EQ-VAE does with every scale
    # Scale equivariance (Skorokhodov et al. 2025): weight of the decode of a downsampled latent against the
    # downsampled image (reconstruction + perceptual distance), added to the loss; one factor per micro-batch.
    scale_equivariance_weight: float = 0.0
    scale_equivariance_factors: list[int] = field(default_factory=lambda: [2, 4])
    # VA-VAE (Yao et al. 2025): weight w_hyper of the marginal cosine + distance-matrix losses between a 1x1
    # projection of the latent and a frozen feature model's patch features. Paper: 0.1 with DINOv2-large.
    align_weight: float = 0.0
    # The feature model (vaekit.pretrained.features): a transformers folder or hub id, torchvision:alexnet,
    # torchvision:vgg16 (the LPIPS backbones) or timm:NAME.
    align_model: str = "facebook/dinov2-large"
    align_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # the frozen feature model's precision
    align_margin_cos: float = 0.5  # m1 of the marginal cosine similarity loss (VA-VAE: 0.5)
    align_margin_distance: float = 0.25  # m2 of the marginal distance-matrix loss (VA-VAE: 0.25)
    align_adaptive: bool = True  # scale by ||grad nll|| / ||grad align|| at the encoder's last layer (VA-VAE eq. 5)
    align_max_adaptive_weight: float = 1e4


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
    scheduler: Schedule = "constant"  # a diffusers.optimization.get_scheduler name
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0: no clipping


@dataclass
class OptimConfig:
    """AdamW for the VAE."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # latent-diffusion's autoencoder betas
    weight_decay: float = 0.0
    eps: float = 1e-8
    scheduler: Schedule = "constant"  # a diffusers.optimization.get_scheduler name
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
    # Seconds a process waits for the others at start-up and at every collective (all-reduce, checkpoint
    # barrier, validation gather) before the run stops with an error; torch's own default is 30 minutes.
    timeout_s: float = 1800.0


@dataclass
class ValidationConfig:
    """Held-out reconstructions: PNG grid and PSNR / SSIM / LPIPS."""

    every: int = 500  # steps; 0: only at the end
    num_images: int = 8  # held-out images shown and scored during training
    final_images: int = 256  # held-out images scored at the end (metrics.json)
    batch_size: int = 4
    lpips_net: Literal["vgg", "alex"] = "vgg"
    size: Optional[int] = None  # side of the held-out centre crops in pixels; None: data.size


@dataclass
class LogConfig:
    """Console, log file and experiment tracker."""

    every: int = 10  # steps between tracker and log-file lines
    tracker: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    project: str = "vaekit"
    progress: bool = True  # tqdm bar on rank 0
    # Write the key of every image each process trains on to out_dir/sample_keys/rank-NNNNN.tsv
    # (step, epoch, key per line): audits the data order, its split across processes and resume.
    sample_keys: bool = False


@dataclass
class Fp16Config:
    """The fp16-safe fine-tune (model.mode=fp16_safe, vaekit.train.fp16_safe): headroom, penalty, what trains."""

    # Headroom: every activation at most this share of float16's 65504 on the probe images. inspect --precision
    # calls a VAE fp16-safe up to 0.25; half of that leaves other images room to run hotter.
    target_fraction: float = 0.125
    penalty_weight: float = 1.0  # weight of the activation penalty beside the distance to the original
    parts: Literal["auto", "decoder", "all"] = "auto"  # auto: the encoder too only when it lacks headroom
    # What trains of those parts: "hot", the blocks (resnet, attention, output head) holding a layer still above
    # half the target after the exact rescaling; "all", every parameter of the parts.
    train: Literal["hot", "all"] = "hot"
    probe_images: int = 16  # held-out images (training images without a hold-out) the headroom is measured on
    check_every: int = 10  # steps between headroom and fidelity checks
    eps_tolerance: float = 1e-3  # the largest change of a GroupNorm-normalised value the exact rescaling may make
    moments_weight: float = 1.0  # weight of the encoder's distance to the original's moments (parts=all)
    # Learning rate of each tensor relative to its RMS (Adafactor's relative step): a weight 1e4 times larger than
    # another moves 1e4 times further, so layers far outside fp16's range can shrink in a few hundred steps.
    relative_lr: bool = True
    latent_snr_db: float = 40.0  # parts=all: the encoder's posterior means must stay this close to the original's
    # Once a check has the headroom, the run fits the original on (the learning rate decaying as a cosine to 0 at
    # train.steps) until the fp32 decode of the probe images is this close to the original's (PSNR), or steps end.
    decode_psnr_db: float = 40.0
    # GroupNorm -> SiLU -> conv chains whose GroupNorm still overflows after the exact rescaling: weight and bias
    # of the GroupNorm / s, the conv's weight x s. Not exact (SiLU is not scale-equivariant), the change bounded.
    approximate: bool = True


@dataclass
class TrainConfig:
    """Everything `vaekit train` reads; saved resolved as out_dir/config.yaml before the first step."""

    out_dir: str = "runs/vae"
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: RunConfig = field(default_factory=RunConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    log: LogConfig = field(default_factory=LogConfig)
    fp16: Fp16Config = field(default_factory=Fp16Config)


# Range rules checked before a run starts: key -> (test, what the value must be).
RULES = {
    "train.steps": (lambda v: v >= 1, "at least 1"),
    "train.batch_size": (lambda v: v >= 1, "at least 1"),
    "train.grad_accum": (lambda v: v >= 1, "at least 1"),
    "train.checkpoint_every": (lambda v: v >= 1, "at least 1"),
    "train.keep_last": (lambda v: v >= 0, "0 (keep all) or more"),
    "train.max_nonfinite_in_row": (lambda v: v >= 1, "at least 1"),
    "train.timeout_s": (lambda v: v > 0, "a number of seconds above 0"),
    "log.every": (lambda v: v >= 1, "at least 1"),
    "validation.batch_size": (lambda v: v >= 1, "at least 1"),
    "validation.every": (lambda v: v >= 0, "0 (only at the end) or more"),
    "validation.num_images": (lambda v: v >= 0, "0 or more"),
    "validation.final_images": (lambda v: v >= 0, "0 or more"),
    "validation.size": (lambda v: v is None or v >= 8, "at least 8 pixels, or null for data.size"),
    "optim.lr": (lambda v: v > 0, "a learning rate above 0"),
    "optim.eps": (lambda v: v > 0, "above 0"),
    "optim.weight_decay": (lambda v: v >= 0, "0 or more"),
    "optim.warmup_steps": (lambda v: v >= 0, "0 or more"),
    "optim.grad_clip": (lambda v: v >= 0, "0 (no clipping) or more"),
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1), like [0.5, 0.9]"),
    "disc.lr": (lambda v: v > 0, "a learning rate above 0"),
    "disc.weight_decay": (lambda v: v >= 0, "0 or more"),
    "disc.warmup_steps": (lambda v: v >= 0, "0 or more"),
    "disc.grad_clip": (lambda v: v >= 0, "0 (no clipping) or more"),
    "disc.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1), like [0.5, 0.9]"),
    "disc.start": (lambda v: v >= 0, "0 or more"),
    "disc.n_layers": (lambda v: 1 <= v <= 8, "from 1 to 8"),
    "disc.base_channels": (lambda v: 1 <= v <= 1024, "from 1 to 1024"),
    "disc.max_adaptive_weight": (lambda v: v > 0, "above 0"),
    "disc.weight": (lambda v: v >= 0, "0 (off) or more"),
    "disc.r1_weight": (lambda v: v >= 0, "0 (off) or more"),
    "loss.perceptual_weight": (lambda v: v >= 0, "0 (off) or more"),
    "loss.kl_weight": (lambda v: v >= 0, "0 or more"),
    "loss.kl_warmup_steps": (lambda v: v >= 0, "0 or more"),
    "loss.free_bits": (lambda v: v >= 0, "0 or more"),
    "ema.decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "ema.update_after_step": (lambda v: v >= 0, "0 or more"),
    "ema.inv_gamma": (lambda v: v > 0, "above 0"),
    "ema.power": (lambda v: v > 0, "above 0"),
    "distill.latent_weight": (lambda v: v > 0, "above 0 (the student's encoder learns from nothing else)"),
    "distill.teacher_decode_weight": (lambda v: v >= 0, "0 (off) or more"),
    "fp16.target_fraction": (lambda v: 0 < v <= 0.25, "in (0, 0.25]: inspect --precision allows a quarter of the range"),
    "fp16.penalty_weight": (lambda v: v >= 0, "0 or more"),
    "fp16.probe_images": (lambda v: v >= 1, "at least 1"),
    "fp16.check_every": (lambda v: v >= 1, "at least 1"),
    "fp16.eps_tolerance": (lambda v: v > 0, "above 0"),
    "fp16.moments_weight": (lambda v: v >= 0, "0 or more"),
    "fp16.decode_psnr_db": (lambda v: v > 0, "above 0 (dB)"),
    "fp16.latent_snr_db": (lambda v: v > 0, "above 0 (dB)"),
}


def numbers(obj, prefix=""):
    """(key, value) of every number in a config, nested sections and lists included."""
    for f in fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            yield from numbers(value, key + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value
        elif isinstance(value, list):
            yield from ((f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, (int, float)))


def check_config(config):
    """Reject values that would only fail later, deep inside the loop: one error naming the key."""
    for key, value in numbers(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise VaekitError(f"{key} is {value}; it must be a finite number.")
    for key, (test, what) in RULES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if not test(value):
            raise VaekitError(f"{key} must be {what}, got {value}.")
    check_regularizers(config)
    check_distillation(config)
    if config.model.mode == "fp16_safe":
        check_fp16_safe(config)


def check_regularizers(config):
    """The diffusability regularisers' keys (vaekit.train.regularizers)."""
    loss = config.loss
    if not 0 <= loss.equivariance_prob <= 1:
        raise VaekitError(f"loss.equivariance_prob must be between 0 and 1, got {loss.equivariance_prob}.")
    if not 0 < loss.equivariance_min_scale <= 31 / 32:
        raise VaekitError(f"loss.equivariance_min_scale must be in (0, 0.97]: scales are drawn from "
                          f"[min_scale, 1) in steps of 1/32, got {loss.equivariance_min_scale}.")
    if not loss.scale_equivariance_factors or any(f < 2 for f in loss.scale_equivariance_factors):
        raise VaekitError("loss.scale_equivariance_factors must list downsampling factors of 2 or more, like [2, 4].")
    for key in ("scale_equivariance_weight", "align_weight", "align_margin_cos", "align_margin_distance"):
        if getattr(loss, key) < 0:
            raise VaekitError(f"loss.{key} must not be negative.")
    if loss.align_weight > 0:
        if not loss.align_model:
            raise VaekitError("loss.align_weight > 0 needs loss.align_model: a feature model such as "
                              "facebook/dinov2-large, a local transformers folder, or torchvision:alexnet.")
        if config.model.mode != "scratch":
            raise VaekitError("loss.align_weight aligns the encoder's latents, but model.mode=decoder freezes the "
                              "encoder; use model.mode=scratch (which also fine-tunes an existing model).")
        if loss.align_max_adaptive_weight <= 0:
            raise VaekitError("loss.align_max_adaptive_weight must be positive.")


def check_distillation(config):
    """The distillation keys (vaekit.train.distill), and what a distillation run cannot combine with."""
    distill = config.distill
    if not distill.teacher:
        if distill.cache:
            raise VaekitError("distill.cache holds a teacher's latents; set distill.teacher=MODEL to distil from it.")
        return
    if config.model.mode != "scratch":
        raise VaekitError("A distillation run trains the student's encoder and decoder: use model.mode=scratch "
                          "(the student may still start from trained weights, model.source=FOLDER).")
    regularizers = [key for key in ("equivariance_prob", "scale_equivariance_weight", "align_weight")
                    if getattr(config.loss, key) > 0]
    if regularizers:
        raise VaekitError(f"loss.{regularizers[0]} shapes the latent space, but a student keeps its teacher's; "
                          f"set it to 0 for distillation.")


def describe_losses(config, perceptual=True):
    """The loss a run trains with, in words: 'L1 + 0.1 x LPIPS-Alex + 8.33e-08 x KL + ...'.

    `perceptual`: whether the LPIPS term is on (a demo run without LPIPS weights drops it).
    """
    loss, disc = config.loss, config.disc
    if config.model.mode == "fp16_safe":
        return (f"distance to the original model's outputs + {config.fp16.penalty_weight:g} x penalty on activation "
                f"peaks above {config.fp16.target_fraction:g} x 65504")
    terms = [loss.reconstruction.upper()]
    if perceptual and loss.perceptual_weight > 0:
        terms.append(f"{loss.perceptual_weight:g} x LPIPS-{'Alex' if loss.perceptual_net == 'alex' else 'VGG'}")
    if config.model.mode == "scratch" and loss.kl_weight > 0:
        terms.append(f"{loss.kl_weight:.3g} x KL")
    if disc.weight > 0:
        terms.append(f"{disc.weight:g} x PatchGAN ({disc.loss}{', adaptive' if disc.adaptive else ''}"
                     f"{f', from step {disc.start}' if disc.start else ''})")
    if loss.equivariance_prob > 0:
        terms.append(f"EQ-VAE (p {loss.equivariance_prob:g})")
    if loss.scale_equivariance_weight > 0:
        terms.append(f"{loss.scale_equivariance_weight:g} x scale equivariance")
    if loss.align_weight > 0:
        terms.append(f"{loss.align_weight:g} x alignment to {loss.align_model}")
    if config.distill.teacher:
        terms.append(f"{config.distill.latent_weight:g} x 2-Wasserstein to the teacher's posterior")
        if config.distill.teacher_decode_weight > 0:
            terms.append(f"{config.distill.teacher_decode_weight:g} x distance to the teacher's decode")
    return " + ".join(terms)


def check_fp16_safe(config):
    """The fp16-safe fine-tune learns only from its teacher, in fp32 or bf16, on the weights it measures."""
    others = {"loss.perceptual_weight": config.loss.perceptual_weight, "disc.weight": config.disc.weight,
              "loss.equivariance_prob": config.loss.equivariance_prob,
              "loss.scale_equivariance_weight": config.loss.scale_equivariance_weight,
              "loss.align_weight": config.loss.align_weight}
    for key, value in others.items():
        if value:
            raise VaekitError(f"model.mode=fp16_safe learns only to match the original model (its loss is the distance "
                              f"to the original's outputs plus the activation penalty); set {key}=0.")
    if config.ema.enabled:
        raise VaekitError("model.mode=fp16_safe exports the weights whose activations it measured; set ema.enabled=false.")
    if config.train.mixed_precision == "fp16":
        raise VaekitError("model.mode=fp16_safe trains a model that overflows float16, so it cannot run under fp16 "
                          "autocast; use train.mixed_precision=no (or bf16).")
