#!/usr/bin/env python
"""Open a vaekit report.html in headless Chromium: take a screenshot and check that the page is whole.

    python scripts/screenshot_report.py OUT/report.html --out shot.png [--size 1400x2400]

Checks, each reported in the JSON printed at the end (exit status 1 when one fails):
- the browser logged no console message (the report has no scripts, so any message is an error:
  a script error, a blocked resource);
- the DOM Chromium built holds the summary table and <img> elements whose data: URIs decode as PNG
  (the report must be self-contained: no other src is allowed);
- the screenshot is not blank.
Needs Debian's `chromium` (apt-get install chromium) or another Chromium/Chrome on PATH.
"""

import argparse
import base64
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Flags for a quiet, isolated, offline run: no sandbox (containers run as root), no GPU, no
# background network traffic or updates, a throwaway profile.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
)


def find_browser(name=None):
    """The Chromium executable: `name` if given, else the first of BROWSERS on PATH; None if none."""
    if name:
        return shutil.which(name) or (name if Path(name).is_file() else None)
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def run_browser(browser, args, url, timeout):
    """Run the browser headless on `url` with a fresh profile; returns the CompletedProcess."""
    with tempfile.TemporaryDirectory(prefix="vaekit-chromium-") as profile:
        command = [browser, *FLAGS, f"--user-data-dir={profile}", *args, url]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def console_messages(stderr):
    """Console lines Chromium logged with --enable-logging=stderr (INFO:CONSOLE ... "message", source: ...)."""
    return [line.strip() for line in stderr.splitlines() if re.search(r":CONSOLE[:(]|Uncaught ", line)]


def check_dom(dom):
    """Tables, images and problems in the DOM Chromium serialised."""
    problems = []
    tables = re.findall(r"<table\b[^>]*>", dom)
    sources = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", dom)
    if not any('id="summary"' in t for t in tables):
        problems.append("no summary table (table#summary) in the DOM")
    if not sources:
        problems.append("no <img> elements in the DOM")
    for i, src in enumerate(sources):
        if not src.startswith("data:image/png;base64,"):
            problems.append(f"image {i} is not an embedded PNG data URI: {src[:60]!r}")
            continue
        try:
            from PIL import Image

            with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
                img.verify()
        except Exception as e:  # any decoding failure means a broken image
            problems.append(f"image {i} does not decode: {e}")
    return {"tables": len(tables), "images": len(sources)}, problems


def check_screenshot(path):
    """Pixel statistics of the screenshot and whether it is blank."""
    from PIL import Image, ImageStat

    with Image.open(path) as img:
        grey = img.convert("L")
        stat = ImageStat.Stat(grey)
        histogram = grey.histogram()
    non_white = 1 - histogram[255] / max(sum(histogram), 1)
    info = {"size": list(grey.size), "std": round(stat.stddev[0], 2), "non_white_fraction": round(non_white, 4)}
    blank = stat.stddev[0] < 5 or non_white < 0.01
    return info, (["the screenshot is blank"] if blank else [])


def check_report(report, out, size=(1400, 2400), browser=None, timeout=120):
    """Screenshot `report` to `out` and run every check; returns a dict with `ok` and `problems`."""
    found = find_browser(browser)
    if found is None:
        raise FileNotFoundError(f"no Chromium found (tried {', '.join(BROWSERS)}); apt-get install chromium")
    url = Path(report).resolve().as_uri()
    shot = run_browser(found, ["--enable-logging=stderr", "--v=0", f"--screenshot={Path(out).resolve()}",
                               f"--window-size={size[0]},{size[1]}"], url, timeout)
    problems = []
    if shot.returncode != 0 or not Path(out).is_file():
        problems.append(f"the screenshot run failed (exit {shot.returncode}): {shot.stderr[-500:]}")
    console = console_messages(shot.stderr)
    problems += [f"console: {line}" for line in console]
    dom_run = run_browser(found, ["--dump-dom"], url, timeout)
    dom_info, dom_problems = check_dom(dom_run.stdout)
    problems += dom_problems
    shot_info, shot_problems = check_screenshot(out) if Path(out).is_file() else ({}, [])
    problems += shot_problems
    return {"ok": not problems, "browser": found, "report": str(report), "screenshot": str(out),
            "console_messages": len(console), "dom": dom_info, "pixels": shot_info, "problems": problems}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", help="report.html")
    parser.add_argument("--out", default="report.png", help="screenshot PNG (default report.png)")
    parser.add_argument("--size", default="1400x2400", help="window WIDTHxHEIGHT (default 1400x2400)")
    parser.add_argument("--browser", help="Chromium executable (default: found on PATH)")
    args = parser.parse_args(argv)
    if not Path(args.report).is_file():
        print(f"error: {args.report} does not exist", file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.size.lower().split("x"))
    try:
        result = check_report(args.report, args.out, (width, height), args.browser)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
