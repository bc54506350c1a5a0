"""Named factories for models, audit sets and checks.

A name resolves, in order, to: a factory registered with a decorator, an
entry point in the group auditkit.models / auditkit.datasets /
auditkit.checks, auditkit's own built-ins, or a "package.module:callable"
string. This module imports no torch: the pytest plugin uses it at start-up.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class UnknownNameError(LookupError):
    """A model, audit set or check name that nothing registered; the message lists the known ones."""


@dataclass
class Registry:
    """One namespace of named factories (models, datasets or checks)."""

    what: str  # "model", "dataset", "check"
    group: str  # entry-point group
    builtins: dict[str, str] = field(default_factory=dict)
    factories: dict[str, Any] = field(default_factory=dict)

    def register(self, name: str, factory: Any = None) -> Any:
        """Register `factory` under `name`; without a factory, return a decorator."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a {self.what} name must be a non-empty string, got {name!r}")

        def decorator(obj: F) -> F:
            self.factories[name] = obj
            return obj

        return decorator if factory is None else decorator(factory)

    def entry_points(self) -> dict[str, metadata.EntryPoint]:
        return {ep.name: ep for ep in metadata.entry_points(group=self.group)}

    def names(self) -> list[str]:
        """Every name this registry can resolve without a "module:callable" string."""
        return sorted(set(self.factories) | set(self.entry_points()) | set(self.builtins))

    def has(self, name: str) -> bool:
        return name in self.factories or name in self.builtins or name in self.entry_points() or _is_target(name)

    def resolve(self, name: str) -> Any:
        """The registered object (factory function or Check class) for `name`."""
        if name in self.factories:
            return self.factories[name]
        eps = self.entry_points()
        if name in eps:
            return eps[name].load()
        if name in self.builtins:
            return load_target(self.builtins[name], self.what)
        if _is_target(name):
            return load_target(name, self.what)
        raise UnknownNameError(self.unknown_message(name))

    def check_importable(self, name: str) -> None:
        """Import a "package.module:callable" name now, so a bad one is one usage error, not one per check.

        Raises UnknownNameError with the import error; registered names are left to build time.
        """
        if name not in self.factories and name not in self.builtins and _is_target(name) and name not in self.entry_points():
            self.resolve(name)

    def unknown_message(self, name: str) -> str:
        known = ", ".join(self.names()) or "(none)"
        return (
            f"unknown {self.what} {name!r}; registered {self.what}s: {known}. "
            f"Register one with auditkit.register_{self.what}({name!r}), an entry point in the group "
            f"{self.group!r}, or name it as 'package.module:callable'."
        )


def _is_target(name: str) -> bool:
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr)


def load_target(target: str, what: str = "object") -> Any:
    """Import "package.module:callable" (attr may be dotted)."""
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure while importing the user's module
        raise UnknownNameError(
            f"{what} {target!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UnknownNameError(f"{what} {target!r}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


MODELS = Registry("model", "auditkit.models", {
    "demo": "auditkit.demo:demo_model",
    "demo-shortcut": "auditkit.demo:demo_shortcut_model",
})
DATASETS = Registry("dataset", "auditkit.datasets", {
    "shapes": "auditkit.demo:shapes_dataset",
})
CHECKS = Registry("check", "auditkit.checks", {
    "occlusion-drop": "auditkit.checks.occlusion:OcclusionDrop",
    "saliency-in-box": "auditkit.checks.saliency:SaliencyInBox",
    "saliency-sanity": "auditkit.checks.sanity:SaliencySanity",
    "deletion-insertion": "auditkit.checks.deletion:DeletionInsertion",
    "invariance-grows-with-depth": "auditkit.checks.representation:InvarianceGrowsWithDepth",
    "dead-units": "auditkit.checks.representation:DeadUnits",
    "inversion-converges": "auditkit.checks.inversion:InversionConverges",
    "feature-neighbours": "auditkit.checks.embedding:FeatureNeighbours",
    "class-separation": "auditkit.checks.embedding:ClassSeparation",
    "class-visualisation": "auditkit.checks.synthesis:ClassVisualisation",
    "texture-synthesis-converges": "auditkit.checks.synthesis:TextureSynthesisConverges",
    "max-activating-patches": "auditkit.checks.patches:MaxActivatingPatches",
})

# The suite that runs when the configuration declares no checks.
DEFAULT_SUITE: tuple[dict[str, Any], ...] = (
    {"kind": "occlusion-drop"},
    {"kind": "saliency-in-box"},
    {"kind": "saliency-sanity"},
    {"kind": "deletion-insertion"},
    # translation is judged (convolution and pooling build it in); rotation and scale are measured and shown,
    # not judged: they are learned from the training data, and random weights pass scale (README)
    {"kind": "invariance-grows-with-depth", "compare": ["rotate", "scale"]},
    {"kind": "dead-units"},
    {"kind": "feature-neighbours"},
    {"kind": "class-separation"},
    {"kind": "max-activating-patches"},
    {"kind": "inversion-converges"},
    {"kind": "class-visualisation"},
    {"kind": "texture-synthesis-converges"},
)


def register_model(name: str, factory: Callable[[], Any] | None = None) -> Any:
    """Register a factory returning an auditkit.ModelSpec; usable as @register_model("name")."""
    return MODELS.register(name, factory)


def register_dataset(name: str, factory: Callable[[], Any] | None = None) -> Any:
    """Register a factory returning an auditkit.AuditSet; usable as @register_dataset("name")."""
    return DATASETS.register(name, factory)


def register_check(kind: str, check_class: Any = None) -> Any:
    """Register a Check subclass under `kind`; usable as @register_check("kind") on the class.

    The class's `kind` attribute is set to the registered name.
    """

    def decorator(cls: Any) -> Any:
        cls.kind = kind
        return CHECKS.register(kind, cls)

    return decorator if check_class is None else decorator(check_class)
