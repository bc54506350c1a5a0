"""The demo: two small CNNs trained on synthetic shapes, and the "shapes" audit set.

- ``demo_model()``: classifies by the shape itself (it was trained with a
  corner marker of random colour, so it learned to ignore the marker).
- ``demo_shortcut_model()``: classifies by the corner marker only (it was
  trained on shapes unrelated to the label) - the model an audit should fail.
- ``shapes_dataset()``: 60 images whose class is given away both by the
  shape and by the corner marker, as a watermark gives classes away in real data.

The weights ship in ``auditkit/demo/weights/``; ``python -m auditkit.demo.train``
regenerates them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from auditkit.data import AuditSet
from auditkit.demo.model import DEMO_MEAN, DEMO_STD, LAYERS, ShapesCNN
from auditkit.demo.shapes import CLASS_NAMES, shapes_audit_set
from auditkit.spec import ModelSpec

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

__all__ = ["demo_model", "demo_shortcut_model", "shapes_dataset", "load_weights", "WEIGHTS_DIR"]


def load_weights(module: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load the state_dict at `path` into `module` (CPU, weights_only=True); returns `module` in eval mode.

    A missing file is a FileNotFoundError naming the path and the command
    that regenerates the demo weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"demo weights not found: {path}; regenerate them with `python -m auditkit.demo.train`"
        )
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return module.eval()


def _spec(name: str) -> ModelSpec:
    module = load_weights(ShapesCNN(len(CLASS_NAMES)), WEIGHTS_DIR / f"{name}.pt")
    return ModelSpec(
        module=module,
        class_names=CLASS_NAMES,
        input_size=(64, 64),
        mean=DEMO_MEAN,
        std=DEMO_STD,
        layers=LAYERS,
        name=name,
        version="1.0",
        dataset="shapes",
    )


def demo_model() -> ModelSpec:
    """The ``demo`` model (reads the shapes), with its trained weights, in eval mode."""
    return _spec("demo")


def demo_shortcut_model() -> ModelSpec:
    """The ``demo-shortcut`` model (reads only the corner marker), with its trained weights, in eval mode."""
    return _spec("demo-shortcut")


def shapes_dataset() -> AuditSet:
    """The "shapes" audit set: ``shapes_audit_set()`` (60 images, seed 2014)."""
    return shapes_audit_set()
