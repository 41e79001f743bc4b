"""Latent compatibility: whether a model (a distilled student) shares another's (its teacher's) latent space.

Measured on the images an evaluation scores, in the normalised latent space a denoiser works in
(`(z - shift_factor) * scaling_factor` of each model's own config), so a KL student and a tiny one
compare alike:

- decode: the teacher's latents (posterior means), handed to the student as a pipeline would
  (`z / scaling_factor + shift_factor` of the student's config), decoded by the student and scored
  against the teacher's own decode of them (PSNR, how far from a drop-in replacement) and against
  the image (PSNR and LPIPS-VGG, how good the images a pipeline would then produce are); the
  teacher's own decode against the image is the reference;
- encode: the student's normalised latents against the teacher's, as their RMS distance over the RMS
  of the teacher's (0: the same latents; about 1.4 for unrelated unit-variance latents).

Every decode is clamped and rounded to 8 bits before scoring, as the reconstructions of
vaekit.eval.evaluate are.
"""

import math

import torch

from vaekit.codec.inference import decode, encode
from vaekit.eval import metrics
from vaekit.model.architecture import downsample_factor, latent_channels
from vaekit.model.normalization import denormalize_latents, normalize_latents


def same_latent_grid(teacher, student):
    """Whether two models' latents have the same channels and downsampling (the precondition of comparing them)."""
    return (latent_channels(teacher) == latent_channels(student)
            and downsample_factor(teacher) == downsample_factor(student))


class TeacherView:
    """A batch as the teacher sees it: its posterior means and its own (8-bit) decode of them."""

    def __init__(self, teacher, x, tile="off", lpips=None, psnr_cap=100.0):
        self.teacher, self.x = teacher, x
        self.mean, _ = encode(teacher, x, tile=tile)  # (B, C, h, w), raw
        self.decoded = metrics.quantize(decode(teacher, self.mean, tile=tile, size=tuple(x.shape[-2:])))
        self.psnr_image = metrics.psnr(x, self.decoded.to(x.device), max_db=psnr_cap).cpu()
        self.lpips_image = metrics.lpips_distance(lpips, x, self.decoded.to(x.device)).cpu() if lpips else None


class CompatibilityStatistics:
    """Per-image compatibility values of one model against the teacher, accumulated batch by batch."""

    def __init__(self, teacher_label):
        self.teacher_label = teacher_label
        self.values = {name: [] for name in ("decode_psnr_vs_teacher", "decode_psnr_vs_image",
                                             "decode_lpips_vs_image", "latent_error", "teacher_psnr_vs_image",
                                             "teacher_lpips_vs_image")}

    @torch.no_grad()
    def update(self, student, view, tile="off", lpips=None, psnr_cap=100.0):
        """Score `student` on one TeacherView."""
        x = view.x
        handed = denormalize_latents(student, normalize_latents(view.teacher, view.mean))  # as a pipeline hands it
        decoded = metrics.quantize(decode(student, handed, tile=tile, size=tuple(x.shape[-2:]))).to(x.device)
        own, _ = encode(student, x, tile=tile)
        expected, got = normalize_latents(view.teacher, view.mean), normalize_latents(student, own.to(view.mean.device))
        distance = (got - expected).square().mean(dim=(1, 2, 3)).sqrt()  # (B,)
        scale = expected.square().mean(dim=(1, 2, 3)).sqrt().clamp_min(1e-12)
        self.values["decode_psnr_vs_teacher"].append(metrics.psnr(view.decoded.to(x.device), decoded, psnr_cap).cpu())
        self.values["decode_psnr_vs_image"].append(metrics.psnr(x, decoded, psnr_cap).cpu())
        self.values["latent_error"].append((distance / scale).cpu())
        self.values["teacher_psnr_vs_image"].append(view.psnr_image)
        if lpips is not None:
            self.values["decode_lpips_vs_image"].append(metrics.lpips_distance(lpips, x, decoded).cpu())
            self.values["teacher_lpips_vs_image"].append(view.lpips_image)

    def result(self):
        """Means over the images (None where unmeasured), with the teacher's label and the image count."""
        means = {name: float(torch.cat(v).float().mean()) if v else None for name, v in self.values.items()}
        images = sum(len(v) for v in self.values["latent_error"])
        return {"teacher": self.teacher_label, "images": images,
                **{k: (None if v is None or math.isnan(v) else v) for k, v in means.items()}}
