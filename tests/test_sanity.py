import copy

import pytest
import torch
from torch import nn

from auditkit.checks.base import CheckConfigError, Status
from auditkit.checks.sanity import SaliencySanity
from auditkit.methods import randomisation as rnd
from auditkit.methods import saliency as sal
from auditkit.subject import Subject, _hook_keys


def _toy() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )


def _perturb_bn(module: nn.Module) -> None:
    """Give batch-norm layers non-default statistics and affine values, as after training."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)


def _params_of(module: nn.Module, layer: str) -> dict[str, torch.Tensor]:
    sub = dict(module.named_modules())[layer]
    return {k: v.detach().clone() for k, v in sub.state_dict().items() if v.is_floating_point()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- parameter layers and the cascade ---------------------------------------------


def test_parameter_layers_in_registration_order():
    assert rnd.parameter_layers(_toy()) == ["0", "1", "3.0", "6"]


def test_cascade_is_top_down_cumulative_and_leaves_the_module_alone():
    module = _toy()
    _perturb_bn(module)
    before = copy.deepcopy(module.state_dict())
    layers = rnd.parameter_layers(module)
    original = {name: _params_of(module, name) for name in layers}

    steps = []
    for name, clone in rnd.cascade(module, seed=0):
        assert clone is not module
        steps.append((name, {n: _params_of(clone, n) for n in layers}))
    assert [name for name, _ in steps] == list(reversed(layers))  # one step per layer, top down

    first = steps[0][1]
    assert not _same(first["6"], original["6"])  # the top layer changed ...
    assert all(_same(first[n], original[n]) for n in layers if n != "6")  # ... and nothing else
    for k, (_, state) in enumerate(steps):  # cumulative: the top k+1 layers differ
        changed = {n for n in layers if not _same(state[n], original[n])}
        assert changed == set(list(reversed(layers))[: k + 1])
    last = steps[-1][1]
    for n in layers:  # every parameter tensor of every layer differs at the end
        assert all(not torch.equal(last[n][k], original[n][k]) for k in original[n]), n

    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_cascade_is_reproducible_and_keeps_the_global_rng():
    module = _toy()
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    a = [_params_of(c, n) for n, c in rnd.cascade(module, seed=5)]
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is untouched
    b = [_params_of(c, n) for n, c in rnd.cascade(module, seed=5)]
    assert all(_same(x, y) for x, y in zip(a, b))


# -- Spearman ----------------------------------------------------------------------


def test_spearman_identity_reverse_and_constant():
    x = torch.randn(12, 9)
    assert rnd.spearman(x, x) == pytest.approx(1.0)
    assert rnd.spearman(x, -x) == pytest.approx(-1.0)
    assert rnd.spearman(x, torch.exp(x)) == pytest.approx(1.0)  # monotone transforms keep the ranks
    assert rnd.spearman(x, torch.ones_like(x)) != rnd.spearman(x, torch.ones_like(x))  # NaN


def test_spearman_matches_scipy_without_ties():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 200, generator=gen, dtype=torch.float64)
    b = 0.5 * a + torch.randn(6, 200, generator=gen, dtype=torch.float64)
    rows = rnd.spearman_rows(a, b)
    for i in range(6):
        expected = stats.spearmanr(a[i].numpy(), b[i].numpy())[0]
        assert float(rows[i]) == pytest.approx(expected, abs=1e-6)
        assert rnd.spearman(a[i].view(10, 20), b[i].view(10, 20)) == pytest.approx(expected, abs=1e-6)


def test_bad_parameters_are_config_errors():
    with pytest.raises(CheckConfigError, match="layer applies to methods 'grad_cam' and 'auto' only"):
        SaliencySanity(method="gradient", layer="stage2")
    with pytest.raises(CheckConfigError, match="samples"):
        SaliencySanity(samples=0)
    with pytest.raises(CheckConfigError, match="max_similarity"):
        SaliencySanity(max_similarity=2.0)
    with pytest.raises(CheckConfigError, match="method"):
        SaliencySanity.from_params({"method": "magic"})


# -- the check on the demo model -------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    from auditkit.demo import demo_model, shapes_dataset

    spec = demo_model()
    return spec, shapes_dataset().for_model(spec.class_names, spec.input_size)


def _run(spec, data, **params):
    with Subject(spec, device="cpu") as subject:
        return SaliencySanity(samples=8, **params).execute(subject, data)


def _print_curve(result):
    print(f"\n{result.summary()}")
    for row in result.rows:
        print(f"  {row['step']}: down to {row['randomised_down_to']:<9} spearman {row['spearman']:+.3f} "
              f"(std {row['std']:.3f}, constant {row['constant_maps']})")


def test_demo_passes_with_grad_cam_and_the_module_is_untouched(demo):
    spec, data = demo
    module = spec.module
    module.train()
    module.stage2.eval()  # a mixed mode that must survive
    state = {k: v.clone() for k, v in module.state_dict().items()}
    training = {n: m.training for n, m in module.named_modules()}
    grad = {n: p.requires_grad for n, p in module.named_parameters()}
    hooks = _hook_keys(module)
    try:
        result = _run(spec, data)
    finally:
        after = module.state_dict()
        assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
        assert {n: m.training for n, m in module.named_modules()} == training
        assert {n: p.requires_grad for n, p in module.named_parameters()} == grad
        assert _hook_keys(module) == hooks == {}
        module.eval()
    _print_curve(result)
    assert result.status is Status.PASSED, result.summary()
    assert [r["randomised_down_to"] for r in result.rows] == list(reversed(rnd.parameter_layers(module)))
    # the decision is on the per-sample correlations after the last step; constant randomised maps count as 0
    per_sample = list(result.details["spearman_per_sample"].values())
    assert result.decision["control"] == pytest.approx(sum(0.0 if v is None or v != v else v for v in per_sample) / len(per_sample))
    assert result.value == pytest.approx(0.5 - result.decision["control"])
    assert result.decision["p_value"] <= 0.01 and result.threshold == 0.0
    assert [e.media_type for e in result.evidence] == ["image/png", "image/svg+xml"]


def test_demo_passes_with_gradient(demo):
    spec, data = demo
    result = _run(spec, data, method="gradient", evidence_samples=0)
    _print_curve(result)
    assert result.status is Status.PASSED, result.summary()
    assert result.rows[0]["spearman"] > result.rows[-1]["spearman"]  # the map degrades down the cascade


def _edge_map(subject, images, targets, method="grad_cam", layer=None, **options):
    """A "saliency method" that ignores the model: the gradient magnitude of the grey image."""
    grey = images.mean(1)
    dx = torch.zeros_like(grey)
    dy = torch.zeros_like(grey)
    dx[:, :, 1:] = grey[:, :, 1:] - grey[:, :, :-1]
    dy[:, 1:, :] = grey[:, 1:, :] - grey[:, :-1, :]
    return (dx * dx + dy * dy).sqrt()


def test_a_method_that_ignores_the_model_fails(demo, monkeypatch):
    spec, data = demo
    monkeypatch.setattr(sal, "saliency_map", _edge_map)
    result = _run(spec, data, evidence_samples=0)
    _print_curve(result)
    assert result.status is Status.FAILED, result.summary()
    assert result.decision["control"] == pytest.approx(1.0, abs=1e-6)  # the randomised map is the same map
    assert result.value == pytest.approx(0.5 - 1.0, abs=1e-6)


def test_constant_original_maps_are_an_error(demo, monkeypatch):
    spec, data = demo
    monkeypatch.setattr(sal, "saliency_map", lambda s, images, *a, **k: torch.zeros(images.shape[0], *images.shape[-2:]))
    result = _run(spec, data, evidence_samples=0)
    assert result.status is Status.ERROR
    assert "constant" in result.message


# -- near-constant is constant (issue 13) ------------------------------------------------


def test_spearman_of_a_map_constant_up_to_rounding_is_nan():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=gen)
    flat = 0.25 + 0.25 * 1e-7 * torch.randn(3, 64, generator=gen)  # relative spread ~ 1e-7, as float32 rounding
    assert bool((flat.amax(1) > flat.amin(1)).all())  # not exactly constant
    rho = rnd.spearman_rows(x, flat)
    assert torch.isnan(rho).all(), rho
    assert torch.isnan(rnd.spearman_rows(flat, x)).all()
    assert not torch.isnan(rnd.spearman_rows(x, x + 1e-3 * flat)).any()  # a real ranking stays defined


def test_grad_cam_constant_up_to_rounding_never_passes():
    """The demo with stage4's conv zeroed: its Grad-CAM maps are constant up to rounding (relative spread
    1.7e-7). Before: PASSED on the Spearman of the rounding noise of 7 of 16 samples."""
    from auditkit.demo import demo_model, shapes_dataset

    spec = demo_model()
    with torch.no_grad():
        spec.module.stage4[0].weight.zero_()
    data = shapes_dataset().for_model(spec.class_names, spec.input_size)
    result = _run(spec, data, evidence_samples=0)
    print(result.summary())
    assert result.status is Status.ERROR, result.summary()
    assert "maps are constant (up to rounding" in result.message and "for all 8 samples" in result.message


def test_non_finite_maps_are_an_error_naming_method_layer_and_sample(demo, monkeypatch):
    spec, data = demo
    real = sal.saliency_map

    def nan_on_the_third(subject, images, targets, method, layer=None, **options):
        maps = real(subject, images, targets, method, layer=layer, **options)
        maps[2, 0, 0] = float("nan")
        return maps

    monkeypatch.setattr(sal, "saliency_map", nan_on_the_third)
    result = _run(spec, data, evidence_samples=0)
    assert result.status is Status.ERROR, result.summary()
    assert "NonFiniteError" in result.message and "'grad_cam'" in result.message and "'stage4'" in result.message
    assert f"1 of 8 sample(s): {data[2].id!r}" in result.message


# -- blocks: the cascade's steps follow the module tree (issue 9, point 3) -----------------------


def test_cascade_blocks_follow_the_module_tree_and_cover_every_layer_once():
    torchvision = pytest.importorskip("torchvision")
    resnet = torchvision.models.resnet18()
    blocks = rnd.cascade_blocks(resnet, 12)
    assert [name for name, _ in blocks] == ["conv1", "bn1", "layer1.0", "layer1.1", "layer2.0", "layer2.1",
                                            "layer3.0", "layer3.1", "layer4.0", "layer4.1", "fc"]
    assert [n for _, members in blocks for n in members] == rnd.parameter_layers(resnet)  # in order, once each
    assert dict(blocks)["layer2.0"] == ["layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2", "layer2.0.bn2",
                                        "layer2.0.downsample.0", "layer2.0.downsample.1"]
    # one child holding most of the model (a ViT's encoder.layers): its children merged into the steps left
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=12, num_heads=2,
                                               hidden_dim=16, mlp_dim=16)
    vit_blocks = rnd.cascade_blocks(vit, 12)
    assert len(vit_blocks) == 12 and sum(name.startswith("encoder.layers.") for name, _ in vit_blocks) == 7
    assert [n for _, m in vit_blocks for n in m] == rnd.parameter_layers(vit)
    # a flat Sequential: consecutive layers merged, each block named by its lowest layer
    flat = nn.Sequential(*[nn.Conv2d(2, 2, 1) for _ in range(30)])
    assert [(name, len(m)) for name, m in rnd.cascade_blocks(flat, 4)] == [("0", 8), ("8", 7), ("15", 7), ("22", 8)]
    # few layers, or max_steps 0: one step per layer
    assert rnd.cascade_blocks(_toy(), 12) == [(n, [n]) for n in rnd.parameter_layers(_toy())]
    assert len(rnd.cascade_blocks(resnet, 0)) == 41


def test_block_cascade_is_cumulative_and_ends_in_the_same_random_copy():
    torchvision = pytest.importorskip("torchvision")
    module = torchvision.models.resnet18(num_classes=3)
    _perturb_bn(module)
    layers = rnd.parameter_layers(module)
    blocks = rnd.cascade_blocks(module, 12)
    original = {name: _params_of(module, name) for name in layers}
    done = []
    for (name, clone), (block, members) in zip(rnd.cascade(module, seed=2, max_steps=12), reversed(blocks)):
        assert name == block
        done += members
        changed = {n for n in layers if not _same(_params_of(clone, n), original[n])}
        assert changed == set(done)  # the top blocks, and only they
    per_layer = list(rnd.cascade(module, seed=2))[-1][1]
    assert all(_same(_params_of(clone, n), _params_of(per_layer, n)) for n in layers)  # steps change no seed


def test_sanity_with_fewer_steps_names_the_blocks(demo):
    spec, data = demo
    result = _run(spec, data, max_steps=3)
    assert [r["randomised_down_to"] for r in result.rows] == ["stage4", "stage3", "stage1"]  # top down: (stage4, head), stage3, (stage1, stage2)
    assert "all 9 parameter layers random, in 3 steps" in result.message
    with pytest.raises(CheckConfigError, match="max_steps must be >= 0"):
        SaliencySanity(max_steps=-1)
