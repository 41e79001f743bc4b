"""Held-out reconstructions during and after training: PSNR / SSIM / LPIPS and a PNG grid.

Scored with the weights an export would hold (the EMA when it is on), through the same
`encode_decode` as every other command, on the posterior mean.
"""

import logging
from pathlib import Path

import torch
from vaekit.codec.inference import encode_decode
from vaekit.data.crops import to_pil
from vaekit.errors import VaekitError
from vaekit.eval import metrics, report
from vaekit.eval.diffusability import RetentionStatistics
from vaekit.model.architecture import copy_vae
from vaekit.train import losses

log = logging.getLogger("vaekit.train")


@torch.no_grad()
def validate(vae, images, lpips_net=None, batch_size=4):
    """Reconstruct held-out images with the posterior mean; returns (metrics dict, reconstructions, per-image rows).

    The metrics are means over the images; each row is {"psnr", "ssim", "lpips", "hf_retention"} of
    one image (lpips None without an LPIPS network), for the grid's captions. hf_retention is the
    reconstruction's power above half Nyquist over the original's (vaekit.eval.diffusability): 1 as
    sharp as the input, below 1 blurrier.
    """
    device = next(vae.parameters()).device
    recons, psnr, ssim, lp, sharp = [], [], [], [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)  # (b, 3, H, W)
        y = encode_decode(vae, x).clamp(-1, 1)
        recons.append(y.cpu())
        psnr.append(metrics.psnr(y, x, max_db=100.0).cpu())
        ssim.append(metrics.ssim(y, x).cpu())
        sharp.append(RetentionStatistics().update(x, y).float())
        if lpips_net is not None:
            lp.append(lpips_net(y, x).flatten().cpu())  # (b, 1, 1, 1) -> (b,)
    psnr, ssim, sharp, lp = torch.cat(psnr), torch.cat(ssim), torch.cat(sharp), (torch.cat(lp) if lp else None)
    rows = [{"psnr": float(psnr[i]), "ssim": float(ssim[i]), "lpips": float(lp[i]) if lp is not None else None,
             "hf_retention": float(sharp[i])} for i in range(len(images))]
    values = {"psnr": psnr.mean().item(), "ssim": ssim.mean().item(),
              "lpips": lp.mean().item() if lp is not None else None, "hf_retention": nan_mean(sharp),
              "images": len(images)}
    return values, torch.cat(recons), rows


def nan_mean(values):
    """The mean of a float tensor ignoring NaN (images without fine detail have no hf_retention); None when all are."""
    known = values[~values.isnan()]
    return known.mean().item() if len(known) else None


def summarize(rows):
    """The metrics of `validate` from its per-image rows, averaged the same way (float32 means in image order)."""
    def mean(name):
        return torch.tensor([r[name] for r in rows], dtype=torch.float32).mean().item()

    has_lpips = bool(rows) and rows[0]["lpips"] is not None
    sharp = torch.tensor([r["hf_retention"] for r in rows], dtype=torch.float32)
    return {"psnr": mean("psnr"), "ssim": mean("ssim"), "lpips": mean("lpips") if has_lpips else None,
            "hf_retention": nan_mean(sharp), "images": len(rows)}


def caption_scores(row):
    """'PSNR 24.10 dB   LPIPS 0.210' of one image's row."""
    text = f"PSNR {row['psnr']:.2f} dB"
    return text + (f"   LPIPS {row['lpips']:.3f}" if row["lpips"] is not None else "")


def save_grid(originals, recons, path, keys=None, rows=None, base=None, title=None):
    """PNG: a captioned row per held-out image (key, PSNR, LPIPS): original | reconstruction | error map.

    `base`: (reconstructions, rows) of the model a decoder fine-tune started from; the grid then shows
    original | base | fine-tuned and both error maps, on one colour scale per row. `title`: a line above.
    """
    comparisons = []
    for i, (x, y) in enumerate(zip(originals, recons)):
        shown = {"reconstruction": y} if base is None else {"base": base[0][i], "fine-tuned": y}
        errors = {label: (r.float() - x.float()).abs().mean(dim=0) * 127.5 for label, r in shown.items()}  # (H, W)
        # A few extreme pixels must not wash the map out; one scale per row, so the maps of a row compare.
        scale = max(4.0, max(float(torch.quantile(e.flatten(), 0.99)) for e in errors.values()))
        caption = keys[i] if keys else f"image {i + 1}"
        if rows and base is None:
            caption += "   " + caption_scores(rows[i])
        elif rows:
            caption += f"   base {caption_scores(base[1][i])}   fine-tuned {caption_scores(rows[i])}"
        comparisons.append({"caption": f"{caption}   error 0-{scale:.0f} levels", "original": to_pil(x),
                            "recons": {label: to_pil(r) for label, r in shown.items()},
                            "errors": {label: report.heatmap(e, scale) for label, e in errors.items()}})
    return report.save_png(report.compose_comparison(comparisons, title=title), Path(path))


def take_images(dataset, limit):
    """Up to `limit` decodable images of a dataset as one (N, 3, H, W) tensor, their keys, and the keys skipped."""
    images, keys, errors = [], [], []
    for i in range(len(dataset)):
        if len(images) >= limit:
            break
        item = dataset[i]
        if "error" in item:
            errors.append(f"{item.get('key')}: {item['error']}")
        else:
            images.append(item["pixels"])
            keys.append(item["key"])
    return (torch.stack(images) if images else None), keys, errors


def build_lpips_metric(net, path, perceptual):
    """An LPIPS network for validation: the training one when it matches, else loaded, else None."""
    if perceptual is not None and perceptual.lpips.pnet_type == net:
        return perceptual.lpips
    try:
        return losses.PerceptualLoss(net=net, path=path).lpips
    except VaekitError as e:
        log.warning("Validation LPIPS unavailable (%s); reporting PSNR and SSIM only.", e)
        return None


def format_metrics(values, lpips_net=None):
    """'PSNR 24.10 dB  SSIM 0.7120  LPIPS-Alex 0.2100  HF retention 0.62' (what is unavailable is left out)."""
    text = f"PSNR {values['psnr']:.2f} dB  SSIM {values['ssim']:.4f}"
    if values.get("lpips") is not None:
        name = {"alex": "LPIPS-Alex", "vgg": "LPIPS-VGG"}.get(lpips_net, "LPIPS")
        text += f"  {name} {values['lpips']:.4f}"
    if values.get("hf_retention") is not None:
        text += f"  HF retention {values['hf_retention']:.2f}"
    return text


class Validator:
    """The held-out images of a run and what scores them; every process holds one and scores its share.

    With several processes, process r reconstructs images r, r + w, ... and the main process gathers
    the per-image metrics and reconstructions: the means are those of one process scoring all
    images (the same per-image values, averaged in image order), in 1/w of the time.
    """

    def __init__(self, images, keys, lpips_net, batch_size, vae, rank=0, world=1):
        self.images, self.keys, self.lpips_net, self.batch_size = images, keys, lpips_net, batch_size
        self.rank, self.world = rank, world
        self.scratch = copy_vae(vae)  # receives the weights to score, so the trained model is never touched

    def score(self, state_dict, limit):
        """(metrics, reconstructions, per-image rows) of the first `limit` held-out images with `state_dict`.

        Every process must call it; with several, only the main process gets the result (the others None).
        """
        self.scratch.load_state_dict(state_dict)
        images = self.images[:limit]
        if self.world == 1:
            return validate(self.scratch, images, self.lpips_net, self.batch_size)
        mine = list(range(self.rank, len(images), self.world))
        share = None
        if mine:
            _, recons, rows = validate(self.scratch, images[mine], self.lpips_net, self.batch_size)
            share = (mine, rows, recons.half())  # fp16 halves the transfer; only the grid's pictures use it
        shares = [None] * self.world if self.rank == 0 else None
        torch.distributed.gather_object(share, shares, dst=0)
        if self.rank != 0:
            return None
        found = {i: (row, recon) for part in shares if part is not None for i, row, recon in zip(*part)}
        rows = [found[i][0] for i in range(len(images))]
        recons = torch.stack([found[i][1].float() for i in range(len(images))])
        return summarize(rows), recons, rows

    def run(self, state_dict, limit, grid_path, base=None, title=None):
        """Score the first `limit` held-out images with `state_dict` and save their grid; returns the metrics.

        `base`: the (metrics, reconstructions, rows) `score` gave for the model a decoder fine-tune started
        from, shown beside. Every process must call it; with several, only the main process gets the metrics.
        """
        scored = self.score(state_dict, limit)
        if scored is None:
            return None
        values, recons, rows = scored
        save_grid(self.images[:limit], recons, grid_path, self.keys[:limit], rows,
                  base=base[1:] if base is not None else None, title=title)
        return values
