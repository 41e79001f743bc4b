"""The fp16-safe fine-tune (`model.mode: fp16_safe`): the same VAE, with every activation inside float16's range.

A VAE whose activations exceed 65504 decodes to black or NaN in fp16 (the SDXL VAE). The run:

1. measures the original's activations on the probe images (`eval.diagnostics.measure_activations`,
   the pass of `vaekit inspect --precision`); a model inspect already calls fp16-safe ends the
   command at once, with nothing trained or written;
2. rescales exactly what can be rescaled (`vaekit.model.rescale`: residual streams, resnet conv1s,
   attention values and query/key pairs, the quant convs' sides), so every such layer ends at most
   at `fp16.target_fraction` of 65504. The fp32 function is unchanged up to the GroupNorm eps;
   then, with `fp16.approximate`, the GroupNorm -> SiLU -> conv chains whose GroupNorm still
   overflows (a small, bounded change of the function, which the fine-tune then removes);
3. fine-tunes what remains against the original as a frozen fp32 teacher: the loss is the mean
   squared distance of the decoded images to the teacher's (from the teacher's latents), plus,
   when the encoder trains, of the posterior moments, plus `fp16.penalty_weight` times the squared
   excess of every activation above half the target (measured through the same hooks);
4. checks every `fp16.check_every` steps. A check *has headroom* when every layer is at most the
   target on the probe images and an fp16 encode and decode of them is finite. From the first such
   check on, the learning rate decays (a cosine to 0 at `train.steps`) while the run keeps fitting
   the teacher under the penalty; it stops at the first check with headroom whose fidelity meets
   the targets (fp32 decode PSNR against the original at least `fp16.decode_psnr_db`, and, when
   the encoder trains, latent SNR at least `fp16.latent_snr_db`), or when `train.steps` run out;
5. exports the state of the check with headroom that came closest to the teacher (never one
   without headroom: with none, nothing is exported) and reports, against the original in fp32,
   the fp16 output PSNR before and after and the fp32 fidelity (`fp16_safe.json`).

Which parts change (`fp16.parts`): `decoder` leaves the encoder and quant_conv untouched, so the
latents stay bit-identical; `all` rescales and trains the encoder too, its posterior means held
within `fp16.latent_snr_db` of the original's; `auto` takes `decoder` unless the encoder itself
lacks headroom.
"""

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vaekit.errors import VaekitError
from vaekit.eval.diagnostics import FP16_MARGIN, measure_activations, precision_summary
from vaekit.io import write_json
from vaekit.model.activations import FP16_MAX, ActivationPeaks
from vaekit.model.architecture import cast_vae, copy_vae, fingerprint
from vaekit.model.rescale import apply_chain_rescale, apply_rescale, owning_blocks, plan_chain_rescale, plan_rescale
from vaekit.train.teacher import load_teacher
from vaekit.train.validation import take_images

log = logging.getLogger("vaekit.train")

ENCODER = ("encoder", "quant_conv")  # module name prefixes of what `fp16.parts: decoder` leaves untouched
DECODER = ("post_quant_conv", "decoder")

# The penalty acts on activations above this share of the target, on the layers a check found there
# (the others cost no penalty graph): a training batch pushed under half the target leaves unseen
# images, the probe's among them, room to run hotter than the images trained on.
WATCH = 0.5
# Once a check had the headroom, the fitting phase penalises only above this share: the slack between it and the
# target lets the layers after a shrunk one grow back towards the original's function (on the test VAE whose encoder
# overflows, trained alone for 300 steps: latent SNR 32.8 dB against 29.1 at WATCH), and the exported state is always
# one a check found within the target.
FIT_WATCH = 0.75


def is_encoder(name):
    """Whether a module name belongs to the encoder side (encoder, quant_conv)."""
    return name.split(".", 1)[0] in ENCODER


@dataclass
class Fp16Fix:
    """What the fp16-safe fine-tune needs beside the usual parts; built by `prepare` in every process."""

    cfg: object  # the run's Fp16Config
    teacher: torch.nn.Module  # the original, frozen, fp32
    probe: torch.Tensor  # (N, 3, H, W) images in [-1, 1], on the CPU
    batch_size: int
    sample_posterior: bool
    limit: float  # target_fraction * 65504
    parts: str = "decoder"  # what changes: "decoder" or "all"
    trained: list = field(default_factory=list)  # module names whose parameters train (the rest is frozen)
    already_safe: bool = False
    before: dict = field(default_factory=dict)  # the original's numbers on the probe images
    rescale: dict = field(default_factory=dict)  # the exact rescaling: per-gauge rows, exactness
    penalized: set = field(default_factory=set)
    student: torch.nn.Module | None = None
    last_check: dict = field(default_factory=dict)
    teacher_fingerprint: str = ""
    steps: int = 0  # train.steps: where the decay of the fitting phase ends
    step_now: int = 0  # the optimizer steps taken, for `lr_factor`
    headroom_step: int | None = None  # the first check with headroom: the fitting phase starts there
    best: dict | None = None  # {"step", "score", "decode_psnr_db"[, "latent_snr_db"]} of the closest state with headroom
    best_weights: dict | None = None  # its trained parameters (on the CPU): what is exported
    exportable: bool = False  # set by `finish`: a state with headroom exists and is in the model

    @property
    def trains_encoder(self):
        return any(is_encoder(name) for name in self.trained)

    # ------------------------------------------------------------------------------------------
    # One training micro-step

    def step(self, accelerator, model, x, generator=None, scale=1.0):
        """The fp16-safe loss on one micro-batch and its backward; returns (x, detached decode, float logs).

        `model` is the prepared AutoencoderForTraining of the student. The teacher's latents (a
        sample of its posterior, drawn from `generator`, or its mean) are decoded by both.
        """
        with torch.no_grad():
            posterior = self.teacher.encode(x).latent_dist
            z = posterior.sample(generator=generator) if self.sample_posterior else posterior.mean
            target = self.teacher.decode(z).sample
        watched = self.watch() * self.limit
        with accelerator.autocast(), ActivationPeaks(self.student, limit=watched, penalized=self.penalized) as peaks:
            out = model(x, latents=z)
        distance = F.mse_loss(out.recon.float(), target.float())
        loss = distance
        logs = {"distance": distance.detach()}
        if self.trains_encoder:
            moments = F.mse_loss(out.mean.float(), posterior.mean) + F.mse_loss(out.logvar.float(), posterior.logvar)
            loss = loss + self.cfg.moments_weight * moments
            logs["moments"] = moments.detach()
        penalty = peaks.penalty().to(loss.device)
        loss = loss + self.cfg.penalty_weight * penalty
        logs["penalty"] = penalty.detach()
        logs["peak"] = torch.stack(list(peaks.peaks.values())).float().max() / self.limit  # of the target
        logs["loss"] = loss.detach()
        accelerator.backward(loss * scale)
        return x.detach(), out.recon.detach(), logs

    # ------------------------------------------------------------------------------------------
    # Headroom checks

    def done(self, cfg, parts, state):
        """At a check step: measure the probe images (every process its share) and say whether every layer has headroom.

        Every process must call it at every step; it measures at steps that are multiples of
        fp16.check_every (only there, so a resumed run checks, and penalises, as an uninterrupted
        one) and updates the penalised layers.
        """
        self.step_now = state.step
        if state.step % self.cfg.check_every:
            return False
        check = self.check(parts.vae, parts.accelerator)
        self.last_check = {"step": state.step, **check}
        watched = self.watch() * self.limit
        self.penalized = {name for name, value in check["maxima"].items()
                          if not value <= watched and (self.trains_encoder or not is_encoder(name))}
        largest = max(check["maxima"], key=check["maxima"].get)
        log.info("step %d  fp16 check: largest activation %.4g (%.2f%% of float16's range) at %s; %d layer(s) above "
                 "the target %.4g; fp16 pass %s; fp32 decode PSNR %s%s", state.step, check["maxima"][largest],
                 100 * check["maxima"][largest] / FP16_MAX, largest, len(check["above"]), self.limit,
                 "finite" if check["finite"] else "NOT finite", fmt_db(check["decode_psnr_db"]),
                 f"; latent SNR {fmt_db(check['latent_snr_db'])}" if "latent_snr_db" in check else "")
        if not has_headroom(check):
            return False
        if self.headroom_step is None:
            self.headroom_step = state.step
            if self.score(check) < 0:
                log.info("step %d  every layer has its fp16 headroom; fitting the original on, the learning rate "
                         "decaying to 0 at step %d, until the fidelity targets are met", state.step, self.steps)
        self.keep_if_best(parts.vae, check, state.step)
        # The headroom alone comes first, and stopping there would keep whatever the penalty's steps cost the
        # outputs: the run goes on until they are back within the fidelity targets.
        return self.score(check) >= 0

    def watch(self):
        """The share of the target above which activations are penalised: WATCH, FIT_WATCH once a check had headroom."""
        return WATCH if self.headroom_step is None else FIT_WATCH

    def score(self, check):
        """A check's fidelity margin in dB: min(decode PSNR - target[, latent SNR - target]); >= 0 meets the targets."""
        margins = [check["decode_psnr_db"] - self.cfg.decode_psnr_db]
        if "latent_snr_db" in check:
            margins.append(check["latent_snr_db"] - self.cfg.latent_snr_db)
        return min(margins)

    def keep_if_best(self, vae, check, step):
        """Remember `vae`'s trained parameters when this check (which has headroom) is the closest to the teacher yet."""
        score = self.score(check)
        if self.best is not None and not score > self.best["score"]:
            return
        self.best = {"step": step, "score": score, "decode_psnr_db": check["decode_psnr_db"],
                     **({"latent_snr_db": check["latent_snr_db"]} if "latent_snr_db" in check else {})}
        self.best_weights = {name: p.detach().to("cpu", copy=True) for name, p in vae.named_parameters()
                             if p.requires_grad}

    def lr_factor(self):
        """The learning rate's factor at the coming step: 1 until the headroom, then a cosine from 1 to 0 at train.steps."""
        if self.headroom_step is None or self.steps <= self.headroom_step:
            return 1.0
        done = min(1.0, (self.step_now - self.headroom_step) / (self.steps - self.headroom_step))
        return 0.5 * (1 + math.cos(math.pi * done))

    def check(self, vae, accelerator):
        """{"maxima", "above", "finite", "decode_psnr_db"[, "latent_snr_db"]} of `vae` on the probe images.

        Every process measures its share; the numbers are agreed by reduction.
        """
        rank, world = accelerator.process_index, accelerator.num_processes
        mine = self.probe[rank::world]
        names = [name for name, _ in self.student.named_modules() if name]
        device = accelerator.device
        values = torch.full((len(names) + 1,), -1.0, device=device)  # -1: a layer that did not run here
        if len(mine):
            maxima = measured(vae, mine, self.batch_size, device)
            for i, name in enumerate(names):
                if name in maxima:
                    values[i] = maxima[name]
            values[-1] = 0.0 if fp16_finite(vae, mine, self.batch_size, device) else 1.0
        if world > 1:
            values = accelerator.reduce(values, "max")
        values = values.cpu().tolist()
        maxima = {name: v for name, v in zip(names, values) if v >= 0}
        maxima = {k: (v if math.isfinite(v) else math.inf) for k, v in maxima.items()}
        check = {"maxima": maxima, "above": sorted(n for n, v in maxima.items() if not v <= self.limit),
                 "finite": values[-1] == 0.0}
        # Fidelity: sums of squares over every process's share
        sums = fidelity_sums(self.teacher, vae, mine, self.batch_size, device)
        if world > 1:
            sums = accelerator.reduce(sums, "sum")
        latent_error, signal, decode_error, elements = sums.cpu().tolist()
        check["decode_psnr_db"] = ratio_db(4 * elements, decode_error)  # images in [-1, 1]: peak-to-peak 2
        if self.trains_encoder:
            check["latent_snr_db"] = ratio_db(signal, latent_error)
        return check

    # ------------------------------------------------------------------------------------------
    # The end

    def meta(self):
        """What a checkpoint keeps of the fix (JSON): the teacher's fingerprint, parts, rescaling, before, penalised
        layers, the fitting phase's start and the best state's numbers (its weights go beside, `best_weights`)."""
        return {"teacher": self.teacher_fingerprint, "parts": self.parts, "trained": self.trained,
                "rescale": self.rescale, "before": self.before, "penalized": sorted(self.penalized),
                "headroom_step": self.headroom_step, "best": self.best}

    def finish(self, parts, out_dir, step):
        """The final check, the best state put back (every process) and, on the main process, the report; returns it.

        The state exported is the one closest to the teacher among the checks with headroom, this
        final one included; without any, `exportable` stays False and nothing may be exported.
        Marks the model fp16-ready (diffusers' config force_upcast=False) when it is exported.
        """
        accelerator, vae = parts.accelerator, parts.vae
        check = self.check(vae, accelerator)
        if has_headroom(check):
            self.keep_if_best(vae, check, step)
        exported_step = step
        if self.best is not None and self.best["step"] != step:  # an earlier check came closer: its weights
            with torch.no_grad():
                for name, value in self.best_weights.items():
                    vae.get_parameter(name).copy_(value)
            check, exported_step = self.check(vae, accelerator), self.best["step"]
        self.exportable = self.best is not None
        if self.exportable:
            vae.register_to_config(force_upcast=False)  # pipelines may then run it in fp16 as it is
        if not accelerator.is_main_process:
            return None
        after = outputs_against(self.teacher, vae, self.probe, self.batch_size, accelerator.device)
        report = {
            "target_fraction": self.cfg.target_fraction, "limit": self.limit, "parts": self.parts,
            "probe_images": len(self.probe), "reached": has_headroom(check), "exported": self.exportable,
            "steps": step, "headroom_step": self.headroom_step, "exported_step": exported_step if self.exportable else None,
            "fidelity_targets": {"decode_psnr_db": self.cfg.decode_psnr_db,
                                 **({"latent_snr_db": self.cfg.latent_snr_db} if self.trains_encoder else {})},
            "fidelity_reached": self.exportable and self.score(check) >= 0,
            "before": self.before,
            "after": {**after, "largest": largest_row(check["maxima"]),
                      "verdict": precision_summary(check["maxima"])["verdict"], "above_target": check["above"]},
            "rescale": self.rescale,
        }
        if self.trains_encoder:
            report["latent_tolerance_db"] = self.cfg.latent_snr_db
            report["latents_within_tolerance"] = after["latent_snr_db_fp32"] >= self.cfg.latent_snr_db
        write_json(out_dir / "fp16_safe.json", report)
        return report


# ----------------------------------------------------------------------------------------------
# Setting up: measure the original, pick the parts, rescale exactly


def prepare(cfg, vae, train_ds, val_ds, checkpoint, device):
    """The Fp16Fix of a run, with `vae` (the student, as built) rescaled exactly on a fresh start.

    Runs in every process before the start-up agreement, so a failure here stops all alike.
    """
    fp16 = cfg.fp16
    if str(cfg.model.source).startswith("preset:"):
        raise VaekitError("model.mode=fp16_safe makes an existing model fp16-safe; set model.source to it (a diffusers "
                          "folder, a single file, a checkpoint or a hub id), not a randomly initialised preset.")
    if cfg.model.overrides:
        raise VaekitError("model.mode=fp16_safe keeps the source's architecture and config; remove model.overrides.")
    probe = probe_images(train_ds, val_ds, fp16.probe_images)
    teacher = load_teacher(cfg.model.source, device)
    fix = Fp16Fix(fp16, teacher, probe, cfg.validation.batch_size, cfg.model.sample_posterior,
                  fp16.target_fraction * FP16_MAX, teacher_fingerprint=fingerprint(teacher), steps=cfg.train.steps)
    earlier = checkpoint.meta.get("fp16") if checkpoint is not None else None
    if earlier is not None:
        if earlier["teacher"] != fix.teacher_fingerprint:
            raise VaekitError(f"model.source {cfg.model.source} is not the model this run started from (its weights "
                              f"differ); resume with the original model.source.")
        fix.parts, fix.rescale, fix.before = earlier["parts"], earlier["rescale"], earlier["before"]
        fix.penalized, fix.trained = set(earlier["penalized"]), earlier["trained"]
        fix.headroom_step, fix.best = earlier.get("headroom_step"), earlier.get("best")
        fix.best_weights = checkpoint.weights.get("fp16_best") if fix.best is not None else None
        fix.step_now = checkpoint.meta["step"]
        freeze_all_but(vae, fix.trained)
        return fix
    peaks = measure_activations(teacher, batches(probe, fix.batch_size, device), group_variance=True)
    maxima = peaks.maxima
    summary = precision_summary(maxima)
    fix.before = {**outputs_against(teacher, teacher, probe, fix.batch_size, device, same=True),
                  "largest": largest_row(maxima), "verdict": summary["verdict"]}
    fix.already_safe = summary["fp16_safe"] and fix.before["fp16_finite"]
    if fix.already_safe:
        return fix
    fix.parts = choose_parts(fp16.parts, maxima, fix.limit)
    cast_vae(vae, device=device)
    rescaled_parts = ("encoder", "decoder") if fix.parts == "all" else ("decoder",)
    plan = plan_rescale(vae, maxima, fix.limit, peaks.variances, parts=rescaled_parts,
                        eps_tolerance=fp16.eps_tolerance)
    apply_rescale(vae, plan)
    chains = {"chains": []}
    if fp16.approximate:  # what the exact plan left above the target inside GroupNorm -> SiLU -> conv chains
        chains = plan_chain_rescale(vae, plan["predicted"], fix.limit, parts=rescaled_parts)
        apply_chain_rescale(vae, chains)
    exact = outputs_against(teacher, vae, probe, fix.batch_size, device)
    rescaled = measured(vae, probe, fix.batch_size, device)
    changing = [name for name in rescaled if fix.parts == "all" or not is_encoder(name)]
    hot = [name for name in changing if not rescaled[name] <= WATCH * fix.limit]
    owners = owning_blocks(vae, hot) if hot and fp16.train == "hot" else None
    fix.trained = owners or list(ENCODER + DECODER if fix.parts == "all" else DECODER)
    fix.penalized = set(hot)
    freeze_all_but(vae, fix.trained)
    fix.rescale = {"gauges": plan["gauges"], "chains": chains["chains"], "fixed": plan["fixed"],
                   "eps_tolerance": fp16.eps_tolerance,
                   "fp32_after_rescale": {k: exact[k] for k in ("decode_psnr_fp32", "latent_snr_db_fp32")},
                   "largest_after_rescale": largest_row(rescaled),
                   "above_target_after_rescale": [name for name in changing if not rescaled[name] <= fix.limit],
                   "trained": fix.trained}
    log.info(rescale_lines(fix.rescale, fix.limit))
    return fix


def freeze_all_but(vae, modules):
    """Gradients on for the parameters under `modules` (qualified names), off for every other."""
    for name, parameter in vae.named_parameters():
        parameter.requires_grad_(any(name.startswith(module + ".") for module in modules))


def already_safe(cfg, accelerator, fix):
    """End the command without a run: the source is already fp16-safe. Returns train()'s result."""
    largest = fix.before["largest"]
    message = (f"{cfg.model.source} is already fp16-safe: on {len(fix.probe)} images of {cfg.data.path} its largest "
               f"activation is {largest['fp16_fraction']:.2%} of float16's range ({largest['layer']}), within the "
               f"{FP16_MARGIN:.0%} `vaekit inspect --precision` allows, and it encodes and decodes them in fp16 to "
               f"finite values. Nothing to do: no training, no checkpoint, no export.")
    log.info(message)
    accelerator.end_training()
    return {"already_fp16_safe": True, "message": message, "interrupted": False}


def choose_parts(parts, maxima, limit):
    """`fp16.parts` resolved: "decoder" when the encoder side has headroom (or must not change), else "all"."""
    hot_encoder = [name for name, value in maxima.items() if is_encoder(name) and not value <= limit]
    if parts == "decoder" and hot_encoder:
        raise VaekitError(f"The encoder itself lacks fp16 headroom ({hot_encoder[0]}: {maxima[hot_encoder[0]]:.4g} "
                          f"> {limit:.4g}), which fp16.parts=decoder leaves untouched; use fp16.parts=all (or auto).")
    if parts == "auto":
        return "all" if hot_encoder else "decoder"
    return parts


def probe_images(train_ds, val_ds, count):
    """The first `count` held-out images (centre crops), or without a hold-out the first training crops."""
    dataset = val_ds if val_ds is not None else train_ds
    if not hasattr(dataset, "__getitem__"):
        raise VaekitError("model.mode=fp16_safe measures activations on held-out images; a streamed data set needs "
                          "data.holdout of at least 1.")
    images, _, errors = take_images(dataset, count)
    for error in errors:
        log.warning("Probe image skipped: %s", error)
    if images is None:
        raise VaekitError("model.mode=fp16_safe found no decodable image to measure activations on.")
    return images


# ----------------------------------------------------------------------------------------------
# Measuring


def batches(images, batch_size, device):
    """The images in batches on `device`."""
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size].to(device)


def measured(vae, images, batch_size, device):
    """{layer: largest |activation|} of `vae` (fp32) over encode + decode of the images."""
    return measure_activations(vae, batches(images, batch_size, device)).maxima


@torch.no_grad()
def fp16_finite(vae, images, batch_size, device):
    """Whether an fp16 copy of `vae` encodes and decodes the images to finite values."""
    half = cast_vae(copy_vae(vae), device=device, dtype=torch.float16)
    for x in batches(images, batch_size, device):
        mean = half.encode(x.half()).latent_dist.mean
        if not (torch.isfinite(mean).all() and torch.isfinite(half.decode(mean).sample).all()):
            return False
    return True


@torch.no_grad()
def fidelity_sums(teacher, vae, images, batch_size, device):
    """(4,) float64 tensor on `device`: how far `vae` in fp32 is from the teacher, as sums of squares.

    The squared error of its posterior means against the teacher's and their energy; the squared
    error of its decodes of the teacher's means (clamped to [-1, 1]) and their element count.
    """
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for x in batches(images, batch_size, device):
        reference = teacher.encode(x).latent_dist.mean
        target = teacher.decode(reference).sample.clamp(-1, 1)
        sums[0] += (vae.encode(x).latent_dist.mean - reference).double().square().sum()
        sums[1] += reference.double().square().sum()
        sums[2] += (vae.decode(reference).sample.clamp(-1, 1) - target).double().square().sum()
        sums[3] += target.numel()
    return sums


def ratio_db(signal, error):
    """10 log10(signal / error): inf for no error, -inf for a non-finite one."""
    if not math.isfinite(error):
        return -math.inf
    return math.inf if error == 0 else 10 * math.log10(signal / error)


def has_headroom(check):
    """Whether a check found every layer within the target and a finite fp16 pass."""
    return not check["above"] and check["finite"]


@torch.no_grad()
def outputs_against(teacher, vae, images, batch_size, device, same=False):
    """How close `vae` in fp32 and in fp16 comes to the teacher in fp32 on the images.

    Decodes are of the teacher's latents (posterior means), scored as images (clamped to [-1, 1])
    by PSNR; encodes by the SNR of the posterior means against the teacher's. A non-finite fp16
    output gives None. `same`: `vae` is the teacher (its fp32 numbers are exact by definition).
    """
    half = cast_vae(copy_vae(vae), device=device, dtype=torch.float16)
    squares = {"decode32": 0.0, "decode16": 0.0, "latent32": 0.0, "latent16": 0.0, "signal": 0.0}
    finite, elements, latent_elements, identical = True, 0, 0, True
    for x in batches(images, batch_size, device):
        reference = teacher.encode(x).latent_dist.mean
        target = teacher.decode(reference).sample.clamp(-1, 1)
        mean32 = reference if same else vae.encode(x).latent_dist.mean
        identical = identical and torch.equal(mean32, reference)
        decoded32 = target if same else vae.decode(reference).sample.clamp(-1, 1)
        mean16 = half.encode(x.half()).latent_dist.mean.float()
        decoded16 = half.decode(reference.half()).sample.float()
        finite = finite and bool(torch.isfinite(mean16).all() and torch.isfinite(decoded16).all())
        squares["decode32"] += float((decoded32 - target).square().sum())
        squares["decode16"] += float((decoded16.clamp(-1, 1) - target).square().sum())
        squares["latent32"] += float((mean32 - reference).square().sum())
        squares["latent16"] += float((mean16 - reference).square().sum())
        squares["signal"] += float(reference.square().sum())
        elements += target.numel()
        latent_elements += reference.numel()

    def psnr(key):  # images in [-1, 1]: peak-to-peak 2
        mse = squares[key] / elements
        return math.inf if mse == 0 else 10 * math.log10(4 / mse)

    def snr(key):
        noise = squares[key] / latent_elements
        return math.inf if noise == 0 else 10 * math.log10(squares["signal"] / latent_elements / noise)

    return {"fp16_finite": finite, "decode_psnr_fp32": psnr("decode32"),
            "decode_psnr_fp16": psnr("decode16") if finite else None,
            "latent_snr_db_fp32": snr("latent32"), "latent_snr_db_fp16": snr("latent16") if finite else None,
            "latents_bit_identical": identical}


def largest_row(maxima):
    """{"layer", "max_abs", "fp16_fraction"} of the largest activation."""
    name = max(maxima, key=maxima.get)
    return {"layer": name, "max_abs": maxima[name], "fp16_fraction": maxima[name] / FP16_MAX}


# ----------------------------------------------------------------------------------------------
# Optimizer: relative steps


class RelativeAdamW(torch.optim.AdamW):
    """AdamW whose step for each tensor is the learning rate times the tensor's RMS (one group per tensor).

    Adafactor's relative step size (Shazeer & Stern 2018, section 8) on Adam: every tensor moves by
    about the same fraction of its own size, so a layer whose weights are 1e4 times larger than
    usual (what makes activations overflow) can shrink in the same number of steps as any other.
    The RMS is taken at every step; an all-zero tensor stays zero. `relative=False` keeps Adam's
    absolute steps. `factor` (a callable) multiplies the learning rate at each step, on top of the
    scheduler's: the fitting phase's decay, which starts at a step known only while training.
    """

    def __init__(self, params, relative=True, factor=None, **kwargs):
        super().__init__([{"params": [p]} for p in params], **kwargs)
        self.relative, self.factor = relative, factor

    @torch.no_grad()
    def step(self, closure=None):
        rates = [group["lr"] for group in self.param_groups]
        factor = self.factor() if self.factor is not None else 1.0
        for group in self.param_groups:
            size = float(group["params"][0].detach().float().square().mean().sqrt()) if self.relative else 1.0
            group["lr"] = group["lr"] * factor * size
        try:
            return super().step(closure)
        finally:
            for group, rate in zip(self.param_groups, rates):
                group["lr"] = rate


def make_optimizer(params, optim, relative, factor=None):
    """The VAE's optimizer in this mode: RelativeAdamW (absolute steps unless fp16.relative_lr), optim.*'s settings."""
    return RelativeAdamW(list(params), relative=relative, factor=factor, lr=optim.lr, betas=tuple(optim.betas),
                         weight_decay=optim.weight_decay, eps=optim.eps)


# ----------------------------------------------------------------------------------------------
# Words


def rescale_lines(rescale, limit):
    """The exact rescaling as log lines: one per rescaled gauge, then what is left to train."""
    rows = rescale["gauges"]
    exact = rescale["fp32_after_rescale"]
    lines = [f"Exact rescaling (powers of two, target {limit:.4g}): {len(rows)} gauge(s) rescaled; fp32 against the "
             f"original: decode PSNR {fmt_db(exact['decode_psnr_fp32'])}, latent SNR "
             f"{fmt_db(exact['latent_snr_db_fp32'])}"]
    if rows:
        lines.append(f"  {'scale':>10} {'peak before':>12} {'after':>10} {'eps effect':>10}  gauge (kind, layers)")
    for row in rows:
        lines.append(f"  {row['scale']:>10.4g} {row['peak_before']:>12.4g} {row['peak_after']:>10.4g} "
                     f"{row['groupnorm_eps_effect']:>10.2g}  {row['gauge']} ({row['kind']}, {len(row['layers'])} "
                     f"layers{', limited by eps' if row['limited_by_eps'] else ''})")
    chains = rescale.get("chains", [])
    if chains:
        lines.append(f"Approximate rescaling (GroupNorm weight and bias / s, the conv after the SiLU x s): {len(chains)} "
                     f"chain(s); fp32 against the original after both: decode PSNR "
                     f"{fmt_db(exact['decode_psnr_fp32'])}, latent SNR {fmt_db(exact['latent_snr_db_fp32'])}")
        lines.append(f"  {'scale':>10} {'peak before':>12} {'after':>10} {'SiLU bound':>10}  GroupNorm -> conv")
    for row in chains:
        lines.append(f"  {row['scale']:>10.4g} {row['peak_before']:>12.4g} {row['peak_after']:>10.4g} "
                     f"{row['relative_change_bound']:>10.2g}  {row['chain']} -> {row['conv']} (approximate)")
    largest, above = rescale["largest_after_rescale"], rescale["above_target_after_rescale"]
    lines.append(f"After it the largest activation is {largest['max_abs']:.4g} ({largest['layer']}); "
                 + (f"{len(above)} layer(s) above the target ({', '.join(above[:4])}{', ...' if len(above) > 4 else ''})"
                    f", trained in: {', '.join(rescale['trained'])}" if above else "every layer is within the target"))
    return "\n".join(lines)


def fmt_db(value):
    """'43.2 dB', 'exact' for inf, 'non-finite' for None or -inf."""
    if value is None or value == -math.inf:
        return "non-finite"
    return "exact" if math.isinf(value) else f"{value:.2f} dB"


def summary_lines(report):
    """The before/after table of the final report, as lines."""
    before, after = report["before"], report["after"]
    rows = [("largest activation (of fp16 range)", f"{before['largest']['fp16_fraction']:.2%}",
             f"{after['largest']['fp16_fraction']:.2%}"),
            ("fp16 encode + decode", "finite" if before["fp16_finite"] else "NOT finite",
             "finite" if after["fp16_finite"] else "NOT finite"),
            ("decode PSNR, fp16 vs original fp32", fmt_db(before["decode_psnr_fp16"]), fmt_db(after["decode_psnr_fp16"])),
            ("decode PSNR, fp32 vs original fp32", "exact", fmt_db(after["decode_psnr_fp32"])),
            ("latent SNR, fp16 vs original fp32", fmt_db(before["latent_snr_db_fp16"]),
             fmt_db(after["latent_snr_db_fp16"])),
            ("latent SNR, fp32 vs original fp32", "exact",
             "bit-identical" if after["latents_bit_identical"] else fmt_db(after["latent_snr_db_fp32"]))]
    lines = [f"fp16 safety on {report['probe_images']} probe images (target {report['target_fraction']:.1%} of float16's "
             f"range, parts: {report['parts']}):",
             f"  {'':<38} {'original':>14} {'fp16-safe':>14}"]
    lines += [f"  {name:<38} {a:>14} {b:>14}" for name, a, b in rows]
    lines.append(f"  after: {report['after']['verdict']}")
    targets = report["fidelity_targets"]
    wanted = f"decode PSNR >= {targets['decode_psnr_db']:g} dB" + (
        f", latent SNR >= {targets['latent_snr_db']:g} dB" if "latent_snr_db" in targets else "")
    if not report["exported"]:
        lines.append(f"  NO state had the headroom in {report['steps']} steps, so NOTHING was exported; still above "
                     f"the target: {', '.join(report['after']['above_target'][:5])}. Resume with more steps "
                     "(--resume latest train.steps=...) or raise fp16.penalty_weight.")
        return lines
    lines.append(f"  headroom first at step {report['headroom_step']}; exported: step {report['exported_step']} of "
                 f"{report['steps']}, the check with headroom closest to the original (fidelity targets: {wanted}: "
                 f"{'met' if report['fidelity_reached'] else 'NOT met'})")
    if report.get("latents_within_tolerance") is False:
        lines.append(f"  the encoder's latents moved beyond the tolerance ({fmt_db(after['latent_snr_db_fp32'])} < "
                     f"{report['latent_tolerance_db']:.0f} dB).")
    return lines
