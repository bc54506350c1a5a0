"""The Subject owns batching: an out-of-memory in any method's forward halves the chunk and retries, and the
method's result is the same as with memory to spare (issue 9, point 1)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from auditkit import ModelSpec
from auditkit.methods import cam, deletion, embedding, features, gradients, inversion, occlusion, patches, synthesis
from auditkit.subject import AuditModelError, Subject, is_out_of_memory

LIMIT = 3  # the largest batch the "device" holds
ERRORS = {
    "cuda": lambda n: torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n * 2} GiB"),
    "cpu": lambda n: RuntimeError(f"[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                  f"memory: you tried to allocate {n << 30} bytes"),
}


class Net(nn.Module):
    """conv -> BN -> ReLU -> max-pool -> conv -> ReLU -> mean -> Linear, whose forward runs out of memory
    (the error of `kind`) for a batch of more than `limit` rows."""

    def __init__(self, limit: int | None = None, kind: str = "cuda"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(6, 3)
        self.limit, self.kind = limit, kind
        self.batches: list[int] = []
        with torch.no_grad():  # running statistics that are not the identity, so eval-mode BN matters
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        self.batches.append(x.shape[0])
        if self.limit is not None and x.shape[0] > self.limit:
            raise ERRORS[self.kind](x.shape[0])
        f = self.relu2(self.conv2(self.pool(self.relu1(self.bn(self.conv1(x))))))
        return self.head(f.mean((2, 3)))


def _pair(kind: str):
    """Two copies of one seeded Net: one with memory to spare, one that holds LIMIT rows."""
    torch.manual_seed(0)
    roomy = Net()
    tight = Net(LIMIT, kind)
    tight.load_state_dict(roomy.state_dict())
    return roomy, tight


def _spec(module: nn.Module) -> ModelSpec:
    return ModelSpec(module=module, class_names=["a", "b", "c"], input_size=(12, 12), layers=["conv1", "conv2"],
                     mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), name="tight")


IMAGES = torch.rand(10, 3, 12, 12, generator=torch.Generator().manual_seed(1))
TARGETS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
MAPS = torch.rand(10, 12, 12, generator=torch.Generator().manual_seed(2))

# method -> subject -> result; every method of auditkit.methods that runs the model
METHODS = {
    "predict": lambda s: s.predict(IMAGES),
    "probabilities": lambda s: s.probabilities(IMAGES),
    "gradient": lambda s: gradients.gradient(s, IMAGES, TARGETS),
    "input_x_gradient": lambda s: gradients.input_x_gradient(s, IMAGES, TARGETS),
    "smoothgrad": lambda s: gradients.smoothgrad(s, IMAGES, TARGETS, samples=3),  # 3 model rows per image
    "integrated_gradients": lambda s: gradients.integrated_gradients(s, IMAGES, TARGETS, steps=7),
    "guided_backprop": lambda s: gradients.guided_backprop(s, IMAGES, TARGETS),
    "deconvnet": lambda s: gradients.deconvnet(s, IMAGES, TARGETS),
    "grad_cam": lambda s: cam.grad_cam(s, IMAGES, TARGETS, layer="conv2"),
    "occlusion_map": lambda s: occlusion.occlusion_map(s, IMAGES[:2], TARGETS[:2], patch=4, stride=4),
    "deletion_insertion": lambda s: deletion.deletion_insertion_curves(s, IMAGES, TARGETS, MAPS, steps=5),
    "layer_features": lambda s: features.layer_features(s, IMAGES, ["conv1", "conv2"]),
    "dead_units": lambda s: features.dead_units(s, IMAGES, ["conv1", "conv2"]),
    "penultimate_features": lambda s: embedding.penultimate_features(s, IMAGES),
    "top_activations": lambda s: patches.top_activations(s, IMAGES, ["conv2"], top=4),
    "deconv_projections": lambda s: patches.deconv_projections(
        s, IMAGES, "conv2", torch.tensor([[k, k % 6, k % 6, (2 * k) % 6] for k in range(10)])),
    "invert_layers": lambda s: inversion.invert_layers(s, IMAGES[:4], ["conv1", "conv2"], steps=4),
    "synthesise_texture": lambda s: synthesis.synthesise_texture(s, IMAGES[:5], ["conv1", "conv2"], steps=4),
    "visualise_classes": lambda s: synthesis.visualise_classes(s, [0, 1, 2, 1, 0], steps=4),
}


def _tensors(result) -> list[torch.Tensor]:
    """Every tensor inside a method's result (tensors, dicts, lists, dataclasses), in a fixed order."""
    if isinstance(result, torch.Tensor):
        return [result]
    if dataclasses.is_dataclass(result):
        result = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    if isinstance(result, dict):
        return [t for key in sorted(result, key=str) for t in _tensors(result[key])]
    if isinstance(result, (list, tuple)):
        return [t for item in result for t in _tensors(item)]
    return []


@pytest.mark.parametrize("kind", sorted(ERRORS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_the_same_result_when_the_chunk_halves_on_out_of_memory(method, kind):
    roomy, tight = _pair(kind)
    with Subject(_spec(roomy), device="cpu", batch_size=32) as subject:
        expected = METHODS[method](subject)
    with Subject(_spec(tight), device="cpu", batch_size=32) as subject:  # gradient chunks of 32 / 4
        got = METHODS[method](subject)
        shrunk = subject.batch_size
    want, have = _tensors(expected), _tensors(got)
    assert want and len(want) == len(have)
    for a, b in zip(want, have):
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4, equal_nan=True), (method, (a - b).abs().max())
        else:
            assert torch.equal(a, b), method
    # the tight model saw a batch too large, and only batches it holds after that
    assert max(tight.batches) > LIMIT, (method, tight.batches)
    assert shrunk < 32


def test_out_of_memory_with_one_image_names_the_model_and_non_memory_errors_pass_through():
    module = Net(limit=0)
    with Subject(_spec(module), device="cpu", batch_size=4) as subject:
        with pytest.raises(AuditModelError, match=r"model 'tight': out of memory on cpu with a chunk of one image"):
            subject.predict(IMAGES)
        with pytest.raises(AuditModelError, match=r"model 'tight': out of memory on cpu with a chunk of one image"):
            gradients.smoothgrad(subject, IMAGES, TARGETS, samples=3)

    class Broken(Net):
        def forward(self, x):
            self.batches.append(x.shape[0])
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    broken = Broken()
    with Subject(_spec(broken), device="cpu", batch_size=8) as subject:
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            subject.predict(IMAGES)
        assert subject.batch_size == 8 and broken.batches == [8]  # not retried, not shrunk


def test_what_counts_as_out_of_memory():
    assert is_out_of_memory(ERRORS["cuda"](1)) and is_out_of_memory(ERRORS["cpu"](1))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(MemoryError("x"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only allocator errors


def test_chunks_cover_every_row_once_in_order_and_a_retry_gives_the_same_rows():
    module = Net()
    seen, failures = [], iter([True, False, True])
    with Subject(_spec(module), device="cpu", batch_size=8) as subject:
        def work(rows):
            if rows.stop - rows.start > 2 and next(failures, False):
                raise ERRORS["cuda"](rows.stop - rows.start)
            seen.append((rows.start, rows.stop))
            return rows.stop - rows.start

        sizes = list(subject.chunks(11, work))
        assert subject.batch_size == 2  # 8 failed -> 4 held once, then failed -> 2
    assert sum(sizes) == 11 and [a for a, _ in seen] == sorted(a for a, _ in seen)
    assert seen[0][0] == 0 and all(b == c for (_, b), (c, _) in zip(seen, seen[1:])) and seen[-1][1] == 11
    with Subject(_spec(Net()), device="cpu") as subject, pytest.raises(ValueError, match="cost must be >= 1"):
        list(subject.chunks(3, work, cost=0))


def test_randomised_and_derived_copies_leave_the_users_model_alone():
    module = Net()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.train()
    with Subject(_spec(module), device="cpu", batch_size=5) as subject:
        with subject.randomised(seed=3) as random_subject:
            assert random_subject.module is not module and random_subject.batch_size == 5
            assert random_subject.layers == subject.layers and random_subject.device == subject.device
            assert not torch.equal(random_subject.module.conv1.weight, module.conv1.weight)
            random_subject.predict(IMAGES)
        with subject.derived(Net()) as other:
            assert other.name == subject.name and other.spec.input_size == (12, 12)
    assert module.training and all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def _tanh_chain(layers: int) -> ModelSpec:
    """Tanh x `layers` then Flatten on 3 x 8 x 8 images: each Tanh saves its output (one image, B = 768
    bytes) for the backward, the normalisation saves the 3 stds (12 bytes), and the largest leaf input +
    output is 2 B: backward_cost = ceil((layers * B + 12 + 2 B) / 2 B)."""
    module = nn.Sequential(*[nn.Tanh() for _ in range(layers)], nn.Flatten())
    return ModelSpec(module=module, class_names=[f"c{k}" for k in range(192)], input_size=(8, 8), name="tanh")


def test_a_backward_chunk_weighs_a_plain_forward_of_the_batch():
    """A forward + backward keeps what autograd saves; the Subject measures it once per open on one image,
    against the largest input + output of a leaf module, and makes its backward chunks that many times
    smaller than batch_size. Before: a quarter of the batch for every model."""
    import logging

    from auditkit.subject import BACKWARD_COST

    for layers, cost in ((3, 3), (5, 4)):
        spec = _tanh_chain(layers)
        seen = []
        spec.module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
        with Subject(spec, device="cpu", batch_size=12) as subject:
            assert subject.backward_cost() == cost and subject.backward_cost() == cost
            assert seen == [1, 1]  # measured once, on one image, without and with autograd
            assert not any(m._forward_hooks for m in spec.module.modules())  # the probe's hooks are gone
            images = torch.rand(10, 3, 8, 8)
            rows = [r for r, _, _ in subject.gradients(10, lambda r: images[r], lambda x, r: x.sum((1, 2, 3)))]
            assert [r.stop - r.start for r in rows] == ([4, 4, 2] if cost == 3 else [3, 3, 3, 1])
            assert list(subject.chunks(10, lambda r: r.stop - r.start)) == [10]
        assert subject._backward_cost is None  # measured again after the next open

    class Functional(nn.Module):  # no leaf module: nothing to measure P on
        def forward(self, x):
            return x.flatten(1)

    spec = ModelSpec(module=Functional(), class_names=[f"c{k}" for k in range(192)], input_size=(8, 8),
                     layers=[], name="functional")
    with Subject(spec, device="cpu", batch_size=16) as subject:
        logger = logging.getLogger("auditkit")
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger.addHandler(handler)
        try:
            assert subject.backward_cost() == BACKWARD_COST
        finally:
            logger.removeHandler(handler)
    assert any("'functional'" in r.getMessage() and "memory probe failed" in r.getMessage() for r in records)


def test_grad_cam_runs_in_the_backward_chunks():
    """Grad-CAM differentiates a layer, not the pixels, through its own chunk loop: it takes the Subject's
    backward cost too. Before: a forward + backward of batch_size rows at once (5.6 GB on resnet50)."""
    spec = _tanh_chain(3)  # backward_cost 3
    seen = []
    spec.module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    images, targets = torch.rand(10, 3, 8, 8), torch.arange(10)
    with Subject(spec, device="cpu", batch_size=12) as subject:
        maps = cam.grad_cam(subject, images, targets, layer="0")
    assert seen == [1, 1, 4, 4, 2] and maps.shape == (10, 8, 8)  # the probe's two rows, then chunks of 12 // 3
