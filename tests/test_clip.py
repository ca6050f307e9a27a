"""Image preprocessing against the official LLaVA-1.5 outputs (golden files from the official code)."""

import os

import numpy as np
import pytest
from PIL import Image

from clip import CLIP_MEAN, CLIP_STD, preprocess_image, to_rgb

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets")
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "clip")


def golden_cases():
    """(image path, aspect ratio, expected float pixels): all of shared/assets when present, else our copy."""
    if os.path.isdir(SHARED):
        golden = np.load(os.path.join(SHARED, "golden_clip_preprocess.npz"))
        folder = os.path.join(SHARED, "images")
        expected = lambda name, ratio: golden[f"{name}__{'pixel_values' if ratio == 'pad' else 'nopad_pixel_values'}"]
    else:
        golden = np.load(os.path.join(FIXTURES, "golden_uint8.npz"))
        folder = FIXTURES
        mean, std = (np.array(v, dtype=np.float32)[:, None, None] for v in (CLIP_MEAN, CLIP_STD))
        expected = lambda name, ratio: (golden[f"{name}__{ratio}"].astype(np.float32) * np.float32(1 / 255) - mean) / std
    images = sorted(f for f in os.listdir(folder) if f.endswith((".png", ".jpg")))
    return [(os.path.join(folder, f), ratio, expected(f.rsplit(".", 1)[0], ratio))
            for f in images for ratio in ("pad", "square")]


@pytest.mark.parametrize("path, ratio, expected", golden_cases(), ids=lambda v: os.path.basename(v) if isinstance(v, str) else None)
def test_preprocess_matches_official(path, ratio, expected):
    got = preprocess_image(Image.open(path), 336, ratio).numpy()
    assert got.shape == expected.shape == (3, 336, 336)
    assert np.abs(got - expected).max() < 1e-5


def test_normalization_is_clips():
    # the statistics CLIP was trained with (openai/clip-vit-large-patch14-336 preprocessor_config.json); the
    # expected pixels above use these constants when ../shared is absent, so they are checked here on their own
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_golden_set_covers_the_hard_cases():
    modes = {Image.open(p).mode for p, _, _ in golden_cases()}
    assert {"RGB", "L", "RGBA"} <= modes  # grayscale and alpha go through the same official conversion


def test_pad_background_is_the_clip_mean_colour():
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    x = preprocess_image(wide, 336, "pad")
    top_row = x[:, 0, 168]
    expected = (np.array([122, 116, 104], dtype=np.float32) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert np.abs(top_row.numpy() - expected).max() < 1e-5  # ≈ [-0.0113, -0.0112, -0.0013] (spec §3)
    assert x[0, 168, 168] > 1.5  # the red image itself sits in the middle


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I;16", "I",
                                  "F", "1"])
def test_every_pillow_mode_becomes_rgb(mode):
    ramp = np.tile(np.arange(64, dtype=np.uint16) * 4, (48, 1))
    if mode in ("I;16", "I"):  # 16-bit grayscale, as a 16-bit PNG opens (Pillow would clip it all to white)
        image = Image.fromarray(ramp * 256) if mode == "I;16" else Image.fromarray((ramp * 256).astype(np.int32))
    else:
        image = Image.fromarray(ramp.astype(np.uint8)).convert("RGB").convert(mode)
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (64, 48)
    pixels = np.asarray(rgb)
    assert pixels.max() > 200 and pixels.min() < 50
    assert 100 < pixels[:, 32].mean() < 160  # the ramp's middle stays grey: no clipping of 16-bit input to white
    assert preprocess_image(image, 32, "pad").shape == (3, 32, 32)
