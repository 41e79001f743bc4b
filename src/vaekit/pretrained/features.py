"""Frozen image feature models for latent alignment (VA-VAE): DINOv2 or any image backbone, local files first.

A feature-model argument (`loss.align_model`) is one of:

  torchvision:alexnet, torchvision:vgg16   the ImageNet backbones vaekit keeps for LPIPS (`vaekit weights fetch
                                           lpips-alex` / `lpips-vgg`): their convolutional features at stride 16
  timm:NAME                                a timm model with its pretrained weights (only when timm is installed)
  DIR                                      a `transformers` model folder (config.json + weights), e.g. a saved DINOv2
  OWNER/NAME                               a `transformers` hub id such as facebook/dinov2-large: the local hub cache
                                           first, the hub only when it answers (as every model argument)

Each maps images in [-1, 1] to a (B, D, h, w) grid of features of a requested size: a ViT sees the
image resized so that its patch grid is that size (VA-VAE feeds DINOv2 224 px for the 16 x 16 latent
grid of a 256 px image), a conv net sees it resized to that size times its stride, and what still
differs is area-interpolated. The model is frozen: eval mode always, no parameter needs a gradient,
and its forward runs without autograd, so nothing can train it.
"""

import contextlib
import inspect
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.device import DTYPES
from vaekit.errors import VaekitError
from vaekit.pretrained import backbones

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The LPIPS backbones as feature models: torchvision `features` cut after the last ReLU at stride 16
# (alexnet conv5, vgg16 conv5_3), so a 16x latent grid and the feature grid are about the same size.
TORCHVISION_CUTS = {"alexnet": ("alex", 12, 16), "vgg16": ("vgg", 30, 16)}  # name -> (lpips net, layers kept, stride)


class FeatureModel(nn.Module):
    """A frozen backbone: images (B, 3, H, W) in [-1, 1] -> features (B, D, h, w) in float32 on a given grid."""

    def __init__(self, net, name, kind, patch=None, stride=None, prefix_tokens=None, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, dtype=torch.float32):
        super().__init__()
        self.net = net.eval().requires_grad_(False).to(dtype)
        self.name, self.kind, self.patch, self.stride, self.dtype = name, kind, patch, stride, dtype
        self.prefix_tokens = prefix_tokens  # None: whatever precedes the patch tokens (CLS, registers)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.accepts_interpolation = "interpolate_pos_encoding" in inspect.signature(net.forward).parameters
        self.dim = int(self(torch.zeros(1, 3, 8, 8), (2, 2)).shape[1])

    def train(self, mode=True):
        """Ignore train(): the feature model is frozen and keeps its eval-mode behaviour."""
        return super().train(False)

    def input_size(self, grid):
        """The pixel size the backbone sees for a feature grid of `grid` (h, w)."""
        step = self.patch or self.stride
        return grid[0] * step, grid[1] * step

    @torch.no_grad()
    def forward(self, x, grid):
        """Features of images `x` (B, 3, H, W) in [-1, 1] on a `grid` (h, w) of positions, float32 (B, D, h, w)."""
        grid = (int(grid[0]), int(grid[1]))
        x = F.interpolate(x.float(), size=self.input_size(grid), mode="bicubic", antialias=True, align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std  # the backbone's own input normalisation
        features = self.features(x.to(self.dtype)).float()
        if tuple(features.shape[-2:]) != grid:
            features = F.interpolate(features, size=grid, mode="area")
        return features

    def features(self, x):
        """The backbone's last feature map of normalised images, as (B, D, h', w')."""
        if self.kind == "torchvision":
            return self.net(x)
        if self.kind == "timm":
            out = self.net.forward_features(x)
        else:
            kwargs = {"interpolate_pos_encoding": True} if self.accepts_interpolation else {}
            out = self.net(pixel_values=x, **kwargs).last_hidden_state
        if out.dim() == 4:  # a conv net: already (B, D, h', w')
            return out
        # A ViT: (B, prefix + h' * w', D) tokens; drop CLS / register tokens, lay the rest out on the patch grid.
        height, width = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        prefix = out.shape[1] - height * width if self.prefix_tokens is None else self.prefix_tokens
        if prefix < 0:
            raise VaekitError(f"Feature model {self.name} returned {out.shape[1]} tokens for a {height}x{width} "
                              "patch grid; it is not a ViT with square patches.")
        return out[:, prefix:].transpose(1, 2).reshape(out.shape[0], out.shape[2], height, width)  # (B, D, h', w')


def load_feature_model(spec, device=None, dtype="fp32"):
    """A frozen FeatureModel from a feature-model argument (see the module docstring), in `dtype` (fp32/bf16/fp16)."""
    spec = str(spec)
    torch_dtype = DTYPES[dtype]
    if spec.startswith("torchvision:"):
        model = torchvision_features(spec.split(":", 1)[1], torch_dtype)
    elif spec.startswith("timm:"):
        model = timm_features(spec.split(":", 1)[1], torch_dtype)
    else:
        model = transformers_features(spec, torch_dtype)
    return model.to(device) if device is not None else model


def torchvision_features(name, dtype):
    """alexnet / vgg16 `features` with the ImageNet weights of vaekit's LPIPS store, cut at stride 16."""
    import torchvision  # a feature-model user only; training without alignment never loads it

    if name not in TORCHVISION_CUTS:
        raise VaekitError(f"Unknown feature model torchvision:{name}; vaekit provides torchvision:"
                          f"{' and torchvision:'.join(TORCHVISION_CUTS)} (the LPIPS backbones).")
    net_name, keep, stride = TORCHVISION_CUTS[name]
    source = backbones.find_lpips_backbone(net_name)
    if source is None:
        raise VaekitError(f"Feature model torchvision:{name}: {backbones.missing_lpips_message(net_name)}.")
    tensors = backbones.read_lpips_backbone(source, net_name)
    features = getattr(torchvision.models, name)(weights=None).features[:keep]
    state = {k.removeprefix("features."): v for k, v in tensors.items() if int(k.split(".")[1]) < keep}
    features.load_state_dict(state, strict=True)
    return FeatureModel(features, f"torchvision:{name}", "torchvision", stride=stride, dtype=dtype)


@contextlib.contextmanager
def hub_offline_unless_reachable():
    """Within the block the hub client uses only its cache when the hub does not answer (no minute of retries)."""
    from huggingface_hub import constants  # the hub client, for a hub-backed feature model only

    from vaekit.model.load import hub_reachable  # the one reachability check of model arguments

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or not hub_reachable()
    try:
        yield not constants.HF_HUB_OFFLINE
    finally:
        constants.HF_HUB_OFFLINE = saved


def timm_features(name, dtype):
    """A timm backbone with pretrained weights (timm's own hub download, from its cache when offline)."""
    try:
        import timm  # optional: only users of timm:NAME feature models need it installed
    except ImportError:
        raise VaekitError(f"Feature model timm:{name} needs the timm package, which is not installed: pip install "
                          "timm, or use a transformers model (a folder or a hub id such as facebook/dinov2-base).") \
            from None
    with hub_offline_unless_reachable() as online:
        try:
            try:  # ViTs accept other input sizes only when built with dynamic_img_size
                net = timm.create_model(name, pretrained=True, num_classes=0, dynamic_img_size=True)
            except TypeError:
                net = timm.create_model(name, pretrained=True, num_classes=0)
        except (OSError, RuntimeError, ValueError) as e:  # unknown name, missing weights, no network
            where = "" if online else " (the hub cannot be reached, and its local cache does not hold the weights)"
            raise VaekitError(f"Could not load feature model timm:{name}{where}: {str(e)[:200]}") from None
    config = getattr(net, "pretrained_cfg", {}) or {}
    patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    stride = None if patch else int(net.feature_info[-1]["reduction"])
    return FeatureModel(net, f"timm:{name}", "timm", patch=patch, stride=stride,
                        prefix_tokens=getattr(net, "num_prefix_tokens", None),
                        mean=tuple(config.get("mean", IMAGENET_MEAN)), std=tuple(config.get("std", IMAGENET_STD)),
                        dtype=dtype)


def quiet_from_pretrained(cls, name, local_only):
    """cls.from_pretrained without transformers' progress bars and unused-weight notices."""
    from transformers.utils import logging as hf_logging  # transformers' own switches, loaded with it

    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notices about a checkpoint's classification head left unused
            return cls.from_pretrained(name, local_files_only=local_only)
    finally:
        hf_logging.enable_progress_bar()


def transformers_features(spec, dtype):
    """A transformers vision backbone (AutoModel) from a folder or a hub id, the local cache before the hub."""
    from transformers import AutoImageProcessor, AutoModel  # heavy, and only for transformers feature models

    from vaekit.model.load import hub_reachable, is_hub_id  # model arguments' offline rules, shared

    path = Path(spec).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise VaekitError(f"Feature model {spec}: the folder has no config.json; save a transformers model there with "
                          "save_pretrained, or use torchvision:alexnet / a hub id such as facebook/dinov2-base.")
    if not path.exists() and not is_hub_id(spec):
        raise VaekitError(f"Feature model not found: {spec}. Pass a transformers model folder, a hub id "
                          "(facebook/dinov2-base), torchvision:alexnet, torchvision:vgg16 or timm:NAME.")
    attempts = [True] if path.exists() else [True] + ([False] if hub_reachable() else [])
    last = None
    for local_only in attempts:
        try:
            net = quiet_from_pretrained(AutoModel, str(path) if path.exists() else spec, local_only)
            break
        except (OSError, ValueError, KeyError) as e:  # transformers' "not found" and "unknown model type" errors
            last = e
    else:
        reason = ("it is not in the local hub cache and the hub cannot be reached" if len(attempts) == 1 and
                  not path.exists() else f"loading failed ({str(last)[:200]})")
        raise VaekitError(f"Could not load feature model '{spec}': {reason}. Pass a local folder (a transformers model "
                          "saved with save_pretrained), torchvision:alexnet or torchvision:vgg16.")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # no processor config: ImageNet statistics
        processor = quiet_from_pretrained(AutoImageProcessor, str(path) if path.exists() else spec, True)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    patch = getattr(net.config, "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    stride = None if patch else 32  # conv backbones (ConvNeXt, ResNet) end at stride 32
    return FeatureModel(net, spec, "transformers", patch=patch, stride=stride, mean=mean, std=std, dtype=dtype)
