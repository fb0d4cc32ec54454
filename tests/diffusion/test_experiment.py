import torch

from slimserve.diffusion.experiments.metrics import frechet_distance, mean_interval, psnr
from slimserve.diffusion.experiments.shapes import CLASSES, SHAPES, adherence, caption, make_dataset


def test_drawn_shapes_read_back_their_caption_and_noise_does_not():
    data = make_dataset(300, seed=5)
    true_shapes = torch.tensor([SHAPES.index(CLASSES[int(label)][0]) for label in data.labels])
    assert adherence(data.images, data.labels, true_shapes) == {
        "colour": 1.0,
        "position": 1.0,
        "shape": 1.0,
        "all": 1.0,
    }
    noise = torch.rand_like(data.images) * 2 - 1
    assert adherence(noise, data.labels, true_shapes)["all"] < 0.3
    assert caption(0) == "a red square at the top left"


def test_frechet_distance_psnr_and_intervals():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 4, generator=generator)
    b = torch.randn(4000, 4, generator=generator)
    assert frechet_distance(a, b) < 0.05
    assert abs(frechet_distance(a, b + 2.0) - 16.0) < 0.5  # four dimensions shifted by 2
    assert abs(frechet_distance(a, 3 * b) - 4 * (3 - 1) ** 2) < 1.0  # sigma 1 vs 3: (1 - 3)^2 per dimension
    assert abs(psnr(torch.zeros(4), torch.full((4,), 0.2)) - 20.0) < 1e-5  # 10 log10(4 / 0.04)
    interval = mean_interval([1.0, 2.0, 3.0])
    assert interval["mean"] == 2.0 and abs(interval["ci95"] - 4.303 / 3**0.5) < 1e-9
