"""Speed of vaekit against diffusers' AutoencoderKL: decode, encode and one training step, side by side.

One process, one run: every variant of a workload uses the same weights, inputs, dtype and device, is
warmed up, synchronised, timed as the median of repeats, and checked against an fp32 reference before
its speed counts (PSNR >= --gate_db; a row that fails says so and its speed-up is not claimed).

Variants (--variants):
  eager     diffusers AutoencoderKL as it comes, in --dtype (the baseline every ratio is against)
  compiled  diffusers' best simple setup: channels_last + torch.compile of encoder and decoder
  vaekit    vaekit.codec.levers.optimize_vae with --levers (and, for training, vaekit.train.steps)
--ablate adds one row per lever in --levers, applied alone to the eager model.

Examples:
  python scripts/bench.py --device cpu --preset tiny --dtype fp32 --sizes 32 --repeats 3
  python scripts/bench.py --device cuda --preset sd --dtype bf16 --out benchmarks/h100.md
"""

import argparse
import contextlib
import copy
import dataclasses
import datetime
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback

import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchlib lives beside this script
from benchlib import cpu_name, error_text, fmt, free_memory, is_oom, log, sync, time_calls  # noqa: E402
from vaekit.codec import levers as fast
from vaekit.device import DTYPES
from vaekit.errors import VaekitError


# Dense bf16/fp16 tensor-core peak in TFLOP/s, from the vendors' data sheets, keyed on a substring of
# torch.cuda.get_device_name(); the first match wins, so the more specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),  # the same GH100 chip as H100 SXM, with more and faster memory
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)

TARGETS = {"decode_vs_eager": 2.0, "encode_vs_eager": 1.5, "train_vs_plain": 1.5}


@dataclasses.dataclass
class Workload:
    """One timed job: what runs, at which size and batch."""

    kind: str  # decode | encode | train
    size: int  # image side in pixels
    batch: int

    @property
    def name(self):
        return f"{self.kind} {self.size}px"


@dataclasses.dataclass
class Variant:
    """One way of running a workload."""

    name: str
    family: str  # eager | compiled | vaekit | ablation
    levers: fast.FastConfig = None


@dataclasses.dataclass
class Row:
    """One measured (workload, variant) pair."""

    workload: str
    kind: str
    variant: str
    family: str
    batch: int
    seconds: float = None  # median per call (one batch)
    first_call_s: float = None
    peak_mib: float = None
    psnr_db: float = None
    gate_ok: bool = None
    flops: float = None  # per call
    error: str = None

    @property
    def ms_per_image(self):
        return None if self.seconds is None else 1000 * self.seconds / self.batch

    @property
    def images_per_s(self):
        return None if self.seconds is None else self.batch / self.seconds


# ----------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    """Command-line options; device-dependent defaults are filled in by resolve_defaults."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="weights and activations (default bf16)")
    p.add_argument("--preset", default=None, help="architecture preset (default: sd on CUDA, tiny on CPU)")
    p.add_argument("--model", default=None, help="any vaekit model argument (real weights); overrides --preset")
    p.add_argument("--sizes", type=int, default=None,
                   help="base size s: decode at 2s and 4s, encode at s and 2s, train at s "
                        "(default 256 on CUDA, 32 on CPU)")
    p.add_argument("--decode_sizes", default=None, help="comma list, overrides --sizes for decode")
    p.add_argument("--encode_sizes", default=None, help="comma list, overrides --sizes for encode")
    p.add_argument("--encode_batch", default=None, help="comma list, one per encode size (default 64,32 CUDA; 8,4 CPU)")
    p.add_argument("--train_size", type=int, default=None, help="training crop size (default: s)")
    p.add_argument("--train_batch", type=int, default=None, help="images per training step (default 16 CUDA, 2 CPU)")
    p.add_argument("--max_batch", type=int, default=None,
                   help="CUDA: cap of the doubling search for the largest decode batch that fits (default 64); "
                        "CPU: the large decode batch itself (default 4)")
    p.add_argument("--workloads", default="decode,encode,train", help="comma list of decode, encode, train")
    p.add_argument("--variants", default="eager,compiled,vaekit", help="comma list of eager, compiled, vaekit")
    p.add_argument("--levers", default=None,
                   help=f"vaekit's levers, comma list of {', '.join(fast.LEVERS)} "
                        "(default: channels_last,sdpa,fused_upsample plus compile on CUDA)")
    p.add_argument("--compile_mode", default="default", help="torch.compile mode of vaekit's compile lever")
    p.add_argument("--baseline_compile_mode", default="default",
                   help="torch.compile mode of the 'compiled' diffusers baseline (diffusers' docs use max-autotune)")
    p.add_argument("--ablate", action="store_true", help="add a row per lever, applied alone to the eager model")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3 CUDA, 1 CPU)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls; the median is reported (default 10 CUDA, 3 CPU)")
    p.add_argument("--gate_db", type=float, default=45.0, help="minimum PSNR against the fp32 reference")
    p.add_argument("--gate_images", type=int, default=4, help="images per workload checked against the reference")
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak for the %% column (default: table)")
    p.add_argument("--lpips_net", default="vgg", choices=["vgg", "alex"], help="LPIPS backbone of the training step")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--no_cudnn_benchmark", action="store_true",
                   help="leave cudnn.benchmark off (it is on for every row)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the markdown report here (atomically)")
    p.add_argument("--json", default=None, help="write the rows as JSON here (atomically)")
    return p.parse_args(argv)


def int_list(text):
    """'64,32' -> [64, 32]."""
    return [int(v) for v in str(text).split(",") if v.strip()]


def resolve_defaults(args):
    """Fill in the defaults that depend on the device, and check the rest."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise VaekitError("--device cuda was asked for but torch sees no CUDA device; use --device cpu.")
    args.preset = args.preset or ("sd" if cuda else "tiny")
    s = args.sizes or (256 if cuda else 32)
    args.decode_sizes = int_list(args.decode_sizes) if args.decode_sizes else [2 * s, 4 * s]
    args.encode_sizes = int_list(args.encode_sizes) if args.encode_sizes else [s, 2 * s]
    batches = int_list(args.encode_batch) if args.encode_batch else ([64, 32] if cuda else [8, 4])
    if len(batches) < len(args.encode_sizes):
        batches += [batches[-1]] * (len(args.encode_sizes) - len(batches))
    args.encode_batch = batches[:len(args.encode_sizes)]
    args.train_size = args.train_size or s
    args.train_batch = args.train_batch or (16 if cuda else 2)
    args.max_batch = args.max_batch or (64 if cuda else 4)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.repeats = args.repeats or (10 if cuda else 3)
    if args.levers is None:
        args.levers = "channels_last,sdpa,fused_upsample" + (",compile" if cuda else "")
    args.fast = fast.parse_levers(args.levers)
    args.fast.compile_mode = args.compile_mode
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for w in args.workloads:
        if w not in ("decode", "encode", "train"):
            raise VaekitError(f"Unknown workload '{w}'; choose from decode, encode, train.")
    for v in args.variants:
        if v not in ("eager", "compiled", "vaekit"):
            raise VaekitError(f"Unknown variant '{v}'; choose from eager, compiled, vaekit.")
    if "train" in args.workloads and args.train_size < 32:
        raise VaekitError(f"--train_size {args.train_size} is too small for the 3-layer PatchGAN; use at least 32.")
    if "train" in args.workloads and args.dtype == "fp16":
        raise VaekitError("The training step is measured in bf16 or fp32 (fp16 would need a GradScaler); "
                          "use --dtype bf16.")
    return args


# ----------------------------------------------------------------------------------------------
# FLOPs and numerics (timing and memory: benchlib)


def count_flops(fn):
    """FLOPs of one call of `fn`, counted by torch.utils.flop_counter (convolutions, matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def device_peak_tflops(device, dtype, override):
    """The device's dense peak for `dtype` in TFLOP/s: --peak_tflops, else the table for bf16/fp16 on CUDA."""
    if override:
        return override
    if device.type != "cuda" or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS:
        if key in name:
            return peak
    return None


def psnr_against(output, reference):
    """Worst per-item PSNR in dB of `output` against `reference`, with the reference's own peak-to-peak range.

    The range is taken from the reference rather than fixed at 2 (images in [-1, 1]) so the gate means
    the same for latents and for randomly initialised models whose outputs span less than [-1, 1].
    """
    out = output.float().flatten(1)  # (B, ...) -> (B, D)
    ref = reference.float().flatten(1)
    mse = (out - ref).square().mean(dim=1)
    peak = (ref.amax(dim=1) - ref.amin(dim=1)).clamp_min(1e-12)
    values = 10 * torch.log10(peak.square() / mse.clamp_min(1e-30))
    return float(values.min())


@contextlib.contextmanager
def strict_fp32():
    """True fp32 matmuls and convolutions (no TF32), for the reference outputs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------
# Models: the base weights, the baselines and vaekit's path


def load_base(args):
    """The fp32 model every variant copies its weights from (random init of a preset unless --model)."""
    from vaekit.model import load_vae

    torch.manual_seed(args.seed)
    spec = args.model or f"preset:{args.preset}"
    return load_vae(spec).to("cpu", torch.float32).eval()


def copy_vae(base, device, dtype):
    """A separate model with the base weights, on `device` in `dtype`."""
    return copy.deepcopy(base).to(device=device, dtype=dtype).eval()


def compile_baseline(vae, mode, backend="inductor"):
    """diffusers' best simple setup, as its docs write it: channels_last, then torch.compile of both halves."""
    fast.raise_recompile_limit()
    vae.to(memory_format=torch.channels_last)
    mode = None if mode == "default" else mode
    vae.encoder.compile(mode=mode, backend=backend)
    vae.decoder.compile(mode=mode, backend=backend)
    return vae


def make_variants(args):
    """The variants to run, in table order."""
    variants = []
    if "eager" in args.variants:
        variants.append(Variant("diffusers eager", "eager"))
    if "compiled" in args.variants:
        variants.append(Variant(f"diffusers channels_last+compile({args.baseline_compile_mode})", "compiled"))
    if "vaekit" in args.variants:
        variants.append(Variant(f"vaekit [{','.join(fast.lever_names(args.fast)) or 'no levers'}]", "vaekit",
                                args.fast))
    if args.ablate:
        for name in fast.lever_names(args.fast):
            if name == "sdpa":
                continue  # diffusers' default already (AttnProcessor2_0): the eager row is this lever
            levers = fast.parse_levers(f"sdpa,{name}")
            levers.compile_mode = args.compile_mode
            variants.append(Variant(f"eager + {name}", "ablation", levers))
    return variants


def prepare_vae(base, variant, args, device, dtype):
    """A fresh model for one inference row, set up as the variant says."""
    vae = copy_vae(base, device, dtype)
    if variant.family == "compiled":
        return compile_baseline(vae, args.baseline_compile_mode, getattr(args, "compile_backend", "inductor"))
    if variant.levers is not None:
        return fast.optimize_from_config(vae, variant.levers)
    return vae


def uses_compile(variant):
    """Whether a variant compiles (dynamo state is reset before it, so cached graphs never leak between rows)."""
    levers = variant.levers
    return variant.family == "compiled" or (levers is not None and (levers.compile or levers.cuda_graphs))


def uses_graphs(variant, device):
    """Whether a variant may replay CUDA graphs (reduce-overhead, max-autotune): each call then starts a new step."""
    return device.type == "cuda" and uses_compile(variant)


# ----------------------------------------------------------------------------------------------
# Inference workloads


def make_inputs(workload, vae, device, seed):
    """Seeded inputs for a decode (latents) or encode (images in [-1, 1]) workload, on `device` in fp32."""
    from vaekit.model import downsample_factor, latent_channels

    g = torch.Generator().manual_seed(seed + workload.size)
    if workload.kind == "decode":
        side = workload.size // downsample_factor(vae)
        x = torch.randn(workload.batch, latent_channels(vae), side, side, generator=g)  # (B, C, h, w)
    else:
        x = torch.rand(workload.batch, 3, workload.size, workload.size, generator=g) * 2 - 1  # (B, 3, H, W)
    return x.to(device)


def inference_fn(vae, workload, x):
    """A no-argument callable running the workload once: decoded images or posterior means."""
    if workload.kind == "decode":
        def run():
            with torch.no_grad():
                return vae.decode(x).sample
    else:
        def run():
            with torch.no_grad():
                return vae.encode(x).latent_dist.mean
    return run


def reference_output(base, workload, x, device, count):
    """The fp32 eager output for the first `count` items, a few at a time (items are independent)."""
    vae = copy_vae(base, device, torch.float32)
    outs = []
    with strict_fp32():
        for i in range(0, count, 4):
            outs.append(inference_fn(vae, workload, x[i:min(i + 4, count)].float())())
    del vae
    free_memory(device)
    return torch.cat(outs)


def largest_decode_batch(base, size, device, dtype, cap):
    """The largest power-of-two decode batch (up to `cap`) that diffusers' eager model fits on the GPU."""
    from vaekit.model import downsample_factor, latent_channels

    vae = copy_vae(base, device, dtype)
    side = size // downsample_factor(vae)
    best, batch = 0, 1
    while batch <= cap:
        try:
            z = torch.randn(batch, latent_channels(vae), side, side, device=device, dtype=dtype)
            with torch.no_grad():
                vae.decode(z)
            sync(device)
            best, batch = batch, batch * 2
        except Exception as e:  # noqa: BLE001 - only an OOM is expected here
            if not is_oom(e):
                raise
            break
        finally:
            z = None
            free_memory(device)
    del vae
    free_memory(device)
    return max(best, 1)


@dataclasses.dataclass
class InferenceSetup:
    """What every variant of one decode or encode workload shares: inputs, the fp32 reference, the FLOPs."""

    workload: Workload
    x: torch.Tensor  # inputs in the run's dtype
    reference: torch.Tensor  # fp32 eager outputs of the first gate_n items
    gate_n: int
    flops: float  # per call (one batch)


def prepare_inference(workload, base, args, device, dtype):
    """Inputs, fp32 reference and FLOPs of one inference workload."""
    # Inputs arrive in the run's dtype, and the reference sees those same values in fp32, so the gate
    # measures the computation rather than the rounding of the inputs.
    x = make_inputs(workload, base, device, args.seed).to(dtype)
    gate_n = min(args.gate_images, workload.batch)
    reference = reference_output(base, workload, x, device, gate_n)
    counter_vae = copy_vae(base, device, dtype)
    # FLOPs are those of the model (counted once at batch 1, linear in the batch), so TFLOP/s is the
    # model's work per second whatever a variant does to get there.
    flops = count_flops(inference_fn(counter_vae, workload, x[:1])) * workload.batch
    del counter_vae
    free_memory(device)
    return InferenceSetup(workload, x, reference, gate_n, flops)


def measure_inference(setup, vae, variant, args, device):
    """Time one prepared model on a workload and gate its output; returns its Row (exceptions propagate)."""
    workload = setup.workload
    row = Row(workload.name, workload.kind, variant.name, variant.family, workload.batch, flops=setup.flops)
    fn = inference_fn(vae, workload, setup.x)
    row.seconds, row.first_call_s, row.peak_mib, out = time_calls(
        fn, device, args.warmup, args.repeats, graphs=uses_graphs(variant, device))
    row.psnr_db = psnr_against(out[:setup.gate_n], setup.reference)
    row.gate_ok = row.psnr_db >= args.gate_db
    return row


def run_inference_workload(workload, base, variants, args, device, dtype):
    """Measure every variant on one decode or encode workload; returns its rows."""
    setup = prepare_inference(workload, base, args, device, dtype)
    rows = []
    for variant in variants:
        log(f"  {workload.name} batch {workload.batch}: {variant.name}")
        vae = None
        try:
            if uses_compile(variant):
                torch._dynamo.reset()
            vae = prepare_vae(base, variant, args, device, dtype)
            row = measure_inference(setup, vae, variant, args, device)
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others' rows
            row = Row(workload.name, workload.kind, variant.name, variant.family, workload.batch, flops=setup.flops,
                      error=error_text(e))
            if not is_oom(e):
                traceback.print_exc()
        finally:
            vae = None
            free_memory(device)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# The training step: a plain diffusers step and vaekit's


@dataclasses.dataclass
class TrainLosses:
    """The loss recipe both training steps compute (latent-diffusion's, in vaekit.train.losses' mean reduction)."""

    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6 * 4 / 192  # vaekit.train.LossConfig's default (latent-diffusion's 1e-6 per element sum)
    disc_weight: float = 0.5
    max_adaptive_weight: float = 1e4
    lr: float = 1e-4
    betas: tuple = (0.5, 0.9)


def load_perceptual_net(net):
    """(LPIPS network, where its backbone came from); a random backbone when no pretrained one is cached.

    The speed of LPIPS does not depend on its weights, so a machine without them still benchmarks.
    """
    import lpips

    from vaekit.pretrained.backbones import load_lpips, lpips_available

    if lpips_available(net):
        return load_lpips(net, download=False), "pretrained"
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    return model.eval().requires_grad_(False), "random backbone (pretrained weights not cached; same speed)"


def make_discriminator(seed):
    """vaekit's PatchGAN (pix2pix NLayerDiscriminator, 3 layers, 64 channels, BatchNorm), seeded."""
    from vaekit.train.discriminator import DiscriminatorConfig, PatchDiscriminator

    torch.manual_seed(seed)
    return PatchDiscriminator(DiscriminatorConfig())


def autocast_for(device, dtype):
    """bf16 autocast for a bf16 run, nothing for fp32 (trainable weights stay fp32 either way)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def build_plain_step(vae, disc, perceptual, device, dtype, recipe):
    """A straightforward diffusers training step with the same losses as vaekit's; returns step(x, seed) -> recon.

    fp32 master weights under autocast, L1 + LPIPS + KL + hinge GAN with taming-transformers' adaptive
    weight, then a separate discriminator step on detached reconstructions. Written out on purpose: this
    is the baseline a user writes without vaekit.
    """
    opt_g = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, betas=recipe.betas)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=recipe.lr, betas=recipe.betas)
    last_layer = vae.decoder.conv_out.weight

    def step(x, seed):
        vae.train()
        disc.train()
        generator = torch.Generator().manual_seed(seed)
        with autocast_for(device, dtype):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=generator)).sample
            rec = (recon.float() - x.float()).abs().mean()
            nll = rec + recipe.perceptual_weight * perceptual(recon, x).mean()
            mean, logvar = posterior.mean.float(), posterior.logvar.float()
            kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
            disc.requires_grad_(False)
            g_loss = -disc(recon).mean()
            nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
            g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
            weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, recipe.max_adaptive_weight).detach()
            loss = nll + recipe.kl_weight * kl + recipe.disc_weight * weight * g_loss
        loss.backward()
        disc.requires_grad_(True)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        with autocast_for(device, dtype):
            real, fake = disc(x), disc(recon.detach())
            d_loss = 0.5 * (F.relu(1.0 - real.float()).mean() + F.relu(1.0 + fake.float()).mean())
        d_loss.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        return recon.detach()

    return step


_ACCELERATOR = {}


def get_accelerator(device, dtype):
    """One Accelerate Accelerator per process (its state is a singleton), in the run's precision."""
    from accelerate import Accelerator

    key = (device.type, dtype)
    if key not in _ACCELERATOR:
        if _ACCELERATOR:
            raise VaekitError("The benchmark runs one precision per process.")
        mixed = {torch.float32: "no", torch.bfloat16: "bf16"}[dtype]
        _ACCELERATOR[key] = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed)
    return _ACCELERATOR[key]


def build_vaekit_step(vae, disc, perceptual, device, dtype, recipe, levers):
    """vaekit's training step: vaekit.train's generator and discriminator steps, on an optimize_vae'd model.

    vaekit.train has no single step function (the loop body lives in train()), so this mirrors that
    body for grad_accum=1: prepared modules, generator_step, clipped AdamW step, discriminator_step.
    """
    from vaekit.train import config as train_config, losses, steps

    accelerator = get_accelerator(device, dtype)
    training_levers = dataclasses.replace(levers, fuse_qkv=False)  # fused QKV changes the trainable keys
    fast.optimize_from_config(vae, training_levers)
    if levers.channels_last:
        fast.to_channels_last(disc)
        fast.to_channels_last(perceptual)
    loss_cfg = train_config.LossConfig(perceptual_weight=recipe.perceptual_weight, kl_weight=recipe.kl_weight)
    disc_cfg = train_config.DiscConfig(weight=recipe.disc_weight, max_adaptive_weight=recipe.max_adaptive_weight,
                                 lr=recipe.lr, betas=list(recipe.betas))
    optim_cfg = train_config.OptimConfig(lr=recipe.lr, betas=list(recipe.betas))
    model = steps.AutoencoderForTraining(vae, freeze_encoder=False, sample_posterior=True)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    opt_g = torch.optim.AdamW(trainable, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=disc_cfg.lr, betas=tuple(disc_cfg.betas))
    model, disc_ddp, opt_g, opt_d = accelerator.prepare(model, disc, opt_g, opt_d)
    perceptual_loss = losses.PerceptualLoss(model=perceptual)
    last_layer = vae.decoder.conv_out.weight

    def step(x, seed):
        model.train()
        disc_ddp.train()
        generator = torch.Generator().manual_seed(seed)
        real, recon, logs = steps.generator_step(
            accelerator, model, x, loss_cfg=loss_cfg, disc_cfg=disc_cfg, kl_weight=recipe.kl_weight,
            perceptual=perceptual_loss, disc=accelerator.unwrap_model(disc_ddp), last_layer=last_layer,
            generator=generator)
        values = {k: v.float().item() for k, v in logs.items()}  # the trainer reads its logs every step
        grad_norm = accelerator.clip_grad_norm_(trainable, optim_cfg.grad_clip or float("inf"))
        if math.isfinite(float(grad_norm)):
            opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        logs = steps.discriminator_step(accelerator, disc_ddp, real, recon, disc_cfg=disc_cfg)
        values.update({k: v.float().item() for k, v in logs.items()})
        d_norm = accelerator.clip_grad_norm_(disc_ddp.parameters(), disc_cfg.grad_clip or float("inf"))
        if math.isfinite(float(d_norm)):
            opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        return recon

    return step


def reference_recon(base, x, device, seed, count, noise_dtype=torch.float32):
    """fp32 reconstruction of the first `count` images with the posterior noise of step seed `seed`.

    The noise is drawn as the training step draws it: diffusers' DiagonalGaussianDistribution.sample
    calls randn in the dtype of the posterior (bf16 under bf16 autocast), and torch 2.11's CPU randn
    gives a different stream in bf16 than in fp32 (torch 2.15's gives the same values), so the
    reference draws in `noise_dtype` and computes everything else in fp32.
    """
    vae = copy_vae(base, device, torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad(), strict_fp32():
        posterior = vae.encode(x.float()).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator, dtype=noise_dtype).to(device).float()
        recon = vae.decode(posterior.mean + posterior.std * noise).sample
    del vae
    free_memory(device)
    return recon[:count]


def train_variants(variants):
    """Training rows: the baselines, vaekit, and for an ablation vaekit's step without levers, then one per lever.

    Ablation rows start from vaekit's step (vaekit.train's pieces), not from the plain step, so the
    trainer's own overhead shows in the "no levers" row. Inference-only levers are left out.
    """
    out = [v for v in variants if v.family != "ablation"]
    ablation = [v for v in variants if v.family == "ablation"]
    if ablation:
        out.append(Variant("vaekit step, no levers", "ablation", fast.parse_levers("sdpa")))
    for v in ablation:
        if v.levers.compile or v.levers.channels_last or v.levers.fused_upsample:
            out.append(v)
    return out


def train_row_name(variant, args):
    """The table label of a training row."""
    if variant.family == "eager":
        return "diffusers plain step"
    if variant.family == "compiled":
        return f"plain step, channels_last+compile({args.baseline_compile_mode})"
    if variant.family == "vaekit":
        return f"vaekit step [{','.join(fast.lever_names(variant.levers))}]"
    return variant.name.replace("eager + ", "vaekit step + ")


@dataclasses.dataclass
class TrainSetup:
    """What every variant of the training workload shares: the batch, the fp32 reference, FLOPs, fresh parts."""

    workload: Workload
    x: torch.Tensor
    reference: torch.Tensor  # fp32 reconstruction of the first gate_n images with step 0's posterior noise
    gate_n: int
    flops: float  # of one plain step
    recipe: TrainLosses
    fresh_parts: object  # () -> (fp32 VAE, PatchGAN, LPIPS), each a new copy with the same weights
    perceptual_source: str


def prepare_train(workload, base, args, device, dtype):
    """The batch, fp32 reference, FLOPs and part factory of the training workload."""
    recipe = TrainLosses()
    perceptual, source = load_perceptual_net(args.lpips_net)
    perceptual = perceptual.to(device)
    disc_state = make_discriminator(args.seed).state_dict()
    g = torch.Generator().manual_seed(args.seed + 7)
    x = (torch.rand(workload.batch, 3, workload.size, workload.size, generator=g) * 2 - 1).to(device)  # (B, 3, H, W)
    gate_n = min(args.gate_images, workload.batch)
    reference = reference_recon(base, x, device, 0, gate_n, noise_dtype=dtype)  # autocast: posterior in dtype

    def fresh_parts():
        vae = copy_vae(base, device, torch.float32)  # fp32 master weights
        disc = make_discriminator(args.seed)
        disc.load_state_dict(disc_state)
        return vae, disc.to(device), copy.deepcopy(perceptual)

    step = build_plain_step(*fresh_parts(), device, dtype, recipe)
    flops = count_flops(lambda: step(x, 0))
    step = None  # frees the parts before the timed runs build their own
    free_memory(device)
    return TrainSetup(workload, x, reference, gate_n, flops, recipe, fresh_parts, source)


def measure_train(setup, variant, args, device, dtype):
    """Build one variant's step on fresh parts, gate its first step, time the next ones; returns its Row."""
    workload = setup.workload
    row = Row(workload.name, workload.kind, train_row_name(variant, args), variant.family, workload.batch,
              flops=setup.flops)
    vae, disc, lp = setup.fresh_parts()
    try:
        if variant.family == "eager":
            step = build_plain_step(vae, disc, lp, device, dtype, setup.recipe)
        elif variant.family == "compiled":
            compiled = compile_baseline(vae, args.baseline_compile_mode, getattr(args, "compile_backend", "inductor"))
            step = build_plain_step(compiled, disc, lp, device, dtype, setup.recipe)
        else:
            step = build_vaekit_step(vae, disc, lp, device, dtype, setup.recipe, variant.levers)
        seeds = iter(range(0, 10**9))
        sync(device)
        t0 = time.perf_counter()
        first_recon = step(setup.x, next(seeds))  # the gate: same weights and posterior noise as the reference
        sync(device)
        row.first_call_s = time.perf_counter() - t0
        row.psnr_db = psnr_against(first_recon[:setup.gate_n].float(), setup.reference)
        row.gate_ok = row.psnr_db >= args.gate_db
        row.seconds, _, row.peak_mib, _ = time_calls(
            lambda: step(setup.x, next(seeds)), device, args.warmup - 1, args.repeats,
            graphs=uses_graphs(variant, device))
    finally:
        vae = disc = lp = step = None
        if _ACCELERATOR:  # Accelerate keeps every prepared model and optimizer; let this row's go
            next(iter(_ACCELERATOR.values())).free_memory()
        free_memory(device)
    return row


def run_train_workload(workload, base, variants, args, device, dtype):
    """Measure one training step per variant (plain diffusers step, compiled, vaekit); returns its rows."""
    setup = prepare_train(workload, base, args, device, dtype)
    log(f"  LPIPS-{args.lpips_net}: {setup.perceptual_source}")
    rows = []
    for variant in train_variants(variants):
        log(f"  {workload.name} batch {workload.batch}: {train_row_name(variant, args)}")
        try:
            if uses_compile(variant):
                torch._dynamo.reset()
            row = measure_train(setup, variant, args, device, dtype)
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others' rows
            row = Row(workload.name, workload.kind, train_row_name(variant, args), variant.family, workload.batch,
                      flops=setup.flops, error=error_text(e))
            if not is_oom(e):
                traceback.print_exc()
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Report


def baseline_of(row, rows):
    """The eager (plain-step) row of the same workload and batch."""
    for other in rows:
        if other.workload == row.workload and other.batch == row.batch and other.family == "eager":
            return other
    return None


def speedup(row, rows):
    """Throughput ratio against the eager row of the same workload, or None."""
    base = baseline_of(row, rows)
    if base is None or base.seconds is None or row.seconds is None:
        return None
    return base.seconds / row.seconds


def render_table(rows, peak):
    """The markdown table of all rows."""
    lines = ["| workload | variant | batch | ms/image | images/s | vs eager | peak MiB | TFLOP/s | % of peak "
             "| PSNR dB (gate) | first call s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.workload} | {r.variant} | {r.batch} | {r.error} | | | | | | | |")
            continue
        ratio = speedup(r, rows)
        tflops = r.flops / r.seconds / 1e12 if r.flops and r.seconds else None
        share = 100 * tflops / peak if tflops is not None and peak else None
        if r.gate_ok:
            vs = fmt(ratio, ".2f") + "x" if ratio is not None else "–"
            gate = f"{r.psnr_db:.1f} ok" if math.isfinite(r.psnr_db) else "exact ok"
        else:
            vs = "not claimed" if r.family != "eager" else "–"
            gate = f"{r.psnr_db:.1f} FAIL"
        lines.append(f"| {r.workload} | {r.variant} | {r.batch} | {fmt(r.ms_per_image, '.3f')} | "
                     f"{fmt(r.images_per_s, '.1f')} | {vs} | {fmt(r.peak_mib, '.0f')} | {fmt(tflops, '.3f')} | "
                     f"{fmt(share, '.1f')} | {gate} | {fmt(r.first_call_s, '.2f')} |")
    return "\n".join(lines)


def target_lines(rows, args):
    """The issue's targets, checked on this run's rows (only meaningful for --preset sd on an H100/H200)."""
    def measured(kind, size, family, batch=None):
        return [r for r in rows if r.kind == kind and r.family == family and r.workload == f"{kind} {size}px"
                and (batch is None or r.batch == batch) and r.seconds is not None]

    lines = []
    for size in args.decode_sizes[-1:]:
        for v in measured("decode", size, "vaekit"):
            e = baseline_of(v, rows)
            c = next((r for r in measured("decode", size, "compiled", v.batch)), None)
            parts = [f"decode {size}px batch {v.batch}:"]
            if e and e.seconds:
                parts.append(f"{e.seconds / v.seconds:.2f}x eager (target >= {TARGETS['decode_vs_eager']}x)")
            if c:
                parts.append(f"{c.seconds / v.seconds:.2f}x compiled (target > 1x)")
            parts.append("gate ok" if v.gate_ok else "GATE FAILED: not claimed")
            lines.append("- " + " ".join(parts))
    for size, batch in list(zip(args.encode_sizes, args.encode_batch))[:1]:
        for v in measured("encode", size, "vaekit", batch):
            e = baseline_of(v, rows)
            if e and e.seconds:
                lines.append(f"- encode {size}px batch {batch}: {e.seconds / v.seconds:.2f}x eager (target >= "
                             f"{TARGETS['encode_vs_eager']}x) {'gate ok' if v.gate_ok else 'GATE FAILED: not claimed'}")
    for v in [r for r in rows if r.kind == "train" and r.family == "vaekit" and r.seconds]:
        e = baseline_of(v, rows)
        if e and e.seconds:
            lines.append(f"- train {v.workload.split()[1]} batch {v.batch}: {e.seconds / v.seconds:.2f}x the plain "
                         f"step (target >= {TARGETS['train_vs_plain']}x) "
                         f"{'gate ok' if v.gate_ok else 'GATE FAILED: not claimed'}")
    return lines


def environment(args, device, dtype):
    """Where and with what the run happened, for the report header."""
    import diffusers

    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "triton": getattr(fast.triton, "__version__", None) if fast.triton is not None else None,
            "device": str(device), "dtype": args.dtype, "model": args.model or f"preset:{args.preset}",
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            info["nvidia_smi"] = smi.stdout.strip()
    else:
        info["device_name"] = cpu_name()
        info["cpu_threads"] = torch.get_num_threads()
        info["cpu_count"] = os.cpu_count()
        # Other processes on the machine make CPU timings noisy; the load says how much.
        info["load_average_1_5_15min"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return info


def render_report(rows, args, info, peak):
    """The markdown report: environment, table, targets, notes."""
    head = [f"- {k}: `{v}`" for k, v in info.items() if v is not None]
    notes = [
        f"- Median of {args.repeats} timed calls after {args.warmup} warm-up calls; CUDA is synchronised around each.",
        "- vs eager: throughput ratio against diffusers eager (training: the plain diffusers step) of the same "
        "workload and batch. A row whose output fails the PSNR gate is not claimed.",
        f"- Gate: worst per-item PSNR of the first {args.gate_images} outputs against an fp32 eager reference "
        f"(TF32 off) on the same weights, with the reference's peak-to-peak range; at least {args.gate_db} dB. "
        "Training rows compare the first step's reconstruction (same posterior noise).",
        "- TFLOP/s: the model's FLOPs (torch.utils.flop_counter, counted once per workload on the baseline) "
        "divided by the median time; % of peak uses " + (f"{peak} TFLOP/s." if peak else "no peak (none known)."),
        "- peak MiB: torch.cuda.max_memory_allocated on CUDA; the process's peak RSS (VmHWM) on CPU.",
    ]
    targets = target_lines(rows, args)
    parts = ["## Environment", "", *head, "", "## Results", "", render_table(rows, peak), "", "## Notes", "", *notes]
    if targets:
        parts += ["", "## Targets (sd preset, bf16, H100/H200)", "", *targets]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    """Run the benchmark and print (and optionally write) the report; returns an exit code."""
    args = resolve_defaults(parse_args(argv))
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its dtype-cast notice would repeat for every row
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not args.no_cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # for every row alike, baselines included
    base = load_base(args)
    variants = make_variants(args)
    peak = device_peak_tflops(device, dtype, args.peak_tflops)
    workloads = []
    if "decode" in args.workloads:
        for size in args.decode_sizes:
            big = largest_decode_batch(base, size, device, dtype, args.max_batch) if device.type == "cuda" \
                else args.max_batch
            workloads += [Workload("decode", size, b) for b in sorted({1, big})]
    if "encode" in args.workloads:
        workloads += [Workload("encode", s, b) for s, b in zip(args.encode_sizes, args.encode_batch)]
    if "train" in args.workloads:
        workloads.append(Workload("train", args.train_size, args.train_batch))
    rows = []
    for workload in workloads:
        log(f"{workload.name}, batch {workload.batch}")
        run = run_train_workload if workload.kind == "train" else run_inference_workload
        rows += run(workload, base, variants, args, device, dtype)
    info = environment(args, device, dtype)
    report = render_report(rows, args, info, peak)
    print(report)
    if args.out:
        from vaekit.io import write_text

        write_text(args.out, report)
    if args.json:
        from vaekit.io import write_json

        write_json(args.json, {"environment": info, "peak_tflops": peak,
                               "rows": [dict(dataclasses.asdict(r), ms_per_image=r.ms_per_image,
                                             images_per_s=r.images_per_s) for r in rows]})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except VaekitError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        sys.exit(2)
