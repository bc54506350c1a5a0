import pytest
import torch

from auditkit import Box
from auditkit.checks.base import Status
from auditkit.methods import saliency as sal


def test_energy_and_lift_closed_form():
    maps = torch.zeros(2, 10, 10)
    maps[0, 0:2, 0:5] = 1.0  # 10 units inside the box
    maps[0, 9, :] = 1.0  # 10 units outside
    maps[0, 5, 5] = -50.0  # negative attribution is ignored
    inside = torch.zeros(2, 10, 10, dtype=torch.bool)
    inside[:, 0:5, 0:5] = True  # a quarter of the image
    energy = sal.energy_in_box(maps, inside)
    assert energy[0] == pytest.approx(0.5)
    assert torch.isnan(energy[1])  # an all-zero map has no positive energy
    lift = energy / sal.area_fraction(inside)
    assert lift[0] == pytest.approx(2.0)


def test_uniform_map_has_lift_one():
    inside = torch.zeros(1, 8, 8, dtype=torch.bool)
    inside[0, 2:6, 1:4] = True
    energy = sal.energy_in_box(torch.ones(1, 8, 8), inside)
    assert float(energy / sal.area_fraction(inside)) == pytest.approx(1.0)


def test_pointing_hits_use_distance_to_the_nearest_box():
    maps = torch.zeros(2, 20, 20)
    maps[0, 3, 12] = 1.0  # centre (12.5, 3.5)
    maps[1, 19, 0] = 1.0  # centre (0.5, 19.5)
    boxes = [(Box(10, 0, 15, 5),), (Box(10, 0, 15, 5), Box(4, 16, 8, 20))]
    assert sal.argmax_points(maps).tolist() == [[12, 3], [0, 19]]
    assert sal.pointing_hits(maps, boxes, 0).tolist() == [True, False]
    assert sal.pointing_hits(maps, boxes, 3.5).tolist() == [True, True]  # 3.5 px left of the second box
    assert sal.distance_to_boxes((0.0, 0.0), ()) == float("inf")


def test_centre_prior_peaks_in_the_middle_and_is_symmetric():
    prior = sal.centre_prior(2, 9, 12)
    assert prior.shape == (2, 9, 12)
    assert sal.argmax_points(prior)[0].tolist() in ([5, 4], [6, 4])
    assert torch.allclose(prior, prior.flip(-1)) and torch.allclose(prior, prior.flip(-2))


def test_unknown_method_and_bad_parameters_are_errors():
    from auditkit.checks import build_checks
    from auditkit.checks.base import CheckConfigError

    with pytest.raises(CheckConfigError, match="method"):
        build_checks([{"kind": "saliency-in-box", "method": "magic"}])
    with pytest.raises(CheckConfigError, match="layer applies to method 'grad_cam' only"):
        build_checks([{"kind": "saliency-in-box", "method": "gradient", "layer": "stage2"}])
    with pytest.raises(ValueError, match="unknown saliency method 'magic'"):
        sal.saliency_map(None, torch.zeros(1, 3, 4, 4), torch.zeros(1, dtype=torch.long), "magic")


@pytest.fixture(scope="module")
def demo_results():
    """The default suite's saliency-in-box checks (Grad-CAM and gradient) on both demo models."""
    from auditkit.checks import build_checks
    from auditkit.demo import demo_model, demo_shortcut_model, shapes_dataset
    from auditkit.subject import Subject

    data = shapes_dataset()
    checks = [c for c in build_checks() if c.kind == "saliency-in-box"]
    assert {c.method for c in checks} == {"grad_cam", "gradient"}
    out = {}
    for factory in (demo_model, demo_shortcut_model):
        spec = factory()
        with Subject(spec, device="cpu") as subject:
            for check in checks:
                out[spec.name, check.method] = check.execute(subject, data.for_model(spec.class_names, spec.input_size))
    return out


@pytest.mark.parametrize("method", ["grad_cam", "gradient"])
def test_demo_passes_saliency_in_box(demo_results, method):
    result = demo_results["demo", method]
    assert result.status is Status.PASSED, result.summary()
    assert result.details["mean_energy"] > result.details["prior_mean_energy"]
    assert result.details["prior_pass_rate"] < result.threshold  # a centre prior would fail the same rule


@pytest.mark.parametrize("method", ["grad_cam", "gradient"])
def test_demo_shortcut_fails_saliency_in_box(demo_results, method):
    result = demo_results["demo-shortcut", method]
    assert result.status is Status.FAILED, result.summary()
    assert result.details["mean_lift"] < 1.0  # no better than a uniform map: it looks at the corner marker
