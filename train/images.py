"""Pictures a run writes: a grid of samples, and the bits/dim curve (Pillow only)."""
import math

import numpy as np
from PIL import Image, ImageDraw


def image_grid(images, columns=None, padding=1):
    """One uint8 picture (H', W', 3 or 1) tiling uint8 images (N, C, H, W), C = 1 or 3."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid needs uint8 images (N, 1 or 3, H, W), got "
                         f"{images.dtype} {images.shape}")
    N, C, H, W = images.shape
    columns = columns or math.ceil(math.sqrt(N))
    rows = math.ceil(N / columns)
    grid = np.zeros((rows * (H + padding) + padding, columns * (W + padding) + padding, C), np.uint8)
    for index, image in enumerate(images):
        top = padding + (index // columns) * (H + padding)
        left = padding + (index % columns) * (W + padding)
        grid[top:top + H, left:left + W] = image.transpose(1, 2, 0)
    return grid


def save_image_grid(images, path, columns=None, scale=1):
    """Save uint8 images (N, C, H, W) as one PNG grid, each pixel drawn ``scale`` times larger."""
    grid = image_grid(images, columns)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    picture.save(path)


def save_curve(series, path, title="bits/dim", size=(640, 400)):
    """Save a line plot PNG of named series {name: [(step, value), ...]}, e.g. train and test."""
    width, height = size
    margin = 60
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    points = [p for values in series.values() for p in values if np.isfinite(p[1])]
    draw.text((margin, 10), title, fill="black")
    if len(points) == 0:
        picture.save(path)
        return
    steps, values = zip(*points)
    x_low, x_high = min(steps), max(max(steps), min(steps) + 1)
    y_low, y_high = min(values), max(values)
    if y_high - y_low < 1e-9:
        y_low, y_high = y_low - 0.5, y_high + 0.5

    def to_pixel(step, value):
        x = margin + (step - x_low) / (x_high - x_low) * (width - 2 * margin)
        y = height - margin - (value - y_low) / (y_high - y_low) * (height - 2 * margin)
        return x, y

    draw.rectangle([margin, margin, width - margin, height - margin], outline="gray")
    for fraction in (0.0, 0.5, 1.0):
        value = y_low + fraction * (y_high - y_low)
        draw.text((4, to_pixel(x_low, value)[1] - 6), f"{value:.3f}", fill="black")
        step = x_low + fraction * (x_high - x_low)
        draw.text((to_pixel(step, y_low)[0] - 10, height - margin + 6), f"{step:.0f}", fill="black")
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for index, (name, values) in enumerate(series.items()):
        color = colors[index % len(colors)]
        finite = [to_pixel(s, v) for s, v in values if np.isfinite(v)]
        if len(finite) > 1:
            draw.line(finite, fill=color, width=2)
        for x, y in finite if len(finite) < 50 else finite[-1:]:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.text((width - margin - 120, margin + 6 + 14 * index), name, fill=color)
    draw.text((width // 2 - 20, height - 20), "step", fill="black")
    picture.save(path)
