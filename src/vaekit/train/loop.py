"""`train(config)`: one training run, from scratch or decoder fine-tuning, plainly or under accelerate/torchrun.

`train` reads top to bottom: start the run, build what it trains, restore a checkpoint, then for
each step the training step and, when due, validation and a checkpoint; last the export. What the
run trains with lives in `Parts`, what changes from step to step in `RunState`; `save` and
`restore` are each other's inverse.

- Trainable weights stay fp32; mixed precision only autocasts the forward.
- A step is one global batch of `batch_size x processes x grad_accum` images. Which images (and
  which crops and posterior noise) it uses derives from (seed, epoch, index) and (seed, step, slot),
  so resuming at step k and training to n gives the weights of an uninterrupted run to n.
- Skipped (non-finite) steps and stop requests are agreed across processes, so they never diverge.
- Before the first collective every process checks what it needs (`check_ready`) and all agree,
  so a process that cannot start stops every process with one message instead of a hang.
- Streamed shards (`vaekit.data.streaming`) resume from each worker stream's recorded position.
- With `distill.teacher` the run is a distillation (`vaekit.train.distill`): a frozen teacher gives
  each micro-batch its targets, the student keeps its latent space; the hooks are marked "distillation".
"""

import contextlib
import hashlib
import json
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration,
                               gather_object, set_seed)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from vaekit.cache.pairs import CachedPairs, collate_pairs
from vaekit.config import save_config, to_dict
from vaekit.data.streaming import StreamingImages, check_stream, stream_workers
from vaekit.data.training import build_train_val, collate_images, collate_stream
from vaekit.device import cpu_has_native_bf16, launched_processes, needs_cpu_collectives
from vaekit.errors import VaekitError
from vaekit.io import ensure_folder, remove_temporaries, write_json, write_text
from vaekit.model.architecture import (cast_vae, copy_vae, encoder_fingerprint, is_tiny, set_initial_logvar,
                                      vae_config)
from vaekit.model.card import model_card
from vaekit.model.load import load_vae, save_diffusers
from vaekit.seeds import torch_generator
from vaekit.signals import ignore_stop_signals, stop_on_signals
from vaekit.train import checkpoint as ckpt
from vaekit.train import distill, fp16_safe, losses
from vaekit.train.config import check_config, describe_losses
from vaekit.train.discriminator import DiscriminatorConfig, PatchDiscriminator
from vaekit.train.preflight import agree_ready, refuse_sharding, run_check
from vaekit.train.regularizers import build_regularizer, transform_rng
from vaekit.train.sampler import StepBatchSampler
from vaekit.train.steps import AutoencoderForTraining, discriminator_step, generator_step
from vaekit.train.tracking import Progress, flat_hparams, make_tracker_kwargs, setup_logging
from vaekit.train.validation import Validator, build_lpips_metric, format_metrics, take_images

log = logging.getLogger("vaekit.train")


@dataclass
class Parts:
    """What the run trains with: built by `build_parts`, written by `save`, read back by `restore`."""

    accelerator: Accelerator
    vae: torch.nn.Module  # the unwrapped AutoencoderKL: fp32 master weights
    model: torch.nn.Module  # AutoencoderForTraining as Accelerate prepared it (DDP under several processes)
    trainable: list
    opt_g: torch.optim.Optimizer
    sched_g: object
    disc: torch.nn.Module | None = None  # the prepared PatchGAN, when the adversarial term is on
    opt_d: torch.optim.Optimizer | None = None
    sched_d: object = None
    ema: EMAModel | None = None
    perceptual: losses.PerceptualLoss | None = None
    regularizer: object = None  # vaekit.train.regularizers.Regularizer, when a diffusability regulariser is on
    distiller: object = None  # vaekit.train.distill.Distiller (the frozen teacher), in a distillation run
    fp16: object = None  # vaekit.train.fp16_safe.Fp16Fix, in the fp16-safe fine-tune (model.mode=fp16_safe)

    @property
    def last_layer(self):
        """Where the adaptive adversarial weight compares gradients: the decoder's output convolution."""
        if is_tiny(self.vae):
            return self.vae.decoder.layers[-1].weight
        return self.vae.decoder.conv_out.weight

    def export_state(self):
        """The weights an export holds: the EMA's when it is on, else the trained ones."""
        return state_with_ema(self.vae, self.ema) if self.ema is not None else self.vae.state_dict()


@dataclass
class RunState:
    """What changes from step to step; `save` writes all of it into the checkpoint's meta.json."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    steps_per_epoch: int = 1
    images_seen: int = 0  # by this process since the start or the resume
    images_resumed: int = 0  # by all processes before the resume
    nonfinite_skips: int = 0
    nonfinite_in_row: int = 0
    disc_updates: int = 0
    skipped_images: list = field(default_factory=list)
    history: list = field(default_factory=list)  # validation results of this session
    session_start: tuple = (0, 0)  # (step, nonfinite_skips) when this session started
    # Streamed data only: this process's worker streams, micro-batches taken from them, and the position
    # after the last batch each stream gave ([epoch, shard slot, samples read], None before its first).
    stream: dict | None = None


@dataclass
class Ready:
    """What every process checked and opened before the first collective (`check_ready`)."""

    checkpoint: object  # a loaded train.checkpoint.Checkpoint, or None for a fresh run
    vae: object  # the AutoencoderKL to train, as loaded (build_vae)
    train_ds: object  # TrainImageDataset, or StreamingImages for streamed shards
    val_ds: object
    perceptual: object  # the LPIPS training loss, or None
    metric_lpips: object  # the LPIPS network of validation metrics, or None
    teacher: tuple | None = None  # distillation: (frozen teacher on the device, its fingerprint)
    fp16: object = None  # vaekit.train.fp16_safe.Fp16Fix in model.mode=fp16_safe: teacher, probe, exact rescaling


def train(config, resume=None):
    """Run one training job; returns a dict with the run's output paths and final metrics."""
    check_config(config)
    cfg = config
    refuse_sharding()  # from the environment, before any process group: every process stops alike
    accelerator = start_run(cfg)
    ready = check_ready(cfg, accelerator, resume)
    if ready.fp16 is not None and ready.fp16.already_safe:  # nothing to do: not a run
        return fp16_safe.already_safe(cfg, accelerator, ready.fp16)
    checkpoint, train_ds, val_ds = ready.checkpoint, ready.train_ds, ready.val_ds
    if accelerator.is_main_process:
        save_config(cfg, Path(cfg.out_dir) / "config.yaml")
    parts = build_parts(cfg, accelerator, ready.vae, ready.perceptual, ready.teacher, ready.fp16)
    state = RunState()
    if checkpoint is not None:
        restore(cfg, parts, state, checkpoint, data_size(train_ds))
    if not isinstance(train_ds, StreamingImages):
        record_unlisted(state, train_ds.source)
    state.session_start = (state.step, state.nonfinite_skips)
    batches = make_batches(cfg, accelerator, train_ds, state)
    key_log = open_key_log(cfg, accelerator.process_index, state.step)
    validator = make_validator(cfg, parts, val_ds, ready.metric_lpips)
    start_tracking(cfg, accelerator, train_ds, validator)

    progress, last_saved = Progress(accelerator, cfg, state.step, accelerator.num_processes), None
    started = time.perf_counter()
    with stop_on_signals(log) as stop:
        while state.step < cfg.train.steps:
            if parts.fp16 is not None and parts.fp16.done(cfg, parts, state):  # every layer has its fp16 headroom
                break
            images, logs, finite = train_step(cfg, parts, state, batches, key_log)
            skipped, stopping = agree(accelerator, not finite, stop["signal"] is not None)
            count_skip(state, skipped)
            progress.update(state.step, images, logs)
            maybe_validate(cfg, parts, state, validator, has_holdout=val_ds is not None)
            if state.nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
                path = save(cfg, parts, state, data_size(train_ds), interrupted=True)
                raise VaekitError(
                    f"{state.nonfinite_in_row} steps in a row had a non-finite loss or gradient; stopped at step "
                    f"{state.step} (checkpoint {path}). Lower optim.lr, use train.mixed_precision=bf16 instead of "
                    f"fp16, or lower the loss weights.")
            if stopping:
                path = save(cfg, parts, state, data_size(train_ds), interrupted=True)
                progress.close()
                log.info("Stopped at step %d; checkpoint %s. Continue with --resume latest.", state.step, path)
                accelerator.end_training()
                return {"checkpoint": path, "step": state.step, "interrupted": True, "signal": stop["signal"]}
            if state.step % cfg.train.checkpoint_every == 0 or state.step == cfg.train.steps:
                last_saved = save(cfg, parts, state, data_size(train_ds))
    progress.close()
    if key_log is not None:
        key_log.close()
    if last_saved != ckpt.checkpoint_path(cfg.out_dir, state.step) and (state.step > 0 or parts.fp16 is not None):
        # Resumed at the final step, or stopped early with fp16 headroom: keep a checkpoint of where it ended.
        last_saved = save(cfg, parts, state, data_size(train_ds))
    check_trained(state, last_saved)
    return finish(cfg, parts, state, validator, last_saved, train_seconds=time.perf_counter() - started,
                  train_images=len(train_ds) if not isinstance(train_ds, StreamingImages) else None)


# ----------------------------------------------------------------------------------------------
# Setting up


def start_run(cfg):
    """Accelerate's Accelerator for this run (processes, mixed precision, tracker, collective timeout) and TF32."""
    accelerator = Accelerator(
        cpu=needs_cpu_collectives(),
        mixed_precision=cfg.train.mixed_precision,
        log_with=make_tracker_kwargs(cfg.log),
        project_config=ProjectConfiguration(project_dir=cfg.out_dir, logging_dir=str(Path(cfg.out_dir) / "tensorboard")),
        kwargs_handlers=[
            # Every trainable parameter is used in every forward, so DDP need not search for unused ones.
            DistributedDataParallelKwargs(find_unused_parameters=False),
            # Bounds the start-up agreement and every later collective: a process that dies or hangs stops
            # the others after this long with an error, instead of torch's 30 minutes.
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.timeout_s)),
        ],
    )
    refuse_sharding(accelerator.distributed_type)  # e.g. chosen in `accelerate config` rather than the environment
    # Gradient accumulation is done by hand (no_sync on all but the last micro-batch) rather than with
    # accelerator.accumulate: the discriminator's micro-steps run after the VAE's optimizer step, and
    # Accelerate's single accumulation counter would interleave the two.
    if launched_processes() != accelerator.num_processes:
        raise VaekitError(f"{launched_processes()} processes were launched but Accelerate runs "
                          f"{accelerator.num_processes}; check the launcher flags.")
    if cfg.train.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        log.warning("train.mixed_precision=fp16 needs a GPU: this CPU run computes in fp32 (bf16 works on a CPU).")
    if cfg.train.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("train.mixed_precision=bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 is emulated "
                    "and usually slower than fp32; train.mixed_precision=no may be faster here.")
    if cfg.train.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def check_ready(cfg, accelerator, resume):
    """Each process's checks before the first collective (run folder, checkpoint, model, data, LPIPS), agreed.

    A failure on any process raises the same VaekitError on every process (vaekit.train.preflight).
    The processes also agree on what must be the same everywhere: the checkpoint they resume from
    (nodes without a shared file system may see different ones), and whether the LPIPS loss and
    metric are on (with `perceptual_if_missing: skip`, or a missing metric network, a process
    without the weights turns them off for all, or the replicas would train on different losses).
    """
    failures = []

    def check(what, action):
        result, failure = run_check(what, action)
        if failure is not None:
            failures.append(failure)
        return result

    if accelerator.is_main_process:
        check("run folder", lambda: prepare_run_folder(cfg.out_dir))
    else:
        setup_logging(cfg.out_dir, is_main=False)
    if cfg.log.sample_keys:
        check("run folder", lambda: ensure_folder(Path(cfg.out_dir) / "sample_keys"))
    path = check("resume", lambda: find_checkpoint(resume, cfg.out_dir))
    checkpoint = check("checkpoint", lambda: ckpt.load_checkpoint(path)) if path is not None else None
    teacher = None
    if cfg.distill.teacher:  # distillation: the teacher, checked against the cache card and the checkpoint
        teacher = check("teacher", lambda: distill.open_teacher(cfg, accelerator.device, checkpoint))
    vae = None
    if teacher is not None or not cfg.distill.teacher:
        vae = check("model", lambda: build_vae(cfg, checkpoint, teacher[0] if teacher else None))
    # Building LPIPS draws from the global RNG; forked, it leaves the stream the discriminator and the
    # alignment projection are drawn from where the VAE left it, as before these checks existed.
    with torch.random.fork_rng(devices=[]):
        data = check("data", lambda: open_training_data(cfg, accelerator)) or (None, None)
        perceptual = check("LPIPS", lambda: build_perceptual(cfg.loss))
        metric = None
        if data[1] is not None:
            metric = check("validation LPIPS", lambda: build_lpips_metric(cfg.validation.lpips_net,
                                                                          cfg.loss.lpips_path, perceptual))
    fp16 = None
    if cfg.model.mode == "fp16_safe" and vae is not None and data[0] is not None:
        fp16 = check("fp16", lambda: fp16_safe.prepare(cfg, vae, data[0], data[1], checkpoint, accelerator.device))
    facts = {"resume_step": checkpoint.meta["step"] if checkpoint is not None else None,
             "perceptual": perceptual is not None, "metric": metric is not None,
             "already_fp16_safe": fp16 is not None and fp16.already_safe}
    everyone = agree_ready(accelerator, failures, facts)
    steps = [f["resume_step"] for f in everyone]
    if len(set(steps)) > 1:
        raise VaekitError(f"The processes would resume from different checkpoints (steps by rank: {steps}); "
                          f"every node must see the same out_dir (a shared file system) or get --resume PATH.")
    if perceptual is not None and not all(f["perceptual"] for f in everyone):
        log.warning("LPIPS weights are missing on some processes: every process trains WITHOUT the perceptual term.")
        perceptual = None
    if metric is not None and not all(f["metric"] for f in everyone):
        log.warning("Validation LPIPS is unavailable on some processes: reporting PSNR and SSIM only.")
        metric = None
    if len({f["already_fp16_safe"] for f in everyone}) > 1:
        raise VaekitError("The processes measured different activations on the same model and images (fp16 safety "
                          "by rank: {}); every process must see the same model.source and data.".format(
                              [f["already_fp16_safe"] for f in everyone]))
    return Ready(checkpoint, vae, data[0], data[1], perceptual, metric, teacher, fp16)


def prepare_run_folder(out_dir):
    """Create the run folder and its log (main process), and remove what a killed run's atomic writes left."""
    setup_logging(out_dir, is_main=True)
    removed = sum(remove_temporaries(Path(out_dir) / sub) for sub in ("", "samples"))
    if removed:
        log.info("Removed %d temporary files and folders left by an interrupted run in %s.", removed, out_dir)


def open_training_data(cfg, accelerator):
    """(training data, held-out data or None), checked to give this process images to train on."""
    train_ds, val_ds = build_train_val(cfg.data, val_size=cfg.validation.size, order_seed=cfg.train.seed)
    if isinstance(train_ds, StreamingImages):
        check_stream(train_ds, accelerator.process_index, accelerator.num_processes)
    elif len(train_ds) == 0:
        raise VaekitError(f"No training images found in {cfg.data.path}.")
    if cfg.distill.cache:  # distillation from cached teacher latents: the images paired with them
        if isinstance(train_ds, StreamingImages):
            raise VaekitError("distill.cache pairs indexed images with their cached latents; read the shards indexed "
                              "(data.streaming=off) or drop distill.cache.")
        train_ds = CachedPairs(cfg.distill.cache, train_ds.source, cfg.data.size, cfg.data.flip, cfg.data.seed,
                               cfg.data.max_pixels)
    return train_ds, val_ds


def data_size(train_ds):
    """The number of training images, or for streamed shards their count and list (resume checks that they match)."""
    if isinstance(train_ds, StreamingImages):
        return {"shards": len(train_ds.urls),
                "shard_list": hashlib.sha256("\n".join(train_ds.urls).encode()).hexdigest()[:16]}
    return len(train_ds)


def find_checkpoint(resume, out_dir):
    """The checkpoint folder to resume from, or None to start at step 0 (refusing to mix two runs)."""
    checkpoint = ckpt.resolve_resume(resume, out_dir)
    if resume == "latest" and checkpoint is None:
        log.info("--resume latest: no checkpoint in %s yet, starting from step 0.", out_dir)
    elif checkpoint is None and ckpt.list_checkpoints(out_dir):
        # Starting over here would mix two runs' checkpoints (and pruning would delete the new ones).
        raise VaekitError(f"{out_dir} already holds checkpoints of an earlier run "
                          f"({ckpt.list_checkpoints(out_dir)[-1].name}). Continue it with --resume latest, or set "
                          f"out_dir to a new folder (or delete this one).")
    return checkpoint


def build_vae(cfg, checkpoint=None, teacher=None):
    """The VAE to train: from the checkpoint (its architecture and weights) when resuming, else from model.source.

    Seeded first, with the same seed on every process: a preset's initial weights are identical
    everywhere (and DDP's first broadcast changes nothing). A distillation student takes the
    teacher's latent channels and normalisation (vaekit.train.distill), built again when they change.
    """
    set_seed(cfg.train.seed)
    if checkpoint is not None:
        vae = ckpt.checkpoint_vae(checkpoint.meta, checkpoint.weights["vae"], checkpoint.path)
    else:
        vae = load_vae(cfg.model.source, overrides=cfg.model.overrides)
        if teacher is not None:  # distillation: the student in the teacher's latent space
            changes = distill.student_overrides(vae, teacher, cfg.model.overrides, cfg.model.source)
            if changes:
                set_seed(cfg.train.seed)
                vae = load_vae(cfg.model.source, overrides={**cfg.model.overrides, **changes})
        if cfg.model.init_logvar is not None and cfg.model.source.startswith("preset:"):  # built afresh, not loaded
            set_initial_logvar(vae, cfg.model.init_logvar)
    distill.check_student(vae, cfg)
    return vae


def build_parts(cfg, accelerator, vae, perceptual=None, teacher=None, fp16=None):
    """The fp32 VAE prepared with its discriminator, EMA and optimizers; the VAE, LPIPS loss, teacher and fp16 fix
    from `check_ready`."""
    device = accelerator.device
    cast_vae(vae, device=device, dtype=torch.float32)  # fp32 master weights, whatever the stored dtype
    if cfg.model.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if cfg.model.compile:
        vae.encoder.compile()  # in place: state-dict keys stay those of AutoencoderKL
        vae.decoder.compile()
    regularizer = build_regularizer(cfg, vae, device)
    if teacher is not None:  # distillation: the student encodes the images and decodes the teacher's latents
        model = distill.StudentForTraining(vae)
    else:
        frozen_encoder = cfg.model.mode == "decoder" or (fp16 is not None and not fp16.trains_encoder)
        model = AutoencoderForTraining(vae, freeze_encoder=frozen_encoder,
                                       sample_posterior=cfg.model.sample_posterior,
                                       projection=regularizer.projection if regularizer is not None else None)
    disc = None
    if cfg.disc.weight > 0:
        disc = PatchDiscriminator(DiscriminatorConfig(n_layers=cfg.disc.n_layers, base_channels=cfg.disc.base_channels,
                                                      norm=cfg.disc.norm)).to(device)
    if perceptual is not None:
        perceptual.to(device)
    ema = None
    if cfg.ema.enabled:
        ema = EMAModel(vae.parameters(), decay=cfg.ema.decay, update_after_step=cfg.ema.update_after_step,
                       use_ema_warmup=cfg.ema.warmup, inv_gamma=cfg.ema.inv_gamma, power=cfg.ema.power)
    trainable = [p for p in model.parameters() if p.requires_grad]  # the VAE's, then an alignment projection's
    if fp16 is not None:  # the fp16-safe fine-tune: relative steps (fp16.relative_lr), its hooks on this VAE
        opt_g = fp16_safe.make_optimizer(trainable, cfg.optim, cfg.fp16.relative_lr, factor=fp16.lr_factor)
        fp16.student = vae
    else:
        opt_g = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
    # Schedulers are stepped once per optimizer step by this loop, not by Accelerate (which would step
    # them once per process), so their length is in optimizer steps.
    sched_g = get_scheduler(cfg.optim.scheduler, opt_g, num_warmup_steps=cfg.optim.warmup_steps,
                            num_training_steps=cfg.train.steps)
    parts = Parts(accelerator, vae, model, trainable, opt_g, sched_g, ema=ema, perceptual=perceptual,
                  regularizer=regularizer, fp16=fp16,
                  distiller=distill.make_distiller(cfg, *teacher, vae) if teacher is not None else None)
    if disc is not None:
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc.lr, betas=tuple(cfg.disc.betas),
                                  weight_decay=cfg.disc.weight_decay)
        parts.sched_d = get_scheduler(cfg.disc.scheduler, opt_d, num_warmup_steps=cfg.disc.warmup_steps,
                                      num_training_steps=max(1, cfg.train.steps - cfg.disc.start))
        parts.model, parts.disc, parts.opt_g, parts.opt_d = accelerator.prepare(model, disc, opt_g, opt_d)
    else:
        parts.model, parts.opt_g = accelerator.prepare(model, opt_g)
    bad = [n for n, p in vae.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if bad:  # trainable weights cast to half precision would lose small updates
        raise VaekitError(f"Trainable parameter {bad[0]} is {vae.get_parameter(bad[0]).dtype}, not float32.")
    return parts


def build_perceptual(loss_cfg):
    """The LPIPS training loss, or None when its weight is 0 or (demo only) its weights are missing."""
    if loss_cfg.perceptual_weight <= 0:
        return None
    try:
        return losses.PerceptualLoss(net=loss_cfg.perceptual_net, path=loss_cfg.lpips_path)
    except VaekitError as e:
        if loss_cfg.perceptual_if_missing == "error":
            raise VaekitError(f"{e} Or train without the perceptual term: loss.perceptual_weight=0.") from None
        log.warning("LPIPS weights unavailable, training WITHOUT the perceptual term (loss.perceptual_if_missing="
                    "skip): %s", e)
        return None


def global_batch(cfg, world):
    """Images per optimizer step over all processes."""
    return cfg.train.batch_size * cfg.train.grad_accum * world


def make_batches(cfg, accelerator, train_ds, state):
    """An endless iterator of this process's micro-batches, starting at the run's data position."""
    if isinstance(train_ds, StreamingImages):
        return stream_batches(cfg, accelerator, train_ds, state)
    sampler = StepBatchSampler(len(train_ds), cfg.train.batch_size, cfg.train.grad_accum, accelerator.num_processes,
                               accelerator.process_index, cfg.train.seed, state.epoch, state.batch_in_epoch)
    state.steps_per_epoch = sampler.steps_per_epoch
    collate = collate_pairs if isinstance(train_ds, CachedPairs) else collate_images  # distillation from a cache
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.data.num_workers,
                                         pin_memory=accelerator.device.type == "cuda",
                                         worker_init_fn=ignore_stop_signals)
    return iter(loader)


def stream_batches(cfg, accelerator, stream, state):
    """Micro-batches of streamed shards: each DataLoader worker one stream, resumed at its recorded position."""
    world, rank = accelerator.num_processes, accelerator.process_index
    workers = stream_workers(cfg.data.num_workers, len(stream.urls), world)
    if state.stream is None or state.stream["workers"] != workers:
        state.stream = {"workers": workers, "batches": 0, "positions": [None] * workers}
    state.steps_per_epoch = math.inf  # epochs are per worker stream here, carried in the positions
    # Workers hand out batches in turn; after n batches it is stream n % workers's turn, so DataLoader
    # worker 0 plays that stream and the batch sequence continues as if never interrupted.
    view = stream.for_process(rank, world, workers, state.stream["positions"], rotation=state.stream["batches"])
    loader = torch.utils.data.DataLoader(view, batch_size=cfg.train.batch_size, collate_fn=collate_stream,
                                         num_workers=workers if cfg.data.num_workers else 0,
                                         pin_memory=accelerator.device.type == "cuda",
                                         worker_init_fn=ignore_stop_signals)
    return iter(loader)


def make_validator(cfg, parts, val_ds, lpips_net):
    """The held-out images and their scorer (every process scores its share), or None without held-out images."""
    if val_ds is None:
        return None
    images, keys, errors = take_images(val_ds, max(cfg.validation.num_images, cfg.validation.final_images))
    for error in errors:
        log.warning("Held-out image skipped: %s", error)
    if images is None:
        return None
    if lpips_net is not None:
        lpips_net.to(parts.accelerator.device)
    accelerator = parts.accelerator
    return Validator(images, keys, lpips_net, cfg.validation.batch_size, parts.vae, accelerator.process_index,
                     accelerator.num_processes)


def open_key_log(cfg, rank, step):
    """This process's sample-key log (log.sample_keys), without the lines of steps after `step`; None when off.

    One line per image trained on: step, epoch, key. Lines of steps after the checkpoint a run
    resumes from (a killed run's last steps) are dropped, so the file lists what the weights saw.
    """
    if not cfg.log.sample_keys:
        return None
    path = Path(cfg.out_dir) / "sample_keys" / f"rank-{rank:05d}.tsv"
    kept = []
    if path.is_file():
        kept = [line for line in path.read_text().splitlines(keepends=True) if int(line.split("\t", 1)[0]) <= step]
    write_text(path, "".join(kept))
    return open(path, "a", encoding="utf-8")


def start_tracking(cfg, accelerator, train_ds, validator):
    """Open the experiment tracker and log what the run is about to do."""
    if cfg.log.tracker == "tensorboard":
        accelerator.init_trackers(cfg.log.project)
        if accelerator.is_main_process:  # hyperparameters in a subfolder named for them, not by a float timestamp
            accelerator.get_tracker("tensorboard", unwrap=True).add_hparams(flat_hparams(cfg), {}, run_name="hparams")
    elif cfg.log.tracker != "none":
        accelerator.init_trackers(cfg.log.project, config=flat_hparams(cfg))
    if isinstance(train_ds, StreamingImages):
        training = f"training images streamed from {len(train_ds.urls)} shards"
    else:
        training = f"{len(train_ds)} training images"
    what = f"{cfg.model.source} ({cfg.model.mode} mode)"
    if cfg.distill.teacher:  # distillation
        what = (f"{cfg.model.source} as a student of {cfg.distill.teacher}"
                + (f" from its cached latents in {cfg.distill.cache}" if cfg.distill.cache else ""))
    log.info("Training %s for %d steps: %d images per step = %d per process x %d processes x %d "
             "accumulation; %s and %d held-out images; run folder %s",
             what, cfg.train.steps, global_batch(cfg, accelerator.num_processes),
             cfg.train.batch_size, accelerator.num_processes, cfg.train.grad_accum, training,
             0 if validator is None else len(validator.images), cfg.out_dir)


# ----------------------------------------------------------------------------------------------
# One step


def train_step(cfg, parts, state, batches, key_log=None):
    """One optimizer step of the VAE and, once it is on, of the discriminator; returns (images, logs, finite)."""
    parts.model.train()
    if parts.disc is not None:
        parts.disc.train()
    disc_active = parts.disc is not None and state.step >= cfg.disc.start
    kl_weight = losses.kl_weight_at(state.step, cfg.loss.kl_weight, cfg.loss.kl_warmup_steps)
    kept, images, logs, finite = vae_update(cfg, parts, state, batches, kl_weight, disc_active, key_log)
    if disc_active:
        finite = disc_update(cfg, parts, state, kept, logs) and finite
    logs.update(grad_norm=logs.pop("grad_norm"), lr=parts.sched_g.get_last_lr()[0])
    if parts.distiller is None:  # a distillation has no KL term
        logs["kl_weight"] = kl_weight
    state.images_seen += images
    state.step += 1
    state.batch_in_epoch += 1
    if state.batch_in_epoch >= state.steps_per_epoch:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    return images, logs, finite


def vae_update(cfg, parts, state, batches, kl_weight, disc_active, key_log=None):
    """Generator micro-steps over grad_accum micro-batches, then the VAE's optimizer step and EMA.

    Returns ([(x, reconstruction, loss weight)] per micro-batch for the discriminator, images used,
    logs averaged over the micro-batches, whether the gradient was finite).
    """
    accelerator = parts.accelerator
    world, rank, accum = accelerator.num_processes, accelerator.process_index, cfg.train.grad_accum
    raw_disc = accelerator.unwrap_model(parts.disc) if disc_active else None
    kept, images, logs = [], 0, {}
    for m in range(accum):
        batch = next(batches)
        note_batch(state, batch, key_log)
        for error in batch["errors"]:
            text = f"{error['key']}: {error['error']}"
            log.warning("Skipped an image that cannot be used: %s", text)
            state.skipped_images.append(text)
        pixels, weight = batch["pixels"], 1.0
        if len(pixels) == 0:
            # Stands in, with loss weight 0, for a micro-batch whose images all failed to decode: every
            # process must still run a backward, or DDP's gradient all-reduce would wait forever.
            pixels, weight = torch.zeros(1, 3, cfg.data.size, cfg.data.size), 0.0
        else:
            images += len(pixels)
        x = pixels.to(accelerator.device, non_blocking=True)
        slot = m * world + rank
        generator = torch_generator(cfg.train.seed, state.step, slot)  # posterior noise of this slot
        with contextlib.nullcontext() if m == accum - 1 else accelerator.no_sync(parts.model):
            if parts.distiller is not None:  # distillation: targets from the teacher (or its cached latents)
                real, recon, micro_logs = parts.distiller.step(
                    accelerator, parts.model, x, cached_latents(cfg, parts, batch, weight), loss_cfg=cfg.loss,
                    disc_cfg=cfg.disc, perceptual=parts.perceptual, disc=raw_disc, last_layer=parts.last_layer,
                    generator=generator, sample=cfg.model.sample_posterior, scale=weight / accum)
            elif parts.fp16 is not None:  # the fp16-safe fine-tune: distance to the teacher + activation penalty
                real, recon, micro_logs = parts.fp16.step(accelerator, parts.model, x, generator, scale=weight / accum)
            else:
                real, recon, micro_logs = generator_step(
                    accelerator, parts.model, x, loss_cfg=cfg.loss, disc_cfg=cfg.disc, kl_weight=kl_weight,
                    perceptual=parts.perceptual, disc=raw_disc, last_layer=parts.last_layer, generator=generator,
                    scale=weight / accum, regularizer=parts.regularizer,
                    rng=transform_rng(cfg.train.seed, state.step, slot))
        kept.append((real, recon, weight))
        add_logs(logs, micro_logs, accum)
    # A non-finite gradient norm means a non-finite loss or gradient somewhere (DDP has already averaged
    # the gradients, so every process sees the same norm).
    grad_norm = accelerator.clip_grad_norm_(parts.trainable, cfg.optim.grad_clip or float("inf"))
    finite, updated = optimizer_step(accelerator, parts.opt_g, parts.sched_g, grad_norm)
    if updated and parts.ema is not None:
        parts.ema.step(parts.vae.parameters())
    logs["grad_norm"] = float(grad_norm)
    return kept, images, logs, finite


def cached_latents(cfg, parts, batch, weight):
    """Distillation from a cache: the batch's stored (mean, logvar or None) on the device; None without a cache."""
    if "mean" not in batch:
        return None
    mean, logvar = batch["mean"], batch["logvar"]
    if weight == 0:  # the stand-in of a micro-batch whose images all failed
        mean, logvar = parts.distiller.zero_cached(parts.vae, cfg.data.size)
    device = parts.accelerator.device
    return mean.to(device), (logvar.to(device) if logvar is not None else None)


def disc_update(cfg, parts, state, kept, logs):
    """Discriminator micro-steps on the real images and the reconstructions just made, then its optimizer step."""
    accelerator = parts.accelerator
    for m, (x, recon, weight) in enumerate(kept):
        with contextlib.nullcontext() if m == len(kept) - 1 else accelerator.no_sync(parts.disc):
            micro_logs = discriminator_step(accelerator, parts.disc, x, recon, disc_cfg=cfg.disc,
                                            scale=weight / cfg.train.grad_accum)
        add_logs(logs, micro_logs, cfg.train.grad_accum)
    grad_norm = accelerator.clip_grad_norm_(parts.disc.parameters(), cfg.disc.grad_clip or float("inf"))
    finite, updated = optimizer_step(accelerator, parts.opt_d, parts.sched_d, grad_norm)
    state.disc_updates += int(updated)
    return finite


def note_batch(state, batch, key_log):
    """Record where a streamed batch leaves its worker stream, and log its keys when log.sample_keys is on."""
    if "worker" in batch:
        state.stream["positions"][batch["worker"]] = batch["position"]
        state.stream["batches"] += 1
    if key_log is not None:
        epochs = batch.get("epochs") or [state.epoch] * len(batch["keys"])
        key_log.write("".join(f"{state.step + 1}\t{e}\t{k}\n" for e, k in zip(epochs, batch["keys"])))
        key_log.flush()


def add_logs(total, logs, count):
    """Add one micro-batch's tensor logs to the running averages in `total`."""
    for k, v in logs.items():
        total[k] = total.get(k, 0.0) + v.float().item() / count


def optimizer_step(accelerator, optimizer, scheduler, grad_norm):
    """Step `optimizer` unless its gradient is non-finite, then its schedule; returns (finite, weights changed)."""
    finite = math.isfinite(float(grad_norm))
    if finite or accelerator.scaler is not None:
        optimizer.step()  # with fp16 the GradScaler skips a non-finite step itself and lowers its scale
    updated = finite and not getattr(optimizer, "step_was_skipped", False)
    optimizer.zero_grad(set_to_none=True)
    step_scheduler(scheduler)
    return finite, updated


def step_scheduler(scheduler):
    """Advance a schedule by one training step, also when that step's update was skipped."""
    with warnings.catch_warnings():
        # The schedule follows the step counter, so after a skipped (non-finite) first update this
        # order is intended; PyTorch would warn that the optimizer has not stepped yet.
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        scheduler.step()


def agree(accelerator, nonfinite, stop_requested):
    """(skip, stop) as all processes agree on them: true when any process says so."""
    flags = torch.tensor([float(nonfinite), float(stop_requested)], device=accelerator.device)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "max")
    return bool(flags[0] > 0), bool(flags[1] > 0)


def record_unlisted(state, source):
    """Add the files the source left out when it was listed (special files, loops, unreadable) to the skip list."""
    for entry in source.skipped:
        text = f"{entry['key']}: {entry['reason']}"
        if text not in state.skipped_images:
            log.warning("Skipped a file that cannot be read as an image: %s", text)
            state.skipped_images.append(text)


def check_trained(state, checkpoint):
    """Refuse to export when most of this session's steps were skipped as non-finite: the weights barely trained."""
    steps = state.step - state.session_start[0]
    skipped = state.nonfinite_skips - state.session_start[1]
    if steps > 0 and 2 * skipped > steps:
        raise VaekitError(
            f"{skipped} of the {steps} steps of this run were skipped because the loss or gradient was not finite, "
            f"so the weights are (nearly) untrained; nothing was exported (last checkpoint: {checkpoint}). Check "
            f"the loss weights and optim.lr, or use train.mixed_precision=bf16 instead of fp16.")


def count_skip(state, skipped):
    """Count a skipped (non-finite) step, and the streak of them."""
    if not skipped:
        state.nonfinite_in_row = 0
        return
    state.nonfinite_skips += 1
    state.nonfinite_in_row += 1
    log.warning("Step %d: non-finite loss or gradient, update skipped (%d in a row).", state.step,
                state.nonfinite_in_row)


def maybe_validate(cfg, parts, state, validator, has_holdout):
    """Score the held-out images every validation.every steps (every process its share; the main one reports)."""
    every = cfg.validation.every
    if not (has_holdout and every and state.step % every == 0 and state.step < cfg.train.steps):
        return
    if validator is not None:
        path = Path(cfg.out_dir) / "samples" / f"step-{state.step:06d}.png"
        values = validator.run(parts.export_state(), cfg.validation.num_images, path)
    if validator is not None and parts.accelerator.is_main_process:
        state.history.append({"step": state.step, **values})
        parts.accelerator.log({f"val/{k}": v for k, v in values.items() if v is not None}, step=state.step)
        log.info("step %d  validation  %s", state.step, format_metrics(values, cfg.validation.lpips_net))
    parts.accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save(cfg, parts, state, dataset_size, interrupted=False):
    """Write this step's checkpoint and prune old ones; the inverse of `restore`. Every process must call it."""
    accelerator = parts.accelerator
    images = state.images_resumed + accelerator.reduce(
        torch.tensor([state.images_seen], device=accelerator.device), "sum").item()
    fingerprints = gather_object([replica_fingerprint(parts.vae)])
    skipped = sorted(set(state.skipped_images).union(*gather_object([state.skipped_images])))
    streams = gather_object([state.stream]) if state.stream is not None else None
    if len(set(fingerprints)) > 1:
        raise VaekitError("The processes hold different weights (DDP replicas diverged); this is a bug in vaekit.")
    path = ckpt.checkpoint_path(cfg.out_dir, state.step)
    if accelerator.is_main_process:
        disc = accelerator.unwrap_model(parts.disc) if parts.disc is not None else None
        weights = {"vae": parts.vae.state_dict(),
                   "ema": state_with_ema(parts.vae, parts.ema) if parts.ema is not None else None,
                   "disc": disc.state_dict() if disc is not None else None,
                   "align": parts.regularizer.state_dict() if parts.regularizer is not None else None,
                   "fp16_best": parts.fp16.best_weights if parts.fp16 is not None else None}
        optimizers = {"vae": parts.opt_g.state_dict(), "disc": parts.opt_d.state_dict() if parts.opt_d else {}}
        meta = {
            "interrupted": interrupted,
            "config": to_dict(cfg),
            "vae_class": type(parts.vae).__name__,
            "vae_config": vae_config(parts.vae),
            "data": {"epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
                     "global_batch": global_batch(cfg, accelerator.num_processes), "dataset_size": dataset_size,
                     "processes": accelerator.num_processes, **({"streams": streams} if streams else {})},
            "loop": {"images_seen": int(images), "nonfinite_skips": state.nonfinite_skips,
                     "nonfinite_in_row": state.nonfinite_in_row, "disc_updates": state.disc_updates},
            "schedulers": {"vae": parts.sched_g.state_dict(),
                           "disc": parts.sched_d.state_dict() if parts.sched_d is not None else None},
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "ema": {k: v for k, v in parts.ema.state_dict().items() if k != "shadow_params"} if parts.ema else None,
            "replica_fingerprints": fingerprints,
            "skipped_images": skipped,
            "distill": parts.distiller.meta() if parts.distiller is not None else None,
            **({"fp16": parts.fp16.meta()} if parts.fp16 is not None else {}),
        }
        ckpt.save_checkpoint(cfg.out_dir, state.step, weights, optimizers, ckpt.rng_state(), meta)
        if skipped:
            write_text(Path(cfg.out_dir) / "skipped_images.txt", "\n".join(skipped) + "\n")
        ckpt.prune_checkpoints(cfg.out_dir, cfg.train.keep_last)
    accelerator.wait_for_everyone()
    return path


def restore(cfg, parts, state, checkpoint, dataset_size):
    """Load a checkpoint's optimizers, schedules, discriminator, EMA, RNG and position into the run; inverse of `save`.

    The VAE's own weights were loaded by `build_vae`, which builds it from the checkpoint.
    """
    meta = checkpoint.meta
    loop = meta["loop"]
    state.step = meta["step"]
    state.images_resumed = loop["images_seen"]
    state.nonfinite_skips = loop.get("nonfinite_skips", 0)
    state.nonfinite_in_row = loop.get("nonfinite_in_row", 0)
    state.disc_updates = loop.get("disc_updates", 0)
    state.skipped_images = list(meta.get("skipped_images", []))
    position = meta["data"]
    if isinstance(dataset_size, dict) or "streams" in position:
        restore_stream(cfg, parts.accelerator, state, position, dataset_size)
    elif position["global_batch"] == global_batch(cfg, parts.accelerator.num_processes) \
            and position["dataset_size"] == dataset_size:
        state.epoch, state.batch_in_epoch = position["epoch"], position["batch_in_epoch"]
    else:  # the order of a different batch layout would not match; start its next epoch cleanly
        state.epoch, state.batch_in_epoch = position["epoch"] + 1, 0
        log.warning("Batch size, process count or data set changed since the checkpoint; continuing from the "
                    "start of epoch %d.", state.epoch)
    check_schedule_length(cfg, meta)
    parts.opt_g.load_state_dict(checkpoint.optimizers["vae"])
    parts.sched_g.load_state_dict(meta["schedulers"]["vae"])
    if parts.disc is not None:
        if checkpoint.weights["disc"] is not None:
            parts.accelerator.unwrap_model(parts.disc).load_state_dict(checkpoint.weights["disc"])
            parts.opt_d.load_state_dict(checkpoint.optimizers["disc"])
            parts.sched_d.load_state_dict(meta["schedulers"]["disc"])
        else:
            log.warning("The checkpoint has no discriminator; starting a new one.")
    if parts.regularizer is not None and parts.regularizer.projection is not None:
        if checkpoint.weights.get("align") is not None:
            parts.regularizer.load_state_dict(checkpoint.weights["align"])
        else:
            log.warning("The checkpoint has no alignment projection; starting a new one.")
    if parts.ema is not None:
        shadow = checkpoint.weights["ema"]
        if shadow is not None:
            parts.ema.load_state_dict({**meta["ema"], "shadow_params": [shadow[n] for n, _ in parts.vae.named_parameters()]})
            parts.ema.to(parts.accelerator.device)
        else:
            log.warning("The checkpoint has no EMA; starting the EMA from its raw weights.")
    if parts.accelerator.scaler is not None and meta.get("scaler"):
        parts.accelerator.scaler.load_state_dict(meta["scaler"])
    ckpt.set_rng_state(checkpoint.rng)
    log.info("Resumed from %s at step %d.", checkpoint.path, state.step)


def restore_stream(cfg, accelerator, state, position, dataset_size):
    """Put back this process's worker-stream positions; a changed layout or shard list starts the next epoch.

    The positions are only valid for the same shards, processes, batch size and worker streams;
    otherwise every stream starts the epoch after the latest one any stream had reached, so no
    sample of the interrupted epoch is seen twice (its unread rest is skipped).
    """
    world = accelerator.num_processes
    streamed = isinstance(dataset_size, dict)
    workers = stream_workers(cfg.data.num_workers, dataset_size["shards"], world) if streamed else 0
    streams = position.get("streams")
    if (streams and position["dataset_size"] == dataset_size and len(streams) == world
            and position["global_batch"] == global_batch(cfg, world) and streams[0]["workers"] == workers):
        state.stream = streams[accelerator.process_index]
        return
    reached = [p[0] for s in streams or [] for p in s["positions"] if p is not None]
    epoch = max(reached, default=position.get("epoch", 0)) + 1
    state.stream = {"workers": workers, "batches": 0, "positions": [[epoch, 0, 0]] * workers} if workers else None
    log.warning("The shards, process count, batch size or data.num_workers changed since the checkpoint (or it "
                "was not streamed); continuing from the start of epoch %d.", epoch)
    if not workers:  # streamed before, indexed now
        state.epoch, state.batch_in_epoch = epoch, 0


# Schedules whose shape depends on the run's total length (diffusers' get_scheduler num_training_steps).
LENGTH_DEPENDENT = ("linear", "cosine", "cosine_with_restarts", "polynomial")


def check_schedule_length(cfg, meta):
    """Refuse a resume whose train.steps would squeeze a length-dependent learning-rate schedule; warn on stretching."""
    planned = meta["config"]["train"]["steps"]
    if planned == cfg.train.steps:
        return
    schedules = [s for s in (cfg.optim.scheduler, cfg.disc.scheduler if cfg.disc.weight > 0 else "constant")
                 if s in LENGTH_DEPENDENT]
    if not schedules:
        log.info("train.steps changed from %d to %d; the constant learning rate is unaffected.", planned, cfg.train.steps)
        return
    how = (f"To train further with a schedule of its own, start a new run from these weights: model.source="
           f"{ckpt.checkpoint_path(cfg.out_dir, meta['step'])} out_dir=NEW_FOLDER.")
    if cfg.train.steps < planned:
        raise VaekitError(
            f"This run was planned for {planned} steps and its {schedules[0]} learning-rate schedule ends there; "
            f"resuming with train.steps={cfg.train.steps} would squeeze the rest of the schedule (the learning rate "
            f"would drop at once). Resume with train.steps={planned} to finish the run as planned. {how}")
    log.warning("train.steps grows from %d to %d: the %s learning-rate schedule is stretched to the new length, so "
                "the learning rate rises again from step %d on. %s", planned, cfg.train.steps, schedules[0],
                meta["step"], how)


def state_with_ema(vae, ema):
    """The VAE's state dict with each parameter replaced by its EMA shadow."""
    state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    for (name, _), shadow in zip(vae.named_parameters(), ema.shadow_params):
        state[name] = shadow.detach().clone()
    return state


def replica_fingerprint(module):
    """sha256 over this process's parameters; every DDP replica must give the same one."""
    digest = hashlib.sha256()
    for name, p in module.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Finishing


def finish(cfg, parts, state, validator, last_saved, train_seconds=None, train_images=None):
    """Export the weights (EMA when on) with their model card, score all held-out images, and say where everything is.

    A decoder fine-tune also scores the model it started from (`model.source`) on the same images, shows
    it in the grid (original | base | fine-tuned) and checks that the encoder is still bit-identical.
    """
    accelerator, out_dir = parts.accelerator, Path(cfg.out_dir)
    result = {"checkpoint": last_saved, "step": state.step, "interrupted": False}
    # fp16-safe: the closest state with headroom back in the model, before it is scored and exported
    fp16_report = parts.fp16.finish(parts, out_dir, state.step) if parts.fp16 is not None else None
    if parts.fp16 is not None and not parts.fp16.exportable:  # never export a state without the headroom
        if accelerator.is_main_process:
            log.info("\n".join([f"Finished {state.step} steps; checkpoint {last_saved}"]
                               + fp16_safe.summary_lines(fp16_report) + [f"  report  {out_dir / 'fp16_safe.json'}"]))
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return {**result, "fp16": fp16_report}
    values, base, base_scores = None, load_base(cfg, accelerator), None
    if validator is not None:  # every process scores its share; the main process gets the metrics
        if base is not None:
            base_scores = validator.score(base.state_dict(), len(validator.images))
        kept = None if base is None else encoder_fingerprint(base) == encoder_fingerprint(parts.vae)
        title = None if kept is None else (
            "latents unchanged: the encoder is bit-identical to the base's" if kept else
            "WARNING: the encoder differs from the base's, so its latents do too")
        values = validator.run(parts.export_state(), len(validator.images), out_dir / "reconstructions.png",
                               base=base_scores, title=title)
    if accelerator.is_main_process:
        export = cast_vae(copy_vae(parts.vae), device="cpu")
        export.load_state_dict(parts.export_state())
        weights = "ema" if parts.ema is not None else "raw"
        comparison = base_comparison(base, export, base_scores)
        if values is not None:
            values.update(step=state.step, weights=weights,
                          lpips_net=cfg.validation.lpips_net if values["lpips"] is not None else None,
                          train_seconds=train_seconds, **comparison)
        card = model_card(export, out_dir / "vae", training=training_facts(cfg, parts, state, train_images, values,
                                                                             validator))
        result["export"] = save_diffusers(export, out_dir / "vae", card=card)
        took = f" in {format_duration(train_seconds)}" if train_seconds is not None else ""
        lines = [f"Finished {state.step} steps{took}. Outputs in {out_dir}:",
                 f"  diffusers export ({'EMA' if weights == 'ema' else 'trained'} weights) with its model card  "
                 f"{result['export']}"]
        if parts.distiller is not None:  # distillation: a tiny student also in TAESD's two-file layout
            result["taesd"] = parts.distiller.export(export, out_dir)
            if result["taesd"] is not None:
                lines.append(f"  TAESD files (what ComfyUI reads from models/vae_approx)  {result['taesd']}")
        if validator is not None:
            write_json(out_dir / "metrics.json", values)
            if state.history:
                write_text(out_dir / "validation_history.jsonl", "".join(json.dumps(h) + "\n" for h in state.history))
            accelerator.log({f"val/{k}": v for k, v in values.items() if isinstance(v, float)}, step=state.step)
            result.update(metrics=values, grid=out_dir / "reconstructions.png", metrics_file=out_dir / "metrics.json")
            side = validator.images.shape[-1]
            columns = "original | base | fine-tuned | error maps" if base_scores else \
                "original | reconstruction | error map"
            lines.append(f"  held-out images ({side} px): {columns}  {result['grid']}")
            lines.append(f"  held-out metrics  {result['metrics_file']}  ({values['images']} images: "
                         f"{format_metrics(values, values['lpips_net'])})")
            if base_scores:
                lines.append(f"  the base, {cfg.model.source}, on the same images: "
                             f"{format_metrics(values['base'], values['lpips_net'])}")
        else:
            lines.append("  no held-out images (data.holdout=0): no grid or metrics")
        if comparison:
            lines.append("  latents unchanged: the encoder is bit-identical to the base's (encoder fingerprint "
                         f"{comparison['encoder_fingerprint'][:16]})" if comparison["latents_unchanged"] else
                         "  WARNING: the encoder differs from the base's: latents are not those of the base")
        lines.append(f"  checkpoint  {last_saved}")
        if fp16_report is not None:
            result["fp16"] = fp16_report
            lines += fp16_safe.summary_lines(fp16_report) + [f"  report  {out_dir / 'fp16_safe.json'}"]
        if state.skipped_images:
            lines.append(f"  {len(set(state.skipped_images))} unusable images skipped, listed in "
                         f"{out_dir / 'skipped_images.txt'}")
        lines += next_commands(result["export"], cfg.data.path, out_dir, cfg.distill.teacher)
        log.info("\n".join(lines))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def load_base(cfg, accelerator):
    """For a decoder fine-tune, `model.source` loaded again (the base it started from), on CPU; else None.

    Every process loads it and they agree: when any cannot (a file removed during the run), none compares,
    with a warning, and the run still exports.
    """
    if cfg.model.mode != "decoder":
        return None
    base, failure = run_check("base model", lambda: load_vae(cfg.model.source, overrides=cfg.model.overrides))
    loaded = [failure is None] if accelerator.num_processes == 1 else gather_object([failure is None])
    if not all(loaded):
        log.warning("Cannot load the base model %s again to compare the fine-tune with%s; exporting without it.",
                    cfg.model.source, f" ({failure[1]})" if failure else "")
        return None
    return base


def base_comparison(base, export, base_scores):
    """metrics.json's record of a decoder fine-tune against its base: the base's scores and whether latents are kept."""
    if base is None:
        return {}
    fingerprint = encoder_fingerprint(export)
    comparison = {"latents_unchanged": fingerprint == encoder_fingerprint(base), "encoder_fingerprint": fingerprint}
    if base_scores:
        comparison["base"] = base_scores[0]
    return comparison


def format_duration(seconds):
    """'2 min 31 s', or '48.2 s' under a minute."""
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


def training_facts(cfg, parts, state, train_images, values, validator):
    """What the export's model card says about this run (vaekit.model.card.model_card's `training`)."""
    held_out = len(validator.images) if validator is not None else 0
    metrics = None
    if values is not None:
        metrics = {**values, "size": validator.images.shape[-1]}
    return {
        "source": cfg.model.source,
        "mode": cfg.model.mode,
        "teacher": cfg.distill.teacher or None,
        "steps": state.step,
        "images_per_step": global_batch(cfg, parts.accelerator.num_processes),
        "data": {"path": cfg.data.path, "train_images": train_images if train_images is not None else "streamed",
                 "held_out": held_out, "size": cfg.data.size, "crop": cfg.data.crop},
        "losses": describe_losses(cfg, perceptual=parts.perceptual is not None),
        "ema": parts.ema is not None,
        "metrics": metrics,
    }


def next_commands(export, data, out_dir, teacher=None):
    """What to try next with the exported VAE, as lines to print."""
    if teacher:  # distillation: compare the student with its teacher, latent compatibility included
        return ["Next, with this student:",
                f"  vaekit evaluate --vae {teacher} --vae {export} --teacher {teacher} --data {data} "
                f"--out {out_dir / 'evaluation'}   # beside its teacher: quality, latent compatibility, speed",
                f"  vaekit reconstruct --vae {export} IMAGE.png --out {out_dir / 'reconstructed'}"]
    return ["Next, with this VAE:",
            f"  vaekit reconstruct --vae {export} IMAGE.png --out {out_dir / 'reconstructed'}   # any image, any size",
            f"  vaekit encode --vae {export} --data {data} --out {out_dir / 'latents'}   # a latent cache for diffusion",
            f"  vaekit evaluate --vae {export} --data {data} --out {out_dir / 'evaluation'}   # PSNR, SSIM, LPIPS, "
            f"rFID and an HTML report"]
