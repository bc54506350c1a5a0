"""The whole default suite on one model: each check's time in plain inferences of the audit set, and peak memory.

    python benchmarks/suite.py [--model resnet50] [--images 64] [--size 224] [--device cpu] [--batch-size 64]
                               [--threads N] [--checks occlusion-drop,saliency-in-box] [--memory 2GB]
                               [--repeats 3] [--no-count] [--json PATH]

--model is a torchvision model name (resnet18, resnet50, ...; random weights, weights=None, nothing is
downloaded) or "demo" (auditkit's embedded demo CNN, at its own 64 px). The audit set is N images of
auditkit's synthetic shapes (auditkit.demo.shapes, one exact object box each) resized to --size; a
torchvision model keeps its 1000 outputs, named so that the five shape classes are its first five classes
and the labels fall in those. One Subject (device, --batch-size, --memory) serves every check, and each
check runs as the runner runs it (auditkit.runner.AuditSession.run): check.execute(subject, audit_set),
then its evidence saved (here into a temporary folder).

Figures:

- plain inference T: all N images through the Subject's chunked forward (Subject.predict_rows, so never
  answered from the results the Subject keeps for reuse), the fastest of --repeats runs (more, while they
  add up to under 2 s) after a warm-up, measured before and after the checks (the smaller is used: a
  shared machine's load varies); T / N is the time of one forward pass per image. The Subject's kept
  results are cleared before the first check, so the checks start as under the runner;
- per check: wall seconds (execute + evidence), status, and "fwd/img" = seconds / T, the number of plain
  inferences of the whole audit set the check cost (= forward passes per image at plain-inference speed);
  "cpu/wall" the process's CPU seconds per wall second (far below the thread count: the machine was
  busy); "rows/img" the images that went through Subject.forward per audit image (the model and its
  random-weight copies, truncated forwards included; --no-count turns this counting off), "grad" the
  share of them with autograd on, "rows/call" the images per forward call; "cache h/m" the kept results
  the check reused / computed (--memory sets the budget, as --audit-memory does);
- the suite's total seconds and its multiple of T;
- peak memory: on CPU the process's resident-set peak (getrusage ru_maxrss, reset before each measurement
  through /proc/self/clear_refs where the kernel allows it, else a high-water mark over the whole run),
  on CUDA torch.cuda.max_memory_allocated(); each above the same baseline (model, audit set and
  libraries loaded, one warm-up image run), for one plain forward of --batch-size images and for each
  check ("peak"; "rise" is the same peak above what the process held when the check began, which leaves
  out memory an earlier check left held); the suite's peak is the largest and its ratio to the forward's
  is reported.

Targets (the issue's; set for 224 px, 64 images, CPU): resnet50 suite <= 600 s and <= 150 forward passes
per image, resnet18 <= 120 forward passes per image, and for any model a suite peak <= 2x one plain forward
of the batch. Each is printed met / not met beside the measured figure; under other settings the time
targets are printed for reference only. Exit status 1 when a target that applies is not met. Progress
(which check is running) goes to stderr. Run by hand; not part of the test suite.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import resource
import sys
import tempfile
import time
from typing import Any

import torch

from timing import best_of

from auditkit.checks import Status, build_checks
from auditkit.checks.base import Check, jsonable
from auditkit.demo.shapes import CLASS_NAMES, shapes_audit_set
from auditkit.registry import CHECKS, DEFAULT_SUITE
from auditkit.spec import ModelSpec
from auditkit.subject import Subject

MIB = 2**20
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the targets: (model, images, px, device) they are set for
TARGET_SETTING = {"images": 64, "size": 224, "device": "cpu"}
SUITE_SECONDS = {"resnet50": 600.0}
FORWARDS_PER_IMAGE = {"resnet50": 150.0, "resnet18": 120.0}
MEMORY_RATIO = 2.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the model and the audit set ------------------------------------------------------


def build_case(model: str, images: int, size: int | None):
    """(ModelSpec, AuditSet as the model sees it) for `model` on `images` shapes images."""
    data = shapes_audit_set(n=images)
    if model in ("demo", "demo-shortcut"):
        from auditkit.demo import demo_model, demo_shortcut_model

        spec = demo_model() if model == "demo" else demo_shortcut_model()
    else:
        import torchvision

        if model not in torchvision.models.list_models(module=torchvision.models):
            raise SystemExit(f"unknown model {model!r}: expected demo or a torchvision classification model "
                             f"such as resnet18, resnet50")
        torch.manual_seed(0)
        module = torchvision.models.get_model(model, weights=None).eval()
        px = size or 224
        with torch.no_grad():
            classes = int(module(torch.zeros(1, 3, px, px)).shape[1])
        if classes < len(CLASS_NAMES):
            raise SystemExit(f"{model} has {classes} outputs, fewer than the {len(CLASS_NAMES)} shape classes")
        names = list(CLASS_NAMES) + [f"class-{k:04d}" for k in range(len(CLASS_NAMES), classes)]
        spec = ModelSpec(module=module, class_names=names, input_size=(px, px), mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, name=f"{model}-random", version="weights=None")
    return spec, data.for_model(spec.class_names, spec.input_size)


def select_checks(names: str | None) -> list[Check]:
    """The default suite's checks (with the suite's parameters), or those named in the comma list."""
    tables = [dict(t) for t in DEFAULT_SUITE]
    if not names:
        return build_checks(tables)
    by_kind = {t["kind"]: t for t in tables}
    chosen = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name in by_kind:
            chosen.append(dict(by_kind[name]))
        elif CHECKS.has(name):
            chosen.append({"kind": name})
        else:
            raise SystemExit(f"unknown check {name!r}; the default suite's: {', '.join(by_kind)}")
    return build_checks(chosen)


# -- memory -----------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (ru_maxrss, VmHWM) to the current RSS; False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block above a fixed baseline: host RSS always, CUDA allocated on a CUDA device."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.resettable = reset_peak_rss()
        self.rss_base = rss_bytes()
        self.cuda_base = torch.cuda.memory_allocated() if self.cuda else 0

    def start(self) -> None:
        if self.resettable:
            reset_peak_rss()
        self.rss_start = rss_bytes()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda_start = torch.cuda.memory_allocated()

    def stop(self) -> dict[str, int]:
        """Peaks above the baseline ("rss", "cuda") and above what was held at start() ("rss_rise", "cuda_rise")."""
        peak = peak_rss_bytes()
        out = {"rss": peak - self.rss_base, "rss_rise": peak - self.rss_start}
        if self.cuda:
            torch.cuda.synchronize()
            top = torch.cuda.max_memory_allocated()
            out["cuda"], out["cuda_rise"] = top - self.cuda_base, top - self.cuda_start
        return out


# -- counting the model's rows --------------------------------------------------------


class RowCounter:
    """Images that go through Subject.forward (all / with autograd on) and its calls, for every Subject of
    the run: the user's model and its copies (randomised, hook-free), truncated forwards (forward_to)
    included. It wraps Subject.forward on the class for the run (a counter and a call, nothing else), so
    no hook is added to the user's module."""

    def __init__(self) -> None:
        self.rows = self.grad_rows = self.calls = 0
        self._original = None

    def attach(self) -> "RowCounter":
        original = self._original = Subject.forward

        @functools.wraps(original)
        def forward(subject, pixels, *args, **kwargs):
            rows = int(pixels.shape[0]) if isinstance(pixels, torch.Tensor) and pixels.ndim else 0
            self.calls += 1
            self.rows += rows
            if torch.is_grad_enabled():
                self.grad_rows += rows
            return original(subject, pixels, *args, **kwargs)

        Subject.forward = forward
        return self

    def take(self) -> tuple[int, int, int]:
        out = (self.rows, self.grad_rows, self.calls)
        self.rows = self.grad_rows = self.calls = 0
        return out

    def detach(self) -> None:
        if self._original is not None:
            Subject.forward = self._original
            self._original = None


# -- the run ----------------------------------------------------------------------------


def open_subject(spec: ModelSpec, args: argparse.Namespace) -> Subject:
    """The one Subject of the run, opened, as the runner builds it (device, batch size, memory budget when
    this auditkit's Subject takes one)."""
    kwargs: dict[str, Any] = {}
    if args.memory is not None:
        if "memory" not in inspect.signature(Subject).parameters:
            raise SystemExit("--memory: this auditkit's Subject keeps no results (it takes no memory budget)")
        from auditkit.config import parse_memory

        try:
            kwargs["memory"] = parse_memory(args.memory, where="--memory")
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    return Subject(spec, device=args.device, batch_size=args.batch_size, **kwargs).open()


def plain_forward(subject: Subject, pixels: torch.Tensor) -> torch.Tensor:
    """Logits of `pixels` through the Subject's chunked forward (predict_rows), bypassing any kept result."""
    return subject.predict_rows(pixels.shape[0], lambda rows: pixels[rows])


def cache_counts(cache: Any) -> tuple[int, int, int] | None:
    """(hits, misses, bytes kept) of the Subject's result cache so far; None when it has none."""
    stats = getattr(cache, "stats", None)
    if stats is None:
        return None
    return int(stats.hits), int(stats.misses), int(stats.kept_bytes)


def fastest(repeats: int, fn, least_seconds: float = 2.0, most: int = 50) -> float:
    """timing.best_of, run at least `repeats` times and until `least_seconds` have passed (at most `most` runs),
    so that a short plain inference is not judged on three samples of a busy machine."""
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats or (spent < least_seconds and len(times) < most):
        times.append(best_of(1, fn))
        spent += times[-1]
    return min(times)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    checks = select_checks(args.checks)
    log(f"building {args.model} and {args.images} shapes images ...")
    spec, data = build_case(args.model, args.images, args.size)
    images = data.images()
    n = images.shape[0]
    batch = images.repeat((args.batch_size + n - 1) // n, 1, 1, 1)[: args.batch_size].contiguous()
    counter = RowCounter().attach() if args.count else None
    subject = open_subject(spec, args)
    device = subject.device
    cache = getattr(subject, "cache", None)  # results the Subject keeps for reuse across checks, if it does

    def plain(pixels: torch.Tensor) -> None:
        """The plain batched forward, in the Subject's chunks, never answered from its cache."""
        plain_forward(subject, pixels)
        sync(device)

    try:
        plain(images[:1])  # warm-up: kernels and libraries loaded before the memory baseline
        memory = PeakMemory(device)

        log(f"plain forward of one batch ({args.batch_size} images) for the memory baseline ...")
        memory.start()
        plain(batch)
        forward_peak = memory.stop()

        log(f"plain inference of the audit set ({n} images), fastest of {args.repeats}+ runs ...")
        plain(images)  # warm-up at full size
        plain_runs = [fastest(args.repeats, lambda: plain(images))]
        t_plain = plain_runs[0]
        if counter:
            counter.take()
        if cache is not None:  # the checks start as under the runner: a fresh Subject keeps nothing yet
            cache.clear()

        rows = []
        with tempfile.TemporaryDirectory(prefix="auditkit-suite-") as report_dir:
            for k, check in enumerate(checks, 1):
                log(f"[{k}/{len(checks)}] {check.name} ...")
                before = cache_counts(cache)
                memory.start()
                cpu_start = cpu_seconds()
                start = time.perf_counter()
                result = check.execute(subject, data)
                result.model = result.model or spec.name
                result.save_evidence(report_dir)
                sync(device)
                seconds = time.perf_counter() - start
                cpu = cpu_seconds() - cpu_start
                peak = memory.stop()
                counted = counter.take() if counter else None
                after = cache_counts(cache)
                row = {"check": check.name, "kind": check.kind, "status": result.status.value,
                       "seconds": seconds, "cpu_seconds": cpu,
                       "peak_rss": peak["rss"], "peak_cuda": peak.get("cuda"),
                       "rise_rss": peak["rss_rise"], "rise_cuda": peak.get("cuda_rise"),
                       "rows_per_image": counted[0] / n if counted else None,
                       "grad_share": (counted[1] / counted[0] if counted and counted[0] else None),
                       "rows_per_call": (counted[0] / counted[2] if counted and counted[2] else None),
                       "cache_hits": after[0] - before[0] if after else None,
                       "cache_misses": after[1] - before[1] if after else None,
                       "cache_kept_bytes": after[2] if after else None,
                       "message": result.message if result.status is Status.ERROR else "",
                       "summary": result.summary(),
                       "details": {k: v for k, v in jsonable(result.details).items()
                                   if isinstance(v, (int, float, str, bool)) or v is None}}
                rows.append(row)
                log(f"      {result.status.value} in {seconds:.1f} s = {seconds / t_plain:.1f} plain inferences"
                    + (f": {row['message'][:200]}" if row["message"] else ""))
        # once more at the end: the least disturbed plain inference of the two (a shared machine's load varies)
        log("plain inference of the audit set again ...")
        plain_runs.append(fastest(args.repeats, lambda: plain(images)))
        t_plain = min(plain_runs)
    finally:
        subject.close()
        if counter:
            counter.detach()

    for row in rows:
        row["forwards_per_image"] = row["seconds"] / t_plain
    total = sum(r["seconds"] for r in rows)
    key = "cuda" if device.type == "cuda" else "rss"
    suite_peak = max((r["peak_cuda"] if key == "cuda" else r["peak_rss"] for r in rows), default=0)
    return {
        "machine": {"platform": f"{platform.system()} {platform.machine()}", "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else ""},
        "setting": {"model": args.model, "spec": spec.name, "images": n, "size": list(spec.input_size),
                    "batch_size": args.batch_size, "final_batch_size": subject.batch_size,
                    "cache_budget": getattr(cache, "budget", None),
                    "classes": len(spec.class_names), "layers": list(subject.layers), "repeats": args.repeats,
                    "checks": [c.name for c in checks]},
        "plain": {"seconds": t_plain, "seconds_per_image": t_plain / n, "images_per_second": n / t_plain,
                  "before_and_after": plain_runs},
        "checks": rows,
        "suite": {"seconds": total, "cpu_seconds": sum(r["cpu_seconds"] for r in rows),
                  "forwards_per_image": total / t_plain},
        "memory": {"measure": "cuda max_memory_allocated" if key == "cuda" else
                   "process RSS peak (getrusage)" + ("" if memory.resettable else ", high-water mark of the run"),
                   "per_check_peaks": memory.resettable or key == "cuda",
                   "forward_batch_peak": forward_peak[key], "forward_batch_peak_rss": forward_peak["rss"],
                   "suite_peak": suite_peak, "ratio": suite_peak / forward_peak[key] if forward_peak[key] else None},
    }


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets with the measured figure, met or not, and whether they apply to this run."""
    s = res["setting"]
    model = s["model"]
    same = (s["images"] == TARGET_SETTING["images"] and s["size"] == [TARGET_SETTING["size"]] * 2
            and res["machine"]["device"] == TARGET_SETTING["device"])
    where = f"{TARGET_SETTING['images']} images, {TARGET_SETTING['size']} px, {TARGET_SETTING['device']}"
    out = []
    for name, limit in SUITE_SECONDS.items():
        out.append({"target": f"{name} suite seconds", "measured": res["suite"]["seconds"], "limit": limit,
                    "applies": same and model == name and _whole_suite(s),
                    "note": f"set for {name}, whole suite, {where}"})
    for name, limit in FORWARDS_PER_IMAGE.items():
        out.append({"target": f"{name} forward passes per image", "measured": res["suite"]["forwards_per_image"],
                    "limit": limit, "applies": same and model == name and _whole_suite(s),
                    "note": f"set for {name}, whole suite, {where}"})
    ratio = res["memory"]["ratio"]
    out.append({"target": "suite peak / one plain forward of the batch", "measured": ratio, "limit": MEMORY_RATIO,
                "applies": ratio is not None, "note": "any model"})
    for t in out:
        t["met"] = t["measured"] is not None and t["measured"] <= t["limit"]
    return out


def _whole_suite(setting: dict[str, Any]) -> bool:
    return setting["checks"] == [t.get("name", t["kind"]) for t in DEFAULT_SUITE]


def report(res: dict[str, Any]) -> None:
    m, s, p = res["machine"], res["setting"], res["plain"]
    print(f"auditkit suite benchmark: {s['model']} ({s['spec']}, {s['classes']} classes, layers "
          f"{', '.join(s['layers'])}), {s['images']} images {s['size'][0]}x{s['size'][1]} px, batch {s['batch_size']}"
          + (f" (shrunk to {s['final_batch_size']} on out-of-memory)" if s["final_batch_size"] != s["batch_size"]
             else ""))
    print(f"machine: {m['platform']}, {m['cpus']} CPUs, device {m['device']} {m['device_name']}".rstrip()
          + f", torch {m['torch']}, {m['threads']} threads, python {m['python']}")
    runs = " and ".join(f"{t:.3f}" for t in p["before_and_after"])
    print(f"plain inference of the audit set: {p['seconds']:.3f} s (fastest run, before and after the "
          f"checks: {runs} s) = {p['seconds_per_image'] * 1e3:.2f} ms per image per forward pass "
          f"({p['images_per_second']:.1f} images/s)")
    print()
    counted = any(r["rows_per_image"] is not None for r in res["checks"])
    cuda = any(r["peak_cuda"] is not None for r in res["checks"])
    head = f"{'check':<30} {'status':<12} {'seconds':>9} {'fwd/img':>9} {'share':>6} {'cpu/wall':>8} {'peak MiB':>9} {'rise MiB':>9}"
    head += f" {'cuda peak':>9} {'cuda rise':>9}" if cuda else ""
    head += f" {'rows/img':>9} {'grad':>5} {'rows/call':>9}" if counted else ""
    cached = any(r.get("cache_hits") is not None for r in res["checks"])
    head += f" {'cache h/m':>9}" if cached else ""
    print(head)
    print("-" * len(head))
    total = res["suite"]["seconds"] or 1.0
    for r in res["checks"]:
        line = (f"{r['check']:<30} {r['status']:<12} {r['seconds']:9.2f} {r['forwards_per_image']:9.1f} "
                f"{100 * r['seconds'] / total:5.1f}% {r['cpu_seconds'] / max(r['seconds'], 1e-9):8.2f} "
                f"{r['peak_rss'] / MIB:9.1f} {r['rise_rss'] / MIB:9.1f}")
        line += f" {r['peak_cuda'] / MIB:9.1f} {r['rise_cuda'] / MIB:9.1f}" if cuda else ""
        if counted:
            grad = "" if r["grad_share"] is None else f"{100 * r['grad_share']:4.0f}%"
            per_call = "" if r["rows_per_call"] is None else f"{r['rows_per_call']:9.1f}"
            line += f" {r['rows_per_image']:9.1f} {grad:>5} {per_call:>9}"
        if cached:
            line += f" {str(r['cache_hits']) + '/' + str(r['cache_misses']):>9}"
        print(line)
    print("-" * len(head))
    su = res["suite"]
    print(f"{'suite total':<30} {'':<12} {su['seconds']:9.2f} {su['forwards_per_image']:9.1f} {'100.0%':>6} "
          f"{su['cpu_seconds'] / max(su['seconds'], 1e-9):8.2f}")
    errors = [r for r in res["checks"] if r["status"] == Status.ERROR.value]
    for r in errors:
        print(f"  ERROR {r['check']}: {r['message'][:300]}")
    print("fwd/img = check seconds / plain inference of the audit set; share = of the suite's seconds; cpu/wall = "
          "process CPU seconds per wall second;\npeak = RSS peak above the baseline (the loaded model and audit set), "
          "rise = above what the process held when the check began (memory an earlier check left held is in peak, "
          "not in rise); MiB")
    busy = su["cpu_seconds"] / max(su["seconds"], 1e-9)
    if m["device"] == "cpu" and busy < 0.75 * m["threads"]:
        print(f"note: cpu/wall {busy:.2f} with {m['threads']} threads: the process did not get its cores (a busy "
              f"machine), so the seconds are inflated and fwd/img is noisy")
    if counted:
        print("rows/img = images through Subject.forward per audit image (random-weight copies and truncated "
              "forwards included), grad = share of them with autograd on, rows/call = images per forward call")
    if cached:
        kept = res["checks"][-1]["cache_kept_bytes"] if res["checks"] else 0
        print(f"cache h/m = the Subject's kept results reused / computed during the check; kept at the end "
              f"{kept / MIB:.1f} MiB of a budget of {(s['cache_budget'] or 0) / MIB:.0f} MiB (counted in the peaks)")
    mem = res["memory"]
    key_label = "CUDA allocated" if cuda else "RSS"
    print()
    print(f"peak memory ({mem['measure']}), above the loaded model and audit set:")
    print(f"  one plain forward of {s['batch_size']} images: {mem['forward_batch_peak'] / MIB:9.1f} MiB {key_label}")
    ratio = mem["ratio"]
    print(f"  suite (largest check):          {mem['suite_peak'] / MIB:9.1f} MiB {key_label}"
          + (f" = {ratio:.2f}x the forward" if ratio is not None else ""))
    if not mem["per_check_peaks"]:
        print("  (the kernel refused to reset the RSS peak: per-check peaks are the run's high-water mark so far)")
    print()
    print("targets:")
    for t in res["targets"]:
        measured = "n/a" if t["measured"] is None else f"{t['measured']:.2f}"
        verdict = "met" if t["met"] else "NOT MET"
        scope = "" if t["applies"] else f"  (reference only: {t['note']})"
        print(f"  {t['target']:<46} {measured:>9} <= {t['limit']:<7g} {verdict}{scope}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision model name (random weights) or demo")
    parser.add_argument("--images", type=int, default=64, help="audit images (synthetic shapes with boxes)")
    parser.add_argument("--size", type=int, default=None, help="input px of a torchvision model (default 224); "
                        "the demo keeps its own 64 px")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--batch-size", type=int, default=64, help="the Subject's batch size (the runner's default 64)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--memory", default=None, help="the Subject's budget for results kept across checks, as "
                        "--audit-memory (2GB, 0 for none; default: the Subject's own default)")
    parser.add_argument("--checks", default=None, help="comma list of checks (default: the whole default suite)")
    parser.add_argument("--repeats", type=int, default=3, help="plain inference runs (best of; more, up to 50, "
                        "until 2 s have passed)")
    parser.add_argument("--no-count", dest="count", action="store_false",
                        help="do not count the images through Subject.forward (no wrapper around it)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.images < 1 or args.batch_size < 1 or args.repeats < 1:
        parser.error("--images, --batch-size and --repeats must be >= 1")
    if args.model in ("demo", "demo-shortcut") and args.size:
        log(f"--size {args.size} ignored: the demo model sees 64 px")

    res = run(args)
    res["targets"] = targets(res)
    report(res)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(jsonable(res), handle, indent=2)
        print(f"\nfigures written to {args.json}")
    sys.exit(1 if any(t["applies"] and not t["met"] for t in res["targets"]) else 0)


if __name__ == "__main__":
    main()
