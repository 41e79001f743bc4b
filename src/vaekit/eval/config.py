"""What `vaekit evaluate` and `vaekit inspect` read: one dataclass per job (no torch)."""

import dataclasses
import typing

from vaekit.codec.options import parse_tile

IDENTITY = "identity"  # a pseudo-model whose reconstruction is its input: the pipeline's upper bound


def unique_labels(specs):
    """Display names for model specs: the spec itself, numbered when repeated."""
    labels = []
    for spec in specs:
        label = spec.rstrip("/")
        if label in labels:
            label = f"{label} #{sum(1 for s in labels if s.startswith(label)) + 1}"
        labels.append(label)
    return labels


@dataclasses.dataclass
class EvaluateConfig:
    """One evaluation run: which models, which images, which protocol."""

    vae: list[str] = dataclasses.field(default_factory=list)  # model arguments, or `identity`
    label: list[str] = dataclasses.field(default_factory=list)  # display names, one per vae (default: the spec)
    data: str = ""  # image folder, HF data set, WebDataset shards or builtin:photos
    out: str = ""  # output folder
    limit: int | None = None  # first N images of the source
    resolution: int | typing.Literal["full"] = 256  # short side + centre crop, or whole images
    batch_size: int = 4
    sample: bool = False  # decode a posterior sample instead of the posterior mean
    seed: int = 0  # for posterior samples
    dtype: typing.Literal["fp32", "fp16", "bf16"] = "fp32"
    tile: str = "off"  # off, auto (tile what would not fit in memory) or a tile size in px (exact: vaekit.codec.tiling)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    lpips: bool = True  # LPIPS-VGG and LPIPS-Alex (needs pretrained weights: vaekit weights fetch)
    rfid: bool = True  # needs the FID Inception (vaekit weights fetch inception)
    worst: int = 4  # images shown in the comparison, those with the largest LPIPS (or lowest PSNR)
    crop: int = 96  # side of the comparison crops, in image pixels
    psnr_cap: float = 100.0  # dB; identical images have infinite PSNR
    override: list[str] = dataclasses.field(default_factory=list)  # key=value for every model's config
    weights: typing.Literal["ema", "raw"] = "ema"  # for training checkpoints
    diffusability: bool = True  # latent spectrum and equivariance error per model (vaekit.eval.diffusability)
    # The label or model argument of a teacher (added to the models when it is none of them): every model with
    # its latent grid gets latent-compatibility scores against it (vaekit.eval.compatibility).
    teacher: str | None = None

    def __post_init__(self):
        if not self.vae:
            raise ValueError("name at least one model with --vae MODEL (or `identity`)")
        if self.teacher == IDENTITY:
            raise ValueError(f"--teacher names a model with latents; `{IDENTITY}` has none")
        if not self.data:
            raise ValueError("name the images with --data SRC")
        if not self.out:
            raise ValueError("name the output folder with --out DIR")
        if self.label and len(self.label) != len(self.vae):
            raise ValueError(f"{len(self.label)} --label values for {len(self.vae)} --vae models; give one per model")
        if self.resolution != "full" and self.resolution < 8:
            raise ValueError(f"resolution must be at least 8 px or 'full', got {self.resolution}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        parse_tile(self.tile)
        if self.batch_size < 1 or self.worst < 0 or self.crop < 8:
            raise ValueError("batch_size must be >= 1, worst >= 0 and crop >= 8")


@dataclasses.dataclass
class InspectConfig:
    """One `vaekit inspect` run: one model, or several side by side."""

    vae: str | list[str] = ""  # one model argument or a list; kept as a list
    label: list[str] = dataclasses.field(default_factory=list)  # display names, one per vae (default: the spec)
    data: str = ""
    out: str | None = None  # folder for inspect.json and histograms.png; None: print only
    limit: int | None = None  # first N images
    size: int = 256  # short side + centre crop, so every image gives the same latent grid
    batch_size: int = 4
    seed: int = 0  # posterior samples drawn for the histograms
    device: str = "auto"
    override: list[str] = dataclasses.field(default_factory=list)
    weights: typing.Literal["ema", "raw"] = "ema"
    precision: bool = False  # report per-layer activation ranges against fp16 instead of latent statistics
    diffusability: bool = True  # latent spectrum against the images' and equivariance error (decodes the latents)

    def __post_init__(self):
        self.vae = [self.vae] if isinstance(self.vae, str) and self.vae else list(self.vae or [])
        if not self.vae or not self.data:
            raise ValueError("name the model with --vae MODEL and the images with --data SRC")
        if self.label and len(self.label) != len(self.vae):
            raise ValueError(f"{len(self.label)} --label values for {len(self.vae)} --vae models; give one per model")
        if self.size < 8 or self.batch_size < 1 or (self.limit is not None and self.limit < 2):
            raise ValueError("size must be >= 8, batch_size >= 1 and limit >= 2")


@dataclasses.dataclass
class ProbeConfig:
    """One `vaekit probe` run: the same small denoiser trained on each model's latents of the same images."""

    vae: list[str] = dataclasses.field(default_factory=list)  # model arguments
    label: list[str] = dataclasses.field(default_factory=list)  # display names, one per model (default: the spec)
    cache: list[str] = dataclasses.field(default_factory=list)  # latent caches (`vaekit encode`), one per --vae
    data: str = ""  # images to encode when a model has no --cache (into out/latents/, reused by later runs)
    out: str = ""  # output folder: probe.json, probe.png, latents/
    limit: int | None = 512  # images (the first N of the source, or of the keys the caches share)
    size: int = 128  # short side + centre crop of encoded images, px
    holdout: int = 64  # images held out to measure the final loss on
    steps: int = 400  # denoiser optimizer steps, the same for every model
    batch_size: int = 16
    lr: float = 1e-3  # AdamW, 5% linear warm-up, cosine decay
    width: int = 32  # channels of the denoiser
    blocks: int = 4  # residual blocks of the denoiser
    noise_levels: int = 8  # levels t of the final held-out loss, evenly spaced in (0, 1)
    eval_every: int = 50  # steps between held-out losses on the curve
    sample: bool = True  # train on z ~ q(z|x), as latent diffusion does; false: the posterior mean
    seed: int = 0  # denoiser weights, batches, noise: the same for every model
    device: str = "auto"
    override: list[str] = dataclasses.field(default_factory=list)  # key=value for every model's config
    weights: typing.Literal["ema", "raw"] = "ema"  # for training checkpoints

    def __post_init__(self):
        if not self.vae and not self.cache:
            raise ValueError("name the models with --vae MODEL (repeatable), or their latents with --cache DIR")
        if self.vae and self.cache and len(self.cache) != len(self.vae):
            raise ValueError(f"{len(self.cache)} --cache values for {len(self.vae)} --vae models; give one per model "
                             "or none (then the probe encodes --data itself)")
        if self.vae and not self.cache and not self.data:
            raise ValueError("name the images with --data SRC (or pass one --cache DIR per --vae)")
        count = len(self.vae) or len(self.cache)
        if self.label and len(self.label) != count:
            raise ValueError(f"{len(self.label)} --label values for {count} models; give one per model")
        if not self.out:
            raise ValueError("name the output folder with --out DIR")
        if self.limit is not None and self.limit < 4:
            raise ValueError(f"limit must be at least 4, got {self.limit}")
        if self.holdout < 1 or (self.limit is not None and self.holdout >= self.limit):
            raise ValueError("holdout must be at least 1 and below limit")
        if min(self.steps, self.batch_size, self.width, self.blocks, self.noise_levels, self.eval_every) < 1:
            raise ValueError("steps, batch_size, width, blocks, noise_levels and eval_every must be at least 1")
        if self.size < 8 or self.lr <= 0 or self.width % 8:
            raise ValueError("size must be >= 8, lr positive and width a multiple of 8")
