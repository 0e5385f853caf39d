"""(c) A network of your own: any `nn.Module` from a batch of images to `out_features` numbers,
registered as `model.name`. gossiplab stacks its parameters and buffers (here BatchNorm's running
statistics) for all sites into one [N, P + B] tensor and trains them together; dropout draws from
each site's own random stream. Its `permutation_spec` says which hidden units DIMAT may permute
(and activation-match), so the matched merges run on it too."""

from torch import nn

from gossiplab.permutation import Axis, PermutationGroup, PermutationSpec
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

    def permutation_spec(self, input_shape: tuple[int, ...]) -> PermutationSpec:
        """The 8 channels: the filters (and biases) that make them, BatchNorm's entries, and the
        linear layer's inputs they feed, H/4 x W/4 flattened positions each; activations after ReLU."""
        _, height, width = input_shape
        norm = [Axis(f"features.1.{entry}", 0) for entry in ("weight", "bias", "running_mean", "running_var")]
        axes = (Axis("features.0.weight", 0), Axis("features.0.bias", 0), *norm,
                Axis("classifier.1.weight", 1, (height // 4) * (width // 4)))  # fmt: skip
        return PermutationSpec((PermutationGroup(8, axes, "features.2"),))


@MODELS.register("small-convnet")
def small_convnet(config, input_shape: tuple[int, ...], out_features: int) -> nn.Module:
    channels, height, width = input_shape
    return SmallConvNet(channels, 8 * (height // 4) * (width // 4), out_features)
