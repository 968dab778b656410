"""Image augmentation: each op does what its range says, off is the identity, draws are seeded per micro-batch so
that a resumed run equals an uninterrupted one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import train_args

from finetune import train
from finetune.config import DataOptions, ImageTransformOptions
from finetune.data.transforms import (
    OPS,
    ImageTransforms,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    adjust_sharpness,
    random_affine,
    rgb_to_hsv,
)
from finetune.training.metrics import read_metrics


def images(n: int = 4, h: int = 24, w: int = 32, seed: int = 0) -> torch.Tensor:
    """Mid-range colors with texture (no clamping at the ends for moderate factors)."""
    g = torch.Generator().manual_seed(seed)
    return 0.25 + 0.5 * torch.rand(n, 3, h, w, generator=g)


def only(op: str, **ranges) -> ImageTransforms:
    weights = tuple(1.0 if o == op else 0.0 for o in OPS)
    return ImageTransforms(ImageTransformOptions(enable=True, max_num_transforms=1, weights=weights, **ranges), 0)


def test_color_ops_scale_what_they_name():
    x = images()
    f = torch.tensor([0.8, 1.2, 1.0, 0.9])
    torch.testing.assert_close(adjust_brightness(x, f), x * f.view(-1, 1, 1, 1))
    gray = lambda t: (0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2])  # noqa: E731
    out = adjust_contrast(x, f)
    torch.testing.assert_close(gray(out).std((1, 2)), gray(x).std((1, 2)) * f, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gray(out).mean((1, 2)), gray(x).mean((1, 2)), rtol=1e-5, atol=1e-6)
    desaturated = adjust_saturation(x, torch.zeros(4))
    torch.testing.assert_close(desaturated[:, 0], desaturated[:, 1])  # no color left
    torch.testing.assert_close(desaturated[:, 0], gray(x))
    torch.testing.assert_close(adjust_saturation(x, torch.ones(4)), x)


def test_hue_shifts_the_hue_and_nothing_else():
    x = images()
    shift = torch.tensor([0.05, -0.05, 0.0, 0.25])
    before, after = rgb_to_hsv(x), rgb_to_hsv(adjust_hue(x, shift))
    turn = (after[:, 0] - before[:, 0] - shift.view(-1, 1, 1) + 0.5) % 1.0 - 0.5  # difference on the color wheel
    colored = before[:, 1] > 0.05  # hue is meaningless for grays
    assert turn[colored].abs().max() < 1e-4
    torch.testing.assert_close(after[:, 1:], before[:, 1:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adjust_hue(x, torch.zeros(4)), x, rtol=1e-5, atol=1e-6)


def test_sharpness_blends_with_a_smoothed_copy():
    x = images()
    torch.testing.assert_close(adjust_sharpness(x, torch.ones(4)), x)
    blurred = adjust_sharpness(x, torch.zeros(4))
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    expected = (x[0, 0, 0:3, 0:3] * kernel).sum()
    torch.testing.assert_close(blurred[0, 0, 1, 1], expected)
    torch.testing.assert_close(blurred[..., 0, :], x[..., 0, :])  # borders kept
    assert blurred.std() < x.std()  # smoother
    sharper = adjust_sharpness(x, torch.full((4,), 1.5))
    assert (sharper - x).abs().max() > 0.01


def test_affine_shifts_and_rotates():
    x = images(2, 16, 16)
    torch.testing.assert_close(random_affine(x, torch.zeros(2), torch.zeros(2, 2)), x, rtol=0, atol=1e-6)
    # a shift of 1/16 of the width is one pixel: content moves right, a black column enters on the left
    shifted = random_affine(x, torch.zeros(2), torch.tensor([[1 / 16, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(shifted[0, :, :, 1:], x[0, :, :, :-1], rtol=0, atol=1e-5)
    assert shifted[0, :, :, 0].abs().max() < 1e-6
    rotated = random_affine(x, torch.tensor([90.0, 0.0]), torch.zeros(2, 2))
    torch.testing.assert_close(rotated[0], torch.rot90(x[0], 1, (1, 2)), rtol=0, atol=1e-4)


@pytest.mark.parametrize("op", OPS)
def test_each_op_changes_every_image_within_its_range(op):
    ranges = {"brightness": (1.1, 1.2), "contrast": (0.5, 0.6), "saturation": (1.4, 1.5), "hue": (0.1, 0.2),
              "sharpness": (0.0, 0.2)}
    transforms = only(op, **{k: v for k, v in ranges.items() if k == op})
    x = images(8)
    params = transforms.draw(8, torch.Generator().manual_seed(1))
    assert params[f"use_{op}"].all() and sum(params[f"use_{o}"].sum() for o in OPS) == 8  # this op only
    if op in ranges:
        lo, hi = ranges[op]
        assert ((params[op] >= lo) & (params[op] <= hi)).all()
    else:
        assert (params["degrees"].abs() <= 5).all() and (params["translate"].abs() <= 0.05).all()
    out = transforms.apply(x, params)
    assert ((out - x).abs().flatten(1).max(1).values > 0.01).all()
    assert out.min() >= 0 and out.max() <= 1
    if op == "brightness":  # the images brighten by the drawn factors
        torch.testing.assert_close(out.mean((1, 2, 3)), x.mean((1, 2, 3)) * params[op].float(), rtol=1e-5, atol=0)


def test_off_is_the_identity_and_default_is_off():
    assert DataOptions().image_transforms.enable is False
    neutral = ImageTransformOptions(enable=True, brightness=(1.0, 1.0), contrast=(1.0, 1.0), saturation=(1.0, 1.0),
                                    hue=(0.0, 0.0), sharpness=(1.0, 1.0), affine_degrees=0.0, affine_translate=0.0)
    x = images()
    batch = {"observation.images.top": x.clone()}
    ImageTransforms(neutral, 0)(batch, ["observation.images.top"], micro_batch=3)
    assert torch.equal(batch["observation.images.top"], x)
    with pytest.raises(ValueError, match=r"hue \(-0.6, 0.0\): need low <= high, within \[-0.5, 0.5\]"):
        ImageTransforms(dataclasses.replace(neutral, hue=(-0.6, 0.0)), 0)


def test_ranks_get_their_slice_of_the_global_draws():
    transforms = ImageTransforms(ImageTransformOptions(enable=True), seed=4)
    x = images(6)
    whole = transforms({"cam": x.clone()}, ["cam"], micro_batch=11)["cam"]
    halves = [transforms({"cam": x[r * 3 : (r + 1) * 3].clone()}, ["cam"], 11, rank=r, world=2)["cam"]
              for r in range(2)]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=0)
    other = transforms({"cam": x.clone()}, ["cam"], micro_batch=12)["cam"]
    assert not torch.equal(other, whole)  # each micro-batch draws anew


def _losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in m}


def test_resume_with_augmentation_equals_one_go(lora_run, policy_dir, dataset_root, tmp_path):
    aug = ("--dataset.image-transforms.enable", "--dataset.eval-episodes", "2")
    straight = tmp_path / "straight"
    train.main(train_args(policy_dir, dataset_root, straight, "--steps", "4", *aug))
    resumed = tmp_path / "resumed"
    train.main(train_args(policy_dir, dataset_root, resumed, "--steps", "2", *aug))
    train.main(train_args(policy_dir, dataset_root, resumed, "--steps", "4", *aug, "--resume", "auto"))
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a, b)
    plain = _losses(lora_run)  # the same run without augmentation: the images the policy saw differed
    assert all(abs(plain[s] - a[s]) > 1e-6 for s in (1, 2, 3, 4)), (plain, a)
