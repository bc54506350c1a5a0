import copy
import io
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from auditkit import ModelSpec
from auditkit.checks.base import CheckConfigError, Status
from auditkit.checks.patches import MaxActivatingPatches
from auditkit.demo import demo_model, shapes_dataset
from auditkit.methods import features as fe
from auditkit.methods import patches as pt
from auditkit.subject import Subject, _hook_keys

# -- closed form ----------------------------------------------------------------------------------


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def closed_form(stack: nn.Sequential) -> dict[str, tuple[tuple, tuple, tuple]]:
    """layer name -> (size, stride, start), each (y, x), by the recurrence over (k, s, p, d):
    start += -p * jump; size += d (k - 1) * jump; jump *= s  (element-wise layers leave all three)."""
    size, jump, start = [1, 1], [1, 1], [0, 0]
    out = {}
    for name, m in stack.named_children():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, s, p = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
            d = _pair(getattr(m, "dilation", 1))
            for a in (0, 1):
                start[a] -= p[a] * jump[a]
                size[a] += d[a] * (k[a] - 1) * jump[a]
                jump[a] *= s[a]
        out[name] = (tuple(size), tuple(jump), tuple(start))
    return out


def textbook_size(kernels: list[int], strides: list[int]) -> int:
    """RF = 1 + sum_i (k_i - 1) prod_{j<i} s_j."""
    total, prod = 1, 1
    for k, s in zip(kernels, strides):
        total += (k - 1) * prod
        prod *= s
    return total


STACKS = {
    # stride, padding, max-pool, dilation
    "resnet-stem-dilated": (lambda: nn.Sequential(
        nn.Conv2d(3, 4, 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, stride=2)), 48),
    # asymmetric kernels, strides and padding; a saturating activation; average pool
    "asymmetric": (lambda: nn.Sequential(
        nn.Conv2d(3, 4, (3, 5), stride=(1, 2), padding=(1, 0)), nn.ReLU6(),
        nn.Conv2d(4, 4, (1, 3), stride=(2, 1), padding=(0, 1)), nn.AvgPool2d(2)), 32),
    # dilated ceil-mode max-pool, big kernel, hardswish
    "dilated-pool": (lambda: nn.Sequential(
        nn.BatchNorm2d(3), nn.MaxPool2d(3, stride=2, dilation=2, ceil_mode=True), nn.Conv2d(3, 4, 7, padding=3),
        nn.Hardswish(), nn.Conv2d(4, 4, 3, stride=3)), 40),
}


@pytest.mark.parametrize("name", list(STACKS))
def test_receptive_field_matches_closed_form_on_plain_stacks(name):
    build, size = STACKS[name]
    torch.manual_seed(0)
    stack = build().eval()
    expected = closed_form(stack)
    for layer, (rf_size, stride, start) in expected.items():
        rf = pt.module_receptive_field(stack, layer, 3, (size, size))
        assert (rf.size, rf.stride, rf.start) == (rf_size, stride, start), layer


def test_closed_form_reference_agrees_with_the_textbook_formula():
    stack = STACKS["resnet-stem-dilated"][0]()
    size, stride, _ = closed_form(stack)["5"]
    kernels = [5, 3, 2 * (3 - 1) + 1, 3]  # the dilated conv's effective kernel d (k - 1) + 1
    strides = [2, 2, 1, 2]
    assert size == (textbook_size(kernels, strides),) * 2 == (1 + 4 + 2 * 2 + 4 * 4 + 2 * 4,) * 2
    assert stride == (8, 8)


class Block(nn.Module):
    """torchvision's BasicBlock in miniature: two 3x3 convs, a 1x1 strided shortcut, one shared in-place ReLU."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


def mini_resnet():
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 4, 7, 2, 3, bias=False), bn1=nn.BatchNorm2d(4), relu=nn.ReLU(inplace=True),
        maxpool=nn.MaxPool2d(3, 2, 1), layer1=nn.Sequential(Block(4, 4), Block(4, 4)),
        layer2=nn.Sequential(Block(4, 6, 2), Block(6, 6)))).eval()


def test_receptive_field_of_resnet_stages_residuals_included():
    model = mini_resnet()  # resnet18's stem, layer1 and layer2 (RF 43 and 99, as resnet18 has)
    # stem: conv 7x7 s2 p3 (RF 7, start -3), max-pool 3 s2 p1 (11, jump 4, start -5); each 3x3 conv (pad 1)
    # adds 2 * jump to the size and -jump to the start; layer2's first conv has stride 2 (jump 4 -> 8)
    expected = {"layer1": ((43, 43), (4, 4), (-21, -21)), "layer2": ((99, 99), (8, 8), (-49, -49)),
                "layer1.0.shortcut": ((11, 11), (4, 4), (-5, -5))}
    for layer, want in expected.items():
        rf = pt.module_receptive_field(model, layer, 3, (64, 64))
        assert (rf.size, rf.stride, rf.start) == want, layer
    assert expected["layer2"][0][0] == textbook_size([7, 3] + [3] * 8, [2, 2, 1, 1, 1, 1, 2, 1, 1, 1])
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_receptive_field_ignores_weights_and_switched_off_paths():
    # a 5x5 conv whose outer ring is zero and a ReLU that is always off: the plain gradient sees nothing
    # of that, the structural copy sees the whole field
    conv1, conv2 = nn.Conv2d(1, 1, 5, padding=2), nn.Conv2d(1, 1, 3, padding=1)
    with torch.no_grad():
        conv1.weight.zero_()
        conv1.weight[0, 0, 2, 2] = 1.0
        conv1.bias.fill_(0.0)
        conv2.weight.fill_(1.0)
        conv2.bias.fill_(-100.0)  # relu(conv2) is 0 for pixels in [0, 1]
    stack = nn.Sequential(conv1, conv2, nn.ReLU()).eval()
    rf = pt.module_receptive_field(stack, "2", 1, (16, 16))
    assert (rf.size, rf.stride, rf.start) == ((7, 7), (1, 1), (-3, -3))
    x = torch.rand(1, 1, 16, 16, requires_grad=True)
    grad_relu, = torch.autograd.grad(stack(x)[0, 0, 8, 8], x)
    grad_conv, = torch.autograd.grad(stack[:2](x)[0, 0, 8, 8], x)
    assert grad_relu.count_nonzero() == 0 and grad_conv.count_nonzero() == 9  # naive supports: 0 and 3x3
    assert all(p.requires_grad for p in stack.parameters())  # measured on a copy


def test_receptive_field_larger_than_the_image_grows_the_probe_and_clips_boxes():
    stack = nn.Sequential(*[nn.Conv2d(1, 1, 5, padding=2) for _ in range(4)]).eval()  # RF 17 on an 8 px image
    rf = pt.module_receptive_field(stack, "3", 1, (8, 8))
    assert (rf.size, rf.stride, rf.start) == ((17, 17), (1, 1), (-8, -8)) and rf.canvas[0] > 8
    assert rf.box(0, 0, (8, 8)) == (0, 0, 8, 8)
    assert rf.box(3, 5, (8, 8)) == (0, 0, 8, 8)
    boxes = rf.unclipped_boxes(torch.tensor([3]), torch.tensor([5]))
    assert boxes.tolist() == [[-3, -5, 14, 12]]


def test_receptive_field_errors_name_the_layer():
    stack = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2)).eval()
    with pytest.raises(ValueError, match="'1'.*global"):
        pt.module_receptive_field(stack, "1", 1, (8, 8), max_canvas=64)
    with pytest.raises(ValueError, match="'3' gives \\(2, 2\\).*N x C x H x W"):
        pt.module_receptive_field(stack, "3", 1, (8, 8))
    with pytest.raises(ValueError, match="no layer 'nope'"):
        pt.module_receptive_field(stack, "nope", 1, (8, 8))


class SqueezeExcite(nn.Module):
    """x * sigmoid(w * mean(x)): every output depends on every pixel (MobileNetV3's and EfficientNet's SE)."""

    def __init__(self):
        super().__init__()
        self.conv, self.gate = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        return x * torch.sigmoid(self.gate(x.mean((2, 3), keepdim=True)))


def test_a_field_made_global_by_squeeze_excitation_is_the_units_own_cell():
    # before: ValueError "the receptive field still reaches the border of a 64 x 64 probe"
    stack = nn.Sequential(SqueezeExcite(), nn.MaxPool2d(2)).eval()
    rf = pt.module_receptive_field(stack, "1", 1, (8, 8), max_canvas=64)
    assert rf.token_cell and rf.size == rf.stride == (2, 2) and rf.start == (0, 0) and rf.canvas == (8, 8)


# -- toy model: top-k and DeconvNet ----------------------------------------------------------------


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.conv2(self.act(self.conv1(x))).mean(dim=(2, 3)))


def _toy_spec(module):
    return ModelSpec(module=module, class_names=["a", "b"], input_size=(10, 10), layers=["conv1", "conv2"],
                     name="toy", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))


def _images(n=6, size=10, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("distinct", [True, False])
def test_top_activations_match_brute_force(distinct):
    module, images, k = Toy(), _images(), 4
    with Subject(_toy_spec(module), device="cpu", batch_size=3) as subject:  # 3 chunks: merging is exercised
        tops = pt.top_activations(subject, images, ["conv1", "conv2"], k, distinct_images=distinct)
        maps = fe.layer_features(subject, images, ["conv1", "conv2"], flatten=False)
    for layer, acts in maps.items():
        t = tops[layer]
        n, c, h, w = acts.shape
        assert t.values.shape == (c, k) and t.map_size == (h, w)
        table = acts.tolist()
        for ch in range(c):
            cands = [(table[i][ch][y][x], i, y, x) for i in range(n) for y in range(h) for x in range(w)]
            if distinct:
                cands = [max((v for v in cands if v[1] == i), key=lambda v: v[0]) for i in range(n)]
            ref = sorted(cands, key=lambda v: -v[0])[:k]
            got = list(zip(t.values[ch].tolist(), t.image[ch].tolist(), t.y[ch].tolist(), t.x[ch].tolist()))
            assert [g[1:] for g in got] == [r[1:] for r in ref], (layer, ch)
            torch.testing.assert_close(t.values[ch], torch.tensor([r[0] for r in ref]))
            if distinct:
                assert len(set(t.image[ch].tolist())) == k


def test_top_activations_keep_fewer_when_there_are_fewer_images():
    with Subject(_toy_spec(Toy()), device="cpu") as subject:
        tops = pt.top_activations(subject, _images(n=3), ["conv2"], 9)
    assert tops["conv2"].values.shape == (5, 3)


def test_ties_keep_the_earliest_image_and_position():
    """A dead channel (all zeros) ties everywhere: the earliest (image, position) comes first, in order."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 1, 1)
            nn.init.zeros_(self.conv1.weight)
            nn.init.zeros_(self.conv1.bias)
            self.conv2 = nn.Identity()
            self.head = nn.Linear(1, 2)

        def forward(self, x):
            return self.head(self.conv2(self.conv1(x)).mean(dim=(2, 3)))

    with Subject(_toy_spec(Flat()), device="cpu", batch_size=2) as subject:
        tops = pt.top_activations(subject, _images(n=4, size=5), ["conv1"], 5, distinct_images=False)
    t = tops["conv1"]
    assert t.image[0].tolist() == [0, 0, 0, 0, 0] and (t.y[0] * 5 + t.x[0]).tolist() == [0, 1, 2, 3, 4]


def test_empty_batch_and_bad_image_index_are_clear_errors():
    with Subject(_toy_spec(Toy()), device="cpu") as subject:
        with pytest.raises(ValueError, match="non-empty"):
            pt.top_activations(subject, torch.empty(0, 3, 10, 10), ["conv2"], 9)
        for index in (-1, 2):
            with pytest.raises(ValueError, match=f"names image {index}, but there are 2 images"):
                pt.deconv_projections(subject, _images(n=2), "conv2", torch.tensor([[index, 0, 0, 0]]))


def test_deconv_projection_closed_form_and_zero_outside_the_field():
    module, images = Toy(), _images(n=4)
    units = torch.tensor([[0, 1, 4, 5], [2, 4, 0, 0], [3, 0, 9, 2], [2, 4, 0, 0]])
    with Subject(_toy_spec(module), device="cpu", batch_size=3) as subject:
        proj = pt.deconv_projections(subject, images, "conv2", units)
        rf = pt.receptive_field(subject, "conv2", (10, 10))
    assert (rf.size, rf.start) == ((5, 5), (-2, -2))
    # DeconvNet by hand: transposed conv2, ReLU on the backward signal, transposed conv1, then 1 / std
    seed = torch.zeros(4, 5, 10, 10)
    seed[torch.arange(4), units[:, 1], units[:, 2], units[:, 3]] = 1.0
    g = F.conv_transpose2d(seed, module.conv2.weight.detach(), padding=1).clamp(min=0)
    g = F.conv_transpose2d(g, module.conv1.weight.detach(), padding=1)
    expected = g / torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(proj, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(proj[1], proj[3])  # same unit, same image: same row
    inside = torch.zeros(4, 10, 10, dtype=torch.bool)
    for u, (x0, y0, x1, y1) in enumerate(rf.boxes(units[:, 2], units[:, 3], (10, 10)).tolist()):
        inside[u, y0:y1, x0:x1] = True
    assert proj.abs().sum(1)[~inside].max() == 0 and proj.abs().sum(1)[inside].gt(0).any()


def test_deconv_bad_unit_names_the_layer_and_leaves_no_trace():
    module = Toy()
    hooks = _hook_keys(module)
    with Subject(_toy_spec(module), device="cpu") as subject:
        with pytest.raises(ValueError, match="outside layer 'conv2'.*5 x 10 x 10"):
            pt.deconv_projections(subject, _images(n=2), "conv2", torch.tensor([[0, 5, 0, 0]]))
        assert "forward" not in module.act.__dict__ and _hook_keys(module) == hooks


def test_crop_units_matches_slicing_with_fill():
    rf = pt.ReceptiveField(layer="l", size=(5, 4), stride=(2, 3), start=(-2, -1), canvas=(0, 0))
    images = torch.rand(3, 2, 9, 8)
    ys, xs = torch.tensor([0, 3, 4]), torch.tensor([0, 1, 2])
    crops = pt.crop_units(images, rf, ys, xs, fill=-1.0)
    assert crops.shape == (3, 2, 5, 4)
    for u in range(3):
        y0, x0 = -2 + 2 * int(ys[u]), -1 + 3 * int(xs[u])
        ref = torch.full((2, 5, 4), -1.0)
        for dy in range(5):
            for dx in range(4):
                if 0 <= y0 + dy < 9 and 0 <= x0 + dx < 8:
                    ref[:, dy, dx] = images[u, :, y0 + dy, x0 + dx]
        assert torch.equal(crops[u], ref)


def test_display_projection_maps_zero_to_grey_and_the_peak_to_the_ends():
    p = torch.zeros(2, 1, 2, 2)
    p[0, 0, 0, 0], p[0, 0, 1, 1], p[1, 0, 0, 1] = 4.0, -2.0, -0.5
    shown = pt.display_projection(p)
    assert shown[0].flatten().tolist() == [1.0, 0.5, 0.5, 0.25]
    assert shown[1].flatten().tolist() == [0.5, 0.0, 0.5, 0.5]
    assert pt.display_projection(torch.zeros(1, 3, 2, 2)).eq(0.5).all()


# -- the check on the demo -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run():
    spec, data = demo_model(), shapes_dataset()
    module = spec.module
    before = {"state": copy.deepcopy(module.state_dict()), "hooks": _hook_keys(module),
              "training": {n: m.training for n, m in module.named_modules()},
              "grad": {n: p.requires_grad for n, p in module.named_parameters()}}
    check = MaxActivatingPatches(layers=("stage1", "stage4"), channels=("stage2:3",), channels_per_layer=2)
    with Subject(spec, device="cpu") as subject:
        result = check.execute(subject, data)
        fields = {layer: pt.receptive_field(subject, layer) for layer in subject.layers}
    return spec, data, before, result, fields


def test_demo_receptive_fields_match_the_closed_form(demo_run):
    *_, fields = demo_run
    # each stage: conv 3x3 pad 1, then 2x2 max-pool (not stage4); RF 4, 10, 22, 38
    got = {layer: (rf.size, rf.stride, rf.start) for layer, rf in fields.items()}
    assert got == {"stage1": ((4, 4), (2, 2), (-1, -1)), "stage2": ((10, 10), (4, 4), (-3, -3)),
                   "stage3": ((22, 22), (8, 8), (-7, -7)), "stage4": ((38, 38), (8, 8), (-15, -15))}
    assert textbook_size([3, 2, 3, 2, 3, 2, 3], [1, 2, 1, 2, 1, 2, 1]) == 38


def test_demo_check_is_evidence_only_with_one_grid_per_layer(demo_run):
    _, data, _, result, _ = demo_run
    assert result.status is Status.INFO, result.error
    assert result.threshold is None and result.value == 5
    assert [(r["layer"], r["rf"]) for r in result.rows] == [
        ("stage1", "4x4"), ("stage1", "4x4"), ("stage4", "38x38"), ("stage4", "38x38"), ("stage2", "10x10")]
    assert result.rows[-1]["channel"] == 3
    assert [e.title.split(": ")[1] for e in result.evidence] == ["stage1", "stage4", "stage2"]
    for row in result.rows:
        values = [float(v) for v in row["top_activations"].split(", ")]
        images = [int(i) for i in row["images"].split(", ")]
        assert len(values) == 9 and values == sorted(values, reverse=True) and len(set(images)) == 9
        assert all(0 <= i < len(data) for i in images)
    for e, channels in zip(result.evidence, (2, 2, 1)):  # a row of 9 patches + 9 projections per channel
        picture = Image.open(io.BytesIO(e.data))
        assert e.media_type == "image/png" and picture.width > 18 * 48 and picture.height > channels * 48
    for layer, rf in result.details["receptive_fields"].items():
        assert f"{layer} {rf['size'][0]}x{rf['size'][1]} px" in result.message


def test_demo_default_channels_have_the_highest_peaks(demo_run):
    spec, data, _, result, _ = demo_run
    with Subject(spec, device="cpu") as subject:
        tops = pt.top_activations(subject, data.images(), ["stage4"], 1)
    peaks = tops["stage4"].peaks()
    chosen = [r["channel"] for r in result.rows if r["layer"] == "stage4"]
    assert chosen == peaks.argsort(descending=True)[:2].tolist()
    assert [r["peak"] for r in result.rows if r["layer"] == "stage4"] == pytest.approx(peaks[chosen].tolist())


def test_demo_model_unchanged_and_no_hook_left(demo_run):
    spec, _, before, _, _ = demo_run
    module = spec.module
    assert _hook_keys(module) == before["hooks"]
    assert {n: m.training for n, m in module.named_modules()} == before["training"]
    assert {n: p.requires_grad for n, p in module.named_parameters()} == before["grad"]
    assert all(torch.equal(before["state"][k], v) for k, v in module.state_dict().items())
    assert all("forward" not in m.__dict__ for m in module.modules())


# -- configuration errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("params, match", [
    ({"channels": ("stage1",)}, "'stage1' should be 'layer:channel'"),
    ({"channels": ("stage1:x",)}, "'stage1:x'"),
    ({"top": 0}, "top must be in 1..64"),
    ({"channels_per_layer": -1}, "channels_per_layer must be >= 0"),
    ({"channels_per_layer": 0}, "nothing to show"),
])
def test_bad_parameters_are_config_errors(params, match):
    with pytest.raises(CheckConfigError, match=match):
        MaxActivatingPatches.from_params(params)


@pytest.mark.parametrize("channels, match", [
    (("stage9:0",), "no layer 'stage9'; available layers: .*stage1"),
    (("stage1:16",), "'stage1:16': layer 'stage1' has 16 channels \\(0..15\\)"),
    (("head:0",), "layer 'head' gives \\(4, 5\\); patches need a N x C x H x W feature map"),
])
def test_unknown_layer_or_channel_is_an_error_naming_it(channels, match):
    spec, data = demo_model(), shapes_dataset().subset(range(4))
    with Subject(spec, device="cpu") as subject:
        result = MaxActivatingPatches(channels=channels).execute(subject, data)
    assert result.status is Status.ERROR
    assert re.search(match, result.message), result.message
    assert not any(m._forward_hooks for m in spec.module.modules())


def test_user_hooks_do_not_fire_on_private_copies():
    """Receptive-field probes and random-weight copies run on copies; the user's hooks stay with the user's model."""
    from auditkit.methods.randomisation import random_copy

    module, calls = Toy(), []
    handle = module.conv1.register_forward_hook(lambda m, i, o: calls.append(o.dtype))
    try:
        with Subject(_toy_spec(module), device="cpu") as subject:
            pt.receptive_field(subject, "conv2", (10, 10))
            random_copy(module)(_images(n=1))
        assert calls == []
        module(_images(n=1))
        assert calls == [torch.float32]  # the user's own hook still works on the user's model
    finally:
        handle.remove()


def test_a_layer_after_attention_shows_its_own_token_cell():
    """Attention makes a block's receptive field the whole image, and a fixed-size model cannot be probed at
    a larger input. Before: max-activating-patches ERRORed on both calibration ViTs."""
    from auditkit import ModelSpec
    from auditkit.checks.base import Status
    from auditkit.checks.patches import MaxActivatingPatches
    from auditkit.methods import patches as pt
    from auditkit.subject import Subject
    from tests.test_saliency import _TinyTransformer
    from tests.toys import halves_set

    class FixedSize(_TinyTransformer):  # a learned position embedding: 16 x 16 inputs only
        def __init__(self):
            super().__init__("qkv")
            self.pos = torch.nn.Parameter(torch.zeros(1, 8, 4, 4))

        def forward(self, x):
            return self.head(self.block(self.embed(x) + self.pos).mean(dim=(2, 3)))

    spec = ModelSpec(module=FixedSize(), class_names=["left", "right", "empty"], input_size=(16, 16),
                     layers=["embed", "block"], name="tiny-vit")
    with Subject(spec, device="cpu") as subject:
        embed, block = pt.receptive_field(subject, "embed"), pt.receptive_field(subject, "block")
        result = MaxActivatingPatches().execute(subject, halves_set(8))
    assert (embed.size, embed.stride, embed.token_cell) == ((4, 4), (4, 4), False)  # measured: 4 x 4 patches
    assert (block.size, block.stride, block.start, block.token_cell) == ((4, 4), (4, 4), (0, 0), True)
    assert result.status is Status.INFO, result.summary()
    assert result.details["receptive_fields"]["block"]["token_cell"] is True
    assert "own grid cell" in result.message
