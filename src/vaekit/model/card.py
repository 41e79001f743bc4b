"""The README.md beside every diffusers export: a model card in the Hugging Face convention.

YAML front matter (`library_name: diffusers`, tags, `base_model` when the source is a hub id) and
Markdown: the architecture, latent channels and normalisation, for a training run what it was
trained from, how and on what with its held-out metrics, and a snippet that loads the folder and
puts it in a diffusers pipeline. Plain text from plain data: the trainer passes what it knows as
a dict, so this module never imports the trainer.
"""

import re

from vaekit import __version__
from vaekit.model.architecture import describe

TAGS = ("vae", "autoencoder", "latent-diffusion", "vaekit")
CLASS_TAGS = {"AutoencoderKL": ("autoencoderkl",), "AutoencoderTiny": ("autoencodertiny", "taesd")}

# Pipelines whose latents have this many channels (the usage snippet names the first).
PIPELINES = {
    4: ("StableDiffusionPipeline", "stable-diffusion-v1-5/stable-diffusion-v1-5", "SD 1.x/2.x, SDXL"),
    16: ("StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3-medium-diffusers", "SD3, FLUX"),
}

# The metrics a training run reports, in the order a card lists them: key -> (label, digits).
METRICS = {"psnr": ("PSNR (dB)", 2), "ssim": ("SSIM", 4), "lpips": ("LPIPS", 4),
           "hf_retention": ("HF retention (1 = as sharp as the input)", 3)}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def yaml_text(value):
    """A YAML scalar that reads back as the same string (quoted when plain style could change it)."""
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9][\w./-]*", text) and text.lower() not in ("true", "false", "null", "yes", "no"):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def front_matter(source=None, extra_tags=()):
    """The YAML header the hub reads: library, tags, and the base model when the source is a hub id."""
    lines = ["---", "library_name: diffusers", "tags:"]
    lines += [f"- {yaml_text(tag)}" for tag in (*TAGS, *extra_tags)]
    if source and _HUB_ID.match(str(source)):
        lines.append(f"base_model: {yaml_text(source)}")
    lines.append("---")
    return "\n".join(lines)


def architecture_table(info):
    """Markdown rows for the architecture and the latent normalisation of `describe(vae)`."""
    params = info["parameters"]
    if info["class"] == "AutoencoderTiny":
        rows = [
            ("class", "`AutoencoderTiny` (diffusers; the TAESD architecture)"),
            ("downsampling", f"{info['downsample_factor']}x per side"),
            ("latent channels", str(info["latent_channels"])),
            ("block widths", f"encoder {info['encoder_block_out_channels']}, decoder "
                             f"{info['decoder_block_out_channels']}"),
            ("latent range", f"magnitude {info['latent_magnitude']:g}, shift {info['latent_shift']:g}"),
            ("scaling factor", f"{info['scaling_factor']:g}"),
            ("parameters", f"{params['total']:,} (encoder {params['encoder']:,}, decoder {params['decoder']:,})"),
        ]
        return "| | |\n| --- | --- |\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)
    rows = [
        ("class", f"`{info['class']}` (diffusers)"),
        ("downsampling", f"{info['downsample_factor']}x per side"),
        ("latent channels", str(info["latent_channels"])),
        ("block widths", f"{info['block_out_channels']}, {info['layers_per_block']} layer(s) per block, "
                         f"{info['norm_num_groups']} norm groups"),
        ("mid-block attention", "yes" if info["mid_block_attention"] else "no"),
        ("quant convs", "yes" if info["quant_conv"] else "no"),
        ("scaling factor", f"{info['scaling_factor']:g}"),
        ("shift factor", f"{info['shift_factor']:g}"),
        ("parameters", f"{params['total']:,} (encoder {params['encoder']:,}, decoder {params['decoder']:,})"),
    ]
    return "| | |\n| --- | --- |\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def latent_space_note(source, training):
    """Which diffusion models can use this VAE: only those trained on its latent space."""
    if training and training.get("teacher"):
        return (f"A distilled student of `{training['teacher']}`: it was trained into that VAE's latent space, so "
                "diffusion models trained on the teacher's latents work with it (`vaekit evaluate --teacher` "
                "measures how closely).")
    if training and training["mode"] == "decoder":
        return (f"The encoder is `{training['source']}`'s, unchanged, so its latents are bit-identical: every "
                "diffusion model trained on that VAE's latents works with this decoder as a drop-in replacement.")
    if str(source or "").startswith("preset:"):
        return ("These are a preset's random weights: a starting point for training (`vaekit train "
                f"model.source={source}`), not a usable VAE.")
    return ("A diffusion model works only with the latent space it was trained on: use this VAE with models "
            "trained on its latents (`vaekit encode` writes a latent cache to train one), or where it is a "
            "decoder fine-tune of theirs.")


def usage(path, info):
    """A Python snippet: load this folder, encode and decode with the normalisation, put it in a pipeline."""
    if info["class"] == "AutoencoderTiny":
        return "\n".join([
            "```python",
            "import torch",
            "from diffusers import AutoencoderTiny",
            "",
            f'vae = AutoencoderTiny.from_pretrained("{path}")  # this folder, or its hub id once uploaded',
            "",
            "images = torch.rand(1, 3, 256, 256) * 2 - 1  # (B, 3, H, W) in [-1, 1]",
            "with torch.no_grad():",
            "    latents = vae.encode(images).latents  # already the normalised latents a diffusion model sees",
            "    decoded = vae.decode(latents).sample",
            "",
            "# In a pipeline of its teacher's latent family (a pipeline divides by scaling_factor, 1.0 here):",
            "# pipe.vae = vae, or with the latent-space check: vaekit.model.replace_vae(pipe, vae)",
            "```",
        ])
    scale, shift = info["scaling_factor"], info["shift_factor"]
    pipeline = PIPELINES.get(info["latent_channels"])
    lines = [
        "```python",
        "import torch",
        "from diffusers import AutoencoderKL",
        "",
        f'vae = AutoencoderKL.from_pretrained("{path}")  # this folder, or its hub id once uploaded',
        "",
        "images = torch.rand(1, 3, 256, 256) * 2 - 1  # (B, 3, H, W) in [-1, 1]",
        "with torch.no_grad():",
        "    z = vae.encode(images).latent_dist.sample()",
        f"    latents = (z - {shift:g}) * {scale:g}  # what a diffusion model sees",
        f"    decoded = vae.decode(latents / {scale:g} + {shift:g}).sample",
    ]
    if pipeline is not None:
        name, repo, family = pipeline
        lines += [
            "",
            f"# In a pipeline of the same latent family ({family}: {info['latent_channels']} channels):",
            f"from diffusers import {name}",
            f'pipe = {name}.from_pretrained("{repo}", vae=vae)',
            "# or, with the channel check diffusers does not make: vaekit.model.replace_vae(pipe, vae)",
        ]
    else:
        lines += ["", f"# No released pipeline uses {info['latent_channels']}-channel latents: train a diffusion model "
                  "on them (vaekit encode writes a latent cache)."]
    lines.append("```")
    return "\n".join(lines)


def number(value, digits):
    """A table cell: the value to `digits` decimals, or a dash when unknown."""
    return "-" if value is None else f"{value:.{digits}f}"


def training_section(training):
    """What a training run was: source, mode, steps, data, losses, and its held-out metrics."""
    data = training["data"]
    rows = [
        ("source model", f"`{training['source']}`"),
        ("mode", {"decoder": "decoder fine-tune (encoder frozen: the latent space of the source is kept exactly)",
                  "scratch": "encoder and decoder trained"}.get(training["mode"], training["mode"])),
        ("steps", f"{training['steps']:,} x {training['images_per_step']} images"),
        ("data", f"`{data['path']}`: {data['train_images']} training images, {data['size']} px crops "
                 f"({data['crop']}), {data['held_out']} held out"),
        *([("teacher", f"`{training['teacher']}` (frozen; this model learned its latent space)")]
          if training.get("teacher") else []),
        ("losses", training["losses"]),
        ("weights", "EMA" if training.get("ema") else "as trained"),
    ]
    text = "## Training\n\n| | |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    metrics = training.get("metrics")
    if metrics:
        net = {"alex": "LPIPS-Alex", "vgg": "LPIPS-VGG"}.get(metrics.get("lpips_net"), "LPIPS")
        keys = [key for key in METRICS if metrics.get(key) is not None]
        cells = [(net if key == "lpips" else METRICS[key][0], key) for key in keys]
        rows = [("this model", metrics)] + ([("the base, before fine-tuning", metrics["base"])]
                                             if metrics.get("base") else [])
        text += (f"\n\nHeld-out metrics ({metrics['images']} images at {metrics['size']} px, posterior mean):\n\n"
                 + "| | " + " | ".join(label for label, _ in cells) + " |\n"
                 + "| --- |" + " --- |" * len(cells) + "\n"
                 + "\n".join(f"| {name} | " + " | ".join(number(values.get(key), METRICS[key][1]) for key in keys)
                             + " |" for name, values in rows))
    return text


def model_card(vae, path, source=None, training=None):
    """README.md text for a diffusers export of `vae` written to `path`.

    `source`: the model argument it was made from; `training`: for a training run's export, a dict with
    source, mode, steps, images_per_step, data {path, train_images, held_out, size, crop}, losses, ema
    and metrics (held-out PSNR, SSIM, LPIPS, lpips_net, hf_retention, images, size), as the trainer knows them.
    """
    info = describe(vae)
    origin = training["source"] if training else source
    parts = [p for p in str(path).replace("\\", "/").split("/") if p]
    name = parts[-2] if len(parts) > 1 and parts[-1] == "vae" else (parts[-1] if parts else "vae")
    title = f"# {name}"
    factor = info["downsample_factor"]
    article = "An" if str(factor).startswith(("8", "11", "18")) else "A"
    kind = ("tiny preview autoencoder (`AutoencoderTiny`, TAESD)" if info["class"] == "AutoencoderTiny" else
            "KL autoencoder (`AutoencoderKL`)")
    what = f"{article} {factor}x-downsampling, {info['latent_channels']}-channel {kind} for latent diffusion"
    what += f", trained with vaekit {__version__}." if training else f", exported by vaekit {__version__}"
    if origin and not training:
        what += f" from `{origin}`."
    elif not training:
        what += "."
    tags = CLASS_TAGS.get(info["class"], ())
    if training and training["mode"] == "decoder":
        tags += ("decoder-finetune",)
    if training and training.get("teacher"):
        tags += ("distillation",)
    sections = [front_matter(origin, extra_tags=tags),
                title, what, "## Architecture", architecture_table(info)]
    if training:
        sections.append(training_section(training))
    sections += ["## Usage", latent_space_note(origin, training), usage(path, info)]
    return "\n\n".join(sections) + "\n"
