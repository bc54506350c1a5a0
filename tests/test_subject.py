import pytest
import torch
from torch import nn

from auditkit import ModelSpec
from auditkit.subject import AuditModelError, Subject
from tests.toys import SmallNet

HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def snapshot(module: nn.Module) -> dict:
    """Everything the audit promises to leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "training": {n: m.training for n, m in module.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in module.named_parameters()},
        "grads": {n: p.grad for n, p in module.named_parameters()},
        "devices": {n: p.device for n, p in module.named_parameters()},
        "hooks": {(n, t): list(getattr(m, t).keys()) for n, m in module.named_modules() for t in HOOK_TABLES},
    }


def assert_unchanged(module: nn.Module, before: dict) -> None:
    after = snapshot(module)
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key  # bit-identical
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for name, grad in before["grads"].items():
        assert after["grads"][name] is grad, name
    assert after["devices"] == before["devices"]
    assert after["hooks"] == before["hooks"]


@pytest.fixture
def user_model():
    """A model in an awkward state: training mode, a frozen layer, a stale .grad and a user hook."""
    torch.manual_seed(0)
    net = SmallNet()
    net.train()
    net.features[0].weight.requires_grad_(False)
    net.head.weight.grad = torch.ones_like(net.head.weight)
    net.head.register_forward_hook(lambda m, i, o: None)
    return net


def spec_of(module, **kw) -> ModelSpec:
    return ModelSpec(module=module, class_names=["a", "b", "c"], input_size=(8, 8), mean=(0.5, 0.5, 0.5),
                     std=(0.25, 0.25, 0.25), name="small", **kw)


def test_audit_leaves_model_exactly_as_found(user_model):
    before = snapshot(user_model)
    x = torch.rand(10, 3, 8, 8)
    with Subject(spec_of(user_model), device="cpu", batch_size=3) as subject:
        assert not user_model.training and not any(p.requires_grad for p in user_model.parameters())
        subject.predict(x)
        with subject.capture(["features.2"]) as acts:
            subject.predict(x[:2])
        assert acts["features.2"].shape == (2, 4, 8, 8)
        user_model.features[1].register_forward_hook(lambda m, i, o: None)  # a hook leaked by a buggy check
    assert_unchanged(user_model, before)


def test_model_restored_after_an_exception(user_model):
    before = snapshot(user_model)
    with pytest.raises(RuntimeError, match="boom"):
        with Subject(spec_of(user_model), device="cpu") as subject:
            with subject.capture(["features.0", "head"]):
                subject.predict(torch.rand(2, 3, 8, 8))
                raise RuntimeError("boom")
    assert_unchanged(user_model, before)


def test_capture_removes_hooks_when_forward_raises(user_model):
    class Exploding(nn.Module):
        def forward(self, x):
            raise ValueError("forward failed")

    user_model.features.append(Exploding())
    before = snapshot(user_model)
    subject = Subject(spec_of(user_model), device="cpu").open()
    with pytest.raises(ValueError, match="forward failed"):
        with subject.capture(["features.0"]):
            subject.predict(torch.rand(2, 3, 8, 8))
    subject.close()
    assert_unchanged(user_model, before)


def test_normalisation_is_applied_inside_forward():
    class Identity(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    spec = ModelSpec(module=Identity(), class_names=["r", "g", "b"], input_size=(4, 4), mean=(0.5, 0.0, 0.25), std=(0.5, 2.0, 0.25))
    with Subject(spec, device="cpu") as subject:
        out = subject.predict(torch.ones(1, 3, 4, 4))
    assert torch.allclose(out, torch.tensor([[1.0, 0.5, 3.0]]))


def test_predict_matches_one_big_batch_and_halves_on_out_of_memory(user_model):
    calls = []
    real_forward = user_model.forward

    def forward(x):
        calls.append(x.shape[0])
        if x.shape[0] > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(x)

    user_model.forward = forward
    x = torch.rand(11, 3, 8, 8)
    with Subject(spec_of(user_model), device="cpu", batch_size=16) as subject:
        out = subject.predict(x)
        assert subject.batch_size == 4
        expected = real_forward(subject.normalise(x))
    assert torch.allclose(out, expected, atol=1e-6)
    assert calls[:3] == [11, 8, 4]


def test_unknown_layer_lists_available_names(user_model):
    with pytest.raises(AuditModelError, match=r"model 'small' has no layer 'features.9'; available layers: features, features.0"):
        Subject(spec_of(user_model, layers=["features.9"]), device="cpu")
    subject = Subject(spec_of(user_model), device="cpu")
    with pytest.raises(AuditModelError, match="no layer 'nope'"):
        subject.layer("nope")


def test_wrong_output_shape_and_nan_are_clear_errors():
    class Wrong(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))[:, :2]

    class NaNs(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)) * float("nan")

    spec = ModelSpec(module=Wrong(), class_names=["a", "b", "c"], input_size=(4, 4), name="wrong")
    with Subject(spec, device="cpu") as subject:
        with pytest.raises(AuditModelError, match=r"model 'wrong': output has shape \(2, 2\), expected \(2, 3\)"):
            subject.predict(torch.rand(2, 3, 4, 4))
    spec = ModelSpec(module=NaNs(), class_names=["a", "b", "c"], input_size=(4, 4), name="nans")
    with Subject(spec, device="cpu") as subject:
        with pytest.raises(AuditModelError, match="model 'nans': output holds NaN"):
            subject.predict(torch.rand(2, 3, 4, 4))


def test_bad_input_shape_names_the_model(user_model):
    with Subject(spec_of(user_model), device="cpu") as subject:
        with pytest.raises(AuditModelError, match=r"model 'small': input has shape \(3, 8, 8\), expected N x 3 x H x W"):
            subject.predict(torch.rand(3, 8, 8))


def test_device_errors():
    from auditkit.subject import resolve_device

    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(AuditModelError, match="not valid"):
        resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(AuditModelError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_discovered_layers_for_torchvision_models():
    import torchvision

    def found(module):
        return list(Subject(ModelSpec(module, class_names=["a", "b"], input_size=(64, 64)), device="cpu").layers)

    assert found(torchvision.models.resnet18(num_classes=2)) == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert found(torchvision.models.vgg11(num_classes=2))[:2] == ["features.0", "features.3"]


@pytest.mark.gpu
def test_cuda_round_trip_restores_device(user_model):
    before = snapshot(user_model)
    with Subject(spec_of(user_model), device="cuda") as subject:
        assert next(user_model.parameters()).device.type == "cuda"
        out = subject.predict(torch.rand(4, 3, 8, 8))
        assert out.device.type == "cpu"
    assert_unchanged(user_model, before)


def _training_check():
    from auditkit.checks.base import Check

    class Careless(Check):
        kind = "careless"

        def run(self, subject, audit_set):
            module = subject.module
            module.train()
            module.features[0].weight.requires_grad_(True)
            for _ in range(3):
                module(torch.rand(4, 3, 8, 8) * 3)
            with torch.no_grad():
                module.head.bias.add_(1.0)  # an in-place edit of a parameter
            module.features[3].register_forward_hook(lambda m, i, o: None)
            return self.info_result(message="trained the model")

    return Careless()


def test_restore_after_a_check_that_trains_the_model(user_model):
    before = snapshot(user_model)
    subject = Subject(spec_of(user_model), device="cpu").open()
    audit = snapshot(user_model)  # the audit state open() established: eval, requires_grad off
    x = torch.rand(5, 3, 8, 8)
    clean = subject.predict(x)
    assert subject.restore() == []  # nothing changed: nothing to put back

    check = _training_check()
    check.run(subject, None)
    assert user_model.training and user_model.features[1].num_batches_tracked.item() == 3  # the harm was done
    restored = subject.restore()
    assert restored[0] == "train mode" and "requires_grad" in restored
    assert "parameters head.bias" in restored
    assert "buffers features.1.running_mean, features.1.running_var, features.1.num_batches_tracked" in restored
    assert any(r.startswith("hooks ") and "features.3" in r for r in restored)
    assert_unchanged(user_model, audit)  # buffers, parameters, flags and hooks as open() left them
    assert torch.equal(subject.predict(x), clean)
    assert subject.restore() == []

    result = check.execute(subject, None)  # as the session runs it: execute(), then restore()
    assert result.status.value == "info", result.summary()
    subject.restore()
    assert_unchanged(user_model, audit)

    check.run(subject, None)  # harm again, then close without a restore in between
    subject.close()
    assert_unchanged(user_model, before)  # the user's model exactly as it was: training mode, frozen layer, grads


def test_close_restores_values_changed_during_the_audit(user_model):
    before = snapshot(user_model)
    with Subject(spec_of(user_model), device="cpu") as subject:
        user_model.train()
        user_model(torch.rand(4, 3, 8, 8))  # moves the batch-norm statistics
        bn = user_model.features[1]
        bn.running_var = torch.full_like(bn.running_var, 7.0)  # a buffer replaced, not edited in place
        subject.predict(torch.rand(2, 3, 8, 8))
    assert_unchanged(user_model, before)
    assert user_model.features[1].running_var is not None and torch.equal(
        user_model.features[1].running_var, before["state"]["features.1.running_var"])
