"""Occlusion throughput against plain inference, and against Captum's Occlusion, in one run.

    python benchmarks/occlusion.py [--model demo|resnet18|<torchvision name>] [--size 224] [--device cpu]
                                   [--batch-size 64] [--images 16] [--patch 12] [--stride 4] [--repeats 3]
                                   [--captum]

Prints plain batched inference throughput (images/s), occlusion-map throughput (perturbed images/s) and
their ratio (issue 9's target: at least 0.95 on resnet18: building the perturbations must cost little
next to the forward passes). With --captum, also Captum's Occlusion on the same images and windows (its
default perturbations_per_eval = 1, the grey baseline, the target class's softmax probability, as ours)
and our rate over Captum's (target: at least 10x). A torchvision name runs with random weights
(weights=None; nothing is downloaded) on the demo's shapes resized to --size. Run by hand; not part of
the test suite.
"""
from __future__ import annotations

import argparse

import torch

from timing import best_of

from auditkit.methods.occlusion import occlusion_map, window_starts
from auditkit.registry import DATASETS, MODELS
from auditkit.subject import Subject


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dataset", default=None, help="default: the model's own audit set")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=16, help="images to occlude")
    parser.add_argument("--patch", type=int, default=12)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=224, help="input size of a torchvision model")
    parser.add_argument("--captum", action="store_true", help="also time Captum's Occlusion")
    args = parser.parse_args()

    if MODELS.has(args.model):
        spec = MODELS.resolve(args.model)()
        data = DATASETS.resolve(args.dataset or spec.dataset)().for_model(spec.class_names, spec.input_size)
    else:
        from suite import build_case  # torchvision model, random weights, shapes resized

        spec, data = build_case(args.model, args.images, args.size)
    images, labels = data.images()[: args.images], data.labels()[: args.images]
    h, w = images.shape[-2:]
    windows = len(window_starts(h, args.patch, args.stride)) * len(window_starts(w, args.patch, args.stride))
    perturbed = images.shape[0] * windows
    # plain inference on exactly as many images as occlusion perturbs: the originals, repeated
    plain = images.repeat((perturbed + images.shape[0] - 1) // images.shape[0], 1, 1, 1)[:perturbed]

    t_captum = t_captum_single = captum_windows = None
    with Subject(spec, device=args.device, batch_size=args.batch_size) as subject:
        subject.predict_rows(args.batch_size, lambda rows: plain[rows])  # warm-up
        # predict_rows: never answered from the Subject's kept results
        t_plain = best_of(args.repeats, lambda: subject.predict_rows(perturbed, lambda rows: plain[rows]))
        t_occ = best_of(args.repeats, lambda: occlusion_map(
            subject, images, labels, patch=args.patch, stride=args.stride))
        if args.captum:
            t_captum, t_captum_single, captum_windows = time_captum(subject, images, labels, args)

    plain_rate, occ_rate = perturbed / t_plain, perturbed / t_occ
    print(f"model {args.model} on {args.device}, {h}x{w} px, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"images: {images.shape[0]} x {windows} windows = {perturbed} perturbed images (patch {args.patch}, stride {args.stride})")
    print(f"plain batched inference : {plain_rate:10.1f} images/s")
    print(f"occlusion map           : {occ_rate:10.1f} perturbed images/s")
    print(f"ratio                   : {occ_rate / plain_rate:10.2f}  (target >= 0.95)")
    if t_captum is not None:
        captum_rate, single_rate = captum_windows / t_captum, captum_windows / t_captum_single
        print(f"Captum, all images      : {captum_rate:10.1f} perturbed images/s ({captum_windows} perturbed images, "
              f"perturbations_per_eval 1: a forward of {images.shape[0]} images per window)")
        print(f"Captum, image by image  : {single_rate:10.1f} perturbed images/s (a forward of 1 image per window)")
        print(f"ours / Captum           : {occ_rate / captum_rate:10.2f} (all images), "
              f"{occ_rate / single_rate:.2f} (image by image)  (target >= 10)")


def time_captum(subject, images, labels, args) -> tuple[float, int]:
    """Seconds of Captum's Occlusion (default perturbations_per_eval = 1: each forward holds one window
    of every image given) over the same images and windows, on p(target) of the same normalised model:
    all images in one call, and one image per call; and the perturbed images each ran."""
    from captum.attr import Occlusion

    class Probability(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(subject.forward(x), dim=1)

    occlusion = Occlusion(Probability())
    c = images.shape[1]
    h, w = images.shape[-2:]
    windows = ((h - args.patch) // args.stride + 1) * ((w - args.patch) // args.stride + 1)
    x = images.to(subject.device)

    def run(rows: slice):
        with torch.no_grad():
            occlusion.attribute(x[rows], sliding_window_shapes=(c, args.patch, args.patch),
                                strides=(c, args.stride, args.stride), baselines=0.5,
                                target=labels[rows].to(subject.device))

    whole = best_of(1, lambda: run(slice(0, x.shape[0])))
    one_by_one = best_of(1, lambda: [run(slice(i, i + 1)) for i in range(x.shape[0])])
    return whole, one_by_one, images.shape[0] * windows


if __name__ == "__main__":
    main()
