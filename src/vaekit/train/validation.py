"""Held-out reconstructions during and after training: PSNR / SSIM / LPIPS and a PNG grid.

Scored with the weights an export would hold (the EMA when it is on), through the same
`encode_decode` as every other command, on the posterior mean.
"""

import logging
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from vaekit.codec.inference import encode_decode
from vaekit.errors import VaekitError
from vaekit.eval import metrics
from vaekit.io import atomic_path
from vaekit.model.architecture import copy_vae
from vaekit.train import losses

log = logging.getLogger("vaekit.train")


@torch.no_grad()
def validate(vae, images, lpips_net=None, batch_size=4):
    """Reconstruct held-out images with the posterior mean; returns (metrics dict, reconstructions)."""
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


def build_lpips_metric(net, path, perceptual):
    """An LPIPS network for validation: the training one when it matches, else loaded, else None."""
    if perceptual is not None and perceptual.lpips.pnet_type == net:
        return perceptual.lpips
    try:
        return losses.PerceptualLoss(net=net, path=path).lpips
    except VaekitError as e:
        log.warning("Validation LPIPS unavailable (%s); reporting PSNR and SSIM only.", e)
        return None


def format_metrics(values):
    """'PSNR 24.1 dB  SSIM 0.712  LPIPS 0.210' (LPIPS omitted when unavailable)."""
    text = f"PSNR {values['psnr']:.2f} dB  SSIM {values['ssim']:.4f}"
    if values.get("lpips") is not None:
        text += f"  LPIPS {values['lpips']:.4f}"
    return text


class Validator:
    """The held-out images of a run and what scores them; only the main process holds one."""

    def __init__(self, images, lpips_net, batch_size, vae):
        self.images, self.lpips_net, self.batch_size = images, lpips_net, batch_size
        self.scratch = copy_vae(vae)  # receives the weights to score, so the trained model is never touched

    def run(self, state_dict, limit, grid_path):
        """Score the first `limit` held-out images with `state_dict` and save their grid; returns the metrics."""
        self.scratch.load_state_dict(state_dict)
        images = self.images[:limit]
        values, recons = validate(self.scratch, images, self.lpips_net, self.batch_size)
        save_grid(images, recons, grid_path)
        return values
