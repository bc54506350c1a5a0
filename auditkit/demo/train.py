"""Train the demo models on synthetic shapes, reproducibly, on the CPU.

    python -m auditkit.demo.train [--out DIR] [--which demo|demo-shortcut|both] [--epochs N] [--seed S]

- ``demo`` learns the shapes: trained on shape_mode="label" with a random
  corner marker (so the marker carries no information). Augmentation:
  random flips, and flat grey patches - in about half the images one away
  from the object (a grey area is no shape), in 1 of 10 one over the object
  with a uniform target (no shape, no class evidence).
- ``demo-shortcut`` learns the marker only: trained on shape_mode="random"
  with marker="class" (the drawn shape is independent of the label).

Prints per-epoch loss and training accuracy, then each model's accuracy on
the "shapes" audit set and on a held-out random-marker set (high only for a
model that reads the shapes). Saves the state_dicts as ``<out>/demo.pt`` and
``<out>/demo-shortcut.pt`` (default: auditkit/demo/weights/).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from auditkit.data import Box
from auditkit.demo import WEIGHTS_DIR
from auditkit.demo.model import DEMO_MEAN, DEMO_STD, ShapesCNN
from auditkit.demo.shapes import CLASS_NAMES, MarkerMode, ShapeMode, generate, shapes_audit_set

HELDOUT_SEED = 999  # random-marker evaluation set; differs from every training seed and the audit seed 2014
HELDOUT_SIZE = 1000
_BATCH = 64


@dataclass(frozen=True)
class Recipe:
    """How one demo model is trained."""

    marker: MarkerMode
    shape_mode: ShapeMode
    n_train: int
    epochs: int
    seed_offset: int  # training data seed = 1000 * (seed + 1) + seed_offset
    augment: bool  # random flips and grey patches (the shortcut model must keep its marker in place)


RECIPES: dict[str, Recipe] = {
    "demo": Recipe(marker="random", shape_mode="label", n_train=12000, epochs=10, seed_offset=1, augment=True),
    "demo-shortcut": Recipe(marker="class", shape_mode="random", n_train=6000, epochs=3, seed_offset=2, augment=False),
}


def normalise(images: torch.Tensor) -> torch.Tensor:
    """(images - DEMO_MEAN) / DEMO_STD, channel-wise, for N x 3 x H x W pixels in [0, 1]."""
    mean = torch.tensor(DEMO_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DEMO_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def _grey_patches(
    images: torch.Tensor, boxes: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat 0.5-grey rectangles, as an occlusion test leaves them: (images, covered).

    About half the images get one rectangle (8-36 px a side) clear of the
    object box, so a grey area alone is no shape; about 1 in 10 has its object
    box (plus 0-3 px margin) covered instead, and `covered` marks these: with
    the shape gone they carry no class evidence and are trained towards a
    uniform prediction. boxes: N x 4 integer (x0, y0, x1, y1).
    """
    out = images.clone()
    n, _, h, w = images.shape
    roll = torch.rand(n, generator=gen)
    covered = roll < 0.1
    sizes = torch.randint(8, 37, (n, 2), generator=gen)
    margins = torch.randint(0, 4, (n, 4), generator=gen)
    for i in range(n):
        bx0, by0, bx1, by1 = boxes[i].tolist()
        if covered[i]:
            m = margins[i].tolist()
            out[i, :, max(0, by0 - m[1]):by1 + m[3], max(0, bx0 - m[0]):bx1 + m[2]] = 0.5
        elif roll[i] < 0.6:
            pw, ph = sizes[i].tolist()
            for _ in range(10):  # a few tries to find room away from the object
                x0 = int(torch.randint(0, w - pw + 1, (1,), generator=gen))
                y0 = int(torch.randint(0, h - ph + 1, (1,), generator=gen))
                if x0 >= bx1 or x0 + pw <= bx0 or y0 >= by1 or y0 + ph <= by0:
                    out[i, :, y0:y0 + ph, x0:x0 + pw] = 0.5
                    break
    return out, covered


def _flip(images: torch.Tensor, boxes: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal and vertical flips (each with p=0.5), boxes flipped along."""
    images, boxes = images.clone(), boxes.clone()
    _, _, h, w = images.shape
    for dim, size, (a, b) in ((3, w, (0, 2)), (2, h, (1, 3))):
        sel = torch.rand(images.shape[0], generator=gen) < 0.5
        images[sel] = images[sel].flip(dim)
        lo, hi = boxes[sel, a].clone(), boxes[sel, b].clone()
        boxes[sel, a], boxes[sel, b] = size - hi, size - lo
    return images, boxes


def _box_tensor(boxes: list[Box]) -> torch.Tensor:
    return torch.tensor([b.as_tuple() for b in boxes], dtype=torch.long)


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of `model` (in eval mode) on pixel images in [0, 1]."""
    model.eval()
    preds = torch.cat([model(normalise(x)).argmax(1) for x in images.split(500)])
    return float((preds == labels).float().mean())


def train_one(name: str, *, seed: int = 0, epochs: int | None = None) -> torch.nn.Module:
    """Train the demo model `name` (a key of RECIPES) from scratch; returns it in eval mode."""
    recipe = RECIPES[name]
    epochs = recipe.epochs if epochs is None else epochs
    start = time.perf_counter()
    images, labels, boxes = generate(
        recipe.n_train, 1000 * (seed + 1) + recipe.seed_offset, marker=recipe.marker, shape_mode=recipe.shape_mode
    )
    box_t = _box_tensor(boxes)
    print(f"[{name}] generated {len(labels)} training images in {time.perf_counter() - start:.1f} s", flush=True)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ShapesCNN(len(CLASS_NAMES)).to(memory_format=torch.channels_last)  # faster convs on CPU
    steps = epochs * ((len(labels) + _BATCH - 1) // _BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.2)
    for epoch in range(1, epochs + 1):
        model.train()
        total_loss, correct, counted = 0.0, 0, 0
        for idx in torch.randperm(len(labels), generator=gen).split(_BATCH):
            x, y = images[idx], labels[idx]
            target = F.one_hot(y, len(CLASS_NAMES)).float()
            covered = torch.zeros(len(y), dtype=torch.bool)
            if recipe.augment:
                x, b = _flip(x, box_t[idx], gen)
                x, covered = _grey_patches(x, b, gen)
                target[covered] = 1.0 / len(CLASS_NAMES)
            logits = model(normalise(x).contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == y)[~covered].sum())
            counted += int((~covered).sum())
        print(
            f"[{name}] epoch {epoch}/{epochs}: loss {total_loss / len(labels):.4f}, "
            f"train acc {correct / counted:.3f}, {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    return model.to(memory_format=torch.contiguous_format).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m auditkit.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder for the .pt files (default: %(default)s)")
    parser.add_argument("--which", choices=("demo", "demo-shortcut", "both"), default="both")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's number of epochs")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and training data")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    names = list(RECIPES) if args.which == "both" else [args.which]
    audit = shapes_audit_set()
    audit_x, audit_y = audit.images(), audit.labels()
    held_x, held_y, _ = generate(HELDOUT_SIZE, HELDOUT_SEED, marker="random", shape_mode="label")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        start = time.perf_counter()
        model = train_one(name, seed=args.seed, epochs=args.epochs)
        seconds = time.perf_counter() - start
        path = args.out / f"{name}.pt"
        torch.save(model.state_dict(), path)
        results.append((name, seconds, accuracy(model, audit_x, audit_y), accuracy(model, held_x, held_y), path))
    for name, seconds, acc_audit, acc_held, path in results:
        print(
            f"{name}: trained in {seconds:.0f} s; accuracy on the audit set {acc_audit:.3f}, "
            f"on the random-marker set {acc_held:.3f}; saved {path} ({path.stat().st_size / 1024:.0f} KiB)"
        )


if __name__ == "__main__":
    main()
