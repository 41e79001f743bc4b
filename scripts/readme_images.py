"""The README's pictures, from the `make demo` run: its held-out grid and a `vaekit evaluate` report screenshot.

    make demo [demo-finetune] && python scripts/readme_images.py      # what `make readme-images` runs

Writes, each a PNG under --limit_kb (300 KB) so the repository stays small:
- docs/images/demo-grid.png: checkpoints/demo/reconstructions.png (original | reconstruction | error map);
- docs/images/demo-finetune-grid.png: checkpoints/demo-finetune/reconstructions.png, when that run exists
  (original | base | fine-tuned, latents unchanged);
- docs/images/evaluate-report.png: the top of the report `vaekit evaluate` writes for the demo VAE (and the
  fine-tune) on the demo's held-out photos, taken by scripts/screenshot_report.py in headless Chromium.
Pictures are shrunk (fewer colours first, then fewer pixels) until they fit.
"""

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default=str(ROOT / "checkpoints" / "demo"), help="the `make demo` run folder")
    parser.add_argument("--finetune", default=str(ROOT / "checkpoints" / "demo-finetune"),
                        help="the `make demo-finetune` run folder (used when it exists)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="where the pictures go")
    parser.add_argument("--limit_kb", type=int, default=300, help="largest picture size in KB")
    parser.add_argument("--width", type=int, default=1100, help="browser window width for the screenshot")
    parser.add_argument("--height", type=int, default=1250, help="browser window height: how much of the report shows")
    return parser.parse_args(argv)


def png_bytes(img):
    """An image as optimised PNG bytes."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def shrink_to_fit(img, limit):
    """PNG bytes of `img` under `limit` bytes: full colour, else a 256-colour palette, then smaller sides."""
    img = img.convert("RGB")
    data = png_bytes(img)
    while len(data) > limit:
        # An adaptive 256-colour palette with dithering keeps photos and text readable at a third of the size.
        data = png_bytes(img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG))
        if len(data) <= limit:
            break
        img = img.resize((round(img.width * 0.85), round(img.height * 0.85)), Image.Resampling.LANCZOS)
        data = png_bytes(img)
    return data


def write_picture(source, target, limit):
    """Copy a PNG to `target`, shrunk under `limit` bytes; returns a line saying what was written."""
    with Image.open(source) as img:
        data = shrink_to_fit(img, limit)
    target.write_bytes(data)
    with Image.open(target) as img:
        size = img.size
    return f"{target.relative_to(ROOT)}  {size[0]}x{size[1]}  {len(data) / 1024:.0f} KB  (from {source})"


def held_out_photos(run, folder):
    """Write the run's held-out photos (its own data split) into `folder` as PNGs; returns the folder."""
    from vaekit.config import load_config  # torch and the data pipeline: only once the script runs
    from vaekit.data.sources import open_source, split_holdout
    from vaekit.train import TrainConfig

    config = load_config(TrainConfig, Path(run) / "config.yaml").data
    _, held = split_holdout(open_source(config.path, config.source), config.holdout, config.seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(held.keys()):
        held[i].decode().save(folder / f"{Path(key).name}.png")
    return folder


def main(argv=None):
    """Write the README's pictures and say what each is."""
    args = parse_args(argv)
    demo, finetune, out = Path(args.demo), Path(args.finetune), Path(args.out)
    if not (demo / "reconstructions.png").is_file():
        sys.exit(f"{demo} has no finished run: run `make demo` first.")
    out.mkdir(parents=True, exist_ok=True)
    limit = args.limit_kb * 1024
    lines = [write_picture(demo / "reconstructions.png", out / "demo-grid.png", limit)]
    has_finetune = (finetune / "reconstructions.png").is_file()
    if has_finetune:
        lines.append(write_picture(finetune / "reconstructions.png", out / "demo-finetune-grid.png", limit))

    evaluation = demo / "readme-evaluation"
    photos = held_out_photos(demo, evaluation / "held-out")
    command = [sys.executable, "-m", "vaekit.cli", "evaluate", "--vae", str(demo / "vae"), "--label", "demo",
               "--data", str(photos), "--out", str(evaluation / "report"), "--worst", "2", "--quiet"]
    if has_finetune:
        command += ["--vae", str(finetune / "vae"), "--label", "demo, decoder fine-tuned"]
    subprocess.run(command, check=True, cwd=ROOT)
    shot = evaluation / "report.png"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"),
                             str(evaluation / "report" / "report.html"), "--out", str(shot),
                             "--size", f"{args.width}x{args.height}"], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"the screenshot failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    if not json.loads(result.stdout)["ok"]:
        sys.exit(f"the report did not render cleanly: {result.stdout}")
    lines.append(write_picture(shot, out / "evaluate-report.png", limit))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
