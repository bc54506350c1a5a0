"""Time the synthesis family (inversion-converges, class-visualisation, texture-synthesis-converges).

    python benchmarks/synthesis.py [--model demo] [--device cpu] [--whole-set-steps 10] [--evidence DIR]

Runs each check once with its default parameters on the model's audit set and prints its seconds, status
and headline numbers, then the family total (the target on the demo: under 60 s on an idle 2-core CPU).
Then it inverts every layer for the WHOLE audit set at once (one batch of layers x images per step,
trained model only) for --whole-set-steps steps, and prints seconds per step against the default
sample count. Run by hand; not part of the test suite.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from auditkit.checks.inversion import InversionConverges, class_round_robin
from auditkit.checks.synthesis import ClassVisualisation, TextureSynthesisConverges
from auditkit.methods.inversion import invert_layers
from auditkit.registry import DATASETS, MODELS
from auditkit.subject import Subject


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dataset", default=None, help="default: the model's own audit set")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--whole-set-steps", type=int, default=10, help="0 skips the whole-set timing")
    parser.add_argument("--evidence", default=None, help="write each check's evidence files here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = MODELS.resolve(args.model)()
    data = DATASETS.resolve(args.dataset or spec.dataset)().for_model(spec.class_names, spec.input_size)
    checks = [InversionConverges(), ClassVisualisation(), TextureSynthesisConverges()]
    print(f"model {spec.name}, {len(data)} images, device {args.device}, {torch.get_num_threads()} threads")
    total = 0.0
    with Subject(spec, device=args.device) as subject:
        for check in checks:
            result = check.execute(subject, data)
            total += result.duration_s
            print(f"{check.kind:30s} {result.duration_s:7.1f} s  {result.summary()}")
            for row in result.rows:
                print("    " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in row.items() if k != "reason"))
            if args.evidence:
                result.model = spec.name
                result.save_evidence(Path(args.evidence))
        print(f"{'family total':30s} {total:7.1f} s")

        if args.whole_set_steps:
            images = data.images()
            default = data.subset(class_round_robin(data.labels(), InversionConverges.samples)).images()
            for name, batch in (("default samples", default), ("whole audit set", images)):
                start = time.perf_counter()
                invert_layers(subject, batch, subject.layers, steps=args.whole_set_steps)
                seconds = time.perf_counter() - start
                print(f"invert all {len(subject.layers)} layers, {name} ({batch.shape[0]} images = "
                      f"{batch.shape[0] * len(subject.layers)} per batch): {seconds:.1f} s for "
                      f"{args.whole_set_steps} steps, {seconds / args.whole_set_steps:.3f} s/step")


if __name__ == "__main__":
    main()
