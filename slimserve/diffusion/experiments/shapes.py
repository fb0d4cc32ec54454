"""Procedurally drawn shapes with captions: "a red circle at the top left". Every caption is a class label, and
colour and position can be read back from the pixels, so prompt adherence is checked exactly."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.15, 0.25, 1.0), "yellow": (1.0, 0.9, 0.1)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
CLASSES = list(itertools.product(SHAPES, COLOURS, POSITIONS))
NUM_CLASSES = len(CLASSES)
IMAGE_SIZE = 16


def caption(label: int) -> str:
    shape, colour, position = CLASSES[label]
    return f"a {colour} {shape} at the {position}"


def draw(label: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One RGB image in [0, 1], HWC: the shape, of random size and jitter, on a dark background."""
    shape, colour, position = CLASSES[label]
    half = size / 2
    radius = rng.uniform(2.6, 3.4) * size / 16
    cy = (half / 2 if position.startswith("top") else 3 * half / 2) + rng.uniform(-1, 1)
    cx = (half / 2 if position.endswith("left") else 3 * half / 2) + rng.uniform(-1, 1)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    if shape == "square":
        mask = (np.abs(y - cy) <= radius) & (np.abs(x - cx) <= radius)
    elif shape == "circle":
        mask = (y - cy) ** 2 + (x - cx) ** 2 <= (radius * 1.15) ** 2
    else:  # upward triangle: apex at the top, base at the bottom
        top, bottom = cy - radius * 1.2, cy + radius * 1.2
        frac = (y - top) / (bottom - top)
        mask = (frac >= 0) & (frac <= 1) & (np.abs(x - cx) <= frac * radius * 1.3)
    image = np.full((size, size, 3), 0.05, dtype=np.float32)
    image[mask] = COLOURS[colour]
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    return image.clip(0, 1)


@dataclass
class ShapesData:
    images: torch.Tensor  # N, 3, H, W in [-1, 1]
    labels: torch.Tensor  # N


def make_dataset(count: int, seed: int) -> ShapesData:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, count)
    images = np.stack([draw(int(label), rng) for label in labels])
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
    return ShapesData(tensor.contiguous(), torch.from_numpy(labels).long())


def read_colour_and_position(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (in [-1, 1]): the palette colour nearest the bright pixels' mean, and the quadrant of their
    centroid, as indices into COLOURS and POSITIONS (-1 where nothing is drawn)."""
    pixels = (images.clamp(-1, 1) + 1) / 2
    bright = pixels.amax(dim=1) > 0.5  # N, H, W
    palette = torch.tensor(list(COLOURS.values()))
    size = images.shape[-1]
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    colours, positions = [], []
    for image, mask in zip(pixels, bright):
        if mask.sum() < 2:
            colours.append(-1)
            positions.append(-1)
            continue
        mean = image[:, mask].mean(dim=1)
        colours.append(int(((palette - mean) ** 2).sum(dim=1).argmin()))
        weights = mask.float() / mask.sum()
        cy = (weights.sum(dim=1) * coords).sum()
        cx = (weights.sum(dim=0) * coords).sum()
        positions.append(int(cy >= size / 2) * 2 + int(cx >= size / 2))
    return torch.tensor(colours), torch.tensor(positions)


def adherence(images: torch.Tensor, labels: torch.Tensor, shape_predictions: torch.Tensor) -> dict[str, float]:
    """Fraction of images whose colour and position (read from pixels) and shape (from the classifier) match the
    caption, each and all together."""
    colours, positions = read_colour_and_position(images)
    want = torch.tensor([[SHAPES.index(s), list(COLOURS).index(c), POSITIONS.index(p)] for s, c, p in CLASSES])[labels]
    colour_ok = colours == want[:, 1]
    position_ok = positions == want[:, 2]
    shape_ok = shape_predictions == want[:, 0]
    return {
        "colour": colour_ok.float().mean().item(),
        "position": position_ok.float().mean().item(),
        "shape": shape_ok.float().mean().item(),
        "all": (colour_ok & position_ok & shape_ok).float().mean().item(),
    }
