"""Speed levers for diffusers' AutoencoderKL, each switchable and each with an exact CPU path.

`optimize_vae(vae, ...)` changes a model in place and returns it. State-dict keys stay those of
AutoencoderKL (only `fuse_qkv` adds keys), so an optimised model still saves and loads as usual.

Levers (see benchmarks/RESULTS.md for what each is measured to pay):
- channels_last: NHWC weights and activations, the layout cuDNN's tensor-core convolutions prefer.
- sdpa: the mid-block attention through F.scaled_dot_product_attention (diffusers' AttnProcessor2_0,
  already diffusers' default); sdpa=False selects the plain bmm + softmax AttnProcessor, to measure it.
- fuse_qkv: one (C, 3C) projection instead of three (diffusers' fuse_qkv_projections; adds keys).
- fused_upsample: nearest 2x upsampling followed by a 3x3 convolution, computed as one stride-2 4x4
  transposed convolution on the small input: exact, 16 instead of 36 multiply-adds per output pixel
  and channel pair, and the 4x larger upsampled tensor is never written.
- fused_groupnorm: GroupNorm + SiLU in one Triton kernel that reads NCHW or NHWC in place. Only used
  for CUDA tensors without autograd (inference); everywhere else it runs the exact aten ops.
  UNMEASURED: no GPU was lent when it was written; its numerics are tested in Triton's interpreter.
- compile: torch.compile of the encoder and decoder (`compile_mode`, default "default").
- cuda_graphs: CUDA graphs for fixed shapes, through torch.compile(mode="reduce-overhead").
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

from vaekit.errors import VaekitError
from vaekit.model.architecture import is_tiny

try:  # Triton ships with CUDA builds of torch; CPU-only installs run the aten path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

LEVERS = ("channels_last", "sdpa", "fuse_qkv", "fused_upsample", "fused_groupnorm", "compile", "cuda_graphs")


@dataclass
class FastConfig:
    """Which speed levers `optimize_vae` applies."""

    channels_last: bool = True
    sdpa: bool = True
    fuse_qkv: bool = False
    fused_upsample: bool = False
    fused_groupnorm: bool = False
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: default, max-autotune, max-autotune-no-cudagraphs
    compile_backend: str = "inductor"  # torch.compile backend; "eager" traces without code generation (CPU checks)
    cuda_graphs: bool = False  # implies compile with mode "reduce-overhead" (fixed shapes only)
    dynamic: bool = False  # torch.compile dynamic shapes; False recompiles per shape, fastest when shapes repeat


def parse_levers(text):
    """'channels_last,compile' -> FastConfig with exactly those levers on ('none' or '' -> all off)."""
    names = [n.strip() for n in (text or "").split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise VaekitError(f"Unknown speed lever '{unknown[0]}'. Choose from: {', '.join(LEVERS)}.")
    return FastConfig(**{name: name in names for name in LEVERS})


def lever_names(config):
    """The names of the levers a FastConfig switches on, in LEVERS order."""
    return [name for name in LEVERS if getattr(config, name)]


# ----------------------------------------------------------------------------------------------
# Nearest 2x upsampling + 3x3 convolution as one transposed convolution

# Row p of the 4-tap kernel sums the 3x3 taps j with UPSAMPLE_TAPS[p, j] = 1. Derivation: with
# u = nearest_2x(x), the output row 2a+i of conv3x3(u) reads u rows 2a+i-1 .. 2a+i+1, i.e. x rows
# a-1 (tap 0) and a (taps 1+2) for i = 0, and x rows a (taps 0+1) and a+1 (tap 2) for i = 1. A
# stride-2, padding-1 transposed convolution gives output row o = 2m - 1 + p from input row m and
# kernel row p, so K = [W2, W1+W2, W0+W1, W0]; the same holds along columns.
UPSAMPLE_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def upsample_conv_weight(weight):
    """(Cout, Cin, 3, 3) conv weight -> (Cin, Cout, 4, 4) stride-2 transposed-conv weight equal to upsample+conv."""
    # Summed in at least fp32, so a bf16 model rounds each combined tap once.
    dtype = torch.promote_types(weight.dtype, torch.float32)
    taps = UPSAMPLE_TAPS.to(device=weight.device, dtype=dtype)
    kernel = torch.einsum("pj,oijl,ql->iopq", taps, weight.to(dtype), taps)  # (Cin, Cout, 4, 4)
    return kernel.to(weight.dtype)


class UpsampleConv(nn.Module):
    """diffusers' Upsample2D (nearest 2x, then 3x3 conv) as one transposed convolution; same parameters."""

    def __init__(self, upsample):
        super().__init__()
        self.channels = upsample.channels
        self.out_channels = upsample.out_channels
        self.conv = upsample.conv  # keeps the state-dict key `...upsamplers.0.conv.weight`
        self.source = [upsample]  # in a list so it is not registered twice as a submodule
        self._cached = None

    def kernel(self):
        """The transposed-conv weight, cached while the conv weight is unchanged and needs no gradient."""
        w = self.conv.weight
        if (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling():
            return upsample_conv_weight(w)
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, upsample_conv_weight(w.detach()))
        return self._cached[1]

    def forward(self, hidden_states, output_size=None, *args, **kwargs):
        """(B, Cin, H, W) -> (B, Cout, 2H, 2W)."""
        if output_size is not None:  # an odd target size: only the original layer handles it
            return self.source[0](hidden_states, output_size, *args, **kwargs)
        return F.conv_transpose2d(hidden_states, self.kernel(), self.conv.bias, stride=2, padding=1)


def fusable_upsample(module):
    """Whether `module` is a plain diffusers Upsample2D: nearest 2x then a 3x3, padding-1 conv."""
    if type(module) is not Upsample2D or module.use_conv_transpose or not module.use_conv:
        return False
    conv = getattr(module, "conv", None)
    return (module.name == "conv" and module.norm is None and module.interpolate and isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1)


# ----------------------------------------------------------------------------------------------
# GroupNorm (+ SiLU): aten everywhere, one Triton kernel pair for CUDA inference


def triton_usable(x, weight, bias):
    """Whether the Triton GroupNorm may run: CUDA tensors, Triton importable, affine, no autograd, no autocast."""
    if triton is None or not x.is_cuda or weight is None or bias is None:
        return False
    if torch.is_autocast_enabled("cuda"):  # aten's GroupNorm returns fp32 under autocast; keep that behaviour
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad))


def group_norm_act(x, num_groups, weight, bias, eps, silu=True, backend="auto", programs=None):
    """GroupNorm over (B, C, *) then SiLU if `silu`; backend 'auto' (Triton for CUDA inference), 'aten' or 'triton'.

    `programs` (explicit 'triton' backend only) overrides the launch's target program count, so a CPU
    test in Triton's interpreter can split each group into as many chunks as a GPU launch would.
    """
    if backend == "triton":  # explicit: tests run this in Triton's interpreter on CPU tensors
        return launch_group_norm_act(x, weight, bias, num_groups, eps, silu, programs)
    if backend == "auto" and triton_usable(x, weight, bias):
        return torch.ops.vaekit.group_norm_act(x, weight, bias, num_groups, eps, silu)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


class GroupNormAct(nn.GroupNorm):
    """nn.GroupNorm followed by an optional SiLU, fused on CUDA inference; same parameters and state-dict keys."""

    def __init__(self, norm, silu=True):
        super().__init__(norm.num_groups, norm.num_channels, norm.eps, norm.affine,
                         device=norm.weight.device if norm.affine else None,
                         dtype=norm.weight.dtype if norm.affine else None)
        if norm.affine:  # share the original parameters: optimisers and checkpoints keep pointing at them
            self.weight, self.bias = norm.weight, norm.bias
        self.silu = silu

    def forward(self, x):
        """GroupNorm(x), then SiLU when this module absorbed the block's activation."""
        return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, self.silu)

    def extra_repr(self):
        return super().extra_repr() + f", silu={self.silu}"


def flat_strides(x):
    """Strides (batch, channel, position) of (B, C, *spatial) viewed as (B, C, L), or None if not one stride."""
    spatial = x.shape[2:]
    strides = x.stride()[2:]
    # The spatial dims flatten to one index with one stride when each dim steps over the next one.
    for i in range(len(spatial) - 1):
        if spatial[i] > 1 and strides[i] != strides[i + 1] * spatial[i + 1]:
            return None
    step = strides[-1] if spatial else 1
    return x.stride(0), x.stride(1), step


def target_programs(device):
    """How many programs a GroupNorm launch aims for: 4 per SM on CUDA (H100 / H200: 132 SMs), 8 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


@dataclass(frozen=True)
class GroupLaunch:
    """How one GroupNorm launch splits the work: tiles of BLOCK_L positions, grouped into chunks per group."""

    block_c: int  # channels of one group, padded to a power of two
    block_l: int  # positions per tile
    tiles: int  # tiles per group (programs of the apply kernel per group)
    chunks: int  # partial statistics per group (programs of the statistics kernel per group)
    chunk: int  # positions per chunk, a whole number of tiles


def plan_group_launch(batch, num_groups, per_group, length, programs):
    """The tiling of a GroupNorm over (batch, num_groups * per_group, length) that fills about `programs` programs."""
    block_c = max(2, next_power_of_2(per_group))
    block_l = min(max(16, 4096 // block_c), max(16, next_power_of_2(length)))
    tiles = -(-length // block_l)
    # Enough programs to fill the device: a whole-group reduction per program leaves most SMs idle
    # at batch 1 (B * G = 32 groups for the sd VAE), so each group's statistics are split into chunks.
    chunks = max(1, min(tiles, -(-programs // (batch * num_groups))))
    chunk = -(-tiles // chunks) * block_l
    chunks = -(-length // chunk)  # every chunk non-empty
    return GroupLaunch(block_c, block_l, tiles, chunks, chunk)


def next_power_of_2(n):
    """The smallest power of two >= n (triton.next_power_of_2, without needing Triton)."""
    return 1 << max(0, int(n) - 1).bit_length()


def launch_group_norm_act(x, weight, bias, num_groups, eps, silu, programs=None):
    """Run the Triton GroupNorm(+SiLU): partial Welford statistics per chunk, then combine and normalise."""
    batch, channels = x.shape[:2]
    length = math.prod(x.shape[2:])
    strides = flat_strides(x)
    if strides is None:
        x = x.contiguous()
        strides = flat_strides(x)
    y = torch.empty_like(x)  # x is dense here, so y gets exactly its strides
    y_strides = flat_strides(y)
    per_group = channels // num_groups
    launch = plan_group_launch(batch, num_groups, per_group, length, programs or target_programs(x.device))
    block_c, block_l, tiles, chunks, chunk = (launch.block_c, launch.block_l, launch.tiles, launch.chunks,
                                              launch.chunk)
    partial = torch.empty((batch * num_groups, chunks, 3), dtype=torch.float32, device=x.device)
    _group_norm_stats_kernel[(batch * num_groups, chunks)](
        x, partial, length, per_group, num_groups, *strides, chunk, chunks, BLOCK_L=block_l, BLOCK_C=block_c)
    _group_norm_apply_kernel[(batch * num_groups, tiles)](
        x, y, weight, bias, partial, length, per_group, num_groups, *strides, *y_strides, chunks, eps,
        SILU=silu, BLOCK_L=block_l, BLOCK_C=block_c, BLOCK_S=max(2, next_power_of_2(chunks)))
    return y


if triton is not None:

    @triton.jit
    def _group_norm_stats_kernel(x_ptr, partial_ptr, length, per_group, groups, stride_b, stride_c, stride_l,
                                 chunk, chunks, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        """(count, mean, M2) of one group over one chunk of positions, merged tile by tile."""
        row = tl.program_id(0)  # b * groups + g
        part = tl.program_id(1)
        b = (row // groups).to(tl.int64)
        g = row % groups
        cols = tl.arange(0, BLOCK_C)
        c_mask = cols < per_group
        c = (g * per_group + cols).to(tl.int64)
        base = x_ptr + b * stride_b
        lo = part * chunk
        hi = tl.minimum(lo + chunk, length)
        count = tl.zeros((), dtype=tl.float32)
        mean = tl.zeros((), dtype=tl.float32)
        m2 = tl.zeros((), dtype=tl.float32)
        for start in range(lo, hi, BLOCK_L):
            pos = start + tl.arange(0, BLOCK_L)
            mask = (pos < hi)[:, None] & c_mask[None, :]  # (BLOCK_L, BLOCK_C)
            ptrs = base + pos.to(tl.int64)[:, None] * stride_l + c[None, :] * stride_c
            v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            t_count = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
            t_mean = tl.sum(tl.sum(v, axis=1), axis=0) / t_count
            d = tl.where(mask, v - t_mean, 0.0)
            t_m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
            # Chan, Golub & LeVeque (1979) pairwise update: merge the tile's (n, mean, M2) into the running one.
            total = count + t_count
            delta = t_mean - mean
            mean = mean + delta * (t_count / total)
            m2 = m2 + t_m2 + delta * delta * (count * t_count / total)
            count = total
        out = partial_ptr + (row * chunks + part) * 3
        tl.store(out, count)
        tl.store(out + 1, mean)
        tl.store(out + 2, m2)

    @triton.jit
    def _group_norm_apply_kernel(x_ptr, y_ptr, w_ptr, b_ptr, partial_ptr, length, per_group, groups,
                                 stride_b, stride_c, stride_l, ystride_b, ystride_c, ystride_l, chunks, eps,
                                 SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
                                 BLOCK_S: tl.constexpr):
        """Combine the group's partial statistics, then normalise, scale, shift (and SiLU) one tile."""
        row = tl.program_id(0)
        tile = tl.program_id(1)
        b = (row // groups).to(tl.int64)
        g = row % groups
        s = tl.arange(0, BLOCK_S)
        s_mask = s < chunks
        p = partial_ptr + (row * chunks + s) * 3
        n_i = tl.load(p, mask=s_mask, other=0.0)
        mean_i = tl.load(p + 1, mask=s_mask, other=0.0)
        m2_i = tl.load(p + 2, mask=s_mask, other=0.0)
        n = tl.sum(n_i, axis=0)
        mean = tl.sum(n_i * mean_i, axis=0) / n
        m2 = tl.sum(m2_i + n_i * (mean_i - mean) * (mean_i - mean), axis=0)
        rstd = 1.0 / tl.sqrt(m2 / n + eps)  # biased variance, as nn.GroupNorm
        cols = tl.arange(0, BLOCK_C)
        c_mask = cols < per_group
        c = (g * per_group + cols).to(tl.int64)
        gamma = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        beta = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        pos = (tile * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
        mask = (pos < length)[:, None] & c_mask[None, :]  # (BLOCK_L, BLOCK_C)
        v = tl.load(x_ptr + b * stride_b + pos[:, None] * stride_l + c[None, :] * stride_c, mask=mask,
                    other=0.0).to(tl.float32)
        out = (v - mean) * rstd * gamma[None, :] + beta[None, :]
        if SILU:
            out = out * tl.sigmoid(out)
        tl.store(y_ptr + b * ystride_b + pos[:, None] * ystride_l + c[None, :] * ystride_c,
                 out.to(y_ptr.dtype.element_ty), mask=mask)


# An opaque op for torch.compile: dynamo does not trace the launcher's Python (grid sizes, device queries).
@torch.library.custom_op("vaekit::group_norm_act", mutates_args=())
def _group_norm_act_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float,
                       silu: bool) -> torch.Tensor:
    return launch_group_norm_act(x, weight, bias, num_groups, eps, silu)


@_group_norm_act_op.register_fake
def _(x, weight, bias, num_groups, eps, silu):
    return torch.empty_like(x)


def fuse_group_norms(vae):
    """Swap GroupNorm (+ the SiLU after it) for GroupNormAct in every resnet, both output norms and attention."""
    swapped = 0
    for module in list(vae.modules()):
        if isinstance(module, ResnetBlock2D):
            # In a VAE resnet each norm is followed directly by the shared SiLU: norm1 -> act -> conv1 and
            # norm2 -> act -> dropout -> conv2. Only that shape is fused.
            plain = (module.upsample is None and module.downsample is None and module.time_emb_proj is None
                     and type(module.nonlinearity) is nn.SiLU and type(module.norm1) is nn.GroupNorm
                     and type(module.norm2) is nn.GroupNorm)
            if plain:
                module.norm1 = GroupNormAct(module.norm1, silu=True)
                module.norm2 = GroupNormAct(module.norm2, silu=True)
                module.nonlinearity = nn.Identity()
                swapped += 2
        elif isinstance(module, Attention) and type(module.group_norm) is nn.GroupNorm:
            module.group_norm = GroupNormAct(module.group_norm, silu=False)
            swapped += 1
    for part in (vae.encoder, vae.decoder):
        if type(part.conv_norm_out) is nn.GroupNorm and type(part.conv_act) is nn.SiLU:
            part.conv_norm_out = GroupNormAct(part.conv_norm_out, silu=True)
            part.conv_act = nn.Identity()
            swapped += 1
    return swapped


# ----------------------------------------------------------------------------------------------
# The entry point


def optimize_vae(vae, channels_last=True, compile=False, sdpa=True, fused_groupnorm=False, fused_upsample=False,
                 fuse_qkv=False, cuda_graphs=False, compile_mode="default", dynamic=False, compile_backend="inductor"):
    """Apply the chosen speed levers to an AutoencoderKL (or AutoencoderTiny) in place and return it (see the module
    docstring)."""
    if is_tiny(vae):  # TAESD has no attention, GroupNorm or upsampler convolution: channels-last and compile apply
        sdpa = fuse_qkv = fused_upsample = fused_groupnorm = False
    config = FastConfig(channels_last=channels_last, sdpa=sdpa, fuse_qkv=fuse_qkv, fused_upsample=fused_upsample,
                        fused_groupnorm=fused_groupnorm, compile=compile or cuda_graphs, compile_mode=compile_mode,
                        compile_backend=compile_backend, cuda_graphs=cuda_graphs, dynamic=dynamic)
    applied = getattr(vae, "vaekit_levers", None)
    if applied is not None and applied.compile:
        raise VaekitError("This model was already compiled by optimize_vae; optimise a fresh copy instead.")
    if not is_tiny(vae) and attention_count(vae):
        vae.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())
        if fuse_qkv:
            vae.fuse_qkv_projections()  # also sets FusedAttnProcessor2_0 (SDPA on a fused projection)
    if fused_upsample:
        for block in vae.decoder.up_blocks:
            if block.upsamplers is not None:
                for i, layer in enumerate(block.upsamplers):
                    if fusable_upsample(layer):
                        block.upsamplers[i] = UpsampleConv(layer)
    if fused_groupnorm:
        fuse_group_norms(vae)
    if channels_last:
        vae.to(memory_format=torch.channels_last)
    if config.compile:
        mode = "reduce-overhead" if cuda_graphs else compile_mode
        mode = None if mode == "default" else mode
        raise_recompile_limit()
        # nn.Module.compile works in place: parameter names (and so checkpoints) do not change.
        vae.encoder.compile(mode=mode, dynamic=dynamic, backend=compile_backend)
        vae.decoder.compile(mode=mode, dynamic=dynamic, backend=compile_backend)
    vae.vaekit_levers = config
    return vae


def optimize_from_config(vae, config):
    """optimize_vae with the levers of a FastConfig."""
    return optimize_vae(vae, **dataclasses.asdict(config))


def applied_levers(vae):
    """The FastConfig optimize_vae applied to `vae`, or None for an untouched model."""
    return getattr(vae, "vaekit_levers", None)


def attention_count(vae):
    """How many attention layers (mid-block) the model has."""
    return len(vae.attn_processors)


def raise_recompile_limit(limit=64):
    """Let dynamo keep one compiled graph per shape for many shapes (a benchmark visits several)."""
    import torch._dynamo  # dynamo's config, loaded only when something is compiled

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < limit:
            setattr(config, name, limit)
    if hasattr(config, "accumulated_recompile_limit") and config.accumulated_recompile_limit < 4 * limit:
        config.accumulated_recompile_limit = 4 * limit


def to_channels_last(module):
    """Move a helper network (LPIPS, discriminator) to channels_last in place and return it."""
    return module.to(memory_format=torch.channels_last)
