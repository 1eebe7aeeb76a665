"""SPHINX image processors: pad to a centred square filled with the CLIP mean colour, bicubic resize to the
model's input size, CLIP normalisation. Views are cut inside the model, as in the original.

`SphinxImageProcessorPil` resizes with Pillow exactly as the original `padded_resize` transform does and
reproduces its pixels; `SphinxImageProcessor` (torchvision) is the batched tensor version.

Both accept paths, PIL images, numpy arrays and tensors. Images in other modes (greyscale, palette, RGBA,
CMYK, 16-bit) are converted to 8-bit RGB; an image that cannot be decoded raises a `ValueError` naming it.

This file is copied flat into saved model folders as remote code.
"""

import os

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension, PILImageResampling

_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def load_image_file(path: str) -> PIL.Image.Image:
    """Open and fully decode an image file, with EXIF orientation applied."""
    if not os.path.isfile(path):
        raise ValueError(f"image file {path!r} does not exist (URLs are not fetched; download the image first)")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return PIL.ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"cannot decode image file {path!r}: {error}") from error


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """8-bit RGB version of any PIL image; 16-bit and float images are scaled, alpha is dropped (as the original)."""
    try:
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


def _array_to_rgb_uint8(image: np.ndarray, input_data_format) -> tuple[np.ndarray, ChannelDimension]:
    """Channel order of an array image (colour channels last wins when ambiguous) and 16-bit → 8-bit."""
    if image.ndim == 3 and input_data_format is None:
        input_data_format = ChannelDimension.LAST if image.shape[-1] in (3, 4) else ChannelDimension.FIRST
    if image.dtype == np.uint16:
        image = np.rint(image / 257.0).astype(np.uint8)
    elif not image.flags.writeable:  # torch cannot share read-only memory
        image = image.copy()
    return image, input_data_format


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
        return _array_to_rgb_uint8(image, input_data_format)
    return image, input_data_format


class SphinxImageProcessor(TorchvisionBackend):
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
        processed = []
        for image in images:
            if do_pad:
                height, width = image.shape[-2:]
                side = max(height, width)
                left, top = (side - width) // 2, (side - height) // 2
                fill = [int(255 * m) for m in image_mean] if image.dtype == torch.uint8 else list(image_mean)
                image = tvF.pad(image, [left, top, side - width - left, side - height - top], fill=fill)
            if do_resize:
                image = self.resize(image, size=size, resample=resample)
            processed.append(image)
        pixel_values = torch.stack(processed)
        pixel_values = self.rescale_and_normalize(
            pixel_values, do_rescale, rescale_factor, do_normalize, image_mean, image_std
        )
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)


class SphinxImageProcessorPil(PilBackend):
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
        processed = []
        for image in images:
            if do_pad:
                channels, height, width = image.shape
                side = max(height, width)
                left, top = (side - width) // 2, (side - height) // 2
                fill = [int(255 * m) for m in image_mean] if image.dtype == np.uint8 else list(image_mean)
                canvas = np.empty((channels, side, side), dtype=image.dtype)
                canvas[:] = np.asarray(fill, dtype=image.dtype)[:channels, None, None]
                canvas[:, top : top + height, left : left + width] = image
                image = canvas
            if do_resize:
                image = self.resize(image, size=size, resample=resample)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            processed.append(image)
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)


__all__ = ["SphinxImageProcessor", "SphinxImageProcessorPil"]
