"""Exact rescaling of an AutoencoderKL's activations: smaller numbers inside, the same function outside.

A positive scale s can be moved through a network without changing what it computes wherever
every reader of an activation either ignores the scale or is linear:

- GroupNorm is invariant to a positive scale of its input: GroupNorm(s x) with eps equals
  GroupNorm(x) with eps / s^2. That is exact up to eps, and the change is measured (below);
- a convolution or linear layer W x + b that reads an activation of scale s_in and writes one of
  scale s_out computes the same with weight W * s_out / s_in and bias b * s_out; zero padding and
  nearest upsampling commute with a scale;
- a residual sum needs both operands at the same scale.

In diffusers' Encoder and Decoder that gives independent scales ("gauges"):

- each residual stream: the activations a resnet adds to, from the layer that starts it (conv_in,
  a down- or upsampler's conv, or a resnet's conv_shortcut when the width changes) to the next
  such layer. Its readers are GroupNorms (each resnet's norm1, the attention's group_norm, the
  final conv_norm_out), the residual additions, and the linear convs that start the next stream;
  its writers are each resnet's conv2, the attention's to_out, and those starting convs;
- each resnet's conv1: read only by norm2;
- each attention's value (to_v, read only by the linear to_out) and its query/key pair (q * s with
  k / s leaves q k^T unchanged);
- the encoder's moments before quant_conv, and the latents after post_quant_conv (each read only
  by a 1x1 conv).

What no scale can reach is left for training: GroupNorm outputs (gamma and beta), the SiLUs, the
model's inputs and outputs, and, without quant_conv, the moments themselves.

Scales are powers of two, so the new weights are the old ones times 2^k exactly, in fp32 and in
fp16. `plan_rescale` picks, per gauge, the smallest power-of-two reduction that brings every
activation it scales under a limit; `apply_rescale` edits the weights; the plan reports per gauge
what was scaled, by how much, and the largest change the GroupNorm eps makes to a group's normalised
values (RMS, at most `eps_tolerance`: a gauge is scaled less when the measured variances demand it).
"""

import math
from dataclasses import dataclass, field

import torch

from vaekit.errors import VaekitError

PARTS = ("encoder", "decoder")


@dataclass
class Gauge:
    """One free scale: the activations it multiplies (name -> power) and the GroupNorms reading them."""

    name: str  # the module that writes it first
    kind: str  # "stream", "resnet conv1", "attention value", "attention query/key", "moments", "latents"
    part: str  # "encoder" or "decoder"
    activations: dict = field(default_factory=dict)  # module name -> power (+1; -1 for the key of a query/key pair)
    readers: list = field(default_factory=list)  # GroupNorm module names reading it
    fixed: str | None = None  # why it cannot be rescaled, when a reader is neither a GroupNorm nor linear


@dataclass
class Affine:
    """A conv or linear layer: the gauges (name, power) of its output and input, None for unscaled."""

    module: str
    out: tuple | None
    inp: tuple | None


class Graph:
    """The gauges and affine layers of one AutoencoderKL, built by `rescale_graph`."""

    def __init__(self, vae):
        self.vae = vae
        self.gauges = {}
        self.affines = []
        self.part = None

    def gauge(self, name, kind):
        self.gauges[name] = Gauge(name, kind, self.part)
        return name

    def affine(self, module, out=None, inp=None, power=1):
        self.affines.append(Affine(module, (out, power) if out else None, (inp, 1) if inp else None))

    def activation(self, module, gauge, power=1):
        self.gauges[gauge].activations[module] = power

    def reader(self, module, gauge):
        """A GroupNorm reading `gauge`; any other module there pins the gauge at scale 1."""
        norm = self.vae.get_submodule(module)
        if isinstance(norm, torch.nn.GroupNorm):
            self.gauges[gauge].readers.append(module)
        else:
            self.fix(gauge, f"{module} is a {type(norm).__name__}, not a GroupNorm")

    def fix(self, gauge, reason):
        self.gauges[gauge].fixed = self.gauges[gauge].fixed or reason


def rescale_graph(vae, parts=PARTS):
    """The gauges and affine layers of `vae`'s `parts` ("encoder": encoder and quant_conv; "decoder")."""
    graph = Graph(vae)
    if "encoder" in parts:
        graph.part = "encoder"
        encoder = vae.encoder
        stream = graph.gauge("encoder.conv_in", "stream")
        graph.affine("encoder.conv_in", out=stream)
        graph.activation("encoder.conv_in", stream)
        for i, block in enumerate(encoder.down_blocks):
            stream = walk_block(graph, f"encoder.down_blocks.{i}", block, stream, "downsamplers")
        stream = walk_mid(graph, "encoder.mid_block", encoder.mid_block, stream)
        graph.reader("encoder.conv_norm_out", stream)
        if getattr(vae, "quant_conv", None) is not None:
            moments = graph.gauge("encoder.conv_out", "moments")
            graph.affine("encoder.conv_out", out=moments)
            graph.affine("quant_conv", inp=moments)
            graph.activation("encoder.conv_out", moments)
            graph.activation("encoder", moments)
    if "decoder" in parts:
        graph.part = "decoder"
        latents = None
        if getattr(vae, "post_quant_conv", None) is not None:
            latents = graph.gauge("post_quant_conv", "latents")
            graph.affine("post_quant_conv", out=latents)
            graph.activation("post_quant_conv", latents)
        stream = graph.gauge("decoder.conv_in", "stream")
        graph.affine("decoder.conv_in", out=stream, inp=latents)
        graph.activation("decoder.conv_in", stream)
        stream = walk_mid(graph, "decoder.mid_block", vae.decoder.mid_block, stream)
        for i, block in enumerate(vae.decoder.up_blocks):
            stream = walk_block(graph, f"decoder.up_blocks.{i}", block, stream, "upsamplers")
        graph.reader("decoder.conv_norm_out", stream)
    return graph


def walk_block(graph, name, block, stream, samplers):
    """A Down/UpDecoderBlock2D (with or without attention): resnets, attentions, then its resampler."""
    attentions = list(getattr(block, "attentions", None) or [])
    for j, resnet in enumerate(block.resnets):
        stream = walk_resnet(graph, f"{name}.resnets.{j}", resnet, stream)
        if j < len(attentions) and attentions[j] is not None:
            walk_attention(graph, f"{name}.attentions.{j}", attentions[j], stream)
    for j, sampler in enumerate(getattr(block, samplers, None) or []):
        new = graph.gauge(f"{name}.{samplers}.{j}.conv", "stream")
        conv = getattr(sampler, "conv", None)
        plain = (isinstance(conv, torch.nn.Conv2d) and getattr(sampler, "norm", None) is None
                 and not getattr(sampler, "use_conv_transpose", False))
        if not plain:  # a resampler that is not a plain (pad or nearest upsample) + conv
            graph.fix(stream, f"{name}.{samplers}.{j} is not a plain resampling convolution")
            graph.fix(new, f"{name}.{samplers}.{j} is not a plain resampling convolution")
        graph.affine(f"{name}.{samplers}.{j}.conv", out=new, inp=stream)
        graph.activation(f"{name}.{samplers}.{j}.conv", new)
        graph.activation(f"{name}.{samplers}.{j}", new)
        stream = new
    graph.activation(name, stream)
    return stream


def walk_mid(graph, name, mid, stream):
    """UNetMidBlock2D: resnets[0], then (attention, resnet) pairs."""
    stream = walk_resnet(graph, f"{name}.resnets.0", mid.resnets[0], stream)
    for j, (attention, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        if attention is not None:
            walk_attention(graph, f"{name}.attentions.{j}", attention, stream)
        stream = walk_resnet(graph, f"{name}.resnets.{j + 1}", resnet, stream)
    graph.activation(name, stream)
    return stream


def walk_resnet(graph, name, resnet, stream):
    """ResnetBlock2D: norm1 reads the stream, conv1 is its own gauge (read by norm2), conv2 writes the stream."""
    if (getattr(resnet, "upsample", None) is not None or getattr(resnet, "downsample", None) is not None
            or getattr(resnet, "time_emb_proj", None) is not None):
        graph.fix(stream, f"{name} resamples or takes a time embedding")
    graph.reader(f"{name}.norm1", stream)
    inner = graph.gauge(f"{name}.conv1", "resnet conv1")
    graph.affine(f"{name}.conv1", out=inner)
    graph.activation(f"{name}.conv1", inner)
    graph.reader(f"{name}.norm2", inner)
    if resnet.conv_shortcut is not None:
        new = graph.gauge(f"{name}.conv_shortcut", "stream")
        graph.affine(f"{name}.conv_shortcut", out=new, inp=stream)
        graph.activation(f"{name}.conv_shortcut", new)
        stream = new
    graph.affine(f"{name}.conv2", out=stream)
    graph.activation(f"{name}.conv2", stream)
    graph.activation(name, stream)
    return stream


def walk_attention(graph, name, attention, stream):
    """diffusers' Attention as a residual self-attention: group_norm reads the stream, to_out writes it."""
    plain = (isinstance(getattr(attention, "group_norm", None), torch.nn.GroupNorm)
             and attention.residual_connection and getattr(attention, "spatial_norm", None) is None
             and getattr(attention, "norm_q", None) is None and getattr(attention, "norm_k", None) is None
             and not attention.is_cross_attention and isinstance(attention.to_out[0], torch.nn.Linear))
    if not plain:
        graph.fix(stream, f"{name} is not a plain residual self-attention with a GroupNorm")
        return
    graph.reader(f"{name}.group_norm", stream)
    query_key = graph.gauge(f"{name}.to_q", "attention query/key")
    graph.affine(f"{name}.to_q", out=query_key)
    graph.affine(f"{name}.to_k", out=query_key, power=-1)
    graph.activation(f"{name}.to_q", query_key)
    graph.activation(f"{name}.to_k", query_key, power=-1)
    value = graph.gauge(f"{name}.to_v", "attention value")
    graph.affine(f"{name}.to_v", out=value)
    graph.activation(f"{name}.to_v", value)
    graph.affine(f"{name}.to_out.0", out=stream, inp=value)
    graph.activation(f"{name}.to_out.0", stream)
    graph.activation(name, stream)


# ---------------------------------------------------------------------------------------------------
# Choosing the scales


def eps_effect(variances, eps, scale):
    """The largest RMS change of a group's GroupNorm-normalised values when the input is scaled by `scale`.

    A group of variance v normalises to values of RMS sqrt(v / (v + eps)) (at most 1); scaled by s,
    to sqrt(v / (v + eps / s^2)). Every value of the group shrinks by the same factor, so the
    difference is the RMS of the change of the group's values, in the units of a unit-variance
    feature map. Returns the largest over the measured (image, group) variances (0 for s >= 1).
    """
    if scale >= 1 or variances is None or not len(variances):
        return 0.0
    v = variances.double().clamp_min(0)
    before = (v / (v + eps)).sqrt()
    after = (v / (v + eps / scale**2)).sqrt()
    return float((before - after).abs().max())


def choose_scale(gauge, maxima, limit):
    """The power-of-two scale bringing the gauge's activations under `limit` (1 when they are, or unmeasured)."""
    up = max((maxima[n] for n, p in gauge.activations.items() if p > 0 and n in maxima), default=0.0)
    down = max((maxima[n] for n, p in gauge.activations.items() if p < 0 and n in maxima), default=0.0)
    if max(up, down) <= limit or not math.isfinite(max(up, down)):
        return 1.0
    if down == 0:
        return 2.0 ** -math.ceil(math.log2(up / limit))
    if up == 0:
        return 2.0 ** math.ceil(math.log2(down / limit))
    return 2.0 ** round(0.5 * math.log2(down / up))  # query * s and key / s meet at sqrt(query * key)


def plan_rescale(vae, maxima, limit, variances=None, parts=PARTS, eps_tolerance=1e-3):
    """Per-gauge power-of-two scales bringing activations under `limit`; a dict for `apply_rescale` and reports.

    `maxima`: {module name: largest |activation|} of an fp32 pass (vaekit.model.activations);
    `variances`: {GroupNorm name: (N,) per-(image, group) input variances} of the same pass. A
    gauge's scale is raised (less reduction) until the GroupNorm eps changes no normalised value
    of the measured images by more than `eps_tolerance` (see `eps_effect`). Returns {"scales":
    {gauge: scale}, "gauges": [a row per rescaled gauge], "predicted": {module: new maximum},
    "remaining": [modules still above limit]}.
    """
    graph = rescale_graph(vae, parts)
    variances = {k: torch.cat(v) if isinstance(v, list) else v for k, v in (variances or {}).items()}
    scales, effects, limited = {}, {}, set()
    for gauge in graph.gauges.values():
        scale = 1.0 if gauge.fixed else choose_scale(gauge, maxima, limit)
        effect = lambda s: max((eps_effect(variances.get(r), vae.get_submodule(r).eps, s)  # noqa: E731
                                for r in gauge.readers), default=0.0)
        while scale < 1 and effect(scale) > eps_tolerance:
            scale = scale * 2
            limited.add(gauge.name)
        scales[gauge.name], effects[gauge.name] = scale, effect(scale)
    rows = []
    for gauge in graph.gauges.values():
        scale = scales[gauge.name]
        if scale != 1:
            rows.append({"gauge": gauge.name, "kind": gauge.kind, "part": gauge.part, "exact": True, "scale": scale,
                         "peak_before": max(maxima.get(n, 0.0) for n in gauge.activations),
                         "peak_after": max(maxima.get(n, 0.0) * scale**p for n, p in gauge.activations.items()),
                         "groupnorm_eps_effect": effects[gauge.name], "limited_by_eps": gauge.name in limited,
                         "layers": list(gauge.activations), "parameters": parameter_factors(graph, gauge.name, scales)})
    predicted = dict(maxima)
    for gauge in graph.gauges.values():
        for name, power in gauge.activations.items():
            if name in predicted:
                predicted[name] = maxima[name] * scales[gauge.name] ** power
    remaining = [name for name, value in predicted.items() if value > limit]
    fixed = {g.name: g.fixed for g in graph.gauges.values() if g.fixed}
    return {"scales": scales, "gauges": rows, "predicted": predicted, "remaining": remaining, "fixed": fixed,
            "limit": limit, "parts": list(parts), "eps_tolerance": eps_tolerance}


def factor(side, scales):
    """The scale of one side of an affine layer: 1 when unscaled."""
    return scales.get(side[0], 1.0) ** side[1] if side is not None else 1.0


def parameter_factors(graph, gauge, scales):
    """{parameter name: factor} of the layers touching `gauge`, for its report row (other gauges at their scales)."""
    factors = {}
    for affine in graph.affines:
        if gauge not in {s[0] for s in (affine.out, affine.inp) if s is not None}:
            continue
        out, inp = factor(affine.out, scales), factor(affine.inp, scales)
        factors[f"{affine.module}.weight"] = out / inp
        if graph.vae.get_submodule(affine.module).bias is not None:
            factors[f"{affine.module}.bias"] = out
    return factors


@torch.no_grad()
def apply_rescale(vae, plan):
    """Multiply the weights and biases of `vae` in place by the plan's scales; returns the edited parameters' factors.

    Powers of two: every multiplication is exact (short of fp32 underflow), so applying the
    inverse plan restores the weights bit for bit.
    """
    graph = rescale_graph(vae, plan["parts"])
    unknown = set(plan["scales"]) - set(graph.gauges)
    if unknown:
        raise VaekitError(f"The rescaling plan names gauges this model lacks ({sorted(unknown)[0]}); it was made "
                          f"for another architecture.")
    edited = {}
    for affine in graph.affines:
        out, inp = factor(affine.out, plan["scales"]), factor(affine.inp, plan["scales"])
        module = vae.get_submodule(affine.module)
        if out / inp != 1:
            module.weight.mul_(out / inp)
            edited[f"{affine.module}.weight"] = out / inp
        if module.bias is not None and out != 1:
            module.bias.mul_(out)
            edited[f"{affine.module}.bias"] = out
    return edited


def scaled_plan(vae, scales, parts=PARTS):
    """A plan with given gauge scales (any positive numbers, not only powers of two), e.g. to make a test model."""
    graph = rescale_graph(vae, parts)
    missing = [name for name in scales if name not in graph.gauges]
    if missing:
        raise VaekitError(f"No gauge {missing[0]!r} in this model; gauges: {', '.join(graph.gauges)}.")
    return {"scales": dict(scales), "parts": list(parts)}


def gauge_names(vae, parts=PARTS, kind=None):
    """The gauges of `vae`'s parts, optionally of one kind ("stream", "resnet conv1", ...)."""
    return [g.name for g in rescale_graph(vae, parts).gauges.values() if kind is None or g.kind == kind]


# ---------------------------------------------------------------------------------------------------
# What training must change for what rescaling cannot reach

BLOCKS = ("ResnetBlock2D", "Attention")


def owning_blocks(vae, layers):
    """The module names whose parameters a fine-tune trains to lower `layers`' activations, or None for whole parts.

    A layer inside a resnet or an attention (its norms, SiLUs, conv1, query/key/value) is owned by
    that block; the GroupNorm, SiLU and conv_out at an encoder's or decoder's end (and its output)
    by its conv_norm_out and conv_out.
    A residual stream is written by every block before it, so a hot stream (one the exact
    rescaling had to leave, e.g. for the GroupNorm eps) needs its whole part: then None.
    """
    streams = {n for g in rescale_graph(vae, PARTS).gauges.values() if g.kind == "stream" for n in g.activations}
    owners = set()
    for layer in layers:
        if layer in streams:
            return None
        parts_of = layer.split(".")
        owner = next((".".join(parts_of[:i]) for i in range(len(parts_of), 0, -1)
                      if type(vae.get_submodule(".".join(parts_of[:i]))).__name__ in BLOCKS), None)
        if owner is not None:
            owners.add(owner)
        elif parts_of[0] in ("encoder", "decoder") and parts_of[-1] in ("encoder", "decoder", "conv_norm_out",
                                                                        "conv_act", "conv_out"):
            owners |= {f"{parts_of[0]}.conv_norm_out", f"{parts_of[0]}.conv_out"}
        elif layer in ("quant_conv", "post_quant_conv"):
            owners.add(layer)
        else:
            return None
    return sorted(owners)


# ---------------------------------------------------------------------------------------------------
# Approximate: GroupNorm -> SiLU -> conv chains

# max over x of |SiLU(x) - ReLU(x)| = max |x| sigmoid(-|x|), reached at |x| = 1.2785 (the root of
# 1 + e^-x = x): SiLU's only departure from positive homogeneity.
SILU_GAP = 0.2785


def silu_chains(vae, parts=PARTS):
    """[(GroupNorm, conv) module names] of `parts`: a GroupNorm with affine weights, then a SiLU, then a conv.

    Each resnet's norm1 -> conv1 and norm2 -> conv2, and the conv_norm_out -> conv_out head of the
    encoder and of the decoder (a SpatialNorm head or another activation is left out).
    """
    chains = []
    for part in parts:
        for name, module in getattr(vae, part).named_modules(prefix=part):
            if type(module).__name__ == "ResnetBlock2D" and isinstance(module.nonlinearity, torch.nn.SiLU):
                chains += [(f"{name}.norm1", f"{name}.conv1"), (f"{name}.norm2", f"{name}.conv2")]
        head = getattr(vae, part)
        if isinstance(getattr(head, "conv_act", None), torch.nn.SiLU):
            chains.append((f"{part}.conv_norm_out", f"{part}.conv_out"))
    return [(norm, conv) for norm, conv in chains
            if isinstance(vae.get_submodule(norm), torch.nn.GroupNorm) and vae.get_submodule(norm).affine
            and isinstance(vae.get_submodule(conv), torch.nn.Conv2d)]


def plan_chain_rescale(vae, maxima, limit, parts=PARTS):
    """Power-of-two scales for the GroupNorm -> SiLU -> conv chains whose GroupNorm output exceeds `limit`.

    Not exact: dividing the GroupNorm's weight and bias by s and multiplying the conv's weight by s
    computes conv(s * SiLU(y / s)) instead of conv(SiLU(y)). SiLU(x) = ReLU(x) - |x| sigmoid(-|x|),
    ReLU passes scales through, and the second term lies in [-0.2785, 0]; so the conv's input
    changes by at most 0.2785 s per element, in the units of the GroupNorm output y. For a GroupNorm
    that overflows (y near 1e5) the smallest sufficient s changes it by a few 1e-5 of its peak: an
    overflow turned into a small function change that the fine-tune then removes.
    `maxima`: the largest |activation| per module (after the exact rescaling). Returns {"chains":
    [a row per rescaled chain], "parts"}; `apply_chain_rescale` applies it.
    """
    rows = []
    for norm, conv in silu_chains(vae, parts):
        peak = maxima.get(norm, 0.0)
        if not (math.isfinite(peak) and peak > limit):
            continue
        scale = 2.0 ** math.ceil(math.log2(peak / limit))
        rows.append({"chain": norm, "conv": conv, "kind": "GroupNorm -> SiLU -> conv", "exact": False,
                     "part": norm.split(".", 1)[0], "scale": 1 / scale, "peak_before": peak, "peak_after": peak / scale,
                     "silu_change_bound": SILU_GAP * scale, "relative_change_bound": SILU_GAP * scale / peak,
                     "parameters": {f"{norm}.weight": 1 / scale, f"{norm}.bias": 1 / scale, f"{conv}.weight": scale}})
    return {"chains": rows, "parts": list(parts)}


@torch.no_grad()
def apply_chain_rescale(vae, plan):
    """Multiply the parameters of `plan`'s chains in place (powers of two: exact multiplications); returns their factors."""
    known = set(silu_chains(vae, plan["parts"]))
    edited = {}
    for row in plan["chains"]:
        if (row["chain"], row["conv"]) not in known:
            raise VaekitError(f"The rescaling plan names a chain this model lacks ({row['chain']} -> {row['conv']}); "
                              f"it was made for another architecture.")
        for name, value in row["parameters"].items():
            vae.get_parameter(name).mul_(value)
            edited[name] = value
    return edited
