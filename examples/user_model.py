"""(c) A network of your own: any `nn.Module` from a batch of images to `out_features` numbers,
registered as `model.name`. gossiplab stacks its parameters for all sites into one [N, P] tensor
and trains them together."""

from torch import nn

from gossiplab.registry import MODELS


class SmallConvNet(nn.Module):
    def __init__(self, channels: int, flat: int, out_features: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten())
        self.classifier = nn.Linear(flat, out_features)

    def forward(self, x):
        return self.classifier(self.features(x))


@MODELS.register("small-convnet")
def small_convnet(config, input_shape: tuple[int, ...], out_features: int) -> nn.Module:
    channels, height, width = input_shape
    return SmallConvNet(channels, 8 * (height // 4) * (width // 4), out_features)
