"""Geometry: resizing and cropping by crop mode and small-image policy, aspect-ratio buckets, tensors.

- `prepare_image(img, size, crop=...)` returns the output with a `Crop` that records where it came from;
- `make_buckets` / `nearest_bucket` / `resize_crop_to_bucket` for aspect-ratio bucketing;
- `TrainCrop`: a training crop (crop mode, random scale, flip, `jitter_colour`), the same for every data set;
- `to_tensor` / `to_pil` convert between PIL images and (3, H, W) tensors in [-1, 1].
"""

import dataclasses
import math

import numpy as np
import torch
from PIL import Image

from vaekit.data.config import CROP_MODES, SMALL_IMAGE_POLICIES
from vaekit.data.decode import ImageError
from vaekit.errors import VaekitError


# Bicubic with Pillow's antialiasing (the filter support widens with the downscale factor), so
# downscaled photos do not alias; less ringing than Lanczos on hard edges.
RESAMPLE = Image.Resampling.BICUBIC


@dataclasses.dataclass(frozen=True)
class Crop:
    """Where an output image came from: the input, resized to `resized_size`, cut at `box`.

    `box` is (left, top, right, bottom) in pixels of the resized image; it reaches outside it where
    the small-image policy padded with the background. In input pixels the box is
    `left * W / resized_w`, `top * H / resized_h`, ... (`box_in_original`).
    """

    original_size: tuple[int, int]  # (W, H) of the decoded input, after EXIF orientation
    resized_size: tuple[int, int]  # (W, H) after resizing, before cropping
    box: tuple[int, int, int, int]

    @property
    def scale(self):
        """Resize factor (resized width / original width)."""
        return self.resized_size[0] / self.original_size[0]

    def box_in_original(self):
        """The crop box in input pixels (floats)."""
        sx = self.original_size[0] / self.resized_size[0]
        sy = self.original_size[1] / self.resized_size[1]
        left, top, right, bottom = self.box
        return (left * sx, top * sy, right * sx, bottom * sy)

    def to_dict(self):
        """Plain lists, for JSON files."""
        return {"original_size": list(self.original_size), "resized_size": list(self.resized_size),
                "box": list(self.box)}


def _target_size(size):
    """(W, H) from an int or a pair."""
    if isinstance(size, int):
        width = height = size
    else:
        width, height = (int(s) for s in size)
    if width < 1 or height < 1:
        raise VaekitError(f"Crop size must be positive, got {size}.")
    return width, height


def prepare_image(img, size, crop="center", rng=None, small_images="upscale", min_size=0,
                  background=(255, 255, 255), short_side=None):
    """Resize and crop `img` to `size` (int or (W, H)) by crop mode and small-image policy -> (img, Crop).

    crop: "center" (resize to cover, centre crop), "resize_random" (resize to cover, random crop),
    "random" (random crop at native resolution, resizing only images smaller than the crop).
    small_images, for images smaller than the crop on either side: "upscale" (default) resizes
    them up, "pad" keeps them at native size centred on `background`, "skip" raises ImageError.
    An image whose short side is below `min_size` is always skipped ("smaller than min_size").
    short_side: (low, high) pixels, "random" crops only: the image is first scaled down so that its
    short side is a length drawn uniformly from [low, high] (never up; never below the crop), so
    crops show the photo at the scales it is seen at, not only at its capture resolution.
    """
    if crop not in CROP_MODES:
        raise VaekitError(f"crop must be one of {', '.join(CROP_MODES)}, got {crop!r}.")
    if small_images not in SMALL_IMAGE_POLICIES:
        raise VaekitError(f"small_images must be one of {', '.join(SMALL_IMAGE_POLICIES)}, got {small_images!r}.")
    if crop != "center" and rng is None:
        raise ValueError(f"crop={crop!r} needs an rng (numpy.random.Generator)")
    width, height = img.size
    target_w, target_h = _target_size(size)
    if min(width, height) < min_size:
        raise ImageError("smaller than min_size", None, f"{width}x{height}, min_size {min_size}")
    cover = max(target_w / width, target_h / height)  # the scale at which the image just covers the crop
    if cover > 1 and small_images == "skip":
        raise ImageError("smaller than crop size", None, f"{width}x{height} < {target_w}x{target_h}")
    scale = max(cover, 1.0) if crop == "random" else cover
    if crop == "random" and short_side is not None:
        scale = max(cover, min(1.0, rng.uniform(*short_side) / min(width, height)))
    if small_images == "pad":
        scale = min(scale, 1.0)
    resized_w, resized_h = max(1, round(width * scale)), max(1, round(height * scale))
    if small_images != "pad":  # float rounding must never leave the resized image short of the crop
        resized_w, resized_h = max(resized_w, target_w), max(resized_h, target_h)
    left = _offset(resized_w - target_w, crop, rng)
    top = _offset(resized_h - target_h, crop, rng)
    box = (left, top, left + target_w, top + target_h)
    out = _render(img, (resized_w, resized_h), box, background)
    return out, Crop((width, height), (resized_w, resized_h), box)


def _offset(slack, crop, rng):
    """Crop offset along one axis: centred, or uniform over the slack; negative slack centres padding."""
    if slack <= 0 or crop == "center":
        return slack // 2 if slack >= 0 else -((-slack) // 2)
    return int(rng.integers(0, slack + 1))


def _render(img, resized_size, box, background):
    """Cut `box` out of `img` resized to `resized_size`, resampling only the part inside the box."""
    resized_w, resized_h = resized_size
    width, height = img.size
    left, top, right, bottom = box
    # The visible part of the box, in resized pixels.
    v_left, v_top, v_right, v_bottom = max(left, 0), max(top, 0), min(right, resized_w), min(bottom, resized_h)
    if (resized_w, resized_h) == (width, height):
        part = img.crop((v_left, v_top, v_right, v_bottom))
    else:
        sx, sy = width / resized_w, height / resized_h
        # Resizing just the source region equals resize-then-crop (Pillow's filter still reads the
        # pixels around the region) at a fraction of the cost for large photos.
        part = img.resize((v_right - v_left, v_bottom - v_top), RESAMPLE,
                          box=(v_left * sx, v_top * sy, v_right * sx, v_bottom * sy))
    if (v_left, v_top, v_right, v_bottom) == box:
        return part
    canvas = Image.new("RGB", (right - left, bottom - top), tuple(int(c) for c in background))
    canvas.paste(part, (v_left - left, v_top - top))
    return canvas


def resize_center_crop(img, size, small_images="upscale", background=(255, 255, 255)):
    """Resize to cover `size` (int or (W, H)), centre crop -> (img, Crop)."""
    return prepare_image(img, size, "center", small_images=small_images, background=background)


def random_crop(img, size, rng, small_images="upscale", background=(255, 255, 255)):
    """Random crop at native resolution (images smaller than the crop follow `small_images`) -> (img, Crop)."""
    return prepare_image(img, size, "random", rng, small_images=small_images, background=background)


def resize_random_crop(img, size, rng, small_images="upscale", background=(255, 255, 255)):
    """Resize to cover `size` (short side fits), random crop along the long side -> (img, Crop)."""
    return prepare_image(img, size, "resize_random", rng, small_images=small_images, background=background)


def make_buckets(target_area=512 * 512, min_aspect=0.5, max_aspect=2.0, step=64):
    """Aspect-ratio buckets [(W, H)]: sides multiples of `step`, area nearest `target_area`, sorted by W/H.

    For each portrait width w (a multiple of step) the height is the multiple of step nearest
    target_area / w; landscape buckets are their transposes, so the set is symmetric; buckets with
    W/H outside [min_aspect, max_aspect] are dropped.
    """
    if step < 1 or target_area < step * step:
        raise VaekitError(f"Buckets need step >= 1 and target_area >= step^2; got {step} and {target_area}.")
    if not 0 < min_aspect <= 1 <= max_aspect:
        raise VaekitError(f"Buckets need 0 < min_aspect <= 1 <= max_aspect, got {min_aspect} and {max_aspect}.")
    portrait = []
    width = step
    while True:
        height = max(step, round(target_area / width / step) * step)
        if width > height:
            break
        portrait.append((width, height))
        width += step
    buckets = {b for w, h in portrait for b in ((w, h), (h, w))}
    buckets = sorted((b for b in buckets if min_aspect <= b[0] / b[1] <= max_aspect), key=lambda b: b[0] / b[1])
    if not buckets:
        raise VaekitError(f"No bucket fits aspect ratios {min_aspect}..{max_aspect} at step {step}; widen the range.")
    return buckets


def nearest_bucket(width, height, buckets):
    """The bucket whose aspect ratio is nearest the image's in log space (first one on a tie)."""
    if not buckets:
        raise VaekitError("No buckets to choose from.")
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def resize_crop_to_bucket(img, bucket, small_images="upscale", background=(255, 255, 255)):
    """Resize to cover the bucket (W, H) and centre crop -> (img, Crop)."""
    return prepare_image(img, tuple(bucket), "center", small_images=small_images, background=background)


@dataclasses.dataclass(frozen=True)
class TrainCrop:
    """How a decoded training image becomes a crop: `prepare_image`'s options, the flip and the colour jitter.

    Called with (img, rng): (3, size, size) in [-1, 1], cropped, flipped and jittered by `rng`; ImageError if
    unusable. `colour` = (hue, saturation) jitter, see `jitter_colour`; (0, 0) draws nothing more from `rng`.
    """

    size: int = 256
    crop: str = "resize_random"
    flip: bool = True
    small_images: str = "upscale"
    min_size: int = 16
    background: tuple = (255, 255, 255)
    colour: tuple = (0.0, 0.0)
    short_side: tuple | None = None  # (low, high): random crops at random scales, see `prepare_image`

    def __call__(self, img, rng):
        img, _ = prepare_image(img, self.size, self.crop, rng, self.small_images, self.min_size, self.background,
                               self.short_side)
        pixels = to_tensor(img)
        if self.flip and rng.random() < 0.5:
            pixels = pixels.flip(-1)  # (3, H, W), mirrored left-right
        if any(self.colour):
            pixels = jitter_colour(pixels, rng, *self.colour)
        return pixels


# RGB -> YIQ (NTSC): Y is the luma torchvision's grayscale uses, I and Q the two chroma axes (each row sums to 0,
# so greys have no chroma at any brightness).
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def jitter_colour(pixels, rng, hue, saturation):
    """(3, H, W) in [-1, 1] with its hue turned by U(-hue, hue) of the colour wheel and its saturation scaled by
    U(1 - saturation, 1 + saturation), both drawn from `rng`: a few photos then teach colours they lack.

    Written here rather than torchvision's adjust_hue / adjust_saturation: their HSV round trip costs about
    2.6 ms per 64 px crop on one core (a fifth of a small model's training step); here both are one 3 x 3
    matrix. The hue turns the chroma plane of YIQ about the grey axis (luma kept, greys unchanged), and the
    saturation scales the chroma, the same as torchvision's blend with the greyscale image.
    """
    turn, scale = rng.uniform(-hue, hue), rng.uniform(1 - saturation, 1 + saturation)
    cos, sin = math.cos(2 * math.pi * turn) * scale, math.sin(2 * math.pi * turn) * scale
    chroma = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    matrix = torch.from_numpy(_YIQ_TO_RGB @ chroma @ _RGB_TO_YIQ).to(pixels.dtype)
    # Linear with greys fixed, so it applies to [-1, 1] values as well as to [0, 1] ones.
    return torch.einsum("ij,jhw->ihw", matrix, pixels).clamp_(-1.0, 1.0)


def to_tensor(img):
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3)
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W)


def to_pil(tensor):
    """Tensor (3, H, W) (or (1, 3, H, W)) in [-1, 1] -> RGB PIL image, clamped and rounded."""
    if tensor.dim() == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise VaekitError(f"to_pil expects a (3, H, W) tensor, got shape {tuple(tensor.shape)}.")
    values = ((tensor.detach().float().cpu() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return Image.fromarray(values.permute(1, 2, 0).numpy())  # (H, W, 3)
