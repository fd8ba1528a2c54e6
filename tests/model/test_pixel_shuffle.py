import pytest
import torch

from xsam.model.pixel_shuffle import pixel_shuffle


def test_shapes():
    x = torch.randn(2, 8, 6, 12)
    assert pixel_shuffle(x, 0.5).shape == (2, 4, 3, 48)
    assert pixel_shuffle(x, 2).shape == (2, 16, 12, 3)
    assert pixel_shuffle(x, 1) is x


def test_exact_inverse():
    x = torch.randn(3, 10, 14, 5)
    assert torch.equal(pixel_shuffle(pixel_shuffle(x, 0.5), 2), x)
    y = torch.randn(2, 4, 6, 16)
    assert torch.equal(pixel_shuffle(pixel_shuffle(y, 2), 0.5), y)


def test_odd_sizes_zero_padded_bottom_right():
    x = torch.randn(1, 5, 3, 2) + 10.0  # no zeros in the input
    y = pixel_shuffle(x, 0.5)
    assert y.shape == (1, 3, 2, 8)
    back = pixel_shuffle(y, 2)  # [1, 6, 4, 2]: the input plus one zero row and one zero column
    assert torch.equal(back[:, :5, :3], x)
    assert torch.count_nonzero(back[:, 5]) == 0 and torch.count_nonzero(back[:, :, 3]) == 0


def test_hand_made_channel_order():
    # one 2x2 image with C=2: pixel (row, col) holds channels [10*row + col, 100 + 10*row + col]
    x = torch.tensor([[[[0.0, 100.0], [1.0, 101.0]],
                       [[10.0, 110.0], [11.0, 111.0]]]])  # [1, 2, 2, 2]
    y = pixel_shuffle(x, 0.5)
    # groups of C channels in the order top-left, top-right, bottom-left, bottom-right
    assert y.tolist() == [[[[0.0, 100.0, 1.0, 101.0, 10.0, 110.0, 11.0, 111.0]]]]
    assert torch.equal(pixel_shuffle(y, 2), x)


def test_bad_arguments():
    with pytest.raises(ValueError):
        pixel_shuffle(torch.randn(1, 2, 2, 6), 2)  # channels not divisible by 4
    with pytest.raises(ValueError):
        pixel_shuffle(torch.randn(1, 2, 2, 4), 0.25)
    with pytest.raises(ValueError):
        pixel_shuffle(torch.randn(2, 2, 4), 0.5)
