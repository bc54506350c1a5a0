"""dead-units: a channel is dead when its output is constant (up to rounding) over every image and position.

Before: dead meant "max over the audit set <= 0", right only after a ReLU. The ImageNet EfficientNet-Lite0
(swish) failed with 4 of 32 stem channels "dead" that were negative but varying, and a census over 4 photos
called 63 of 1280 head channels dead.
"""
import pytest
import torch
from torch import nn

from auditkit import AuditSet, ModelSpec, Sample
from auditkit.checks.base import CheckConfigError, Status
from auditkit.checks.representation import DeadUnits
from auditkit.methods import features as fe
from auditkit.subject import Subject
from tests.toys import NaNFeatures

torch.set_num_threads(1)


class Toy(nn.Module):
    """conv (4 channels) -> act. Channel 1: negative everywhere but varying (conv in about [-3, -2.2]);
    channel 2: constant (zero weight, bias `constant`); channel 3: all zero before the activation."""

    def __init__(self, act: nn.Module, constant: float = 0.5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = act
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight[1] = 0.1 * self.conv.weight[1].abs() + 0.01
            self.conv.bias[1] = -3.0
            self.conv.weight[2] = 0.0
            self.conv.bias[2] = constant
            self.conv.weight[3] = 0.0
            self.conv.bias[3] = 0.0

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean(dim=(2, 3)))


def _images(n=20, size=8, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _set(n=20, size=8):
    images = _images(n, size)
    return AuditSet(name="toy", class_names=("a", "b"),
                    samples=[Sample(image=images[i], label=i % 2, id=f"s{i}") for i in range(n)])


def _spec(module, layers=("conv", "act"), size=8):
    return ModelSpec(module=module, class_names=["a", "b"], input_size=(size, size), layers=list(layers), name="toy")


def _dead(module, n=20, batch_size=4, layers=("conv", "act")):
    with Subject(_spec(module, layers), device="cpu", batch_size=batch_size) as subject:
        return {k: v.tolist() for k, v in fe.dead_units(subject, _images(n), list(layers)).items()}


def test_swish_channel_negative_but_varying_is_not_dead():
    """Before: channel 1 after SiLU has max < 0 on every image and position, so it was called dead."""
    with Subject(_spec(Toy(nn.SiLU())), device="cpu", batch_size=4) as subject:
        act = fe.layer_features(subject, _images(), ["act"], flatten=False)["act"][:, 1]
    assert float(act.max()) < 0 and float(act.max() - act.min()) > 1e-6  # negative, and varying
    dead = _dead(Toy(nn.SiLU()))
    assert dead["act"][1] is False and dead["conv"][1] is False
    assert dead["act"] == [False, False, True, True]  # only the constant channels


def test_relu_all_zero_channel_is_dead_and_the_negative_one_too():
    """After a ReLU, constant is 'never positive': the negative-bias channel is all zeros, hence dead."""
    dead = _dead(Toy(nn.ReLU()))
    assert dead["act"] == [False, True, True, True]
    assert dead["conv"] == [False, False, True, True]  # before the ReLU, channel 1 still varies


@pytest.mark.parametrize("act", [nn.ReLU(), nn.SiLU(), nn.GELU(), nn.Tanh(), nn.Identity(), nn.Hardswish()],
                         ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("constant", [0.5, -0.5, 0.0])
def test_a_constant_channel_is_dead_after_any_activation(act, constant):
    """Before: a channel constant at a positive value (0.5, or silu(0.5) > 0) was alive."""
    dead = _dead(Toy(act, constant=constant))
    assert dead["conv"][2] is True and dead["act"][2] is True
    assert dead["act"][0] is False


def test_constant_up_to_rounding_is_dead_but_a_real_spread_is_not():
    class Offset(nn.Module):
        def __init__(self, wobble):
            super().__init__()
            self.wobble = wobble
            self.feat = nn.Identity()
            self.head = nn.Linear(2, 2)

        def forward(self, x):
            m = x.mean(dim=(1, 2, 3))  # in [0, 1], varies by image
            f = torch.stack([1000.0 + self.wobble * m, m], 1)  # channel 0: 1000 plus a tiny (or real) wobble
            return self.head(self.feat(f))

    rounding = _dead(Offset(1e-4), layers=("feat",))["feat"]  # spread <= 1e-4 << 1e-5 * 1000 = 1e-2
    real = _dead(Offset(1.0), layers=("feat",))["feat"]
    assert rounding == [True, False] and real == [False, False]


def test_the_running_min_and_max_span_the_batches():
    """An N x C layer with batch_size 1: every chunk holds one value per channel (constant within the chunk);
    only the minimum and maximum over all chunks tell a varying channel from a constant one."""

    class Columns(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = nn.Identity()
            self.head = nn.Linear(2, 2)

        def forward(self, x):
            return self.head(self.feat(torch.stack([x.mean(dim=(1, 2, 3)), torch.full_like(x[:, 0, 0, 0], 3.0)], 1)))

    for batch_size in (1, 3, 20):
        assert _dead(Columns(), batch_size=batch_size, layers=("feat",))["feat"] == [False, True]


def test_a_non_finite_layer_output_is_an_error_naming_the_layer():
    spec = ModelSpec(module=NaNFeatures(), class_names=["a", "b"], input_size=(16, 16), layers=["conv", "odd"],
                     name="nan")
    with Subject(spec, device="cpu") as subject:
        result = DeadUnits().execute(subject, _set(20, 16))
    assert result.status is Status.ERROR, result.summary()
    assert "NonFiniteError" in result.message and "layer 'odd'" in result.message


def test_check_passes_a_swish_model_whose_channels_are_negative_but_alive():
    """The EfficientNet case in small: half the stem channels are negative everywhere after SiLU. Before: FAILED
    (2 of 4 channels 'dead', 50 % > max_dead 0.1)."""

    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.SiLU()
            self.head = nn.Linear(4, 2)
            with torch.no_grad():
                self.conv.weight[:2] *= 0.1
                self.conv.bias[:2] = -4.0

        def forward(self, x):
            return self.head(self.act(self.conv(x)).mean(dim=(2, 3)))

    with Subject(_spec(Stem()), device="cpu") as subject:
        act = fe.layer_features(subject, _set(20).images(), ["act"], flatten=False)["act"]
        result = DeadUnits().execute(subject, _set(20))
    assert float(act[:, :2].max()) < 0  # negative on every image and position
    assert result.status is Status.PASSED and result.value == 0.0, result.summary()
    assert "20 images" in result.message


def test_check_fails_a_relu_model_with_dead_channels_as_before():
    with Subject(_spec(Toy(nn.ReLU())), device="cpu") as subject:
        result = DeadUnits().execute(subject, _set(16))  # exactly min_images: judged
    assert result.status is Status.FAILED and result.value == 5 / 8, result.summary()  # (2 + 3) of 4 + 4
    assert [(r["layer"], r["dead"], r["dead_channels"]) for r in result.rows] == [("conv", 2, "2, 3"),
                                                                                  ("act", 3, "1, 2, 3")]
    assert "5 of 8 channels dead over 2 layers" in result.message and "act: 3 of 4" in result.message


def test_fewer_than_min_images_is_inconclusive_and_says_how_many_it_needs():
    """Before: 4 photos gave a verdict (63 of 1280 head channels 'dead')."""
    with Subject(_spec(Toy(nn.ReLU())), device="cpu") as subject:
        few = DeadUnits().execute(subject, _set(4))
        lowered = DeadUnits(min_images=4).execute(subject, _set(4))
    assert few.status is Status.INCONCLUSIVE and few.value is None, few.summary()
    assert "only 4 audit images" in few.message and "at least min_images = 16" in few.message
    assert "12 more needed" in few.message
    assert few.details["dead_share"] == 5 / 8 and few.details["min_images"] == 16
    assert [r["dead"] for r in few.rows] == [2, 3]  # the census is still shown
    assert "not judged" in few.evidence[0].caption
    assert lowered.status is Status.FAILED and lowered.value == 5 / 8
    with pytest.raises(CheckConfigError, match="min_images"):
        DeadUnits(min_images=0)


class TwoBranches(nn.Module):
    """Two ReLU layers side by side: `narrow` (4 channels, `dead` of them never positive) and `wide`
    (60 channels, all alive); the head reads both."""

    def __init__(self, dead: int):
        super().__init__()
        torch.manual_seed(0)
        self.narrow_conv, self.narrow = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.wide_conv, self.wide = nn.Conv2d(3, 60, 3, padding=1), nn.ReLU()
        self.head = nn.Linear(64, 2)
        with torch.no_grad():
            self.narrow_conv.weight[:dead] = 0.0
            self.narrow_conv.bias[:dead] = -1.0
            self.wide_conv.bias.fill_(10.0)  # positive everywhere: alive and varying

    def forward(self, x):
        both = torch.cat([self.narrow(self.narrow_conv(x)), self.wide(self.wide_conv(x))], dim=1)
        return self.head(both.mean(dim=(2, 3)))


def test_the_judged_share_is_over_all_layers_so_a_few_dead_units_in_one_layer_pass():
    """EfficientNet-Lite0's case: 4 of its 32 stem channels never fire (12.5 % of that layer), a small share of
    the network. Before: FAILED on the largest share of any one layer (here 2 of 4 = 50 % > 0.1)."""
    with Subject(_spec(TwoBranches(dead=2), layers=("narrow", "wide")), device="cpu") as subject:
        result = DeadUnits().execute(subject, _set(16))
    assert result.status is Status.PASSED, result.summary()
    assert result.value == 2 / 64 and result.details["largest_layer_share"] == 0.5
    assert [r["dead"] for r in result.rows] == [2, 0]


def test_a_layer_with_every_channel_dead_fails_whatever_the_share():
    with Subject(_spec(TwoBranches(dead=4), layers=("narrow", "wide")), device="cpu") as subject:
        result = DeadUnits().execute(subject, _set(16))
    assert result.value == 4 / 64 < result.threshold  # the share alone would pass
    assert result.status is Status.FAILED, result.summary()
    assert "every channel of layer(s) narrow is dead" in result.message
    assert result.details["layers_all_dead"] == ["narrow"]
