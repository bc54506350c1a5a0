"""Per-image time of each attribution method, ours next to Captum's, same settings, same run.

    python benchmarks/attribution.py [--images 8] [--resnet-images 4] [--repeats 2]

Models: the demo CNN (64 px) and torchvision's resnet18 with random weights
(224 px), both on the CPU in eval mode. Captum gets a module that applies the
same normalisation, so both compute the same map. Ours should never be more
than 10% slower. Run by hand; not part of the test suite.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from timing import best_of

from auditkit.methods import cam, gradients
from auditkit.spec import ModelSpec
from auditkit.subject import Subject

IG_STEPS, SG_SAMPLES, SG_NOISE = 32, 8, 0.15


class Normalised(nn.Module):
    def __init__(self, subject: Subject):
        super().__init__()
        self.subject, self.model = subject, subject.module

    def forward(self, x):
        return self.model(self.subject.normalise(x))


def captum_methods(subject: Subject, layer: str):
    from captum.attr import (Deconvolution, GuidedBackprop, InputXGradient, IntegratedGradients, LayerGradCam,
                             NoiseTunnel, Saliency)

    wrapped = Normalised(subject).eval()
    return {
        "gradient": lambda x, t: Saliency(wrapped).attribute(x, target=t, abs=False),
        "input_x_gradient": lambda x, t: InputXGradient(wrapped).attribute(x, target=t),
        "smoothgrad": lambda x, t: NoiseTunnel(Saliency(wrapped)).attribute(
            x, target=t, nt_type="smoothgrad", nt_samples=SG_SAMPLES, stdevs=SG_NOISE, abs=False,
            nt_samples_batch_size=subject.batch_size),
        "integrated_gradients": lambda x, t: IntegratedGradients(wrapped).attribute(
            x, target=t, n_steps=IG_STEPS, method="gausslegendre", internal_batch_size=subject.batch_size),
        "guided_backprop": lambda x, t: GuidedBackprop(wrapped).attribute(x, target=t),
        "deconvnet": lambda x, t: Deconvolution(wrapped).attribute(x, target=t),
        "grad_cam": lambda x, t: LayerGradCam(wrapped, subject.layer(layer)).attribute(x, target=t),
    }


def our_methods(subject: Subject, layer: str):
    return {
        "gradient": lambda x, t: gradients.gradient(subject, x, t),
        "input_x_gradient": lambda x, t: gradients.input_x_gradient(subject, x, t),
        "smoothgrad": lambda x, t: gradients.smoothgrad(subject, x, t, samples=SG_SAMPLES, noise=SG_NOISE),
        "integrated_gradients": lambda x, t: gradients.integrated_gradients(
            subject, x, t, steps=IG_STEPS, method="gausslegendre"),
        "guided_backprop": lambda x, t: gradients.guided_backprop(subject, x, t),
        "deconvnet": lambda x, t: gradients.deconvnet(subject, x, t),
        "grad_cam": lambda x, t: cam.grad_cam(subject, x, t, layer=layer, upsample=False),
    }


def bench(name: str, spec: ModelSpec, images: torch.Tensor, repeats: int) -> None:
    targets = torch.zeros(images.shape[0], dtype=torch.long)
    with Subject(spec, device="cpu", batch_size=64) as subject:
        layer = subject.layers[-1]
        ours, theirs = our_methods(subject, layer), captum_methods(subject, layer)
        print(f"\n{name}: {images.shape[0]} images of {tuple(images.shape[1:])}, Grad-CAM layer {layer}, "
              f"IG {IG_STEPS} steps, SmoothGrad {SG_SAMPLES} samples")
        print(f"{'method':22s} {'ours ms/img':>12s} {'captum ms/img':>14s} {'ours/captum':>12s}")
        for method in ours:
            ours[method](images[:1], targets[:1])  # warm-up
            theirs[method](images[:1], targets[:1])
            # interleave the two so that drifting machine load hits both alike
            t_ours = t_captum = float("inf")
            for _ in range(repeats):
                t_ours = min(t_ours, best_of(1, lambda: ours[method](images, targets)) / images.shape[0])
                t_captum = min(t_captum, best_of(1, lambda: theirs[method](images, targets)) / images.shape[0])
            print(f"{method:22s} {1e3 * t_ours:12.2f} {1e3 * t_captum:14.2f} {t_ours / t_captum:12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--resnet-images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")

    from auditkit.demo import demo_model, shapes_dataset

    spec = demo_model()
    data = shapes_dataset().for_model(spec.class_names, spec.input_size)
    bench("demo", spec, data.images()[: args.images], args.repeats)

    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    spec = ModelSpec(module=resnet, class_names=[str(i) for i in range(10)], input_size=(224, 224),
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), name="resnet18-random")
    bench("resnet18 (random weights)", spec, torch.rand(args.resnet_images, 3, 224, 224), args.repeats)


if __name__ == "__main__":
    main()
