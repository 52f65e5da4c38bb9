"""The student's bicubic x4 (one depthwise convolution + pixel shuffle) equals PyTorch's F.interpolate."""

import pytest
import torch
import torch.nn.functional as F

from compress.models.bicubic import bicubic_kernel, bicubic_upsample


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (37, 53), (64, 64)])
def test_equals_interpolate(scale, size):
    image = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(scale))
    ours = bicubic_upsample(image, scale)
    theirs = F.interpolate(image, size=(size[0] * scale, size[1] * scale), mode="bicubic", align_corners=False)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-5


def test_kernel_phases_sum_to_one():
    # Each phase interpolates: its weights sum to 1, so a constant image stays constant.
    kernel = bicubic_kernel(4, 3)
    assert kernel.shape == (48, 1, 5, 5)
    assert torch.allclose(kernel.sum(dim=(1, 2, 3)), torch.ones(48), atol=1e-6)
    flat = torch.full((1, 3, 5, 7), 0.3)
    assert torch.allclose(bicubic_upsample(flat, 4), torch.full((1, 3, 20, 28), 0.3), atol=1e-6)


def test_student_pads_lr_outside_the_upsampling():
    from compress.models.resolve import load_model

    student = load_model("preset:tiny").model
    lr = torch.rand(1, 3, 9, 14)
    image = student.preprocess(lr)
    assert image.shape[-2] % student.pixel_multiple == 0 and image.shape[-1] % student.pixel_multiple == 0
    # The unpadded region is exactly the bicubic upscale of the input (the margin is cropped later).
    direct = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False) * 2 - 1
    assert (image[..., :36, :56] - direct.clamp(-1, 1)).abs().max() < 1e-5
