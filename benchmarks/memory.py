"""Peak memory of a layer sweep against one plain forward of the same batch.

    python benchmarks/memory.py [--models demo resnet18] [--batch 32] [--device cpu] [--repeats 3]

The sweep is `layer_features(subject, batch, subject.layers)`: the flattened
outputs of every named layer for the whole batch (the demo's four stages;
resnet18's conv1, layer1..layer4, random weights, 224 px). The plain forward
is `subject.predict(batch)`. Both run with batch_size = the batch, so each is
one forward of the whole batch. Target: sweep / forward <= 2.0. The "/4"
rows run the sweep in 4 chunks (batch_size = batch / 4).

How peak memory is measured:

- CPU: every measurement runs in a fresh Python subprocess, so no allocator
  cache or earlier peak carries over. The child imports torch, builds the
  model and the batch, and runs a warm-up forward of one image (loads the
  kernels and their libraries). Then it reads its resident set size R0
  (/proc/self/statm), runs the measured operation once, and reads the peak
  resident set size R1 (getrusage(RUSAGE_SELF).ru_maxrss, the kernel's
  high-water mark). The operation's peak is R1 - R0: the extra memory it
  needed on top of the model, the batch and the libraries. The median over
  `--repeats` subprocesses is reported.
- CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before the
  operation, after reset_peak_memory_stats(); the host RSS delta is reported
  too, since the sweep keeps its features on the CPU.

"old sweep" re-runs the previous implementation (Subject.capture, every
chunk's outputs kept, then torch.cat) for comparison. Run by hand; not part
of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

MODES = ("forward", "sweep", "old-sweep", "sweep/4", "old-sweep/4")  # "/4": batch_size = batch / 4 (4 chunks)


# -- the child: one measurement in a fresh process -------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _build(model: str, batch: int):
    import torch

    from auditkit import ModelSpec
    from auditkit.demo import demo_model, shapes_dataset

    if model == "demo":
        spec = demo_model()
        data = shapes_dataset().for_model(spec.class_names, spec.input_size)
    elif model == "resnet18":
        import torchvision

        torch.manual_seed(0)
        spec = ModelSpec(module=torchvision.models.resnet18(weights=None).eval(),
                         class_names=[f"c{i}" for i in range(1000)], input_size=(224, 224),
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), name="resnet18")
        data = shapes_dataset().resized((224, 224))
    else:
        raise SystemExit(f"unknown model {model!r}; expected demo or resnet18")
    images = data.images()
    reps = (batch + images.shape[0] - 1) // images.shape[0]
    return spec, images.repeat(reps, 1, 1, 1)[:batch].contiguous()


def _old_sweep(subject, images, layers):
    """The implementation before this change: capture every chunk's outputs, then torch.cat."""
    import torch

    parts = {name: [] for name in layers}
    for start in range(0, images.shape[0], subject.batch_size):
        with torch.no_grad(), subject.capture(layers) as acts:
            subject.forward(images[start : start + subject.batch_size])
            out = {name: acts[name].float().cpu() for name in layers}
            acts.clear()
        for name, value in out.items():
            parts[name].append(value.flatten(1))
    return {name: torch.cat(values) for name, values in parts.items()}


def child(model: str, mode: str, batch: int, device: str) -> dict:
    import torch

    from auditkit.methods.features import layer_features
    from auditkit.subject import Subject

    spec, images = _build(model, batch)
    with Subject(spec, device=device, batch_size=max(1, batch // 4) if mode.endswith("/4") else batch) as subject:
        subject.predict(images[:1])  # warm-up: kernels and libraries loaded before R0
        cuda = subject.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_before = torch.cuda.memory_allocated()
        rss_before = _rss_bytes()
        if mode == "forward":
            kept = subject.predict(images)
        elif mode.startswith("sweep"):
            kept = layer_features(subject, images, subject.layers)
        else:
            kept = _old_sweep(subject, images, subject.layers)
        out = {"rss_delta": _peak_rss_bytes() - rss_before,
               "kept": sum(t.numel() * t.element_size() for t in (kept.values() if isinstance(kept, dict) else [kept])),
               "layers": list(subject.layers)}
        if cuda:
            torch.cuda.synchronize()
            out["cuda_delta"] = torch.cuda.max_memory_allocated() - cuda_before
    return out


# -- the parent: run the children and print the table ----------------------------------


def measure(model: str, mode: str, batch: int, device: str, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, __file__, "--child", model, mode, "--batch", str(batch),
                               "--device", device], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"child {model} {mode} failed:\n{proc.stderr}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    result = dict(runs[0])
    for key in ("rss_delta", "cuda_delta"):
        if key in result:
            result[key] = statistics.median(r[key] for r in runs)
            result[key + "_all"] = [r[key] for r in runs]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo", "resnet18"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per measurement (median)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.batch, args.device)))
        return

    import torch

    mib = 1 / 2**20
    print(f"torch {torch.__version__}, device {args.device}, batch {args.batch}, median of {args.repeats} fresh "
          f"subprocesses; peak = ru_maxrss after the operation - RSS before it")
    failed = False
    for model in args.models:
        res = {mode: measure(model, mode, args.batch, args.device, args.repeats) for mode in MODES}
        print(f"\n{model}: layers {', '.join(res['sweep']['layers'])}")
        print(f"  {'operation':<10} {'peak MiB':>9} {'(runs)':<24} {'kept MiB':>9} {'x forward':>9}")
        base = res["forward"]["rss_delta"]
        for mode in MODES:
            r = res[mode]
            runs = ", ".join(f"{v * mib:.0f}" for v in r["rss_delta_all"])
            print(f"  {mode:<10} {r['rss_delta'] * mib:9.1f} ({runs:<22}) {r['kept'] * mib:9.1f} "
                  f"{r['rss_delta'] / base:9.2f}")
            if "cuda_delta" in r:
                print(f"  {'':<10} CUDA peak {r['cuda_delta'] * mib:.1f} MiB "
                      f"(x{r['cuda_delta'] / res['forward']['cuda_delta']:.2f} forward)")
        ratio = res["sweep"]["rss_delta"] / base
        ok = ratio <= 2.0
        failed |= not ok
        print(f"  sweep / forward = {ratio:.2f} (target <= 2.0: {'ok' if ok else 'EXCEEDED'})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
