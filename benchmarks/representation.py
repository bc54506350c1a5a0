"""Seconds per check of the representation family, on the demo and on torchvision's resnet18.

    python benchmarks/representation.py [--quick] [--device cpu] [--repeats 1]

The family: invariance to translation (with rotation shown beside it, as in
the default suite), invariance to scaling, dead-units, feature-neighbours and
class-separation, taken from the default suite with its parameters, so the
benchmark times what `make audit` runs.

Targets: (1) the demo model on its 60-image shapes audit set, the whole
family in under 20 s on CPU; (2) resnet18 with random weights
(torchvision.models.resnet18(weights=None)) at 224 px on 32 shapes images
resized to 224 px: the time per check is printed, with no target.
--quick runs only (1). Each check's time is check.execute() wall-clock (the
fastest of --repeats runs, timing.best_of); a check that ends in ERROR is
reported as such. Run by hand; not part of the test suite.
"""
from __future__ import annotations

import argparse
import time

import torch
from timing import best_of

from auditkit import ModelSpec
from auditkit.checks import Status, build_checks
from auditkit.demo import demo_model, shapes_dataset
from auditkit.registry import DEFAULT_SUITE
from auditkit.subject import Subject

REPRESENTATION_KINDS = ("invariance-grows-with-depth", "dead-units", "feature-neighbours", "class-separation")
FAMILY: tuple[dict, ...] = tuple(t for t in DEFAULT_SUITE if t["kind"] in REPRESENTATION_KINDS)


def resnet18_case(n: int = 32, size: int = 224):
    torchvision = __import__("torchvision")
    torch.manual_seed(0)
    shapes = shapes_dataset()
    spec = ModelSpec(module=torchvision.models.resnet18(weights=None), class_names=list(shapes.class_names),
                     input_size=(size, size), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     name="resnet18-random")
    # resnet18's 1000 outputs as 5 shape classes: a linear head with 5 outputs (random weights too)
    spec.module.fc = torch.nn.Linear(spec.module.fc.in_features, len(shapes.class_names))
    data = shapes.subset(list(range(n))).for_model(spec.class_names, spec.input_size)
    return spec, data


def time_family(label: str, spec, data, device: str, repeats: int) -> float:
    checks = build_checks([dict(t) for t in FAMILY])
    with Subject(spec, device=device) as subject:
        subject.predict(data.images()[:2])  # warm-up
        print(f"\n{label}: {len(data)} images {data.image_size}, layers {', '.join(subject.layers)}, "
              f"device {subject.device}")
        total = 0.0
        for check in checks:
            name = check.name
            results = []
            seconds = best_of(repeats, lambda c=check, r=results: r.append(c.execute(subject, data)))
            status = results[-1].status
            extra = "" if status is not Status.ERROR else f"  ({results[-1].message[:120]})"
            total += seconds
            print(f"  {name:<30} {seconds:8.2f} s  {status.value}{extra}")
        print(f"  {'family total':<30} {total:8.2f} s")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the demo only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {args.repeats} (best of)")

    start = time.perf_counter()
    spec = demo_model()
    data = shapes_dataset().for_model(spec.class_names, spec.input_size)
    demo_total = time_family("demo", spec, data, args.device, args.repeats)
    print(f"  demo family target < 20 s: {'ok' if demo_total < 20 else 'EXCEEDED'}")
    if not args.quick:
        spec, data = resnet18_case()
        time_family("resnet18 (random weights)", spec, data, args.device, args.repeats)
    print(f"\nwall-clock of the whole benchmark: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
