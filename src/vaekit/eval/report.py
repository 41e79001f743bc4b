"""Pictures and pages for people: the self-contained HTML report, comparison PNG, heat maps, histograms.

Everything is drawn with Pillow (no plotting library): images are embedded in the HTML as base64
data URIs, so report.html is one file that opens anywhere, offline.
"""

import base64
import datetime
import html
import io
import math

import torch
from PIL import Image, ImageDraw, ImageFont

from vaekit import __version__
from vaekit.io import atomic_path

# Matplotlib's "inferno" colour map sampled at 8 evenly spaced points (perceptually uniform, readable
# in greyscale); interpolated linearly between them.
INFERNO = (
    (0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99),
    (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164),
)

# Above this many dB an artifact score means a pattern a person can usually see (flagged in tables).
# A rule of thumb from the scores of synthetic grids at 1-2 levels of amplitude, not a standard.
ARTIFACT_WARN_DB = 6.0

TILE = 160  # displayed side of a comparison tile in pixels


def font(size=14):
    """Pillow's bundled font at `size`."""
    return ImageFont.load_default(size=size)


def colormap(values):
    """Values in [0, 1], any shape -> uint8 RGB (..., 3) through INFERNO."""
    anchors = torch.tensor(INFERNO, dtype=torch.float32)  # (8, 3)
    position = values.float().clamp(0, 1) * (len(INFERNO) - 1)
    low = position.floor().long().clamp(max=len(INFERNO) - 2)
    frac = (position - low)[..., None]
    rgb = anchors[low] * (1 - frac) + anchors[low + 1] * frac  # (..., 3)
    return rgb.round().to(torch.uint8)


def heatmap(error, vmax):
    """A (H, W) error map -> RGB PIL image, 0 black and `vmax` or more pale yellow."""
    return Image.fromarray(colormap(error.cpu() / vmax).numpy())


def save_png(img, path):
    """Write a PIL image as PNG atomically."""
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def data_uri(img):
    """A PIL image as a base64 PNG data URI."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def upscale(img, side=TILE):
    """Nearest-neighbour upscale by a whole factor so the longer side is about `side` (pixels stay crisp)."""
    factor = max(1, round(side / max(img.size)))
    return img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST) if factor > 1 else img


def colour_bar(width=160, height=12):
    """The heat map's colour scale as an image, 0 on the left."""
    ramp = torch.linspace(0, 1, width)[None, :].expand(height, width)
    return Image.fromarray(colormap(ramp).numpy())


def make_grid_image(images, columns, padding=2, background=(255, 255, 255)):
    """Equal-sized PIL images in a grid, row by row."""
    if not images:
        return Image.new("RGB", (1, 1), background)
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (width + padding) + padding, rows * (height + padding) + padding), background)
    for i, img in enumerate(images):
        row, col = divmod(i, columns)
        grid.paste(img, (padding + col * (width + padding), padding + row * (height + padding)))
    return grid


# ---------------------------------------------------------------------------------------------------
# Comparison PNG


def comparison_columns(comparisons):
    """Column titles and the images of each row: original, every reconstruction, every error map."""
    if not comparisons:
        return [], []
    labels = list(comparisons[0]["recons"])
    titles = ["original", *labels, *(f"error: {label}" for label in labels)]
    rows = [[c["original"], *c["recons"].values(), *c["errors"].values()] for c in comparisons]
    return titles, rows


def compose_comparison(comparisons, labels=None, title=None):
    """The report's comparison as one PNG: a titled column per image kind, a captioned row per image.

    `title`: a line of text above the columns (what the whole picture shows).
    """
    titles, rows = comparison_columns(comparisons)
    small, regular = font(12), font(14)
    if not rows:
        img = Image.new("RGB", (480, 40), "white")
        ImageDraw.Draw(img).text((8, 12), "no images to compare", fill="black", font=regular)
        return img
    rows = [[upscale(tile) for tile in row] for row in rows]
    tile_w, tile_h = rows[0][0].size
    pad, header, caption = 6, 34, 20
    top = 24 if title else 0
    width = pad + len(titles) * (tile_w + pad)
    height = top + header + len(rows) * (caption + tile_h + pad) + 24
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 8), shorten(title, width - 2 * pad, regular, draw), fill=(20, 90, 30), font=regular)
    for col, column in enumerate(titles):
        draw.text((pad + col * (tile_w + pad), top + 10), shorten(column, tile_w, regular, draw), fill="black",
                  font=regular)
    y = top + header
    for comparison, row in zip(comparisons, rows):
        text = comparison.get("caption") or (f"{comparison['key']}  crop {tuple(comparison['box'])}  heat map "
                                              f"0-{comparison['scale_levels']:.0f} levels")
        draw.text((pad, y + 3), shorten(text, width - 2 * pad, small, draw), fill=(60, 60, 60), font=small)
        y += caption
        for col, tile in enumerate(row):
            canvas.paste(tile, (pad + col * (tile_w + pad), y))
        y += tile_h + pad
    canvas.paste(colour_bar(), (pad, y + 4))
    draw.text((pad + 168, y + 2), "error: black 0, yellow = the row's scale", fill="black", font=small)
    return canvas


def shorten(text, width, text_font, draw):
    """`text` cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=text_font) <= width:
        return text
    while text and draw.textlength(text + "...", font=text_font) > width:
        text = text[:-1]
    return text + "..."


# ---------------------------------------------------------------------------------------------------
# Histograms (vaekit inspect)


def histogram_panels(panels, columns=4, size=(240, 150)):
    """PNG of histogram panels: each {"title", "counts" (bins,), "edges" (bins + 1,), "pdf": callable or None}.

    Bars show the fraction of values per bin as a density; `pdf` (a reference density) is drawn as a line.
    """
    width, height = size
    margin_top, margin_bottom, margin_x = 22, 18, 6
    images = []
    for panel in panels:
        counts = torch.as_tensor(panel["counts"], dtype=torch.float64)
        edges = torch.as_tensor(panel["edges"], dtype=torch.float64)
        density = counts / max(float(counts.sum()), 1.0) / (edges[1:] - edges[:-1])  # (bins,)
        reference = None
        centres = (edges[:-1] + edges[1:]) / 2
        if panel.get("pdf") is not None:
            reference = torch.tensor([panel["pdf"](float(c)) for c in centres], dtype=torch.float64)
        top = max(float(density.max()), float(reference.max()) if reference is not None else 0.0, 1e-12)
        img = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(img)
        plot_w, plot_h = width - 2 * margin_x, height - margin_top - margin_bottom
        bar_w = plot_w / len(density)
        for i, d in enumerate(density.tolist()):
            bar_h = plot_h * d / top
            x0, x1 = margin_x + round(i * bar_w), margin_x + round((i + 1) * bar_w) - 1  # bars touch
            draw.rectangle([x0, round(margin_top + plot_h - bar_h), max(x0, x1), margin_top + plot_h],
                           fill=(70, 110, 180))
        if reference is not None:
            points = [(margin_x + (i + 0.5) * bar_w, margin_top + plot_h - plot_h * r / top)
                      for i, r in enumerate(reference.tolist())]
            draw.line(points, fill=(220, 80, 30), width=2)
        draw.line([(margin_x, margin_top + plot_h), (width - margin_x, margin_top + plot_h)], fill="black")
        draw.text((margin_x, 3), panel["title"], fill="black", font=font(12))
        small = font(10)
        draw.text((margin_x, height - 15), f"{float(edges[0]):.3g}", fill="black", font=small)
        if float(edges[0]) < 0 < float(edges[-1]):  # a tick at zero
            zero = margin_x + plot_w * float(-edges[0] / (edges[-1] - edges[0]))
            draw.line([(zero, margin_top + plot_h), (zero, margin_top + plot_h + 4)], fill="black")
            draw.text((zero - 3, height - 15), "0", fill="black", font=small)
        right = f"{float(edges[-1]):.3g}"
        draw.text((width - margin_x - draw.textlength(right, font=small), height - 15), right, fill="black", font=small)
        images.append(img)
    return make_grid_image(images, min(columns, max(len(images), 1)), padding=4, background=(230, 230, 230))


# ---------------------------------------------------------------------------------------------------
# Line plots (spectra, probe loss curves)

# Distinct colours for up to eight series (Okabe & Ito's colour-blind-safe palette), then repeated.
PALETTE = ((0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233),
           (240, 228, 66), (0, 0, 0))


def nice_number(value):
    """A short label for an axis tick."""
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0e}"


def line_plot(series, title="", x_label="", y_label="", log_y=False, size=(560, 340), vline=None, x_range=None):
    """PNG of line series: each {"label", "x", "y", "dashed" (optional)}; `vline` = (x, label) marks a position.

    Drawn with Pillow like every figure here. With `log_y`, values are plotted on a log10 scale
    (non-positive values are left out).
    """
    width, height = size
    left, right, top = 62, 14, 40
    bottom = 42 + 13 * math.ceil(len(series) / 2)  # tick labels, the x label, two legend entries per row
    height += bottom - 62
    plot_w, plot_h = width - left - right, height - top - bottom
    points = []
    for s in series:
        pairs = [(float(x), float(y)) for x, y in zip(s["x"], s["y"]) if y is not None and math.isfinite(float(y))]
        if log_y:
            pairs = [(x, math.log10(y)) for x, y in pairs if y > 0]
        points.append(pairs)
    xs = [x for pairs in points for x, _ in pairs] or [0.0, 1.0]
    ys = [y for pairs in points for _, y in pairs] or [0.0, 1.0]
    x0, x1 = x_range if x_range is not None else (min(xs), max(xs))
    y0, y1 = min(ys), max(ys)
    x1 = x1 if x1 > x0 else x0 + 1
    pad = (y1 - y0) * 0.05 or 0.5
    y0, y1 = y0 - pad, y1 + pad
    to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * plot_w, top + (1 - (y - y0) / (y1 - y0)) * plot_h)  # noqa: E731
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    small = font(11)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(120, 120, 120))
    for i in range(5):  # ticks
        fx, fy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        px, _ = to_px(fx, y0)
        _, py = to_px(x0, fy)
        draw.line([(px, top + plot_h), (px, top + plot_h + 4)], fill="black")
        draw.text((px - 12, top + plot_h + 6), nice_number(fx), fill="black", font=small)
        draw.line([(left - 4, py), (left, py)], fill="black")
        label = nice_number(10 ** fy) if log_y else nice_number(fy)
        draw.text((left - 6 - draw.textlength(label, font=small), py - 6), label, fill="black", font=small)
    if vline is not None and x0 <= vline[0] <= x1:
        px, _ = to_px(vline[0], y0)
        for y in range(top, top + plot_h, 6):
            draw.line([(px, y), (px, min(y + 3, top + plot_h))], fill=(150, 150, 150))
        draw.text((px + 3, top + 3), vline[1], fill=(110, 110, 110), font=small)
    for i, (s, pairs) in enumerate(zip(series, points)):
        colour = (110, 110, 110) if s.get("dashed") else PALETTE[i % len(PALETTE)]
        xy = [to_px(x, y) for x, y in pairs]
        if s.get("dashed"):
            for a, b in zip(xy[::2], xy[1::2]):
                draw.line([a, b], fill=colour, width=2)
        elif len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        elif xy:
            draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=colour)
        legend_y = top + plot_h + 36 + 13 * (i // 2)
        legend_x = left + (i % 2) * plot_w // 2
        draw.line([(legend_x, legend_y + 6), (legend_x + 18, legend_y + 6)], fill=colour, width=2)
        draw.text((legend_x + 22, legend_y), shorten(s["label"], plot_w // 2 - 26, small, draw), fill="black",
                  font=small)
    draw.text((left, 4), title, fill="black", font=font(13))
    draw.text((left + plot_w - draw.textlength(x_label, font=small), top + plot_h + 20), x_label, fill=(60, 60, 60),
              font=small)
    draw.text((8, top - 16), y_label, fill=(60, 60, 60), font=small)
    return img


def side_by_side(images, padding=8):
    """PIL images in one row, top-aligned, on white."""
    width = sum(i.width for i in images) + padding * (len(images) + 1)
    height = max(i.height for i in images) + 2 * padding
    canvas = Image.new("RGB", (width, height), "white")
    x = padding
    for img in images:
        canvas.paste(img, (x, padding))
        x += img.width + padding
    return canvas


# ---------------------------------------------------------------------------------------------------
# HTML


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1400px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; white-space: normal; vertical-align: bottom; } td.name, th.name { text-align: left; }
td.best { font-weight: bold; background: #e6f4e6; } td.warn { background: #fbe3d6; }
.warnings { background: #fff6dd; border: 1px solid #e8cf7a; padding: 8px 12px; }
dl.protocol dt { font-weight: bold; float: left; clear: left; width: 130px; }
dl.protocol dd { margin-left: 140px; margin-bottom: 4px; }
.row { display: flex; flex-wrap: wrap; gap: 8px; margin-bottom: 18px; }
figure { margin: 0; } figcaption { font-size: 12px; color: #444; max-width: 200px; }
img.pixel { image-rendering: pixelated; }
small { color: #666; }
"""


def esc(value):
    """HTML-escaped text."""
    return html.escape(str(value))


def number(value, digits):
    """A table cell's text; a dash when missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    return f"{value:.{digits}f}"


SUMMARY_COLUMNS = (
    # (key, title, digits, direction: "max" / "min" / None, where the value lives)
    ("psnr", "PSNR (dB) &uarr;", 2, "max", "mean"),
    ("ssim", "SSIM &uarr;", 4, "max", "mean"),
    ("ms_ssim", "MS-SSIM &uarr;", 4, "max", "mean"),
    ("lpips_vgg", "LPIPS-VGG &darr;", 4, "min", "mean"),
    ("lpips_alex", "LPIPS-Alex &darr;", 4, "min", "mean"),
    ("rfid", "rFID &darr;", 2, "min", "model"),
    ("colour_shift", "colour shift (levels) &darr;", 2, "min", "mean"),
    ("hf_retention", "HF retention (1 = input)", 3, None, "mean"),
    ("checkerboard_db", "checkerboard (dB)", 1, None, "mean"),
    ("grid_db", "grid (dB)", 1, None, "mean"),
)


def column_value(model, key, where):
    """A summary value of one model."""
    return model["mean"].get(key) if where == "mean" else model.get(key)


def summary_table(models):
    """The across-models table; the best real model per metric in bold, visible artifacts shaded."""
    real = [m for m in models if m["architecture"] is not None] or models
    best = {}
    for key, _, _, direction, where in SUMMARY_COLUMNS:
        values = [column_value(m, key, where) for m in real]
        values = [v for v in values if v is not None]
        if direction and values and len(real) > 1:
            best[key] = max(values) if direction == "max" else min(values)
    head = "".join(f"<th>{title}</th>" for _, title, _, _, _ in SUMMARY_COLUMNS)
    rows = []
    for model in models:
        cells = []
        for key, _, digits, _, where in SUMMARY_COLUMNS:
            value = column_value(model, key, where)
            classes = []
            if key in best and value is not None and value == best[key] and model in real:
                classes.append("best")
            if key.endswith("_db") and value is not None and value > ARTIFACT_WARN_DB:
                classes.append("warn")
            text = number(value, digits)
            if key == "rfid" and value is not None:
                text += f" <small>(N={model['rfid_images']})</small>"
            cells.append(f"<td class=\"{' '.join(classes)}\">{text}</td>")
        flat = model["flat_colour"]
        cells.append(f"<td>{number(flat['std_levels'], 2)}</td>")
        seconds = model["seconds_per_image"]
        cells.append(f"<td>{number(seconds * 1000, 0) if model['architecture'] else '&ndash;'}</td>")
        rows.append(f"<tr><td class=\"name\">{esc(model['label'])}</td><td>{model['images']}</td>{''.join(cells)}</tr>")
    return (
        f"<table id=\"summary\"><thead><tr><th class=\"name\">model</th><th>images</th>{head}"
        f"<th>flat-colour std (levels) &darr;</th><th>ms / image</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def figure(img, caption, pixel=True):
    """An <img> with a caption, upscaled for display."""
    shown = upscale(img)
    cls = ' class="pixel"' if pixel else ""
    return (f"<figure><img{cls} src=\"{data_uri(shown)}\" width=\"{shown.width}\" height=\"{shown.height}\" "
            f"alt=\"{esc(caption)}\"><figcaption>{caption}</figcaption></figure>")


def comparison_html(comparisons):
    """One row of figures per compared image."""
    if not comparisons:
        return "<p>No images to compare.</p>"
    parts = []
    bar = data_uri(colour_bar())
    for c in comparisons:
        height, width = c["size"]
        parts.append(f"<h3>{esc(c['key'])} <small>crop {tuple(c['box'])} of {width}x{height}</small></h3>")
        figures = [figure(c["original"], "original")]
        for label, img in c["recons"].items():
            s = c["scores"].get(label, {})
            caption = (f"{esc(label)}<br>PSNR {number(s.get('psnr'), 2)} &middot; "
                       f"LPIPS {number(s.get('lpips_vgg'), 3)}")
            figures.append(figure(img, caption))
        for label, img in c["errors"].items():
            figures.append(figure(img, f"error {esc(label)}<br>0&ndash;{c['scale_levels']:.0f} levels"))
        parts.append(f"<div class=\"row\">{''.join(figures)}</div>")
    parts.append(f"<p><img src=\"{bar}\" width=\"160\" height=\"12\" alt=\"colour scale\"> "
                 "heat map: mean absolute error over RGB, black 0, pale yellow at the row's scale or more.</p>")
    return "".join(parts)


def flat_colour_html(models, greys):
    """Per-model flat-colour probe: a table and the mid-grey decode with its deviations magnified."""
    rows = []
    for model in models:
        flat = model["flat_colour"]
        if not flat.get("per_colour"):
            continue
        cells = "".join(
            f"<td>{number(v['std_levels'], 2)} / {number(v['checkerboard_db'], 1)} / {number(v['grid_db'], 1)}</td>"
            for v in flat["per_colour"].values()
        )
        rows.append(f"<tr><td class=\"name\">{esc(model['label'])}</td>{cells}</tr>")
    if not rows:
        return "<p>No models to probe.</p>"
    names = next(m["flat_colour"]["per_colour"] for m in models if m["flat_colour"].get("per_colour"))
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    figures = []
    for label, grey in greys.items():
        # Deviations from the decode's own mean, times 16, around mid-grey: a pattern of 1-2 levels shows.
        levels = (grey.float().clamp(-1, 1) + 1) * 127.5  # (3, H, W)
        shown = ((levels - levels.mean(dim=(-2, -1), keepdim=True)) * 16 + 128).clamp(0, 255).round().byte()
        img = Image.fromarray(shown.permute(1, 2, 0).numpy())  # (H, W, 3)
        figures.append(figure(img, f"{esc(label)}: grey decode, deviations x16", pixel=True))
    return (
        "<p>Each cell: spread of the decode (std, 8-bit levels) / checkerboard dB / grid dB.</p>"
        f"<table id=\"flat\"><thead><tr><th class=\"name\">model</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        f"<div class=\"row\">{''.join(figures)}</div>"
    )


def diffusability_html(models, spectrum):
    """Per-model diffusability: high-frequency shares, equivariance PSNRs, verdicts, and the spectrum plot."""
    measured = [m for m in models if m.get("diffusability")]
    if not measured:
        return "<p>Not measured (<code>--no-diffusability</code>, or only the identity).</p>"
    rows, verdicts = [], []
    for model in measured:
        d = model["diffusability"]
        share, psnr = d["high_frequency_share"], d["equivariance_psnr"]
        ratio = share["ratio"]
        ratio_class = ' class="warn"' if ratio is not None and ratio >= 1.5 else ""
        rows.append(
            f"<tr><td class=\"name\">{esc(model['label'])}</td><td>{number(share['latents'], 3)}</td>"
            f"<td>{number(share['images'], 3)}</td><td{ratio_class}>{number(ratio, 2)}</td>"
            f"<td>{number(psnr.get('reconstruction'), 2)}</td><td>{number(psnr.get('downscale_x2'), 2)}</td>"
            f"<td>{number(psnr.get('rotate_90'), 2)}</td></tr>")
        verdicts.append(f"<li><b>{esc(model['label'])}</b>: {esc(d['verdict'])}</li>")
    plot = figure(spectrum, "radially averaged power spectra", pixel=False) if spectrum is not None else ""
    return (
        "<table id=\"diffusability\"><thead><tr><th class=\"name\">model</th><th>high-frequency share, latents "
        "&darr;</th><th>high-frequency share, images</th><th>ratio &darr;</th><th>decode PSNR (dB)</th>"
        "<th>2x-downscaled latent PSNR (dB) &uarr;</th><th>rotated latent PSNR (dB) &uarr;</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table><ul>{''.join(verdicts)}</ul>"
        f"<div class=\"row\">{plot}</div>"
        "<p><small>High-frequency share: energy above half the Nyquist frequency over all non-DC energy (white noise "
        "0.80). Latents with much more of it than their images slow diffusion training down (Skorokhodov et al. 2025); "
        "a latent space whose transformed latents decode to the transformed images is equivariant (EQ-VAE). "
        "<code>vaekit probe</code> trains a small denoiser on the latents to check.</small></p>"
    )


def compatibility_html(summary):
    """The teacher and every model measured against it: how well each decodes the teacher's latents and encodes
    into its latent space, beside its size and speed (vaekit.eval.compatibility)."""
    models = summary["models"]
    teacher = next((m for m in models if m["label"] == summary.get("teacher")), None)
    students = [m for m in models if m.get("latent_compatibility")]
    if teacher is None or not students:
        return ""
    reference = students[0]["latent_compatibility"]
    teacher_ms = teacher["seconds_per_image"] * 1000

    def row(model, role, c):
        ms = model["seconds_per_image"] * 1000
        speed = f"{teacher_ms / ms:.1f}x" if ms > 0 and model is not teacher else "&ndash;"
        return (f"<tr><td class=\"name\">{esc(model['label'])}</td><td>{role}</td>"
                f"<td>{model['architecture']['parameters']['total']:,}</td><td>{number(ms, 0)}</td><td>{speed}</td>"
                f"<td>{number(c.get('decode_psnr_vs_teacher'), 2)}</td>"
                f"<td>{number(c.get('decode_psnr_vs_image'), 2)}</td><td>{number(c.get('decode_lpips_vs_image'), 4)}</td>"
                f"<td>{number(c.get('latent_error'), 3)}</td></tr>")

    rows = [row(teacher, "teacher", {"decode_psnr_vs_image": reference["teacher_psnr_vs_image"],
                                     "decode_lpips_vs_image": reference["teacher_lpips_vs_image"]})]
    rows += [row(m, "student", m["latent_compatibility"]) for m in students]
    return (
        "<h2>Latent compatibility</h2>"
        f"<p>Each model below shares the latent grid of the teacher <b>{esc(teacher['label'])}</b>: it decodes the "
        "teacher's latents as a pipeline would hand them over, and encodes the images into its latent space.</p>"
        "<table id=\"compatibility\"><thead><tr><th class=\"name\">model</th><th>role</th><th>parameters</th>"
        "<th>ms / image</th><th>speed vs teacher</th><th>teacher latents: PSNR vs teacher decode (dB) &uarr;</th>"
        "<th>teacher latents: PSNR vs image (dB) &uarr;</th><th>teacher latents: LPIPS-VGG vs image &darr;</th>"
        f"<th>own latents vs teacher's (relative RMS) &darr;</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        "<p><small>The teacher's row scores its own decode of its latents. ms / image: encode + decode in this run. "
        "A relative RMS of 0 means the teacher's latents; unrelated latent spaces give about 1.4.</small></p>"
    )


def sharpness_html(models, sharpness):
    """Per-model hf_retention with a plain reading, and the per-band plot."""
    rows = []
    for model in models:
        value = model["mean"].get("hf_retention")
        if model["architecture"] is None or value is None:
            continue
        reading = ("as sharp as the input" if abs(value - 1) < 0.05 else
                   f"blurrier: keeps {value:.0%} of the input's fine detail" if value < 1 else
                   f"{value - 1:.0%} more high-frequency energy than the input: ringing, noise or invented texture")
        rows.append(f"<tr><td class=\"name\">{esc(model['label'])}</td><td>{number(value, 3)}</td>"
                    f"<td class=\"name\">{esc(reading)}</td></tr>")
    if not rows:
        return "<p>No models to measure.</p>"
    plot = figure(sharpness, "high-frequency retention per band", pixel=False) if sharpness is not None else ""
    return (
        "<table id=\"sharpness\"><thead><tr><th class=\"name\">model</th><th>HF retention</th>"
        f"<th class=\"name\">reading</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        f"<div class=\"row\">{plot}</div>"
        "<p><small>HF retention: the reconstructions' power above half the Nyquist frequency over the originals' "
        "(mean of per-image ratios; the plot per band over all images). 1 is as sharp as the input, below 1 blurrier, "
        "above 1 ringing or noise. PSNR rewards a blurry average; this measures only the detail a decoder puts "
        "back.</small></p>"
    )


def render_evaluation(summary, comparisons, greys, spectrum=None, sharpness=None):
    """The self-contained report.html of `vaekit evaluate`; `spectrum`, `sharpness`: PIL plots of the spectra."""
    protocol = "".join(f"<dt>{esc(k.replace('_', ' '))}</dt><dd>{esc(v)}</dd>" for k, v in summary["protocol"].items())
    warnings = summary["warnings"]
    warning_html = (
        "<div class=\"warnings\"><b>Warnings</b><ul>" + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul></div>"
        if warnings else ""
    )
    data = summary["data"]
    skipped = "".join(f"<li>{esc(s['key'])}: {esc(s['reason'])}</li>" for s in data["skipped"])
    models = "".join(
        f"<li><b>{esc(m['label'])}</b>: {esc(m['model'])}"
        + (f" <small>({m['architecture']['downsample_factor']}x, {m['architecture']['latent_channels']} channels, "
           f"{m['architecture']['parameters']['total']:,} parameters)</small>" if m["architecture"] else
           " <small>(the input itself: scores of a perfect reconstruction)</small>")
        + "</li>"
        for m in summary["models"]
    )
    created = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>vaekit evaluation</title>
<style>{STYLE}</style>
</head>
<body>
<h1>VAE evaluation</h1>
<p>{data['images']} images from {esc(data['source'])}{f", {len(data['skipped'])} skipped" if data['skipped'] else ""}.
<small>vaekit {esc(__version__)}, {esc(created)}.</small></p>
<ul>{models}</ul>
{warning_html}
<h2>Summary</h2>
{summary_table(summary['models'])}
<p><small>Means over images. Checkerboard and grid: about 0 dB means no periodic pattern in the error;
shaded above {ARTIFACT_WARN_DB:g} dB. Per-image values: per_image.csv; everything: metrics.json.</small></p>
{compatibility_html(summary)}
<h2>Largest differences</h2>
<p>The {len(comparisons)} images with the largest mean LPIPS (or lowest PSNR), cropped where the error is largest.</p>
{comparison_html(comparisons)}
<h2>Sharpness</h2>
{sharpness_html(summary['models'], sharpness)}
<h2>Flat colours</h2>
{flat_colour_html(summary['models'], greys)}
<h2>Diffusability</h2>
{diffusability_html(summary['models'], spectrum)}
<h2>Protocol</h2>
<dl class="protocol">{protocol}</dl>
{f"<h2>Skipped images</h2><ul>{skipped}</ul>" if skipped else ""}
</body>
</html>
"""
