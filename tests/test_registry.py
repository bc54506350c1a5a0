import sys
import textwrap

import pytest

from auditkit import registry
from auditkit.checks import build_checks, check_class
from auditkit.checks.base import Check, CheckConfigError
from auditkit.registry import Registry, UnknownNameError


@pytest.fixture
def models():
    return Registry("model", "auditkit.test-models", {"builtin": "tests.toys:region_spec"})


def test_decorator_registers_and_resolves(models):
    @models.register("mine")
    def factory():
        return 42

    assert models.resolve("mine") is factory
    assert "mine" in models.names() and "builtin" in models.names()


def test_builtin_string_target_resolves(models):
    from tests.toys import region_spec

    assert models.resolve("builtin") is region_spec


def test_module_callable_string_resolves(models):
    from tests.toys import halves_set

    assert models.resolve("tests.toys:halves_set") is halves_set


def test_unknown_name_lists_registered_names(models):
    models.register("alpha", lambda: None)
    with pytest.raises(UnknownNameError, match=r"unknown model 'nope'; registered models: alpha, builtin"):
        models.resolve("nope")


def test_bad_target_strings_name_the_module_or_attribute(models):
    with pytest.raises(UnknownNameError, match="cannot import module 'no_such_module_xyz'"):
        models.resolve("no_such_module_xyz:thing")
    with pytest.raises(UnknownNameError, match="has no attribute 'missing'"):
        models.resolve("tests.toys:missing")


def test_entry_points_are_found(tmp_path, monkeypatch, models):
    dist = tmp_path / "fake_models-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[auditkit.test-models]\nfrom-ep = tests.toys:region_spec\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from tests.toys import region_spec

    assert "from-ep" in models.names()
    assert models.resolve("from-ep") is region_spec


def test_register_check_sets_kind_and_builds():
    from dataclasses import dataclass

    @registry.register_check("always-ok-test")
    @dataclass
    class AlwaysOk(Check):
        level: float = 0.5

    try:
        assert check_class("always-ok-test") is AlwaysOk
        (check,) = build_checks([{"kind": "always-ok-test", "level": 1}])
        assert check.name == "always-ok-test" and check.level == 1.0 and isinstance(check.level, float)
    finally:
        registry.CHECKS.factories.pop("always-ok-test")


def test_default_suite_when_nothing_declared():
    assert [c.kind for c in build_checks([])] == [t["kind"] for t in registry.DEFAULT_SUITE]


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(CheckConfigError, match=r"unknown check kind 'nope'; valid kinds: .*occlusion-drop"):
        build_checks([{"kind": "nope"}])


def test_unknown_parameter_lists_valid_parameters():
    with pytest.raises(CheckConfigError, match=r"unknown parameter\(s\) min_dorp; valid parameters: name, min_margin, alpha"):
        build_checks([{"kind": "occlusion-drop", "min_dorp": 0.3}])


def test_wrong_type_and_value_are_errors():
    with pytest.raises(CheckConfigError, match="min_margin"):
        build_checks([{"kind": "occlusion-drop", "min_margin": "high"}])
    with pytest.raises(CheckConfigError, match="baseline"):
        build_checks([{"kind": "occlusion-drop", "baseline": "purple"}])
    with pytest.raises(CheckConfigError, match="min_margin must be in"):
        build_checks([{"kind": "occlusion-drop", "min_margin": 3}])
    with pytest.raises(CheckConfigError, match="alpha must be a significance level"):
        build_checks([{"kind": "occlusion-drop", "alpha": 0.9}])


def test_duplicate_check_names_are_an_error():
    with pytest.raises(CheckConfigError, match="two checks are named 'occlusion-drop'"):
        build_checks([{"kind": "occlusion-drop"}, {"kind": "occlusion-drop", "baseline": "blur"}])
    checks = build_checks([{"kind": "occlusion-drop"}, {"kind": "occlusion-drop", "name": "occ-blur", "baseline": "blur"}])
    assert [c.name for c in checks] == ["occlusion-drop", "occ-blur"]


def test_registry_imports_no_torch():
    code = textwrap.dedent("""
        import sys
        import auditkit, auditkit.registry, auditkit.config, auditkit.pytest_plugin
        print('torch' in sys.modules)
    """)
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
