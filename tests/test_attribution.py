import pytest
import torch
from torch import nn

from auditkit import ModelSpec
from auditkit.demo import demo_model
from auditkit.demo.shapes import shapes_audit_set
from auditkit.methods.cam import grad_cam
from auditkit.methods.gradients import (
    deconvnet,
    gradient,
    guided_backprop,
    ig_weights,
    input_x_gradient,
    integrated_gradients,
    relu_backward_override,
    smoothgrad,
    to_map,
)
from auditkit.subject import Subject

captum_attr = pytest.importorskip("captum.attr")

HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
ATOL = 1e-4


def hooks_of(module: nn.Module) -> dict:
    return {(n, t): list(getattr(m, t).keys()) for n, m in module.named_modules() for t in HOOK_TABLES}


def patched(module: nn.Module) -> list[str]:
    """Modules carrying an instance-level `forward` (what the ReLU override sets)."""
    return [n for n, m in module.named_modules() if "forward" in m.__dict__]


@pytest.fixture(scope="module")
def demo():
    """The demo model opened on the CPU, 8 audit images and their labels."""
    torch.manual_seed(0)
    audit = shapes_audit_set(n=8)
    images = torch.stack([s.image for s in audit.samples]).float()
    labels = torch.tensor([s.label for s in audit.samples], dtype=torch.int64)
    with Subject(demo_model(), device="cpu", batch_size=64) as subject:
        yield subject, images, labels


class Wrapped(nn.Module):
    """What Captum sees: the Subject's normalisation, then the model."""

    def __init__(self, subject: Subject):
        super().__init__()
        self.subject = subject
        self.model = subject.module

    def forward(self, x):
        return self.model(self.subject.normalise(x))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().cpu() - b.detach().cpu()).abs().max())


# -- exact answers on a linear model ------------------------------------------
def linear_spec(mean, std) -> ModelSpec:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    return ModelSpec(module=net, class_names=["a", "b", "c"], input_size=(4, 4), mean=mean, std=std, name="lin")


def test_gradient_of_linear_model_is_the_weight_row():
    spec = linear_spec((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    weight = spec.module[1].weight.detach().clone()
    x, t = torch.rand(5, 3, 4, 4), torch.tensor([0, 1, 2, 1, 0])
    with Subject(spec, device="cpu", batch_size=2) as subject:
        g = gradient(subject, x, t)
        ixg = input_x_gradient(subject, x, t)
    assert g.shape == x.shape and g.device.type == "cpu"
    assert torch.equal(g, weight[t].view(5, 3, 4, 4))
    assert torch.allclose(ixg, x * weight[t].view(5, 3, 4, 4))


def test_gradient_of_linear_model_goes_through_the_normalisation():
    std = (0.5, 0.25, 2.0)
    spec = linear_spec((0.4, 0.5, 0.6), std)
    weight = spec.module[1].weight.detach().clone().view(3, 3, 4, 4)
    x, t = torch.rand(4, 3, 4, 4), torch.tensor([2, 0, 1, 2])
    with Subject(spec, device="cpu") as subject:
        g = gradient(subject, x, t)
        ig = integrated_gradients(subject, x, t, baseline=0.0, steps=8)
        ig_mean = integrated_gradients(subject, x, t, steps=8)  # default baseline: the normalisation mean
        f_x = subject.predict(x).gather(1, t.view(-1, 1)).squeeze(1)
        f_0 = subject.predict(torch.zeros_like(x)).gather(1, t.view(-1, 1)).squeeze(1)
    expected = weight[t] / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(g, expected, rtol=1e-6, atol=1e-7)
    # a linear model: IG is exactly (x - 0) * gradient and complete
    assert torch.allclose(ig, x * expected, atol=1e-5)
    assert torch.allclose(ig.sum(dim=(1, 2, 3)), f_x - f_0, atol=1e-4)
    mean = torch.tensor((0.4, 0.5, 0.6)).view(1, 3, 1, 1)
    assert torch.allclose(ig_mean, (x - mean) * expected, atol=1e-5)


# -- integrated gradients --------------------------------------------------------
def test_ig_weights_integrate_exactly():
    for method in ("riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle", "gausslegendre"):
        alphas, w = ig_weights(16, method)
        assert alphas.shape == w.shape == (16,)
        assert abs(float(w.sum()) - 1.0) < 1e-12, method
        assert float(alphas.min()) >= 0 and float(alphas.max()) <= 1
    a, w = ig_weights(16, "riemann_trapezoid")
    assert abs(float((w * a).sum()) - 0.5) < 1e-12  # int_0^1 a da


# Measured max relative gap over 16 demo images, 64 steps: default baseline (the normalisation mean,
# ~grey) 0.41 % (trapezoid), 1.14 % (Gauss-Legendre); black baseline 1.09 % / 1.35 % - the ReLU /
# max-pool kinks along the path, Captum's delta agrees; 128 steps: 0.47 % / 0.74 %.
@pytest.mark.parametrize(
    "baseline, method, steps",
    [(None, "riemann_trapezoid", 64), (0.0, "riemann_trapezoid", 128), (0.0, "gausslegendre", 128)],
)
def test_integrated_gradients_completeness_on_demo(demo, baseline, method, steps):
    """sum(attr) = f_t(x) - f_t(b) within 1 % of |f_t(x) - f_t(b)|, image by image."""
    subject, images, labels = demo
    attr = integrated_gradients(subject, images, labels, baseline=baseline, steps=steps, method=method)
    mean = torch.tensor([float(m) for m in subject.spec.mean]).view(1, 3, 1, 1)
    base = mean.expand_as(images) if baseline is None else torch.full_like(images, baseline)
    f_x = subject.predict(images).gather(1, labels.view(-1, 1)).squeeze(1)
    f_b = subject.predict(base).gather(1, labels.view(-1, 1)).squeeze(1)
    gap = (attr.sum(dim=(1, 2, 3)) - (f_x - f_b)).abs()
    assert (gap <= 0.01 * (f_x - f_b).abs()).all(), gap / (f_x - f_b).abs()


def test_integrated_gradients_gap_shrinks_with_steps(demo):
    subject, images, labels = demo
    f = subject.predict(images).gather(1, labels.view(-1, 1)).squeeze(1)
    f0 = subject.predict(torch.zeros_like(images)).gather(1, labels.view(-1, 1)).squeeze(1)
    gaps = [(integrated_gradients(subject, images[:4], labels[:4], baseline=0.0, steps=n).sum(dim=(1, 2, 3)) - (f - f0)[:4])
            .abs().max() for n in (8, 64)]
    assert gaps[1] < gaps[0]


# -- agreement with Captum ----------------------------------------------------------
def test_gradient_matches_captum_saliency(demo):
    subject, images, labels = demo
    ours = gradient(subject, images, labels)
    theirs = captum_attr.Saliency(Wrapped(subject)).attribute(images.clone(), target=labels, abs=False)
    assert max_diff(ours, theirs) <= ATOL


@pytest.mark.parametrize("baseline", [0.0, 0.5])
def test_integrated_gradients_matches_captum(demo, baseline):
    subject, images, labels = demo
    ours = integrated_gradients(subject, images, labels, baseline=baseline, steps=64, method="gausslegendre")
    theirs = captum_attr.IntegratedGradients(Wrapped(subject)).attribute(
        images.clone(), baselines=baseline, target=labels, n_steps=64,
        method="gausslegendre", internal_batch_size=128,
    )
    assert max_diff(ours, theirs) <= ATOL


def test_integrated_gradients_trapezoid_matches_captum_up_to_its_step_size(demo):
    """Captum's trapezoid uses steps of 1 / n (weights summing to (n - 1) / n); ours uses 1 / (n - 1)."""
    subject, images, labels = demo
    n = 32
    # a textured baseline: at a constant one (alpha = 0 is on the path) max-pool ties follow float noise
    base = torch.rand(images[:4].shape, generator=torch.Generator().manual_seed(1))
    ours = integrated_gradients(subject, images[:4], labels[:4], baseline=base, steps=n, method="riemann_trapezoid")
    theirs = captum_attr.IntegratedGradients(Wrapped(subject)).attribute(
        images[:4].clone(), baselines=base, target=labels[:4], n_steps=n, method="riemann_trapezoid",
    )
    assert max_diff(ours, theirs * n / (n - 1)) <= ATOL


def test_guided_backprop_matches_captum(demo):
    subject, images, labels = demo
    ours = guided_backprop(subject, images, labels)
    theirs = captum_attr.GuidedBackprop(Wrapped(subject)).attribute(images.clone(), target=labels)
    assert max_diff(ours, theirs) <= ATOL
    assert max_diff(ours, gradient(subject, images, labels)) > ATOL  # the rule changed something


def test_deconvnet_matches_captum(demo):
    subject, images, labels = demo
    ours = deconvnet(subject, images, labels)
    theirs = captum_attr.Deconvolution(Wrapped(subject)).attribute(images.clone(), target=labels)
    assert max_diff(ours, theirs) <= ATOL


@pytest.mark.parametrize("layer", [None, "stage2"])
def test_grad_cam_matches_captum(demo, layer):
    subject, images, labels = demo
    name = layer or subject.layers[-1]
    ours = grad_cam(subject, images, labels, layer=layer)
    wrapped = Wrapped(subject)
    cam = captum_attr.LayerGradCam(wrapped, wrapped.model.get_submodule(name)).attribute(
        images.clone(), target=labels, relu_attributions=True
    )
    theirs = captum_attr.LayerAttribution.interpolate(cam, tuple(images.shape[-2:]), "bilinear").squeeze(1)
    assert ours.shape == (images.shape[0], *images.shape[-2:])
    assert (ours >= 0).all()
    assert max_diff(ours, theirs) <= ATOL


# -- the model is left as it was ------------------------------------------------------
class InplaceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, 3))
        self.fail = False

    def forward(self, x):
        x = self.features(x)
        if self.fail:
            raise RuntimeError("boom")
        return self.head(x)


@pytest.fixture
def inplace_subject():
    torch.manual_seed(2)
    net = InplaceNet()
    spec = ModelSpec(module=net, class_names=["a", "b", "c"], input_size=(8, 8), mean=(0.5,) * 3, std=(0.25,) * 3,
                     name="inplace")
    with Subject(spec, device="cpu", batch_size=3) as subject:
        yield subject


@pytest.mark.parametrize("method", [guided_backprop, deconvnet])
def test_relu_rules_on_inplace_relu_leave_no_trace(inplace_subject, method):
    subject, net = inplace_subject, inplace_subject.module
    before_hooks, before_state = hooks_of(net), {k: v.clone() for k, v in net.state_dict().items()}
    x, t = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    attr = method(subject, x, t)
    assert attr.shape == x.shape and torch.isfinite(attr).all() and attr.abs().sum() > 0
    assert hooks_of(net) == before_hooks and patched(net) == []
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before_state.items())
    # the plain gradient afterwards is the ordinary one again
    x1 = x.clone().requires_grad_(True)
    net(subject.normalise(x1)).gather(1, t.view(-1, 1)).sum().backward()
    assert torch.allclose(gradient(subject, x, t), x1.grad, atol=1e-6)


def test_relu_override_restored_after_an_exception(inplace_subject):
    subject, net = inplace_subject, inplace_subject.module
    before_hooks = hooks_of(net)
    net.fail = True
    try:
        with pytest.raises(RuntimeError, match="boom"):
            guided_backprop(subject, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
        with pytest.raises(RuntimeError, match="boom"), relu_backward_override(net, "deconvnet") as count:
            assert count == 2 and len(patched(net)) == 2
            net(torch.rand(1, 3, 8, 8))
    finally:
        net.fail = False
    assert hooks_of(net) == before_hooks and patched(net) == []
    assert all(type(m).forward is nn.ReLU.forward for m in net.modules() if isinstance(m, nn.ReLU))


def test_relu_override_keeps_an_instance_forward_the_user_set():
    relu = nn.ReLU()
    own = relu.forward = lambda x: x * 2  # noqa: E731
    with relu_backward_override(relu, "guided"):
        assert relu.forward is not own
    assert relu.forward is own


# -- maps and batching ------------------------------------------------------------
def test_to_map_reductions():
    attr = torch.tensor([[1.0, -3.0], [-2.0, 2.0]]).view(1, 2, 1, 2)  # C = 2, W = 2
    assert torch.equal(to_map(attr, "sum"), torch.tensor([[[-1.0, -1.0]]]))
    assert torch.equal(to_map(attr, "abs_sum"), torch.tensor([[[3.0, 5.0]]]))
    assert torch.equal(to_map(attr, "max_abs"), torch.tensor([[[2.0, 3.0]]]))
    with pytest.raises(ValueError):
        to_map(attr, "mean")


def test_batching_gives_the_same_result_as_one_image_at_a_time(demo):
    subject, images, labels = demo
    x, t = images[:3], labels[:3]
    size = subject.batch_size
    noise_base = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    try:
        runs = {}
        for bs in (64, 1):
            subject.batch_size = bs
            runs[bs] = {
                "gradient": gradient(subject, x, t),
                # a textured baseline: near a constant one max-pool ties make per-pixel IG depend on
                # float noise that varies with the batch composition (the sums do not)
                "ig": integrated_gradients(subject, x, t, baseline=noise_base, steps=8, method="gausslegendre"),
                "guided": guided_backprop(subject, x, t),
                "cam": grad_cam(subject, x, t),
                "smooth": smoothgrad(subject, x, t, samples=4, seed=3),
            }
        single = {
            "gradient": torch.cat([gradient(subject, x[i : i + 1], t[i : i + 1]) for i in range(3)]),
            "guided": torch.cat([guided_backprop(subject, x[i : i + 1], t[i : i + 1]) for i in range(3)]),
            "cam": torch.cat([grad_cam(subject, x[i : i + 1], t[i : i + 1]) for i in range(3)]),
        }
    finally:
        subject.batch_size = size
    for key, value in runs[64].items():
        assert torch.allclose(value, runs[1][key], atol=1e-5), key
    for key, value in single.items():
        assert torch.allclose(value, runs[64][key], atol=1e-5), key
    assert runs[64]["cam"].shape == (3, 64, 64)
    assert to_map(runs[64]["gradient"], "abs_sum").shape == (3, 64, 64)


def test_smoothgrad_is_deterministic_and_averages_gradients(demo):
    subject, images, labels = demo
    x, t = images[:2], labels[:2]
    a = smoothgrad(subject, x, t, samples=8, noise=0.1, seed=5)
    b = smoothgrad(subject, x, t, samples=8, noise=0.1, seed=5)
    c = smoothgrad(subject, x, t, samples=8, noise=0.1, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # no noise: every sample is the plain gradient
    assert torch.allclose(smoothgrad(subject, x, t, samples=3, noise=0.0), gradient(subject, x, t), atol=1e-6)


def test_attribution_leaves_the_demo_model_unchanged(demo):
    subject, images, labels = demo
    net = subject.module
    before = (hooks_of(net), {k: v.clone() for k, v in net.state_dict().items()},
              {n: p.requires_grad for n, p in net.named_parameters()}, {n: p.grad for n, p in net.named_parameters()})
    for fn in (gradient, input_x_gradient, guided_backprop, deconvnet, grad_cam):
        fn(subject, images[:2], labels[:2])
    integrated_gradients(subject, images[:2], labels[:2], steps=4)
    smoothgrad(subject, images[:2], labels[:2], samples=2)
    assert hooks_of(net) == before[0] and patched(net) == []
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before[1].items())
    assert {n: p.requires_grad for n, p in net.named_parameters()} == before[2]
    assert all(p.grad is before[3][n] for n, p in net.named_parameters())
    assert not net.training


@pytest.mark.gpu
def test_every_method_on_cuda_matches_the_cpu(demo):
    """Each method runs batched on CUDA, returns CPU tensors, and agrees with the CPU result."""
    cpu_subject, images, labels = demo
    methods = {
        "gradient": lambda s: gradient(s, images, labels),
        "input_x_gradient": lambda s: input_x_gradient(s, images, labels),
        "smoothgrad": lambda s: smoothgrad(s, images, labels, samples=4),
        "integrated_gradients": lambda s: integrated_gradients(s, images, labels, steps=16),
        "guided_backprop": lambda s: guided_backprop(s, images, labels),
        "deconvnet": lambda s: deconvnet(s, images, labels),
        "grad_cam": lambda s: grad_cam(s, images, labels, layer="stage4"),
    }
    expected = {name: fn(cpu_subject) for name, fn in methods.items()}
    with Subject(demo_model(), device="cuda", batch_size=64) as cuda_subject:
        for name, fn in methods.items():
            got = fn(cuda_subject)
            assert got.device.type == "cpu", name
            scale = expected[name].abs().max().clamp_min(1e-12)
            assert ((got - expected[name]).abs().max() / scale) < 1e-3, name
