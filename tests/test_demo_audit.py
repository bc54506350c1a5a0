"""The embedded demo does what the README promises: demo passes the audit, demo-shortcut fails it."""
import pytest

from auditkit.checks import build_checks
from auditkit.checks.base import Status
from auditkit.demo import demo_model, demo_shortcut_model, shapes_dataset
from auditkit.subject import Subject


@pytest.fixture(scope="module")
def shapes():
    return shapes_dataset()


def run_default_occlusion(spec, data):
    (check,) = [c for c in build_checks() if c.kind == "occlusion-drop"]
    with Subject(spec, device="cpu") as subject:
        return check.execute(subject, data.for_model(spec.class_names, spec.input_size))


def test_demo_passes_occlusion_drop_with_defaults(shapes):
    result = run_default_occlusion(demo_model(), shapes)
    assert result.status is Status.PASSED, result.summary()
    assert result.decision["ci"][0] >= 0.5 and result.decision["p_value"] < 1e-6  # by far, not by a tuned edge
    assert result.details["mean_drop_object"] > result.details["mean_drop_control"] + 0.5


def test_demo_shortcut_fails_occlusion_drop(shapes):
    result = run_default_occlusion(demo_shortcut_model(), shapes)
    assert result.status is Status.FAILED, result.summary()
    assert result.details["accuracy"] >= 0.9  # it scores high on the data...
    assert result.details["mean_drop_object"] < 0.2  # ...while the object hardly matters to it
    assert result.decision["ci"][1] < 0.1  # the margin over the control boxes is below the minimum, surely
