"""SPHINX image processors: pad to a centred square filled with the CLIP mean colour, bicubic resize to the
model's input size, CLIP normalisation. Views are cut inside the model, as in the original.

Both backends reproduce the original `padded_resize` transform (PadToSquare, torchvision `Resize` on the PIL
image, `ToTensor`, `Normalize`) bit for bit:
- `SphinxImageProcessor` (the default, torchvision backend) works on batched tensors, on any device, with
  `pillow_resize`: a torch port of Pillow's resampling (its filter weights, 22-bit fixed-point arithmetic and
  8-bit rounding between the horizontal and the vertical pass);
- `SphinxImageProcessorPil` calls Pillow itself.

Both accept paths, PIL images, numpy arrays and tensors (channels first or last, greyscale `H x W`,
`H x W x 1` or `1 x H x W`). Images in other modes (greyscale, palette, RGBA, CMYK, 16-bit) are converted to
8-bit RGB; an image that cannot be decoded raises a `ValueError` naming it.

This file is copied flat into saved model folders as remote code.
"""

import math
import os
from contextlib import contextmanager

import numpy as np
import PIL.Image
import PIL.ImageFile
import PIL.ImageOps
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import group_images_by_shape, reorder_images
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension, PILImageResampling

_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@contextmanager
def _refusing_truncated_images():
    """Decode with Pillow's own default (truncated files raise), whatever another library set globally
    (lmms-eval, for one, sets `ImageFile.LOAD_TRUNCATED_IMAGES = True` when imported)."""
    previous = PIL.ImageFile.LOAD_TRUNCATED_IMAGES
    PIL.ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        PIL.ImageFile.LOAD_TRUNCATED_IMAGES = previous


def load_image_file(path: str) -> PIL.Image.Image:
    """Open and fully decode an image file, with EXIF orientation applied."""
    if not os.path.isfile(path):
        raise ValueError(f"image file {path!r} does not exist (URLs are not fetched; download the image first)")
    try:
        with PIL.Image.open(path) as image, _refusing_truncated_images():
            image.load()
            return PIL.ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"cannot decode image file {path!r}: {error}") from error


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """8-bit RGB version of any PIL image; 16-bit and float images are scaled, alpha is dropped (as the original)."""
    try:
        with _refusing_truncated_images():
            image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot decode image {image!r} (truncated or corrupt data): {error}") from error
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and values.max(initial=0.0) <= 1.0:
            values = values * 255.0
        elif values.max(initial=0.0) > 255:
            values = values / 257.0
        image = PIL.Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def _array_to_rgb(image: np.ndarray, input_data_format) -> tuple[np.ndarray, ChannelDimension]:
    """An `H x W x 3` array of any image array: greyscale is repeated, alpha dropped, 16-bit scaled to 8-bit.

    Without `input_data_format`, a 3-D array whose last axis has 1, 3 or 4 entries is channels-last (this wins
    when both ends could be channels), otherwise channels-first.
    """
    shape = list(image.shape)
    if image.ndim == 2:
        image = image[..., None]
    elif image.ndim != 3:
        raise ValueError(f"an image array must be H x W, H x W x C or C x H x W, got shape {shape}")
    elif input_data_format is None:
        input_data_format = ChannelDimension.LAST if image.shape[-1] in (1, 3, 4) else ChannelDimension.FIRST
    if ChannelDimension(input_data_format or ChannelDimension.LAST) == ChannelDimension.FIRST:
        image = np.moveaxis(image, 0, -1)
    channels = image.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(f"an image needs 1 (grey), 3 (RGB) or 4 (RGBA) channels, got shape {shape}")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise ValueError(f"an image array holds NaN or infinite values (shape {shape}, dtype {image.dtype})")
    if image.dtype == np.uint16:
        image = np.rint(image / 257.0).astype(np.uint8)
    image = np.repeat(image, 3, axis=-1) if channels == 1 else np.ascontiguousarray(image[..., :3])
    return (image if image.flags.writeable else image.copy()), ChannelDimension.LAST  # torch needs writable memory


def _fetch(fetch_parent, image_url_or_urls):
    if isinstance(image_url_or_urls, (list, tuple)):
        return [_fetch(fetch_parent, x) for x in image_url_or_urls]
    if isinstance(image_url_or_urls, str) and not image_url_or_urls.startswith(("http://", "https://", "data:")):
        return load_image_file(image_url_or_urls)
    return fetch_parent(image_url_or_urls)


def _prepare(image, input_data_format):
    if isinstance(image, PIL.Image.Image):
        return to_rgb(image), input_data_format
    if isinstance(image, torch.Tensor):
        image = image.numpy(force=True)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, input_data_format)
    return image, input_data_format


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _box(x: np.ndarray) -> np.ndarray:
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


def _hamming(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Pillow writes the window's constants as C floats (0.54f, 0.46f)
        value = (
            np.sin(x * math.pi)
            / (x * math.pi)
            * (float(np.float32(0.54)) + float(np.float32(0.46)) * np.cos(x * math.pi))
        )
    return np.where(x == 0.0, 1.0, np.where(x >= 1.0, 0.0, value))


def _lanczos(x: np.ndarray) -> np.ndarray:
    def sinc(v):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(v == 0.0, 1.0, np.sin(v * math.pi) / (v * math.pi))

    return np.where((x > -3.0) & (x < 3.0), sinc(x) * sinc(x / 3.0), 0.0)


# Pillow's convolution filters (`libImaging/Resample.c`): the filter and its support, in input pixels.
PILLOW_FILTERS = {
    PILImageResampling.BOX: (_box, 0.5),
    PILImageResampling.BILINEAR: (_bilinear, 1.0),
    PILImageResampling.HAMMING: (_hamming, 1.0),
    PILImageResampling.BICUBIC: (_bicubic, 2.0),
    PILImageResampling.LANCZOS: (_lanczos, 3.0),
}
PILLOW_PRECISION_BITS = 32 - 8 - 2  # fixed-point fraction bits of Pillow's 8-bit resampling


def pillow_resize_weights(in_size: int, out_size: int, resample=PILImageResampling.BICUBIC):
    """Pillow's resampling taps from `in_size` to `out_size` pixels: `(first_index, weights)`.

    `first_index[i]` is the first input pixel of output pixel `i`; `weights` (`[out_size, taps]`, float64) are
    its normalised filter weights, zero past the last input pixel it reads. Computed in double precision with
    the same expressions, in the same order, as Pillow's `precompute_coeffs`.
    """
    if resample not in PILLOW_FILTERS:
        names = ", ".join(PILImageResampling(r).name for r in PILLOW_FILTERS)
        raise ValueError(f"resample must be one of Pillow's convolution filters ({names}), got {resample!r}")
    kernel, support = PILLOW_FILTERS[resample]
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = support * filter_scale
    taps = int(math.ceil(support)) * 2 + 1
    centers = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C's (int) cast truncates towards zero; negative starts are clamped to 0 anyway
    first = np.maximum(np.trunc(centers - support + 0.5).astype(np.int64), 0)
    last = np.minimum(np.trunc(centers + support + 0.5).astype(np.int64), in_size)
    offsets = np.arange(taps)
    weights = kernel((first[:, None] + offsets[None, :] - centers[:, None] + 0.5) * (1.0 / filter_scale))
    weights = np.where(offsets[None, :] < (last - first)[:, None], weights, 0.0)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, total, out=weights, where=total != 0.0)
    return first, weights


def _resample_axis(images: torch.Tensor, out_size: int, dim: int, resample) -> torch.Tensor:
    """One pass of Pillow's resampling along `dim` (-1: horizontal, -2: vertical)."""
    in_size = images.shape[dim]
    first, weights = pillow_resize_weights(in_size, out_size, resample)
    taps = weights.shape[1]
    index = np.minimum(first[:, None] + np.arange(taps), in_size - 1)
    source = images.movedim(dim, 0)  # the resampled axis first: one row per input pixel
    if images.dtype == torch.uint8:
        out = _resample_rows_fixed_point(source, first, index, weights, out_size)
    else:
        out = _resample_rows_float(source, index, weights)
    return out.movedim(0, dim).contiguous()


def _resample_rows_fixed_point(source, first, index, weights, out_size) -> torch.Tensor:
    """Pillow's 8-bit arithmetic: weights rounded to 22 fractional bits (away from zero), integer sums, the
    result shifted back and clipped. The sums run as banded float64 matrix products: every product and partial
    sum is an integer below 2**53, so they are exact in any order, and matrix products are fast everywhere."""
    scaled = weights * (1 << PILLOW_PRECISION_BITS)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5))
    device = source.device
    matrix = torch.zeros((out_size, source.shape[0]), dtype=torch.float64, device=device)
    output_index = torch.arange(out_size, device=device).repeat_interleave(index.shape[1])
    taps = (output_index, torch.from_numpy(index.ravel()).to(device))
    matrix.index_put_(taps, torch.from_numpy(fixed.ravel()).to(device), accumulate=True)  # clipped taps weigh 0
    rows = torch.empty(source.shape, dtype=torch.float64, device=device).copy_(source).view(source.shape[0], -1)
    sums = torch.empty((out_size, rows.shape[1]), dtype=torch.float64, device=device)
    block = 64  # outputs per product: each block reads only the input rows its taps reach
    for start in range(0, out_size, block):
        stop = min(start + block, out_size)
        low, high = int(first[start]), int(index[start:stop].max()) + 1
        torch.mm(matrix[start:stop, low:high], rows[low:high], out=sums[start:stop])
    rounded = (sums.to(torch.int64) + (1 << (PILLOW_PRECISION_BITS - 1))) >> PILLOW_PRECISION_BITS
    return rounded.clamp_(0, 255).to(torch.uint8).view(out_size, *source.shape[1:])


def _resample_rows_float(source, index, weights) -> torch.Tensor:
    """Pillow's float ("F") mode: double weights, sums accumulated tap by tap in Pillow's order, float32 out."""
    index = torch.from_numpy(index).to(source.device)
    kernel = torch.from_numpy(weights).to(source.device)
    rows = source.to(torch.float64)
    shape = (index.shape[0],) + (1,) * (rows.ndim - 1)
    total = torch.zeros((index.shape[0], *rows.shape[1:]), dtype=torch.float64, device=source.device)
    for tap in range(index.shape[1]):
        total += rows.index_select(0, index[:, tap]) * kernel[:, tap].view(shape)
    return total.to(torch.float32)


def pillow_resize(images: torch.Tensor, size: tuple[int, int], resample=PILImageResampling.BICUBIC) -> torch.Tensor:
    """Resize `[..., H, W]` images to `size = (height, width)` exactly as Pillow's `Image.resize` does.

    uint8 images follow Pillow's 8-bit path: two passes, the first rounded to 8 bits, horizontal first unless
    only the height shrinks. That is bit-exact for squares resized to squares (what SPHINX does after padding),
    for one-axis resizes and upscales, and for every filter; Pillow 13.0 also runs some downscales of both
    axes by different factors vertical-first, by a rule not reproduced here, where results can differ by an
    8-bit level. Float images follow Pillow's float ("F") mode. Works batched, on any device.
    """
    height, width = size
    passes = [(-1, width), (-2, height)]
    if width >= images.shape[-1] and height < images.shape[-2]:
        passes.reverse()
    for dim, out_size in passes:
        if images.shape[dim] != out_size:
            images = _resample_axis(images, out_size, dim, resample)
    return images


def resize_like_pillow(
    images: torch.Tensor, size: tuple[int, int], resample=PILImageResampling.BICUBIC
) -> torch.Tensor:
    """Resize `[N, C, H, W]` images to `size = (height, width)` as Pillow's `Image.resize` does.

    Pillow itself for 8-bit images in CPU memory (its C loops beat any tensor formulation there), `pillow_resize`
    on accelerators and for float images. What `SphinxImageProcessor.resize_images` uses.
    """
    if images.device.type != "cpu" or images.dtype != torch.uint8:
        return pillow_resize(images, size, resample)
    height, width = size
    resized = [
        np.asarray(PIL.Image.fromarray(image.permute(1, 2, 0).numpy()).resize((width, height), resample))
        for image in images
    ]
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)


def pad_to_square(images: torch.Tensor, fill: list[float]) -> torch.Tensor:
    """Centre `[..., C, H, W]` images on squares of side `max(H, W)` filled with `fill` (one value per channel)."""
    height, width = images.shape[-2:]
    side = max(height, width)
    if height == width:
        return images
    top, left = (side - height) // 2, (side - width) // 2
    canvas = torch.tensor(fill, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    canvas = canvas.expand(*images.shape[:-2], side, side).clone()
    canvas[..., top : top + height, left : left + width] = images
    return canvas


def _to_tensor_and_normalize(
    images: torch.Tensor, do_rescale, rescale_factor, do_normalize, image_mean, image_std
) -> torch.Tensor:
    """torchvision's `ToTensor` (a division by 255 in float32) then `Normalize`, with the same float32 ops."""
    images = images.to(torch.float32)
    if do_rescale:
        images = images / 255 if rescale_factor == 1 / 255 else images * rescale_factor
    if do_normalize:
        mean = torch.tensor(image_mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        std = torch.tensor(image_std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        images = (images - mean) / std
    return images


def _normalisation(image_mean, image_std) -> tuple[list[float], list[float]]:
    """The mean and std as 3 numbers each: every image is RGB by the time it is normalised, and one number stands
    for all three channels. Anything else is a ValueError naming it (a zero std too: images are divided by it)."""
    checked = []
    for name, values in (("image_mean", image_mean), ("image_std", image_std)):
        listed = [values] if isinstance(values, (int, float)) else values
        try:
            numbers = [float(v) for v in listed]
        except (TypeError, ValueError):
            numbers = []
        if len(numbers) not in (1, 3) or not all(np.isfinite(numbers)):
            raise ValueError(f"{name} must be 3 finite numbers (one per RGB channel) or 1 for all, got {values!r}")
        if name == "image_std" and 0.0 in numbers:
            raise ValueError(f"image_std must not hold a zero (images are divided by it), got {values!r}")
        checked.append(numbers * 3 if len(numbers) == 1 else numbers)
    return checked[0], checked[1]


def _fill(image_mean, eight_bit: bool) -> list[float]:
    """The padding colour: the CLIP mean, as the original's `int(255 * mean)` levels for 8-bit images (a mean
    outside [0, 1] pads with the nearest level)."""
    return [min(255, max(0, int(255 * m))) for m in image_mean] if eight_bit else list(image_mean)


def _with_backend_auto_map(config: dict) -> dict:
    """Name both backends in a saved `auto_map`, so that remote code honours `backend="pil"` as well."""
    reference = (config.get("auto_map") or {}).get("AutoImageProcessor")
    if isinstance(reference, str):
        module = reference.rsplit(".", 1)[0]
        config["auto_map"]["AutoImageProcessor"] = {
            "torchvision": f"{module}.SphinxImageProcessor",
            "pil": f"{module}.SphinxImageProcessorPil",
        }
    return config


class _SphinxImageDefaults:
    """What both backends share: SPHINX's defaults, local paths, and an `auto_map` naming both classes."""

    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": 448, "width": 448}
    do_pad = True
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    model_input_names = ["pixel_values"]

    def fetch_images(self, image_url_or_urls):
        return _fetch(super().fetch_images, image_url_or_urls)

    def preprocess(self, *args, **kwargs):
        try:
            return super().preprocess(*args, **kwargs)
        except StrictDataclassError as error:  # transformers' check of the keyword types, already naming the field
            raise ValueError(str(error)) from None

    def to_dict(self):
        return _with_backend_auto_map(super().to_dict())


class SphinxImageProcessor(_SphinxImageDefaults, TorchvisionBackend):
    def resize_images(self, images: torch.Tensor, size: tuple[int, int], resample) -> torch.Tensor:
        """Resize a stack of padded `[N, C, H, W]` images to `size = (height, width)`: `resize_like_pillow`.

        The one place the resize is chosen: a subclass may override it, e.g. with `pillow_resize` to run the torch
        port on the CPU as well, or with a faster resize that is not bit-exact.
        """
        return resize_like_pillow(images, size, resample)

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, device=None, **kwargs):
        image, input_data_format = _prepare(image, input_data_format)
        return super().process_image(
            image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, device=device, **kwargs
        )

    def _preprocess(
        self,
        images: list[torch.Tensor],
        do_resize,
        size,
        resample,
        do_rescale,
        rescale_factor,
        do_normalize,
        image_mean,
        image_std,
        do_pad,
        return_tensors,
        **kwargs,
    ) -> BatchFeature:
        image_mean, image_std = _normalisation(image_mean, image_std)
        grouped, grouped_index = group_images_by_shape(images, disable_grouping=False)
        processed = {}
        for shape, stacked in grouped.items():
            if do_pad:
                stacked = pad_to_square(stacked, _fill(image_mean, stacked.dtype == torch.uint8))
            if do_resize:
                stacked = self.resize_images(stacked, (size.height, size.width), resample)
            processed[shape] = _to_tensor_and_normalize(
                stacked, do_rescale, rescale_factor, do_normalize, image_mean, image_std
            )
        pixel_values = torch.stack(reorder_images(processed, grouped_index))
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)


class SphinxImageProcessorPil(_SphinxImageDefaults, PilBackend):
    def process_image(self, image, do_convert_rgb=None, input_data_format=None, **kwargs):
        image, input_data_format = _prepare(image, input_data_format)
        return super().process_image(
            image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, **kwargs
        )

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize,
        size,
        resample,
        do_rescale,
        rescale_factor,
        do_normalize,
        image_mean,
        image_std,
        do_pad,
        return_tensors,
        **kwargs,
    ) -> BatchFeature:
        image_mean, image_std = _normalisation(image_mean, image_std)
        processed = []
        for image in images:
            if do_pad:
                image = pad_to_square(torch.from_numpy(image), _fill(image_mean, image.dtype == np.uint8)).numpy()
            if do_resize:
                image = self.resize(image, size=size, resample=resample)
            pixels = _to_tensor_and_normalize(
                torch.from_numpy(image), do_rescale, rescale_factor, do_normalize, image_mean, image_std
            )
            processed.append(pixels.numpy())
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)


__all__ = ["SphinxImageProcessor", "SphinxImageProcessorPil"]
