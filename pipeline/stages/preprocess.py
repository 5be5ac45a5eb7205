"""CPU preprocessing: resize the shorter side to the model's resolution and center-crop a square."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.stages.rows import IMAGE, OK, ORIG_HEIGHT, ORIG_WIDTH, STATUS


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize (bicubic, shorter side -> size) then center-crop to size x size.

    Args:
        image: uint8 (H, W, 3).
        size: output side in pixels.

    Returns:
        uint8 (size, size, 3).
    """
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    resized = Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def preprocess_batch(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray Data map_batches function (numpy format).

    Replaces the variable-size `image` column with a (B, image_size, image_size, 3) uint8 array
    (zeros for error rows) and adds orig_width / orig_height.
    """
    images = batch[IMAGE]
    out = np.zeros((len(images), image_size, image_size, 3), dtype=np.uint8)
    widths = np.zeros(len(images), dtype=np.int32)
    heights = np.zeros(len(images), dtype=np.int32)
    for index, (image, status) in enumerate(zip(images, batch[STATUS], strict=True)):
        if status != OK:
            continue
        heights[index], widths[index] = image.shape[:2]
        out[index] = resize_center_crop(image, image_size)
    batch = dict(batch)
    batch[IMAGE] = out
    batch[ORIG_WIDTH] = widths
    batch[ORIG_HEIGHT] = heights
    return batch
