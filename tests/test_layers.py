"""Layers of any model (issue 15): discovery from one forward, token and channels-last grids, outputs, dtypes
and wrappers. Small hand-built models stand for the families; the zoo test runs the real ones."""
import pytest
import torch
from torch import nn

from auditkit import ModelSpec
from auditkit.layers import LayerView, discover_layers, patch_size, token_grid, unwrap, view_of
from auditkit.methods.cam import grad_cam
from auditkit.subject import AuditModelError, Subject


def _spec(module, size=(32, 32), classes=("a", "b"), **kw):
    return ModelSpec(module=module, class_names=list(classes), input_size=size, name="m", **kw)


def _found(module, size=(32, 32)):
    return list(Subject(_spec(module, size), device="cpu").layers)


# -- token grids --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens, size, patch, expected", [
    (197, (224, 224), 16, (1, 14, 14)),   # ViT-B/16: class token + 14 x 14
    (201, (224, 224), 16, (5, 14, 14)),   # class token + 4 registers
    (198, (224, 224), 16, (2, 14, 14)),   # DeiT distilled: class + distillation token
    (3136, (224, 224), 4, (0, 56, 56)),   # Swin stage 1, no class token
    (196, (224, 224), 4, (0, 14, 14)),    # Swin stage 3: the patch grid halved twice
    (33, (64, 128), 16, (1, 4, 8)),       # a wide input: the grid keeps its aspect
    (50, (224, 224), None, (1, 7, 7)),    # no patch embedding to read: the input's aspect, fewest tokens
    (182, (200, 224), 4, (0, 13, 14)),    # Swin at 200 x 224: stage 2 pads 50 x 56 / 2 up to 13 x 14
    (49, (200, 200), 4, (0, 7, 7)),       # 200 / 32 = 6.25 rounds up: 7 x 7, no token is a class token
])
def test_token_grid_is_read_from_the_patch_size_and_input(tokens, size, patch, expected):
    assert token_grid(tokens, size, patch) == expected


def test_tokens_fold_into_their_grid_dropping_the_leading_ones():
    n, c, h, w = 2, 3, 4, 6
    grid = torch.arange(n * c * h * w, dtype=torch.float32).view(n, c, h, w)
    tokens = torch.cat([torch.full((n, 2, c), -1.0), grid.flatten(2).transpose(1, 2)], dim=1)  # N x (2 + hw) x C
    view = view_of(tokens, (32, 48), 8)
    assert view == LayerView("tokens", (32, 48), prefix=2, grid_size=(4, 6))
    assert torch.equal(view.grid(tokens), grid)
    assert torch.equal(view.grid((tokens, "extra")), grid)  # a tuple's first tensor


def test_channels_last_is_recognised_and_channels_first_kept():
    nchw = torch.rand(2, 96, 8, 8)
    assert view_of(nchw, (32, 32), None).kind == "grid" and view_of(nchw, (32, 32), None).grid(nchw) is nchw
    nhwc = torch.rand(2, 8, 8, 96)
    view = view_of(nhwc, (32, 32), None)
    assert view.kind == "channels_last" and torch.equal(view.grid(nhwc), nhwc.permute(0, 3, 1, 2))
    assert view_of(torch.rand(2, 10), (32, 32), None).kind == "as_is"


def test_a_padded_channels_last_map_of_a_non_square_input_is_recognised():
    # Swin at 200 x 224 outputs 13 x 14 (rounded up), not the input's exact aspect: it was read channels-first
    nhwc = torch.rand(1, 13, 14, 384)
    assert view_of(nhwc, (200, 224), 4).kind == "channels_last"
    assert view_of(torch.rand(1, 384, 13, 14), (200, 224), 4).kind == "grid"
    assert view_of(torch.rand(1, 32, 147, 147), (299, 299), None).kind == "grid"  # inception's valid convs


def test_half_outputs_read_as_float32_and_float64_stays():
    assert view_of(torch.rand(1, 2, 4, 4).half(), (8, 8), None).grid(torch.rand(1, 2, 4, 4).half()).dtype \
        == torch.float32
    assert LayerView("grid", (8, 8)).grid(torch.rand(1, 2, 4, 4, dtype=torch.float64)).dtype == torch.float64


def test_patch_size_is_the_first_convolution_when_stride_equals_kernel():
    assert patch_size(nn.Sequential(nn.Conv2d(3, 8, 16, stride=16))) == 16
    assert patch_size(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 2, stride=2))) is None


# -- discovery ------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class Staged(nn.Module):
    """stem, two stages of blocks with a downsampling between them, a ModuleList the forward iterates, an
    auxiliary head that only runs in training, and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage1 = nn.Sequential(Block(8), Block(8))
        self.down = nn.Conv2d(8, 16, 2, stride=2)
        self.stage2 = nn.Sequential(Block(16), Block(16))
        self.extra = nn.ModuleList([nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)])
        self.aux = nn.Conv2d(16, 2, 1)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        for conv in self.extra:
            x = torch.relu(conv(x))
        if self.training:
            self.aux(x)
        return self.head(x.mean((2, 3)))


def test_discovery_follows_the_forward():
    # the downsampling between stages is dropped, the ModuleList stands for its children that ran, the
    # training-only head never ran, the classifier outputs no feature map
    assert _found(Staged()) == ["stem", "stage1", "stage2", "extra.0", "extra.1"]


class TinyViT(nn.Module):
    """Patch embedding, a class token, blocks as nn.TransformerEncoderLayer, class-token head."""

    def __init__(self, dim=16, depth=3, size=32, patch=8):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 1 + (size // patch) ** 2, dim))
        self.encoder = nn.Sequential(*[nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
                                       for _ in range(depth)])
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        return self.head(self.encoder(t)[:, 0])


def test_a_vit_gives_its_encoder_blocks_as_grids():
    torch.manual_seed(0)
    with Subject(_spec(TinyViT()), device="cpu") as subject:
        assert list(subject.layers) == ["encoder.0", "encoder.1", "encoder.2"]
        from auditkit.methods.features import layer_features

        feats = layer_features(subject, torch.rand(2, 3, 32, 32), subject.layers, flatten=False)
    assert all(f.shape == (2, 16, 4, 4) for f in feats.values())  # class token dropped, 4 x 4 patches


def test_grad_cam_on_a_class_token_vits_last_block_is_read_at_its_input():
    """The head reads the class token only, so the last block's patch tokens get no gradient (a map of
    zeros); Grad-CAM then reads the block's input, which its attention mixes into the class token. Checked
    against the closed form on the tokens entering the last block."""
    torch.manual_seed(0)
    module = TinyViT()
    x, t = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 0])
    with Subject(_spec(module), device="cpu") as subject:
        maps = grad_cam(subject, x, t, upsample=False)
    entering = {}
    handle = module.encoder[1].register_forward_hook(lambda _m, _i, out: entering.setdefault("a", out))
    logits = module(x)
    handle.remove()
    a = entering["a"]
    (g,) = torch.autograd.grad(logits.gather(1, t.view(-1, 1)).sum(), a)
    grid = lambda v: v[:, 1:, :].transpose(1, 2).reshape(3, 16, 4, 4)  # noqa: E731
    expected = torch.relu((grid(g).mean((2, 3), keepdim=True) * grid(a)).sum(1))
    assert maps.shape == (3, 4, 4) and torch.allclose(maps, expected.detach(), atol=1e-6)
    assert expected.abs().sum() > 0  # a map, not the zeros of the last block's own patch tokens


def test_grad_cam_on_channels_last_output_matches_the_transposed_model():
    """A model whose layer outputs N x h x w x C gives the Grad-CAM of the same model written channels-first."""
    torch.manual_seed(0)
    conv, head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.feat, self.head = conv, nn.Identity(), head

        def forward(self, x):
            return self.head(self.feat(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2)))

    class First(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.feat, self.head = conv, nn.Identity(), head

        def forward(self, x):
            return self.head(self.feat(self.conv(x)).mean((2, 3)))

    x, t = torch.rand(2, 3, 16, 16), torch.tensor([1, 0])
    maps = []
    for module in (Last(), First()):
        with Subject(_spec(module, (16, 16), layers=["feat"]), device="cpu") as subject:
            maps.append(grad_cam(subject, x, t))
    assert torch.allclose(maps[0], maps[1], atol=1e-6)


def test_an_unknown_layer_says_how_to_name_layers():
    with pytest.raises(AuditModelError, match=r"ModelSpec\(layers=\[\.\.\.\]\)"):
        Subject(_spec(Staged(), layers=["nope"]), device="cpu")


# -- outputs, dtypes, wrappers ---------------------------------------------------------------------------


class Returns(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.conv = kind, nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        logits = self.conv(x).mean((2, 3))
        if self.kind == "tuple":
            return logits, "aux"
        if self.kind == "dict":
            return {"loss": None, "logits": logits}
        if self.kind == "object":
            return type("Output", (), {"logits": logits})()
        if self.kind == "named":
            return {"scores": logits}
        return logits


@pytest.mark.parametrize("kind, output", [("tensor", None), ("tuple", None), ("dict", None), ("object", None),
                                          ("named", "scores"), ("tuple", 0), ("named", lambda o: o["scores"])])
def test_the_logits_are_found_in_what_the_model_returns(kind, output):
    torch.manual_seed(0)
    module = Returns(kind)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        expected = module.conv(x).mean((2, 3))
    with Subject(_spec(module, (8, 8), layers=["conv"], output=output), device="cpu") as subject:
        assert torch.allclose(subject.predict(x), expected)


def test_a_wrong_output_choice_names_what_the_model_returned():
    with Subject(_spec(Returns("named"), (8, 8), layers=["conv"]), device="cpu") as subject, \
            pytest.raises(AuditModelError, match=r"forward returned dict with keys 'scores'.*ModelSpec\(output="):
        subject.predict(torch.rand(1, 3, 8, 8))
    with Subject(_spec(Returns("dict"), (8, 8), layers=["conv"], output="logit"), device="cpu") as subject, \
            pytest.raises(AuditModelError, match=r"output='logit' does not pick from what the model returned, dict"):
        subject.predict(torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_run_and_give_float32(dtype):
    torch.manual_seed(0)
    module = Staged()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        reference = module(x)
    module = module.to(dtype)
    with Subject(_spec(module), device="cpu") as subject:
        logits = subject.predict(x)
        cam = grad_cam(subject, x, torch.tensor([0, 1]))
    assert logits.dtype == torch.float32 and cam.dtype == torch.float32
    assert torch.allclose(logits, reference, atol=0.05, rtol=0.05)  # the model's own precision
    assert next(module.parameters()).dtype == dtype  # the user's model is left in its dtype


def test_wrappers_are_audited_through_the_module_they_run():
    torch.manual_seed(0)
    inner = Staged()
    for wrapped in (nn.DataParallel(inner), torch.compile(inner)):
        assert unwrap(wrapped) is inner
        with Subject(_spec(wrapped, layers=["module.stem" if isinstance(wrapped, nn.DataParallel) else "stem"]),
                     device="cpu") as subject:
            assert subject.layers == ("stem",) and subject.module is inner
            assert subject.predict(torch.rand(1, 3, 32, 32)).shape == (1, 2)
    assert not any(m._forward_hooks for m in inner.modules())


def test_discovery_leaves_the_model_as_it_was():
    module = Staged().train()
    assert _found(module)[0] == "stem"
    assert module.training and all(p.requires_grad for p in module.parameters())
    assert not any(m._forward_hooks for m in module.modules())


def test_the_report_header_shows_each_models_layers_and_how_they_are_read():
    import time

    from auditkit.report import render_html
    from auditkit.runner import report_meta

    meta = report_meta({"vit": {"name": "vit", "layers": ["blocks.0", "blocks.1"],
                                "layers_read_as": {"blocks.1": "tokens (1 leading dropped)"}},
                        "ts": {"name": "<ts>", "layers": [], "torchscript": True}}, time.time())
    assert meta["layers"] == ("vit: blocks.0, blocks.1 (tokens (1 leading dropped)); "
                              "<ts>: none (TorchScript takes no hooks)")
    page = render_html([], meta)
    assert "<dt>Layers</dt>" in page and "vit: blocks.0, blocks.1 (tokens (1 leading dropped))" in page
    assert "&lt;ts&gt;: none" in page  # escaped: names are user input


def test_a_hook_on_the_grid_view_cannot_replace_the_output_and_a_raw_one_can():
    torch.manual_seed(0)
    module = Staged()
    x = torch.rand(1, 3, 32, 32)
    with Subject(_spec(module), device="cpu") as subject:
        with subject.forward_hook("stem", lambda _m, _i, out: torch.zeros_like(out)), \
                pytest.raises(TypeError, match="use raw=True"):
            subject.forward(x)
        plain = subject.forward(x)
        with subject.forward_hook("stem", lambda _m, _i, out: torch.zeros_like(out), raw=True):
            ablated = subject.forward(x)
    assert not torch.allclose(plain, ablated)
    assert not any(m._forward_hooks for m in module.modules())


def test_the_header_of_a_model_whose_probe_fails_does_not_fail():
    class NeedsABatch(Staged):
        def forward(self, x):
            if x.shape[0] < 2:
                raise RuntimeError("needs a batch")
            return super().forward(x)

    with Subject(_spec(NeedsABatch()), device="cpu") as subject:
        assert subject.describe()["layers"] == []
        assert subject.predict(torch.rand(2, 3, 32, 32)).shape == (2, 2)
