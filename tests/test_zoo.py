"""The zoo (issue 15.5): the default suite runs on the families people ship, random weights, small inputs.

Each model runs every default check on 3 shapes images at a small size, with fast settings (few steps),
and must give no ERROR: FAILED is expected on random weights. The layers found are asserted, so a change of
discovery shows here. timm and transformers are test extras (skipped when absent). benchmarks/ has the
full-size runs.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision.models as tv
from torch import nn

from auditkit import ModelSpec, Status, Subject
from auditkit.checks import build_checks
from auditkit.demo.shapes import CLASS_NAMES, shapes_audit_set
from auditkit.registry import DEFAULT_SUITE

K = len(CLASS_NAMES)
FAST = {
    "saliency-sanity": {"max_steps": 2, "samples": 4},
    "deletion-insertion": {"steps": 4},
    "inversion-converges": {"steps": 10, "samples": 0, "max_layers": 2},
    "texture-synthesis-converges": {"steps": 10, "samples": 0, "max_layers": 2},
    "class-visualisation": {"steps": 2, "max_classes": 2},
    "max-activating-patches": {"top": 3, "channels_per_layer": 2, "max_layers": 2},
}
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _tiny_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=K)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the head at zero: constant logits
    return model


def _tiny_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=[2, 2],
                           num_classes=K)


def _tiny_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], num_classes=K)


def _timm(name, **kw):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, num_classes=K, **kw)


def _hf_vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=K)
    return transformers.ViTForImageClassification(config)


def _scripted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(tv.resnet18(num_classes=K))


def _traced():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(tv.resnet18(num_classes=K).eval(), torch.rand(1, 3, 32, 32))


RESNET = ["conv1", "layer1", "layer2", "layer3", "layer4"]
# name -> (builder, input size, expected layers: a list, or (first, last, count))
ZOO = {
    "resnet18": (lambda: tv.resnet18(num_classes=K), 32, RESNET),
    "mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=K), 64, ("features.0", "features.12", 13)),
    "efficientnet_b0": (lambda: tv.efficientnet_b0(num_classes=K), 64, ("features.0", "features.8", 9)),
    "convnext": (_tiny_convnext, 32, ["features.0", "features.1", "features.3"]),
    "vit": (_tiny_vit, 32, ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]),
    "swin": (_tiny_swin, 32, ["features.0", "features.1", "features.3"]),
    "squeezenet1_1": (lambda: tv.squeezenet1_1(num_classes=K), 64, ("features.0", "features.12", 9)),
    "googlenet": (lambda: tv.googlenet(num_classes=K, aux_logits=False, init_weights=False), 32,
                  ("conv1", "inception5b", 12)),
    "inception_v3": (lambda: tv.inception_v3(num_classes=K, aux_logits=True, init_weights=False), 75,
                     ("Conv2d_1a_3x3", "Mixed_7c", 16)),
    "regnet_x_400mf": (lambda: tv.regnet_x_400mf(num_classes=K), 64,
                       ["trunk_output.block1", "trunk_output.block2", "trunk_output.block3", "trunk_output.block4"]),
    "timm_resnet18": (lambda: _timm("resnet18"), 32, RESNET),
    "timm_vit_tiny": (lambda: _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), 32,
                      ["blocks.0", "blocks.1"]),
    "timm_deit_tiny": (lambda: _timm("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), 32,
                       ["blocks.0", "blocks.1"]),
    "timm_convnext_atto": (lambda: _timm("convnext_atto"), 32, ["stages.0", "stages.1", "stages.2", "stages.3"]),
    "timm_mobilevit_xxs": (lambda: _timm("mobilevit_xxs"), 64, ["stages.0", "stages.1", "stages.2", "stages.3",
                                                                  "stages.4"]),
    "hf_vit": (_hf_vit, 32, None),  # the block names change between transformers releases: (prefix, count)
    "scripted": (_scripted, 32, []),
    "traced": (_traced, 32, []),
    "compiled": (lambda: torch.compile(tv.resnet18(num_classes=K)), 32, RESNET),
    "float16": (lambda: tv.resnet18(num_classes=K).half(), 32, RESNET),
    "bfloat16": (lambda: tv.resnet18(num_classes=K).bfloat16(), 32, RESNET),
}
# On TorchScript: what needs only the output and the pixel gradient runs, what hooks a layer does not apply
SCRIPT_RUNS = {"occlusion-drop", "saliency-in-box", "saliency-sanity", "deletion-insertion", "class-visualisation"}
SCRIPT_DOES_NOT_APPLY = {"invariance-grows-with-depth", "dead-units", "max-activating-patches",
                         "inversion-converges", "texture-synthesis-converges"}


@pytest.mark.parametrize("name", list(ZOO))
def test_the_default_suite_runs_without_error(name):
    build, size, expected = ZOO[name]
    torch.manual_seed(0)
    module = build()
    data = shapes_audit_set(3).resized((size, size))
    spec = ModelSpec(module=module, class_names=CLASS_NAMES, input_size=(size, size), name=name, **IMAGENET)
    checks = build_checks([{**table, **FAST.get(table["kind"], {})} for table in DEFAULT_SUITE])
    with Subject(spec, device="cpu", batch_size=8) as subject:
        layers = subject.describe()["layers"]
        results = {check.name: check.execute(subject, data) for check in checks}
    errors = {k: r.message for k, r in results.items() if r.status is Status.ERROR}
    assert not errors, errors
    if expected is None:
        assert len(layers) == 3 and layers[0].endswith("embeddings") and layers[-1].endswith(".1"), layers
    elif isinstance(expected, tuple):
        assert (layers[0], layers[-1], len(layers)) == expected, layers
    else:
        assert layers == expected, layers
    if name in ("scripted", "traced"):
        applied = {k for k, r in results.items() if not r.details.get("not_applicable")}
        assert SCRIPT_RUNS <= applied and not SCRIPT_DOES_NOT_APPLY & applied, applied
        assert all(r.message.startswith("does not apply: ") and r.status is Status.INFO
                   for k, r in results.items() if k not in applied)
