"""Image augmentation in plain torch (no torchvision), per batch on the training device, reproducible under resume.

The ops and default ranges follow LeRobot's image transforms: brightness, contrast, saturation, hue, sharpness and a
random affine (rotation + shift). Each camera image gets up to `max_num_transforms` ops picked at random by weight.
All random draws come from a CPU generator seeded by the run's seed and the global micro-batch index, made for the
whole global batch and sliced to this rank's rows: the same images get the same augmentation with 1 or N processes
and after `--resume`, as the flow-matching noise does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

OPS = ("brightness", "contrast", "saturation", "hue", "sharpness", "affine")
IDENTITY = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0, "sharpness": 1.0}
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def _gray(img: Tensor) -> Tensor:
    r, g, b = img.unbind(-3)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(-3)


def _blend(img: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """factor * img + (1 - factor) * other, clamped to [0, 1]; factor is (N,)."""
    f = factor.view(-1, 1, 1, 1)
    return (f * img + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(img: Tensor, factor: Tensor) -> Tensor:
    return _blend(img, torch.zeros_like(img), factor)


def adjust_contrast(img: Tensor, factor: Tensor) -> Tensor:
    return _blend(img, _gray(img).mean((-3, -2, -1), keepdim=True), factor)


def adjust_saturation(img: Tensor, factor: Tensor) -> Tensor:
    return _blend(img, _gray(img), factor)


def rgb_to_hsv(img: Tensor) -> Tensor:
    r, g, b = img.unbind(-3)
    maxc, minc = img.max(-3).values, img.min(-3).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], -3)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    h, s, v = hsv.unbind(-3)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([torch.stack(c, 0) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                                                      (v, p, q))], 0)  # (6, 3, N, H, W)
    return table.gather(0, i.unsqueeze(0).unsqueeze(0).expand(1, 3, *i.shape)).squeeze(0).movedim(0, -3)


def adjust_hue(img: Tensor, shift: Tensor) -> Tensor:
    hsv = rgb_to_hsv(img)
    hsv[:, 0] = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(hsv).clamp_(0, 1)


def adjust_sharpness(img: Tensor, factor: Tensor) -> Tensor:
    """Blend with a 3x3 smoothed copy (center weight 5, borders kept), as PIL's ImageEnhance.Sharpness."""
    kernel = torch.ones(3, 3, dtype=img.dtype, device=img.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(3, 1, 3, 3)
    smooth = img.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(img, kernel, groups=3)
    return _blend(img, smooth, factor)


def random_affine(img: Tensor, degrees: Tensor, translate: Tensor) -> Tensor:
    """Rotate by `degrees` (N,) about the center and shift by `translate` (N, 2) fractions of width/height; the
    uncovered border is black."""
    angle = degrees * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(len(img), 2, 3, dtype=img.dtype, device=img.device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, :, 2] = -2 * translate  # grid coordinates span [-1, 1]: a shift of t of the image is 2t
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class ImageTransforms:
    """Augments the camera images of a batch in place of them; built from config.ImageTransformOptions."""

    def __init__(self, options, seed: int):
        self.options, self.seed = options, seed
        o = options
        ranges = {"brightness": o.brightness, "contrast": o.contrast, "saturation": o.saturation, "hue": o.hue,
                  "sharpness": o.sharpness}
        for name, (lo, hi) in ranges.items():
            if lo > hi or (name != "hue" and lo < 0) or (name == "hue" and not -0.5 <= lo <= hi <= 0.5):
                bound = "within [-0.5, 0.5]" if name == "hue" else ">= 0"
                raise ValueError(f"--dataset.image-transforms.{name} {lo, hi}: need low <= high, {bound}")
        if len(o.weights) != len(OPS) or any(w < 0 for w in o.weights):
            raise ValueError(f"--dataset.image-transforms.weights needs {len(OPS)} values >= 0 ({', '.join(OPS)})")
        if o.max_num_transforms < 1:
            raise ValueError("--dataset.image-transforms.max-num-transforms must be >= 1")
        self.ranges = ranges
        active = [name != "affine" and ranges[name] != (IDENTITY[name],) * 2 or
                  name == "affine" and (o.affine_degrees > 0 or o.affine_translate > 0) for name in OPS]
        self.weights = torch.tensor([w if a else 0.0 for w, a in zip(o.weights, active)], dtype=torch.float64)

    def draw(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Per-image choices (bool (n,) per op) and parameters for n images."""
        enabled = int((self.weights > 0).sum())
        k = min(self.options.max_num_transforms, enabled)
        chosen = torch.zeros(n, len(OPS), dtype=torch.bool)
        if k:
            picks = torch.multinomial(self.weights.expand(n, -1), k, replacement=False, generator=generator)
            chosen.scatter_(1, picks, True)
        params: dict[str, Tensor] = {f"use_{op}": chosen[:, j] for j, op in enumerate(OPS)}
        for name, (lo, hi) in self.ranges.items():
            params[name] = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        d, t = self.options.affine_degrees, self.options.affine_translate
        params["degrees"] = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * d
        params["translate"] = (torch.rand(n, 2, generator=generator, dtype=torch.float64) * 2 - 1) * t
        return params

    def apply(self, img: Tensor, params: dict[str, Tensor]) -> Tensor:
        """(N, 3, H, W) float images in [0, 1], augmented as `params` say (N rows of them)."""
        out = img.clone()
        adjust = {"brightness": adjust_brightness, "contrast": adjust_contrast, "saturation": adjust_saturation,
                  "hue": adjust_hue, "sharpness": adjust_sharpness}
        for op in OPS:  # a fixed order, as LeRobot's default (random_order=False)
            rows = params[f"use_{op}"].nonzero().flatten()
            if len(rows) == 0:
                continue
            idx = rows.to(img.device)
            if op == "affine":
                out[idx] = random_affine(out[idx], params["degrees"][rows].to(img), params["translate"][rows].to(img))
            else:
                out[idx] = adjust[op](out[idx], params[op][rows].to(img))
        return out

    def __call__(self, batch: dict, keys: list[str], micro_batch: int, rank: int = 0, world: int = 1) -> dict:
        """Augment `keys` of this rank's slice of global micro-batch `micro_batch` (float images on any device)."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_033 + micro_batch + 0x5EED) % (2**63))
        for key in keys:  # cameras in a fixed order, each with its own draws for the whole global batch
            n = len(batch[key])
            params = self.draw(n * world, generator)
            mine = {name: value[rank * n : (rank + 1) * n] for name, value in params.items()}
            batch[key] = self.apply(batch[key], mine)
        return batch
