"""Measuring VAEs: image metrics, `vaekit evaluate` and its report, latent diagnostics, sampling.

- `config`: EvaluateConfig and InspectConfig (no torch, for the command line);
- `metrics`: per-image PSNR, SSIM, MS-SSIM, LPIPS, colour shift, periodic-artifact scores; rFID;
- `evaluate`: several VAEs on the same images under one stated protocol;
- `report`: the HTML report and PNG figures;
- `diagnostics`: `vaekit inspect` (KL, active units, collapse, normalisation, fp16 safety);
- `diffusability`: latent power spectra, high-frequency share, equivariance error, verdicts;
- `probe`: `vaekit probe`, the same small denoiser trained on each VAE's latents;
- `sampling`: decoding the prior and interpolating between images;
- `reconstruct`: image files of any size through encode + decode to PNGs.
"""

from vaekit.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "EvaluateConfig": "config",
    "InspectConfig": "config",
    "ProbeConfig": "config",
    "probe": "probe",
    "inspect_models": "diagnostics",
    "evaluate": "evaluate",
    "inspect_latents": "diagnostics",
    "inspect_precision": "diagnostics",
    "sample_images": "sampling",
    "interpolate_images": "sampling",
    "reconstruct_files": "reconstruct",
})
