"""The pytest plugin, end to end through pytester."""
import textwrap

import pytest

# pytester's in-process runs drop modules first imported inside a run; import
# the library here so every run shares one ModelSpec class with tests.toys.
import auditkit.checks.occlusion  # noqa: F401
import auditkit.report  # noqa: F401
import auditkit.runner  # noqa: F401
import tests.toys  # noqa: F401

from tests.plugin_project import CONFTEST, report_json  # noqa: E402  (the `project` fixture is in conftest.py)


def test_passing_audit_writes_report(project):
    result = project.runpytest("--audit-model", "good", "-k", "occlusion-drop", "-v")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(["*audit[[]good[]]::occlusion-drop PASSED*", "*report: audit-report*index.html*"])
    data = report_json(project)
    assert [r["check"] for r in data["results"]] == ["occlusion-drop"]
    assert data["results"][0]["status"] == "passed" and data["meta"]["models"][0]["name"] == "good"
    assert data["meta"]["device"] == "cpu" and data["meta"]["torch_version"]
    html = (project.path / "audit-report" / "index.html").read_text()
    assert "occlusion-drop" in html and "halves" in html
    evidence = data["results"][0]["evidence"][0]["path"]
    assert (project.path / "audit-report" / evidence).is_file()


def test_failing_check_fails_the_run(project):
    result = project.runpytest("--audit-model", "shortcut")
    result.assert_outcomes(passed=1, failed=1)  # zero baseline still drops; grey does not
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*occlusion-grey: FAILED: mean drop_object - drop_control = * (needs >= 0.1), p = *"])
    statuses = {r["check"]: r["status"] for r in report_json(project)["results"]}
    assert statuses == {"occlusion-drop": "passed", "occlusion-grey": "failed"}
    assert [r["status"] for r in report_json(project)["results"]] == ["failed", "passed"]  # failures first


def test_model_that_cannot_load_is_an_error_not_a_pass(project):
    result = project.runpytest("--audit-model", "broken")
    result.assert_outcomes(errors=2)  # a check that could not run is a pytest error, not a failure
    result.stdout.fnmatch_lines(["*ERROR: RuntimeError: weights file is corrupt*"])
    assert {r["status"] for r in report_json(project)["results"]} == {"error"}


def test_unknown_model_is_a_usage_error_listing_names(project):
    result = project.runpytest("--audit-model", "nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown model 'nope'; registered models: broken, demo, demo-shortcut, good, shortcut*"])


def test_unknown_check_parameter_is_a_usage_error(project):
    project.makepyprojecttoml('[tool.auditkit]\ndataset = "halves"\n[[tool.auditkit.checks]]\nkind = "occlusion-drop"\nmin_dorp = 1\n')
    result = project.runpytest("--audit-model", "good")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown parameter(s) min_dorp; valid parameters: name, min_margin, alpha*"])


def test_audit_config_file_and_custom_check(project):
    project.makepyfile(custom_checks=textwrap.dedent("""
        from dataclasses import dataclass
        import auditkit

        @auditkit.register_check("accuracy-at-least")
        @dataclass
        class AccuracyAtLeast(auditkit.Check):
            min_accuracy: float = 0.9

            def run(self, subject, audit_set):
                predicted = subject.predict(audit_set.images()).argmax(1)
                accuracy = float((predicted == audit_set.labels()).float().mean())
                return self.result(metric="accuracy", value=accuracy, threshold=self.min_accuracy)
    """))
    project.makefile(".toml", audit=textwrap.dedent("""
        dataset = "halves"
        [[checks]]
        kind = "accuracy-at-least"
        min_accuracy = 0.99
    """))
    project.makeconftest(CONFTEST + "\nimport custom_checks\n")
    result = project.runpytest("--audit-model", "good", "--audit-config", "audit.toml", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*audit[[]good[]]::accuracy-at-least PASSED*"])
    assert report_json(project)["results"][0]["value"] == 1.0


def test_fixtures_for_plain_tests(project):
    project.makepyfile(test_mine=textwrap.dedent("""
        def test_accuracy(audit_subject, audit_set, audit_evidence):
            audit_evidence.image("first sample", audit_set[0].image)
            predicted = audit_subject.predict(audit_set.images()).argmax(1)
            assert (predicted == audit_set.labels()).all()
    """))
    result = project.runpytest("--audit-model", "good", "-k", "accuracy", "-v")
    result.assert_outcomes(passed=1, deselected=2)
    result.stdout.fnmatch_lines(["*test_accuracy[[]audit-good[]] PASSED*"])
    (entry,) = report_json(project)["results"]
    assert entry["kind"] == "test" and entry["evidence"][0]["title"] == "first sample"


def test_plain_fixture_tests_skip_without_audit_model(project):
    project.makepyfile(test_mine="def test_needs(audit_subject):\n    pass\n")
    result = project.runpytest()
    result.assert_outcomes(skipped=1)
    assert not (project.path / "audit-report").exists()


def test_marker_selects_the_audit_alone(project):
    project.makepyfile(test_other="def test_unrelated():\n    pass\n")
    result = project.runpytest("--audit-model", "good", "-m", "audit")
    result.assert_outcomes(passed=1, failed=1, deselected=1)  # good passes with a zero baseline, not grey


def test_xdist_gives_one_correct_report(project):
    result = project.runpytest_subprocess("--audit-model", "good", "--audit-model", "shortcut", "-n", "2", "-p", "xdist")
    result.assert_outcomes(passed=2, failed=2)  # grey fails for both toy models
    data = report_json(project)
    assert len(data["results"]) == 4
    assert {(r["model"], r["check"]) for r in data["results"]} == {
        ("good", "occlusion-drop"), ("good", "occlusion-grey"), ("shortcut", "occlusion-drop"), ("shortcut", "occlusion-grey")}
    assert data["meta"]["counts"]["failed"] == 2
    assert not list((project.path / "audit-report").glob("*.tmp*"))


def test_plugin_does_not_import_torch_without_audit_options(pytester):
    pytester.makeconftest(textwrap.dedent("""
        import sys
        def pytest_sessionfinish(session):
            assert "auditkit.pytest_plugin" in sys.modules
            assert "torch" not in sys.modules, "auditkit imported torch in a run without --audit-*"
    """))
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:hypothesispytest")
    result.assert_outcomes(passed=1)
    assert result.ret == 0


def test_evidence_only_check_passes_the_run_and_is_reported_as_evidence(project):
    project.makepyfile(custom_checks=textwrap.dedent("""
        from dataclasses import dataclass
        import auditkit

        @auditkit.register_check("mean-pixel")
        @dataclass
        class MeanPixel(auditkit.Check):
            def run(self, subject, audit_set):
                return self.info_result(metric="mean pixel", value=float(audit_set.images().mean()),
                                        message="shown, not judged")
    """))
    project.makepyprojecttoml('[tool.auditkit]\ndataset = "halves"\n[[tool.auditkit.checks]]\nkind = "mean-pixel"\n')
    project.makeconftest(CONFTEST + "\nimport custom_checks\n")
    result = project.runpytest("--audit-model", "good")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*good: mean-pixel: INFO: mean pixel = *; shown, not judged*", "audit: 1 info*"])
    data = report_json(project)
    assert data["results"][0]["status"] == "info" and data["results"][0]["threshold"] is None
    assert data["meta"]["counts"]["info"] == 1


# -- INCONCLUSIVE: passes with a warning, fails when strict (issue 14) ------------------------------


def _six_sample_project(project, strict_in_config=False):
    """The halves gate on 6 samples: one fewer than a one-sided test at alpha 0.01 needs."""
    import textwrap

    from tests.plugin_project import CONFTEST

    project.makeconftest(CONFTEST + textwrap.dedent("""
        @auditkit.register_dataset("six")
        def six():
            return halves_set(6)
    """))
    project.makepyprojecttoml('[tool.auditkit]\ndataset = "six"\ndevice = "cpu"\n'
                              + ("strict = true\n" if strict_in_config else "")
                              + '[[tool.auditkit.checks]]\nkind = "occlusion-drop"\nbaseline = "zero"\n')
    return project


def test_an_inconclusive_check_passes_with_a_warning_and_is_counted_apart(project):
    _six_sample_project(project)
    result = project.runpytest("--audit-model", "good", "--junitxml", "junit.xml")
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*AuditInconclusiveWarning: audit[[]good[]]::occlusion-drop is INCONCLUSIVE*",
                                 "*audit: 1 inconclusive*",
                                 "*1 check(s) INCONCLUSIVE*they pass with a warning (--audit-strict fails them)*"])
    data = report_json(project)
    assert data["results"][0]["status"] == "inconclusive" and data["meta"]["overall"] == "passed"
    assert data["results"][0]["decision"]["needed"] == 7 and data["results"][0]["decision"]["n"] == 6
    html = (project.path / "audit-report" / "index.html").read_text()
    assert "1</b> inconclusive" in html and "cannot decide: only 6 sample(s) could be judged" in html
    assert 'name="audit_status" value="inconclusive"' in (project.path / "junit.xml").read_text()


@pytest.mark.parametrize("how", ["option", "config"])
def test_strict_makes_an_inconclusive_check_fail(project, how):
    _six_sample_project(project, strict_in_config=how == "config")
    args = ["--audit-model", "good"] + (["--audit-strict"] if how == "option" else [])
    result = project.runpytest(*args)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*occlusion-drop: INCONCLUSIVE*needs at least 7*", "*they fail (strict)*"])
    data = report_json(project)
    assert data["meta"]["overall"] == "failed" and data["meta"]["strict"] is True


def test_strict_in_the_config_must_be_a_boolean(project):
    project.makepyprojecttoml('[tool.auditkit]\ndataset = "halves"\nstrict = "yes"\n')
    result = project.runpytest("--audit-model", "good")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*strict must be true or false, got 'yes'*"])
