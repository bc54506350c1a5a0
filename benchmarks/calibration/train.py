"""Training of the calibration models on the CPU, with a weights cache.

Weights come from, in order: benchmarks/calibration/weights/<name>.pt (shipped, float16: the trained models of
the fast subset, and good-vit-64), the local cache benchmarks/calibration/.cache/<name>-<key>.pt (ignored by
git; the key hashes the entry's recipe, so a changed recipe retrains), else training now. Random-weight
entries are seeded initialisations and never stored.

Recipe: AdamW (weight decay 1e-4), one-cycle learning rate, batch 64, cross-entropy on `n_train` images of
the entry's training task (seed 1000 + entry seed; the audit sets use seed 2014, held-out checks 999),
random horizontal and vertical flips for shortcut-free tasks only (a flip would move the watermark and turn
the stripes). No occlusion augmentation: the good models are not trained to the test.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.calibration import models as M
from benchmarks.calibration.expected import BY_NAME, Entry
from benchmarks.calibration.tasks import CLASSES, TaskSpec, generate

HERE = Path(__file__).resolve().parent
SHIPPED = HERE / "weights"
CACHE = HERE / ".cache"
TRAIN_SEED = 1000
HELDOUT_SEED = 999
_BATCH = 32


def recipe_key(entry: Entry) -> str:
    fields = {k: getattr(entry, k) for k in ("arch", "size", "train_task", "random", "kill", "n_train", "epochs",
                                            "lr", "seed")}
    if M.ARCH_VERSION.get(entry.arch, 1) != 1:  # version 1 keys predate the field
        fields["arch_version"] = M.ARCH_VERSION[entry.arch]
    return hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:10]


def fresh(entry: Entry) -> torch.nn.Module:
    """The entry's architecture, initialised from its seed (and its dead channels, if any)."""
    torch.manual_seed(entry.seed)
    model = M.build(entry.arch, len(CLASSES), entry.size)
    for stage, share in entry.kill:
        model.kill_channels(stage, share, seed=entry.seed)
    return model


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(M.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(M.STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def accuracy(model: torch.nn.Module, task: TaskSpec, n: int = 400, seed: int = HELDOUT_SEED) -> float:
    """Top-1 accuracy on `n` fresh images of `task`."""
    x, y, _ = generate(task, n, seed)
    model.eval()
    pred = torch.cat([model(_normalise(c)).argmax(1) for c in x.split(200)])
    return float((pred == y).float().mean())


def train(entry: Entry, log=print) -> torch.nn.Module:
    """Train the entry's model from scratch; returns it in eval mode."""
    assert entry.train_task is not None
    start = time.perf_counter()
    task = entry.train_task.training()
    x_all, y_all, _ = generate(task, entry.n_train, TRAIN_SEED + entry.seed)
    log(f"  [{entry.name}] {entry.n_train} training images ({task.describe()}, shapes "
        f"{'random' if task.shape == 'random' else 'by label'}) in {time.perf_counter() - start:.0f} s")
    model = fresh(entry).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(entry.seed)
    steps = entry.epochs * ((entry.n_train + _BATCH - 1) // _BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=entry.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=entry.lr, total_steps=steps, pct_start=0.2)
    flips = task.shortcut == "none"
    for epoch in range(1, entry.epochs + 1):
        model.train()
        total, correct = 0.0, 0
        for idx in torch.randperm(entry.n_train, generator=gen).split(_BATCH):
            x, y = x_all[idx], y_all[idx]
            if flips:
                for dim in (2, 3):
                    sel = torch.rand(len(y), generator=gen) < 0.5
                    x[sel] = x[sel].flip(dim)
            logits = model(_normalise(x).contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
        log(f"  [{entry.name}] epoch {epoch}/{entry.epochs}: loss {total / entry.n_train:.3f}, train acc "
            f"{correct / entry.n_train:.3f}, {time.perf_counter() - start:.0f} s")
    return model.to(memory_format=torch.contiguous_format).eval()


def load(entry: Entry, log=print, retrain: bool = False) -> tuple[torch.nn.Module, dict]:
    """The entry's model in eval mode, and where it came from (source, seconds, held-out accuracies)."""
    owner = BY_NAME[entry.weights_of]
    info: dict = {"weights": owner.name}
    if owner.random:
        info["source"] = f"random initialisation (seed {owner.seed})"
        model = fresh(owner).eval()
    else:
        shipped = SHIPPED / f"{owner.name}.pt"
        cached = CACHE / f"{owner.name}-{recipe_key(owner)}.pt"
        model = fresh(owner)
        if shipped.is_file() and not retrain:
            state = torch.load(shipped, map_location="cpu", weights_only=True)
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
            info["source"] = f"shipped {shipped.relative_to(HERE)} ({shipped.stat().st_size / 1024:.0f} KiB, float16)"
        elif cached.is_file() and not retrain:
            model.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
            info["source"] = f"cached {cached.relative_to(HERE)}"
        else:
            start = time.perf_counter()
            model = train(owner, log)
            info["train_s"] = round(time.perf_counter() - start, 1)
            CACHE.mkdir(exist_ok=True)
            torch.save(model.state_dict(), cached)
            info["source"] = f"trained now in {info['train_s']:.0f} s, cached {cached.relative_to(HERE)}"
        model.eval()
    if entry.audit_task is not None:
        info["accuracy_audit_distribution"] = accuracy(model, entry.audit_task)
        if entry.audit_task.shortcut != "none":
            clean = dataclasses.replace(entry.audit_task, shortcut="none")
            info["accuracy_without_shortcut"] = accuracy(model, clean)
    return model, info


def ship(name: str) -> Path:
    """Write the entry's trained weights (float16) to weights/<name>.pt (the fast subset, good-vit-64)."""
    entry = BY_NAME[name]
    cached = CACHE / f"{entry.name}-{recipe_key(entry)}.pt"
    model = fresh(entry)
    if cached.is_file():
        model.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
    else:
        model = train(entry)
        CACHE.mkdir(exist_ok=True)
        torch.save(model.state_dict(), cached)
    SHIPPED.mkdir(exist_ok=True)
    path = SHIPPED / f"{name}.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    return path
