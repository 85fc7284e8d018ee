import pytest
import torch

from bench.errors import BenchError
from bench.models import build_model, default_model


@pytest.mark.parametrize(
    "name, shape",
    [("digits-cnn", (1, 8, 8)), ("mnist-cnn", (1, 28, 28)), ("wrn-10-1", (3, 32, 32))],
)
def test_model_splits_at_its_first_layer(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 10, (0.5,) * shape[0], (0.25,) * shape[0]).eval()
    x = torch.rand(3, *shape)
    assert model(x).shape == (3, 10)
    # The same operations on the same tensors: bitwise equal.
    assert torch.equal(model.body(model.pre_noise(x)), model(x))
    # The stem sees normalised input: (x - mean) / std (0.5 and 0.25 are exact in float32).
    assert torch.equal(model.pre_noise(x), model.stem((x - 0.5) / 0.25))


def test_mnist_cnn_is_the_papers_architecture():
    model = build_model("mnist-cnn", (1, 28, 28), 10, (0.1,), (0.3,))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (5, 5)), (64, (5, 5))]
    assert [l.out_features for l in linears] == [1024, 10]


def test_wide_resnet_depth_is_checked():
    with pytest.raises(BenchError, match="6n\\+4"):
        build_model("wrn-12-1", (3, 32, 32), 10, (0.5,) * 3, (0.2,) * 3)
    with pytest.raises(BenchError, match="unknown model"):
        build_model("vgg", (3, 32, 32), 10, (0.5,) * 3, (0.2,) * 3)


def test_defaults_per_dataset():
    assert default_model("digits", (1, 8, 8)) == "digits-cnn"
    assert default_model("mnist", (1, 28, 28)) == "mnist-cnn"
    assert default_model("cifar10", (3, 32, 32)).startswith("wrn-")
