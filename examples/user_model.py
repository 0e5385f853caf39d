"""(c) A network of your own: any `nn.Module` from a batch of images to `out_features` numbers,
registered as `model.name`. gossiplab stacks its parameters and buffers (here BatchNorm's running
statistics) for all sites into one [N, P + B] tensor and trains them together; dropout draws from
each site's own random stream."""

from torch import nn

from gossiplab.registry import MODELS


class SmallConvNet(nn.Module):
    def __init__(self, channels: int, flat: int, out_features: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten()
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(flat, out_features))

    def forward(self, x):
        return self.classifier(self.features(x))


@MODELS.register("small-convnet")
def small_convnet(config, input_shape: tuple[int, ...], out_features: int) -> nn.Module:
    channels, height, width = input_shape
    return SmallConvNet(channels, 8 * (height // 4) * (width // 4), out_features)
