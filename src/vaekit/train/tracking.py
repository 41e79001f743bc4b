"""What a run reports: rank-0 log lines (console and train.log), the experiment tracker, the progress bar."""

import importlib.util
import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from vaekit.config import to_dict
from vaekit.errors import VaekitError
from vaekit.io import ensure_folder, storage_errors

log = logging.getLogger("vaekit.train")


def make_tracker_kwargs(log_cfg):
    """Accelerator `log_with`, checking the tracker's package is installed."""
    if log_cfg.tracker == "none":
        return None
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}[log_cfg.tracker]
    if importlib.util.find_spec(package) is None:
        if log_cfg.tracker == "wandb":  # asked for by name: the user wants it, so stop
            raise VaekitError("log.tracker=wandb needs the 'wandb' package: pip install wandb, or set log.tracker=none.")
        # The default tracker is not worth stopping a run for; train.log still gets every line.
        log.warning("log.tracker=tensorboard but the 'tensorboard' package is missing (pip install tensorboard); "
                    "logging to train.log only.")
        return None
    return log_cfg.tracker


def flat_hparams(config):
    """The config as one level of scalar values, for trackers that show hyperparameters."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (int, float, str, bool)):
            out[prefix] = value
        else:
            out[prefix] = json.dumps(value)

    walk("", to_dict(config))
    return out


def setup_logging(out_dir, is_main):
    """Rank-0 log lines to the console (through tqdm) and to out_dir/train.log."""
    class TqdmHandler(logging.Handler):
        def emit(self, record):
            tqdm.write(self.format(record))

    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.ERROR)
    console = TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if is_main:
        ensure_folder(out_dir)
        with storage_errors(Path(out_dir) / "train.log"):
            file = logging.FileHandler(Path(out_dir) / "train.log", encoding="utf-8", errors="backslashreplace")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file)


class Progress:
    """The progress bar, the images/s rate and the periodic log and tracker lines of the main process.

    The bar's rate is updated every step (smoothed over the last steps); the log line and the
    tracker get every `log_every`-th step, with the rate measured since the previous line.
    """

    SMOOTHING = 0.3  # weight of the newest step in the bar's images/s

    def __init__(self, accelerator, cfg, initial_step, world):
        self.accelerator, self.world = accelerator, world
        self.log_every, self.total = cfg.log.every, cfg.train.steps
        self.show = accelerator.is_main_process and cfg.log.progress
        self.bar = tqdm(total=cfg.train.steps, initial=initial_step, disable=not self.show, dynamic_ncols=True,
                        desc="train")
        now = time.perf_counter()
        self.step_time = self.line_time = now
        self.line_images = 0
        self.rate = None

    def update(self, step, images, logs):
        """After a step that used `images` images on this process: refresh the bar, and log every log_every steps."""
        now = time.perf_counter()
        step_rate = images * self.world / max(now - self.step_time, 1e-9)
        self.rate = step_rate if self.rate is None else self.SMOOTHING * step_rate + (1 - self.SMOOTHING) * self.rate
        self.step_time = now
        self.line_images += images
        if step % self.log_every == 0 or step == self.total:
            logs["images_per_s"] = self.line_images * self.world / max(now - self.line_time, 1e-9)
            self.line_time, self.line_images = now, 0
            self.accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=step)
            log.info("step %d  %s", step, "  ".join(f"{k} {v:.4g}" for k, v in logs.items()))
        self.bar.update(1)
        if self.show:
            postfix = {k: f"{logs[k]:.4g}" for k in ("loss", "rec", "lpips", "kl", "g", "d") if k in logs}
            postfix["img/s"] = f"{self.rate:.3g}"
            self.bar.set_postfix(postfix, refresh=False)

    def close(self):
        self.bar.close()
