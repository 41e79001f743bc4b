"""Distillation: a smaller student that keeps a frozen teacher's latent space, so it drops into the teacher's pipelines.

The student (model.source) is an AutoencoderKL, e.g. a preset at half the widths, or an
AutoencoderTiny (preset:taesd, the TAESD architecture). Both train in the teacher's *normalised*
latent space, the space a diffusion model's denoiser works in, `(z - shift_factor) * scaling_factor`:

- A KL student takes the teacher's latent channels, scaling_factor, shift_factor (and per-channel
  latents_mean / latents_std): its raw latents are the teacher's, so a pipeline needs no other change.
- A tiny student takes the teacher's latent channels and scaling_factor 1.0, shift_factor 0.0: its
  encoder outputs the teacher's normalised latents and its decoder takes them (diffusers' convention
  for TAESD), which is what a pipeline's `latents / vae.config.scaling_factor + shift_factor` hands it.

Encoder and decoder learn separately, each from the teacher:

- the encoder matches the teacher's posterior with the squared 2-Wasserstein distance between the two
  diagonal Gaussians in the normalised space, ||mu_s - mu_t||^2 + ||sigma_s - sigma_t||^2 (mean over
  elements; a tiny student's encoder is deterministic, so only the mean term). It is the expected
  squared distance between a student and a teacher sample drawn with the same noise, in the units the
  denoiser sees. A KL divergence would divide the mean error by a variance, which in VAEs trained with
  latent-diffusion's tiny KL weight is a small fraction of the latents' spread: its scale would follow
  the variance rather than the error, and its gradients would explode (docs/training.md);
- the decoder decodes the teacher's latents (a sample of its posterior, or its mean with
  model.sample_posterior=false) and is scored against the image with reconstruction + LPIPS (+ GAN),
  plus optionally against the teacher's own decode of the same latents (distill.teacher_decode_weight).

No KL term towards the prior: the latent space is the teacher's. The teacher runs frozen (fp32, or
bf16 in a bf16 run) and is never saved in a checkpoint; its fingerprint is, and a resume with another
teacher is refused. With `distill.cache` the teacher's latents come from a `vaekit encode` cache of
the training images, whose card must carry the teacher's fingerprint: the teacher's encoder never runs.
"""

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from vaekit.cache.reader import open_card
from vaekit.errors import VaekitError
from vaekit.model.architecture import cast_vae, downsample_factor, fingerprint, is_tiny, latent_channels, vae_config
from vaekit.model.normalization import scale_shift
from vaekit.model.tiny import save_taesd, taesd_mismatch, taesd_name
from vaekit.train import losses
from vaekit.train.steps import adversarial_loss, image_loss
from vaekit.train.teacher import load_teacher

log = logging.getLogger("vaekit.train")

TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def family(vae):
    """The student family of a model: "tiny" for an AutoencoderTiny, "kl" for an AutoencoderKL."""
    return "tiny" if is_tiny(vae) else "kl"


def teacher_dtype(cfg):
    """The teacher's dtype: distill.teacher_dtype, where auto is bf16 in a bf16 run (the student computes in bf16
    anyway) and fp32 otherwise. Never fp16: activations of SDXL-class VAEs overflow it."""
    name = cfg.distill.teacher_dtype
    if name == "auto":
        name = "bf16" if cfg.train.mixed_precision == "bf16" else "fp32"
    return TEACHER_DTYPES[name]


# ----------------------------------------------------------------------------------------------
# The student's latent space, and the checks that say whether it can be the teacher's


def latent_fields(student, teacher):
    """The config fields that put a student of `student`'s family into `teacher`'s latent space."""
    fields = {"latent_channels": latent_channels(teacher)}
    if is_tiny(student):
        return {**fields, "scaling_factor": 1.0, "shift_factor": 0.0}
    config = vae_config(teacher)
    return {**fields, "scaling_factor": config["scaling_factor"], "shift_factor": config.get("shift_factor"),
            "latents_mean": config.get("latents_mean"), "latents_std": config.get("latents_std")}


def check_teacher(teacher, student_is_tiny):
    """Refuse a teacher no student can learn from, or this family cannot."""
    if is_tiny(teacher):
        raise VaekitError("The teacher is an AutoencoderTiny, itself a distilled approximation with a deterministic "
                          "encoder; distil from the AutoencoderKL it approximates.")
    config = vae_config(teacher)
    if student_is_tiny and (config.get("latents_mean") is not None or config.get("latents_std") is not None):
        raise VaekitError("The teacher normalises its latents per channel (latents_mean / latents_std), which an "
                          "AutoencoderTiny's config cannot hold, so a pipeline could not hand it the latents it "
                          "decodes; distil a KL student instead (model.source=preset:sd with smaller widths).")


def student_overrides(student, teacher, overrides, source):
    """Check that `student` (built from `source` + `overrides`) can share `teacher`'s latent space; returns the
    config fields it must still change (an empty dict when it already has them)."""
    check_teacher(teacher, is_tiny(student))
    wanted = latent_fields(student, teacher)
    for key, value in wanted.items():
        given = overrides.get(key, value)
        if key == "shift_factor":  # null and 0 are the same shift
            given, value = given or 0.0, value or 0.0
        if given != value:
            raise VaekitError(f"model.overrides sets {key}={overrides[key]!r}, but a student keeps its teacher's "
                              f"latent space ({key} {value!r} for this teacher); drop that override.")
    down, teacher_down = downsample_factor(student), downsample_factor(teacher)
    if down != teacher_down:
        if is_tiny(student):
            levels = int(math.log2(teacher_down)) + 1
            how = (f"give the tiny student {levels} levels, e.g. model.overrides={{encoder_block_out_channels: "
                   f"{[64] * levels}, decoder_block_out_channels: {[64] * levels}, num_encoder_blocks: "
                   f"{[1] + [3] * (levels - 1)}, num_decoder_blocks: {[3] * (levels - 1) + [1]}}} (no TAESD file "
                   f"layout exists for it: it is exported as a diffusers folder only)")
        else:
            how = f"give the student {int(math.log2(teacher_down)) + 1} entries in block_out_channels"
        raise VaekitError(f"The teacher downsamples {teacher_down}x but the student ({source}) {down}x; a student "
                          f"keeps its teacher's latent grid: {how}.")
    current = vae_config(student)
    changes = {k: v for k, v in wanted.items() if current.get(k) != v}
    if "latent_channels" in changes and not str(source).startswith("preset:"):
        raise VaekitError(f"The student ({source}) makes {latent_channels(student)}-channel latents but the teacher "
                          f"{wanted['latent_channels']}; start from a preset (model.source=preset:NAME with "
                          f"overrides) or from a student with the teacher's latent channels.")
    return changes


# ----------------------------------------------------------------------------------------------
# What the teacher gives each micro-batch


class Targets(NamedTuple):
    """The teacher's view of one micro-batch."""

    mean: torch.Tensor  # (B, C, h, w) posterior mean, normalised
    std: torch.Tensor | None  # (B, C, h, w) posterior standard deviation, normalised (None: a mode-only cache)
    decoder_input: torch.Tensor  # (B, C, h, w) the teacher's latents in the student's space: what its decoder decodes
    decoded: torch.Tensor | None  # (B, 3, H, W) the teacher's decode of the same latents, when that term is on


class StudentOutputs(NamedTuple):
    """What one student forward returns."""

    recon: torch.Tensor  # (B, 3, H, W) the student's decode of the teacher's latents
    mean: torch.Tensor  # (B, C, h, w) the student's posterior mean (a tiny student's latents), raw
    logvar: torch.Tensor | None  # (B, C, h, w) its posterior log-variance; None for a tiny student


class StudentForTraining(nn.Module):
    """Encode the images and decode the teacher's latents in one forward, so the prepared (DDP) module sees both."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, decoder_input):
        """(B, 3, H, W) images and (B, C, h, w) teacher latents in the student's space -> StudentOutputs."""
        if is_tiny(self.vae):
            mean, logvar = self.vae.encode(x).latents, None
        else:
            posterior = self.vae.encode(x).latent_dist
            mean, logvar = posterior.mean, posterior.logvar
        return StudentOutputs(self.vae.decode(decoder_input).sample, mean, logvar)


def latent_matching_loss(mean, std, target_mean, target_std):
    """Squared 2-Wasserstein distance between diagonal Gaussians, per latent element (mean-reduced):
    mean((mu - mu_t)^2) + mean((sigma - sigma_t)^2); the second term only when both deviations are given."""
    loss = (mean.float() - target_mean.float()).square().mean()
    if std is not None and target_std is not None:
        loss = loss + (std.float() - target_std.float()).square().mean()
    return loss


@dataclass
class Distiller:
    """The teacher of a run and what it takes to learn from it: targets per micro-batch, the loss, the export."""

    teacher: nn.Module  # frozen, on the run's device
    fingerprint: str  # of the teacher as loaded, in fp32 (what a cache card and a checkpoint record)
    spec: str
    student_family: str
    cached: bool  # targets from a latent cache: the teacher's encoder never runs
    latent_weight: float
    teacher_decode_weight: float
    warned: bool = False

    def meta(self):
        """What a checkpoint records of the teacher (never its weights)."""
        return {"teacher": self.spec, "teacher_fingerprint": self.fingerprint, "student": self.student_family,
                "cached": self.cached}

    @torch.no_grad()
    def targets(self, x, cached, generator, sample):
        """The teacher's normalised posterior of x (from `cached` (mean, logvar or None), raw, when given) and the
        latents the student's decoder decodes: a posterior sample drawn with `generator`, or the mean."""
        dtype = next(self.teacher.parameters()).dtype
        if cached is None:
            posterior = self.teacher.encode(x.to(dtype)).latent_dist
            mean, logvar = posterior.mean.float(), posterior.logvar.float()
        else:
            mean, logvar = cached[0].float(), (cached[1].float() if cached[1] is not None else None)
        std = (0.5 * logvar).exp() if logvar is not None else None
        z = mean
        if sample and std is not None:
            z = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        scale, shift = scale_shift(self.teacher)
        decoded = self.teacher.decode(z.to(dtype)).sample.float() if self.teacher_decode_weight > 0 else None
        normalised = (z - shift) * scale
        if not self.warned:
            self.warned = True
            spread = float(normalised.std())
            if self.student_family == "tiny" and spread > 2.0:
                log.warning("The teacher's normalised latents have a standard deviation of %.2f on the first batch; "
                            "a tiny student's decoder clamps its input softly at +-3 (tanh(z / 3) * 3). Set the "
                            "teacher's scaling_factor so its latents have about unit variance (vaekit inspect "
                            "suggests it).", spread)
        decoder_input = normalised if self.student_family == "tiny" else z
        return Targets((mean - shift) * scale, std * abs(scale) if std is not None else None, decoder_input, decoded)

    def step(self, accelerator, model, x, cached, *, loss_cfg, disc_cfg, perceptual=None, disc=None,
             last_layer=None, generator=None, sample=True, scale=1.0):
        """The student's loss on one micro-batch and its backward; returns (x, detached decode, float logs).

        `model` is the prepared StudentForTraining; `disc`, when given, the unwrapped discriminator
        (frozen for this step, as in vaekit.train.steps.generator_step).
        """
        targets = self.targets(x, cached, generator, sample)
        with accelerator.autocast():
            out = model(x, targets.decoder_input)
            recon = out.recon
            logs = {}
            nll = image_loss(recon, x, loss_cfg, perceptual, logs)
            if targets.decoded is not None:
                imitation = losses.reconstruction_loss(recon.float(), targets.decoded, loss_cfg.reconstruction)
                nll = nll + self.teacher_decode_weight * imitation
                logs["teacher_rec"] = imitation.detach()
            student_scale, student_shift = scale_shift(accelerator.unwrap_model(model).vae)
            mean = (out.mean.float() - student_shift) * student_scale
            std = (0.5 * out.logvar.float()).exp() * abs(student_scale) if out.logvar is not None else None
            latent = latent_matching_loss(mean, std, targets.mean, targets.std)
            loss = nll + self.latent_weight * latent
            logs["latent"] = latent.detach()
            if disc is not None:
                loss = loss + adversarial_loss(disc, recon, nll, last_layer, disc_cfg, logs)
            logs["loss"] = loss.detach()
        accelerator.backward(loss * scale)
        return x.detach(), recon.detach(), logs

    def zero_cached(self, student, size):
        """Stand-in cached latents (1, C, s, s) for a micro-batch whose images all failed (it trains with weight 0)."""
        side = size // downsample_factor(student)
        zeros = torch.zeros(1, latent_channels(student), side, side)
        return zeros, zeros.clone()

    def export(self, student, out_dir):
        """Besides the diffusers folder: a tiny student of TAESD's architecture as a TAESD pair (what ComfyUI reads
        from models/vae_approx), named for the teacher's family; returns its folder or None."""
        if self.student_family != "tiny":
            return None
        reason = taesd_mismatch(student)
        if reason:
            log.info("No TAESD files: the tiny student differs from TAESD's architecture (%s).", reason)
            return None
        scale, shift = scale_shift(self.teacher)
        name = taesd_name(latent_channels(self.teacher), scale, shift)
        if name is None:
            name = "taesd"
            log.warning("The teacher's latent normalisation (%d channels, scale %g, shift %g) is none of the TAESD "
                        "families ComfyUI knows (taesd, taesdxl, taesd3, taef1): the files are named taesd_*, and "
                        "ComfyUI will assume SD's 0.18215 for them.", latent_channels(self.teacher), scale, shift)
        folder = out_dir / "taesd"
        save_taesd(student, folder, name)
        return folder


def open_teacher(cfg, device, checkpoint=None):
    """The frozen teacher on `device` and its fingerprint, checked against the cache card and a resumed checkpoint."""
    teacher = load_teacher(cfg.distill.teacher, "cpu", weights=cfg.distill.teacher_weights)
    teacher_print = fingerprint(teacher)  # in fp32, before any cast: what `vaekit encode` records
    if checkpoint is not None:
        recorded = (checkpoint.meta.get("distill") or {}).get("teacher_fingerprint")
        if recorded != teacher_print:
            raise VaekitError(f"distill.teacher={cfg.distill.teacher} is not the teacher this run was trained with "
                              f"(fingerprint {teacher_print[:12]}, checkpoint {str(recorded)[:12]}); resume with the "
                              f"same teacher, or start a new run in another out_dir.")
    if cfg.distill.cache:
        check_cache(cfg.distill.cache, teacher_print, cfg.distill.teacher)
    return cast_vae(teacher, device=device, dtype=teacher_dtype(cfg)), teacher_print


def make_distiller(cfg, teacher, teacher_print, student):
    """The run's Distiller for `student`, from open_teacher's (teacher, fingerprint)."""
    return Distiller(teacher, teacher_print, cfg.distill.teacher, family(student), bool(cfg.distill.cache),
                     cfg.distill.latent_weight, cfg.distill.teacher_decode_weight)


def check_student(vae, cfg):
    """Refuse what a student cannot train with; an AutoencoderTiny trains only as a student."""
    if not is_tiny(vae):
        if cfg.distill.cache and open_card(cfg.distill.cache).store == "mode":
            raise VaekitError(f"distill.cache {cfg.distill.cache} stores posterior means only (--store mode), so a "
                              f"KL student's posterior variance would not learn, and pipelines that sample it "
                              f"(img2img) would add untrained noise; encode with --store mean_logvar (the default).")
        return
    if not cfg.distill.teacher:
        raise VaekitError(f"{cfg.model.source} is an AutoencoderTiny, which trains only as a distillation student "
                          f"(its deterministic encoder has no KL term to shape a latent space): set "
                          f"distill.teacher=MODEL.")
    if cfg.model.gradient_checkpointing:
        raise VaekitError("model.gradient_checkpointing with an AutoencoderTiny: diffusers' EncoderTiny skips its "
                          "[-1, 1] -> [0, 1] input rescale when checkpointing, so the student would train on inputs "
                          "it never sees at inference; train it without (it is small).")


def check_cache(cache_dir, teacher_fingerprint, spec):
    """Refuse a latent cache that another VAE (or another normalisation) encoded."""
    info = open_card(cache_dir)  # checked: a damaged card is one VaekitError naming card.json
    card, key = info.card, info.key
    if key.get("vae_fingerprint") != teacher_fingerprint:
        source = (card.get("vae") if isinstance(card.get("vae"), dict) else {}).get("source", "an unknown model")
        raise VaekitError(f"distill.cache {cache_dir} was encoded by another VAE ({source}, fingerprint "
                          f"{str(key.get('vae_fingerprint'))[:12]}) than distill.teacher={spec} (fingerprint "
                          f"{teacher_fingerprint[:12]}); encode the training images with the teacher: vaekit encode "
                          f"--vae {spec} --data DATA --out {cache_dir} --overwrite.")
