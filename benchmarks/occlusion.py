"""Occlusion throughput against plain inference, on the same images and batch size.

    python benchmarks/occlusion.py [--model demo] [--device cpu] [--batch-size 64] [--repeats 3]

Prints plain batched inference throughput (images/s), occlusion-map
throughput (perturbed images/s) and their ratio. The target is a ratio of at
least 0.8 on CPU: building the perturbations must cost little next to the
forward passes. Run by hand; not part of the test suite.
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
    args = parser.parse_args()

    spec = MODELS.resolve(args.model)()
    data = DATASETS.resolve(args.dataset or spec.dataset)().for_model(spec.class_names, spec.input_size)
    images, labels = data.images()[: args.images], data.labels()[: args.images]
    h, w = images.shape[-2:]
    windows = len(window_starts(h, args.patch, args.stride)) * len(window_starts(w, args.patch, args.stride))
    perturbed = images.shape[0] * windows
    # plain inference on exactly as many images as occlusion perturbs: the originals, repeated
    plain = images.repeat((perturbed + images.shape[0] - 1) // images.shape[0], 1, 1, 1)[:perturbed]

    with Subject(spec, device=args.device, batch_size=args.batch_size) as subject:
        subject.predict(plain[: args.batch_size])  # warm-up
        t_plain = best_of(args.repeats, lambda: subject.predict(plain))
        t_occ = best_of(args.repeats, lambda: occlusion_map(
            subject, images, labels, patch=args.patch, stride=args.stride))

    plain_rate, occ_rate = perturbed / t_plain, perturbed / t_occ
    print(f"model {args.model} on {args.device}, {h}x{w} px, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"images: {images.shape[0]} x {windows} windows = {perturbed} perturbed images (patch {args.patch}, stride {args.stride})")
    print(f"plain batched inference : {plain_rate:10.1f} images/s")
    print(f"occlusion map           : {occ_rate:10.1f} perturbed images/s")
    print(f"ratio                   : {occ_rate / plain_rate:10.2f}  (target >= 0.80)")


if __name__ == "__main__":
    main()
