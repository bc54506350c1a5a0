"""The hostile-input matrix: each probe is one way a careless or hostile run could make the gate lie.

Every probe runs the plugin end to end (pytester) or the library on bad
input, and asserts that the run either tells the truth or says it could not.
"""
from __future__ import annotations

import json
import os
import stat
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

# pytester's in-process runs drop modules first imported inside a run; import them here once.
import auditkit
import auditkit.checks.occlusion  # noqa: F401
import auditkit.journal  # noqa: F401
import auditkit.report  # noqa: F401
import auditkit.runner  # noqa: F401
import tests.toys  # noqa: F401
from tests.plugin_project import CONFTEST, PYPROJECT, one_check_gate, report_json

# A gate the toy model "good" fails: grey over its object leaves the drop below 0.5.
FAILING_GATE = one_check_gate("grey")


# Checks that misbehave on purpose: crash the process, interrupt, or change the model.
HOSTILE_CHECKS = textwrap.dedent("""
    import os
    import signal
    from dataclasses import dataclass

    import torch
    import auditkit

    @auditkit.register_check("kill-self")
    @dataclass
    class KillSelf(auditkit.Check):
        signal: int = 11

        def run(self, subject, audit_set):
            os.kill(os.getpid(), self.signal)

    @auditkit.register_check("exit-zero")
    @dataclass
    class ExitZero(auditkit.Check):
        def run(self, subject, audit_set):
            os._exit(0)

    @auditkit.register_check("interrupt")
    @dataclass
    class Interrupt(auditkit.Check):
        def run(self, subject, audit_set):
            raise KeyboardInterrupt

    @auditkit.register_check("trains-the-model")
    @dataclass
    class TrainsTheModel(auditkit.Check):
        def run(self, subject, audit_set):
            subject.module.train()
            with torch.no_grad():
                subject.module(torch.randn(8, 3, 16, 16) * 5 + 3)
            return self.info_result(message="ran the model in train mode")
""")


# A gate the built-in demo model fails (its occlusion margin is about 0.7), named so the header shows it was read.
DEMO_GATE = textwrap.dedent("""
    [tool.auditkit]
    device = "cpu"
    [[tool.auditkit.checks]]
    kind = "occlusion-drop"
    name = "project-gate"
    min_margin = 0.99
""")


def gate(*checks: str) -> str:
    """The plugin tests' two-check gate on the halves set, then these check kinds."""
    return PYPROJECT + "".join(f'[[tool.auditkit.checks]]\nkind = "{kind}"\n' for kind in checks)


@pytest.fixture
def hostile(project):
    project.makepyfile(hostile_checks=HOSTILE_CHECKS)
    project.makeconftest(CONFTEST + "\nimport hostile_checks\n")
    return project


def wait_for_report(folder: Path, seconds: float = 60.0) -> dict:
    """audit.json of `folder` once the watchdog has published it (it runs after the dead process)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (folder / "audit.json").is_file():
            return json.loads((folder / "audit.json").read_text())
        time.sleep(0.1)
    raise AssertionError(f"no report in {folder} after {seconds} s")


# -- 1. the configuration is never dropped ---------------------------------------------------


def test_report_folder_outside_the_project_keeps_the_projects_gate(project, tmp_path_factory):
    project.makepyprojecttoml(FAILING_GATE)
    outside = tmp_path_factory.mktemp("outside")  # an existing folder: pytest takes it for a test path
    result = project.runpytest("--audit-model", "good", "--audit-report", str(outside))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([f"auditkit: configuration {project.path / 'pyproject.toml'}"])
    assert report_json(project, outside)["results"][0]["status"] == "failed"


def test_relative_config_path_is_read_from_the_invocation_directory(project, tmp_path_factory):
    (project.path / "conf").mkdir()
    (project.path / "conf" / "gate.toml").write_text(FAILING_GATE)
    project.makepyprojecttoml("[tool.pytest.ini_options]\n")
    outside = tmp_path_factory.mktemp("outside")
    result = project.runpytest("--audit-model", "good", "--audit-config", "conf/gate.toml", "--audit-report", str(outside))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["auditkit: configuration */conf/gate.toml"])


def test_config_is_found_from_a_subdirectory(project, monkeypatch):
    project.makepyprojecttoml(FAILING_GATE)
    sub = project.mkdir("tests_sub")
    monkeypatch.chdir(sub)
    result = project.runpytest("--audit-model", "good", "--rootdir", str(sub))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert (project.path / "audit-report" / "audit.json").is_file()  # beside the configuration file


def test_inifile_given_with_c_from_outside_keeps_the_projects_gate(project, monkeypatch, tmp_path_factory):
    project.makepyprojecttoml(DEMO_GATE)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    result = project.runpytest("--audit-model", "demo", "-c", str(project.path / "pyproject.toml"))
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # the project's gate, not the default suite (exit 0)
    result.stdout.fnmatch_lines([f"auditkit: configuration {project.path / 'pyproject.toml'} (found in pytest's -c *)"])
    data = report_json(project)  # beside the configuration file
    assert [r["check"] for r in data["results"]] == ["project-gate"]
    assert data["meta"]["config"] == str(project.path / "pyproject.toml")


def test_rootdir_given_from_outside_keeps_the_projects_gate(project, monkeypatch, tmp_path_factory):
    project.makepyprojecttoml(DEMO_GATE)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    result = project.runpytest("--audit-model", "demo", f"--rootdir={project.path}", "--collect-only")
    result.stdout.fnmatch_lines([f"auditkit: configuration {project.path / 'pyproject.toml'} "
                                 f"(found upward from --rootdir {project.path})", "*<AuditItem project-gate>*"])
    assert "collected 1 item" in result.stdout.str()


def test_path_argument_from_the_parent_keeps_the_projects_gate(project, monkeypatch):
    project.makepyprojecttoml(DEMO_GATE)
    project.mkdir("sub")
    monkeypatch.chdir(project.path.parent)  # pytest proj/sub: pytest's configfile is proj/pyproject.toml
    result = project.runpytest(f"{project.path.name}/sub", "--audit-model", "demo", "--collect-only")
    result.stdout.fnmatch_lines([f"auditkit: configuration {project.path / 'pyproject.toml'} "
                                 f"(found upward from the path argument(s) {project.path.name}/sub)",
                                 "*<AuditItem project-gate>*"])
    assert "collected 1 item" in result.stdout.str()


def test_report_folder_in_another_project_is_not_its_configuration(project, tmp_path_factory):
    """pytest takes the space-separated --audit-report value for a test path and makes the other
    project's pyproject.toml its configfile: the invocation directory's gate is read, the other named."""
    project.makepyprojecttoml(DEMO_GATE)
    other = tmp_path_factory.mktemp("other")
    (other / "pyproject.toml").write_text('[tool.pytest.ini_options]\n[tool.auditkit]\ndevice = "cpu"\n'
                                          '[[tool.auditkit.checks]]\nkind = "occlusion-drop"\nname = "other-gate"\n')
    (other / "reports").mkdir()
    result = project.runpytest("--audit-model", "demo", "--audit-report", str(other / "reports"), "--collect-only")
    result.stdout.fnmatch_lines([f"auditkit: configuration {project.path / 'pyproject.toml'}",
                                 "configfile: pyproject.toml", "*<AuditItem project-gate>*"])
    assert (f"auditkit: not read: {other / 'pyproject.toml'}, which also has [tool.auditkit] (pytest's configfile"
            in result.stdout.str())


def test_configuration_lookup_order(tmp_path):
    from auditkit.config import load_config

    table = '[tool.auditkit]\n[[tool.auditkit.checks]]\nkind = "occlusion-drop"\nname = "{}"\n'
    proj, pkg, elsewhere = tmp_path / "proj", tmp_path / "proj" / "pkg", tmp_path / "elsewhere"
    for folder in (pkg / "tests", elsewhere):
        folder.mkdir(parents=True)
    (proj / "pyproject.toml").write_text(table.format("proj"))
    (pkg / "pyproject.toml").write_text(table.format("pkg"))
    (proj / "pytest.ini").write_text("[pytest]\n")
    (elsewhere / "gate.toml").write_text(table.format("gate"))

    def name(config):
        return config.checks[0]["name"] if config.checks else None

    assert name(load_config(None, proj)) == "proj"
    nested = load_config(None, proj, args=["pkg/tests", "-x"])  # the path argument's project, as pytest reads it
    assert name(nested) == "pkg" and nested.not_read == [(str(proj / "pyproject.toml"), "upward from the invocation directory")]
    assert name(load_config(None, elsewhere, inifile=str(proj / "pytest.ini"))) == "proj"  # not TOML: its folder
    assert name(load_config(None, proj, inifile=str(elsewhere / "gate.toml"))) == "gate"  # -c wins over the cwd
    assert name(load_config(None, elsewhere, rootdir=str(pkg), args=[str(proj)])) == "pkg"  # --rootdir over args
    assert name(load_config("gate.toml", elsewhere, inifile=str(proj / "pytest.ini"))) == "gate"  # --audit-config first
    defaults = load_config(None, elsewhere, args=[str(elsewhere)])
    assert defaults.folder is None and defaults.found_by.startswith("looked upward from the path argument(s)")


# -- 2 and 3. crashes and incomplete runs -------------------------------------------------------


@pytest.mark.parametrize("signal_number", [11, 9], ids=["segfault", "kill-9"])
def test_a_check_that_kills_the_process_leaves_a_report_that_says_so(hostile, signal_number):
    hostile.makepyprojecttoml(gate("kill-self").replace('kind = "kill-self"', f'kind = "kill-self"\nsignal = {signal_number}'))
    result = hostile.runpytest_subprocess("--audit-model", "good", "-p", "no:cacheprovider")
    assert result.ret not in (0, 1)
    data = wait_for_report(hostile.path / "audit-report")
    run = data["meta"]["run"]
    assert data["meta"]["overall"] == "incomplete" and run["complete"] is False and run["planned"] == 3
    assert run["ran"] == 2 and run["died_in"] == "audit[good]::kill-self"  # the killed check did not finish
    assert "ended before the audit finished" in run["reason"]
    by_check = {r["check"]: r for r in data["results"]}
    assert by_check["kill-self"]["status"] == "error" and "died while this check ran" in by_check["kill-self"]["message"]
    assert by_check["occlusion-drop"]["status"] == "passed"  # what finished before the crash is kept
    html = (hostile.path / "audit-report" / "index.html").read_text()
    assert "Incomplete run" in html
    assert not list(hostile.path.glob(".audit-report.*"))  # no staging folder left


def test_interrupted_run_is_incomplete_not_passed(hostile):
    hostile.makepyprojecttoml(gate("interrupt"))
    result = hostile.runpytest("--audit-model", "good", "-k", "occlusion-drop or interrupt", no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    data = report_json(hostile)
    run = data["meta"]["run"]
    assert data["meta"]["overall"] == "incomplete" and run["exit_name"] == "INTERRUPTED"
    assert run["planned"] == 3 and run["ran"] == 1 and "interrupted" in run["reason"]
    assert "Incomplete run" in (hostile.path / "audit-report" / "index.html").read_text()


def test_a_check_that_calls_os_exit_0_is_an_error_not_a_green_exit(hostile):
    hostile.makepyprojecttoml(gate("exit-zero"))
    result = hostile.runpytest_subprocess("--audit-model", "good", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # it was 0: the process ended green, mid-run
    data = report_json(hostile)
    by_check = {r["check"]: r for r in data["results"]}
    assert by_check["exit-zero"]["status"] == "error" and "called os._exit(0)" in by_check["exit-zero"]["message"]
    assert data["meta"]["run"]["complete"] is True and len(data["results"]) == 3


GREEN = one_check_gate("zero")



def test_interrupt_before_the_first_result_replaces_an_earlier_green_report(hostile):
    (hostile.path / "green.toml").write_text(GREEN)
    assert hostile.runpytest("--audit-model", "good", "--audit-config", "green.toml").ret == pytest.ExitCode.OK
    assert report_json(hostile)["meta"]["overall"] == "passed"
    (hostile.path / "first.toml").write_text(GREEN.replace("[[tool.auditkit.checks]]", '[[tool.auditkit.checks]]\nkind = "interrupt"\n[[tool.auditkit.checks]]', 1))
    result = hostile.runpytest("--audit-model", "good", "--audit-config", "first.toml", no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    data = report_json(hostile)  # this run's, not the green one
    run = data["meta"]["run"]
    assert data["meta"]["overall"] == "incomplete" and data["results"] == []
    assert (run["planned"], run["ran"], run["exit_name"]) == (2, 0, "INTERRUPTED")
    assert "interrupted while audit[good]::interrupt ran" in run["reason"]
    assert data["meta"]["config"].endswith("first.toml")
    assert "Incomplete run" in (hostile.path / "audit-report" / "index.html").read_text()
    assert not list((hostile.path / "audit-report" / "evidence").iterdir())


def test_k_matching_no_check_replaces_an_earlier_report(project):
    project.runpytest("--audit-model", "good")
    result = project.runpytest("--audit-model", "good", "-k", "nomatch")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    data = report_json(project)
    run = data["meta"]["run"]
    assert data["meta"]["overall"] == "incomplete" and data["results"] == []
    assert (run["planned"], run["ran"], run["deselected"], run["exit_name"]) == (2, 0, 2, "NO_TESTS_COLLECTED")
    result.stdout.fnmatch_lines(["audit: no check ran", "audit INCOMPLETE: 0 of 2 checks ran; 2 check(s) were deselected*"])


def test_collect_only_and_no_audit_model_leave_the_published_report(project):
    project.runpytest("--audit-model", "good")
    before = (project.path / "audit-report" / "audit.json").read_text()
    assert project.runpytest("--audit-model", "good", "--collect-only").ret == pytest.ExitCode.OK
    project.makepyfile(test_plain="def test_plain():\n    pass\n")
    assert project.runpytest("test_plain.py").ret == pytest.ExitCode.OK
    assert (project.path / "audit-report" / "audit.json").read_text() == before
    assert sorted(p.name for p in project.path.glob(".audit-report*")) == []


def test_exitfirst_run_records_the_checks_that_did_not_run(project):
    project.makepyprojecttoml(gate().replace('baseline = "zero"', 'baseline = "grey"', 1))  # both fail
    result = project.runpytest("--audit-model", "good", "-x")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    run = report_json(project)["meta"]["run"]
    assert (run["planned"], run["ran"], run["complete"]) == (2, 1, False)
    assert "did not run" in run["reason"]
    result.stdout.fnmatch_lines(["audit INCOMPLETE: 1 of 2 checks ran*"])


def test_deselected_checks_make_the_report_incomplete(project):
    result = project.runpytest("--audit-model", "good", "-k", "occlusion-drop")
    assert result.ret == pytest.ExitCode.OK
    data = report_json(project)
    assert data["meta"]["run"]["deselected"] == 1 and data["meta"]["overall"] == "incomplete"


def test_complete_run_is_complete(project):
    project.runpytest("--audit-model", "good")
    data = report_json(project)
    assert data["meta"]["run"]["complete"] is True and data["meta"]["run"]["exit_name"] == "TESTS_FAILED"
    assert data["meta"]["overall"] == "failed"


def test_worker_crash_under_xdist_is_an_error_result(hostile):
    hostile.makepyprojecttoml(gate("kill-self"))
    result = hostile.runpytest_subprocess("--audit-model", "good", "-n", "2", "-p", "xdist", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    data = report_json(hostile)
    by_check = {r["check"]: r for r in data["results"]}
    assert by_check["kill-self"]["status"] == "error" and "without a result" in by_check["kill-self"]["message"]
    assert len(data["results"]) == 3


# -- 4. the report folder is one run's, as a whole --------------------------------------------------


def test_second_run_leaves_no_stale_evidence_and_files_are_readable(project):
    project.runpytest("--audit-model", "good", "--audit-model", "shortcut")
    first = {p.name for p in (project.path / "audit-report" / "evidence").iterdir()}
    project.runpytest("--audit-model", "good", "-k", "occlusion-drop")
    report = project.path / "audit-report"
    second = {p.name for p in (report / "evidence").iterdir()}
    listed = {Path(e["path"]).name for r in report_json(project)["results"] for e in r["evidence"]}
    assert second == listed and second < first  # exactly this run's evidence, none of the first run's
    for path in [report / "index.html", report / "audit.json", *(report / "evidence").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path  # group and others can read
    assert not list(project.path.glob(".audit-report.*"))


def test_report_folder_holding_other_files_is_refused(project):
    (project.path / "audit-report").mkdir()
    (project.path / "audit-report" / "notes.txt").write_text("mine")
    result = project.runpytest("--audit-model", "good")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*report folder *audit-report holds files auditkit did not write (notes.txt)*"])
    assert (project.path / "audit-report" / "notes.txt").read_text() == "mine"


def test_report_path_that_is_a_file_is_refused(project):
    (project.path / "report.txt").write_text("x")
    result = project.runpytest("--audit-model", "good", "--audit-report", "report.txt")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*report folder *report.txt is a file*"])


def test_publishing_replaces_the_whole_folder(tmp_path):
    from auditkit.reportdir import make_staging, publish

    target = tmp_path / "audit-report"
    for run in ("first", "second"):
        staging = make_staging(target)
        (staging / "index.html").write_text(run)
        (staging / "evidence" / f"{run}.png").write_bytes(b"png")
        publish(staging, target)
    assert (target / "index.html").read_text() == "second"
    assert [p.name for p in (target / "evidence").iterdir()] == ["second.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit-report"]


def test_report_folders_are_readable_under_umask_077(tmp_path):
    from auditkit.reportdir import make_staging, publish

    target = tmp_path / "audit-report"
    old = os.umask(0o077)
    try:
        staging = make_staging(target)
        (staging / "evidence" / "x.png").write_bytes(b"png")
        publish(staging, target)
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "evidence").stat().st_mode) == 0o755  # it was 0700 under umask 077


class _Killed(BaseException):
    """Stands for a kill -9: nothing after it runs in the process."""


def _run_killed_between_the_renames(tmp_path, monkeypatch):
    """A finished run of one passing check whose publish() is cut between moving the previous report
    aside and moving the new one in; returns (staging, target)."""
    from auditkit import reportdir
    from auditkit.checks.base import CheckResult, Status
    from auditkit.journal import Journal, finalise

    target = tmp_path / "audit-report"
    previous = reportdir.make_staging(target)
    (previous / "index.html").write_text("previous run")
    (previous / "audit.json").write_text("{}")
    reportdir.publish(previous, target)
    staging = reportdir.make_staging(target)
    journal = Journal(staging)
    journal.write("meta", models=["m"], started=time.time(), command="pytest", config="cfg",
                  planned=[{"nodeid": "audit[m]::c", "model": "m", "check": "c", "kind": "k"}])
    journal.write("begin", nodeid="audit[m]::c")
    (staging / "evidence" / "c.png").write_bytes(b"png")
    result = CheckResult(check="c", kind="k", model="m", status=Status.PASSED, message="fine")
    journal.write("result", nodeid="audit[m]::c", result=result.to_dict(), model_info={"name": "m"})
    journal.close()
    rename = os.rename

    def killed_at_the_second_rename(src, dst, *args, **kwargs):
        if Path(src) == staging:
            raise _Killed
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(reportdir.os, "rename", killed_at_the_second_rename)
    with pytest.raises(_Killed):
        finalise(staging, target, 0)
    monkeypatch.setattr(reportdir.os, "rename", rename)
    assert not target.exists() and staging.is_dir() and list(tmp_path.glob(".audit-report.old-*"))
    return staging, target


def _assert_the_killed_run_is_published(tmp_path, target):
    data = json.loads((target / "audit.json").read_text())
    assert [(r["check"], r["status"]) for r in data["results"]] == [("c", "passed")]
    assert data["meta"]["run"]["complete"] is True and data["meta"]["overall"] == "passed"
    assert [p.name for p in (target / "evidence").iterdir()] == ["c.png"]
    assert "previous run" not in (target / "index.html").read_text()
    assert not list(tmp_path.glob(".audit-report.old-*"))  # the previous report set aside is gone


def test_kill_between_the_renames_of_publish_is_finished_by_the_watchdog(tmp_path, monkeypatch):
    import io
    import sys

    from auditkit import watchdog

    staging, target = _run_killed_between_the_renames(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))  # the pipe closed without "done"
    assert watchdog.main([str(staging), str(target), str(os.getpid())]) == 0
    _assert_the_killed_run_is_published(tmp_path, target)  # it was an empty report beside unlisted evidence
    assert not list(tmp_path.glob(".audit-report.tmp-*"))


def test_kill_between_the_renames_without_a_watchdog_is_finished_by_the_next_run(tmp_path, monkeypatch):
    from auditkit.reportdir import make_staging

    staging, target = _run_killed_between_the_renames(tmp_path, monkeypatch)
    for path in tmp_path.glob(".audit-report.*"):  # as if their process (and its watchdog) were gone
        path.rename(path.with_name(path.name.replace(f"-{os.getpid()}-", "-999999999-")))
    new = make_staging(target)
    _assert_the_killed_run_is_published(tmp_path, target)
    assert [p.name for p in tmp_path.glob(".audit-report.*")] == [new.name]


def test_sigkill_between_the_renames_of_publish_leaves_that_runs_report(project):
    project.makeconftest(CONFTEST + textwrap.dedent("""
        import os, signal
        _rename = os.rename

        def rename(src, dst, *args, **kwargs):
            if ".tmp-" in os.path.basename(str(src)) and not os.path.basename(str(dst)).startswith("."):
                os.kill(os.getpid(), signal.SIGKILL)  # the previous report is aside, the new one not yet in
            return _rename(src, dst, *args, **kwargs)

        os.rename = rename
    """))
    (project.path / "audit-report").mkdir()
    (project.path / "audit-report" / "index.html").write_text("previous run")
    result = project.runpytest_subprocess("--audit-model", "good", "-p", "no:cacheprovider")
    assert result.ret not in (0, 1)  # killed
    data = wait_for_report(project.path / "audit-report")
    assert sorted(r["check"] for r in data["results"]) == ["occlusion-drop", "occlusion-grey"]
    assert data["meta"]["run"]["exit_name"] == "TESTS_FAILED" and data["meta"]["overall"] == "failed"
    listed = {Path(e["path"]).name for r in data["results"] for e in r["evidence"]}
    assert {p.name for p in (project.path / "audit-report" / "evidence").iterdir()} == listed
    deadline = time.monotonic() + 30
    while list(project.path.glob(".audit-report.*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(project.path.glob(".audit-report.*"))


def test_abandoned_staging_folders_are_cleaned_up(tmp_path):
    from auditkit.reportdir import make_staging

    target = tmp_path / "audit-report"
    dead = tmp_path / ".audit-report.tmp-999999999-abc"  # no such process
    dead.mkdir()
    staging = make_staging(target)
    assert not dead.exists() and staging.is_dir()


# -- 5 and 9. evidence names and evidence that cannot be saved -------------------------------------


@pytest.mark.parametrize("names", [("demo model", "demo_model"), ("модель", "模型"), ("occ a", "occ_a")])
def test_evidence_names_never_collide(names):
    from auditkit.reportdir import evidence_stem

    stems = {evidence_stem(name, "check", index=0) for name in names}
    assert len(stems) == 2


def test_evidence_names_stay_short():
    from auditkit.reportdir import evidence_stem

    stem = evidence_stem("m" * 900, "c" * 900, index=3)
    assert len(stem.encode()) < 120 and stem.endswith(stem[-10:])


def test_long_and_clashing_names_each_get_their_evidence(project):
    long_name = "occlusion-" + "x" * 300
    project.makepyprojecttoml(gate().replace('name = "occlusion-grey"', f'name = "{long_name}"')
                              + '[[tool.auditkit.checks]]\nkind = "occlusion-drop"\nname = "occlusion drop"\nbaseline = "zero"\n')
    result = project.runpytest("--audit-model", "good")
    assert "File name too long" not in result.stdout.str()
    results = report_json(project)["results"]
    paths = [e["path"] for r in results for e in r["evidence"]]
    assert len(results) == 3 and all(paths) and len(set(paths)) == len(paths)


def test_evidence_that_cannot_be_saved_keeps_the_result(tmp_path, monkeypatch):
    from auditkit import reportdir
    from auditkit.checks.base import CheckResult, Evidence, Status

    def full_disk(handle_fd, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reportdir.os, "fsync", full_disk)
    result = CheckResult(check="c", kind="k", status=Status.PASSED, model="m",
                         evidence=[Evidence(title="map", media_type="image/png", data=b"png")])
    result.save_evidence(tmp_path)
    assert result.status is Status.PASSED
    (item,) = result.evidence
    assert item.path is None and "No space left on device" in item.missing
    assert list((tmp_path / "evidence").iterdir()) == []  # no temporary file left


@pytest.mark.parametrize("failure", [ValueError("embedded null byte"), MemoryError()], ids=["nul-byte", "memory"])
def test_evidence_that_fails_to_save_in_any_way_keeps_the_result(tmp_path, monkeypatch, failure):
    # before: a ValueError (NUL in the report path) or MemoryError while writing lost the result
    from auditkit import reportdir
    from auditkit.checks.base import CheckResult, Evidence, Status

    def fail(*args):
        raise failure

    monkeypatch.setattr(reportdir.os, "fsync", fail)
    result = CheckResult(check="c", kind="k", status=Status.FAILED, model="m",
                         evidence=[Evidence(title="map", media_type="image/png", data=b"png")])
    result.save_evidence(tmp_path)
    assert result.status is Status.FAILED
    (item,) = result.evidence
    assert item.path is None and item.missing.startswith("could not be saved to ")
    assert list((tmp_path / "evidence").iterdir()) == []


# -- 10. the smaller ones --------------------------------------------------------------------------


def test_batch_size_zero_is_a_usage_error(project):
    result = project.runpytest("--audit-model", "good", "--audit-batch-size", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--audit-batch-size must be a positive integer, got 0*"])


def test_config_that_is_not_utf8_is_a_usage_error(project):
    (project.path / "gate.toml").write_bytes(b'dataset = "\xff\xfe"\n')  # (pytest itself reads pyproject.toml first)
    result = project.runpytest("--audit-model", "good", "--audit-config", "gate.toml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*gate.toml: not UTF-8 text*"])


def test_model_target_that_fails_to_import_is_one_usage_error(project):
    project.makepyfile(badmodels="raise ImportError('no module named torchvisionx')\n")
    result = project.runpytest("--audit-model", "badmodels:build")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*model 'badmodels:build': cannot import module 'badmodels': ImportError: no module named torchvisionx*"])


def test_xdist_report_keeps_the_serial_order(project):
    project.runpytest("--audit-model", "good", "--audit-model", "shortcut", "-p", "no:randomly")
    serial = [(r["model"], r["check"]) for r in report_json(project)["results"]]
    project.runpytest_subprocess("--audit-model", "good", "--audit-model", "shortcut", "-n", "2", "-p", "xdist")
    parallel = [(r["model"], r["check"]) for r in report_json(project)["results"]]
    assert parallel == serial


def test_error_is_a_pytest_error_and_junit_properties_are_short(project):
    junit = project.path / "junit.xml"
    result = project.runpytest("--audit-model", "broken", "--audit-model", "good", f"--junitxml={junit}")
    result.assert_outcomes(errors=2, passed=1, failed=1)
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    broken = [c for c in cases if "broken" in c.get("classname", "") + c.get("name", "")]
    assert len(broken) == 2 and all(c.find("error") is not None and c.find("failure") is None for c in broken)
    good = [c for c in cases if c not in broken]
    assert [c.find("failure") is not None for c in good] == [False, True]  # grey fails: a <failure>
    for case in cases:
        for prop in case.iter("property"):
            assert len(prop.get("value")) <= 80, (prop.get("name"), prop.get("value")[:100])
    names = {p.get("name") for p in ET.parse(junit).getroot().iter("property")}
    assert {"audit_status", "audit_metric", "audit_value", "audit_threshold"} <= names


def test_audit_evidence_without_an_audit_writes_nothing(project):
    project.makepyfile(test_mine=textwrap.dedent("""
        import torch

        def test_draws(audit_evidence):
            audit_evidence.image("noise", torch.rand(3, 8, 8))
    """))
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert not (project.path / "audit-report").exists()
    assert not list(project.path.rglob("*.png"))


def test_custom_check_that_trains_the_model_leaves_it_as_it_was(hostile):
    hostile.makeconftest(CONFTEST + textwrap.dedent("""
        from dataclasses import dataclass

        import hostile_checks, torch
        from tests.toys import SmallNet

        NET = SmallNet()
        BEFORE = {k: v.clone() for k, v in NET.state_dict().items()}

        @auditkit.register_model("bn")
        def bn():
            return auditkit.ModelSpec(module=NET, class_names=["left", "right", "empty"], input_size=(16, 16),
                                      name="bn", dataset="halves")

        def changed():
            after = NET.state_dict()
            return [k for k in BEFORE if not torch.equal(BEFORE[k], after[k])]

        @auditkit.register_check("model-intact")
        @dataclass
        class ModelIntact(auditkit.Check):
            def run(self, subject, audit_set):
                bad = changed() + (["train mode"] if subject.module.training else [])
                return self.result(metric="changed tensors", value=len(bad), threshold=0, direction="<=",
                                   message=", ".join(bad))

        def pytest_unconfigure(config):
            assert not changed(), f"the audit changed {changed()}"
            assert NET.training, "the user's train mode was not given back"
    """))
    hostile.makepyprojecttoml(gate("trains-the-model", "model-intact"))
    result = hostile.runpytest("--audit-model", "bn", "-k", "trains or intact", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()[-2000:]
    by_check = {r["check"]: r for r in report_json(hostile)["results"]}
    assert by_check["model-intact"]["status"] == "passed"  # the next check saw the model as it was
    assert "buffers" in " ".join(by_check["trains-the-model"]["details"]["restored"])


# -- library probes: bad data and bad parameters are refused before any check runs ----------------


def _bad_image(kind: str):
    import torch

    image = torch.rand(3, 8, 8)
    return {
        "x255": image * 255,
        "uint8": (image * 255).to(torch.uint8),
        "nan": image.masked_fill(image > 0.5, float("nan")),
        "empty": torch.rand(3, 0, 0),
    }[kind]


@pytest.mark.parametrize("kind", ["x255", "uint8", "nan", "empty"])
def test_samples_built_directly_validate_their_pixels(kind):
    from auditkit import Sample
    from auditkit.data import AuditDataError

    with pytest.raises(AuditDataError, match="sample 'probe'"):
        Sample(_bad_image(kind), 0, (), "probe")


@pytest.mark.parametrize("magnitudes", [[-4, 0], [2, 2], [0.5]])
def test_translation_magnitudes_that_measure_nothing_are_refused(magnitudes):
    from auditkit.checks import CheckConfigError, build_checks

    with pytest.raises(CheckConfigError, match="magnitudes"):
        build_checks([{"kind": "invariance-grows-with-depth", "magnitudes": magnitudes}])


def test_constant_features_fail_class_separation_instead_of_crashing():
    import torch

    from auditkit import Status, Subject
    from auditkit.checks.embedding import ClassSeparation
    from tests.toys import SmallNet, halves_set

    net = SmallNet()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    spec = auditkit.ModelSpec(module=net, class_names=["left", "right", "empty"], input_size=(16, 16), name="zeroed")
    data = halves_set(n=12)
    with Subject(spec, device="cpu") as subject:
        result = ClassSeparation().execute(subject, data)
    assert result.status is Status.FAILED and "same for every image" in result.message


@pytest.mark.parametrize("kind", ["occlusion-drop", "deletion-insertion", "class-visualisation"])
def test_checks_that_score_a_softmax_need_a_model_of_two_classes(kind):
    # before: occlusion-drop and deletion-insertion FAILED "effect 0" (p = 1 for every image, intact or
    # not), class-visualisation PASSED "1 of 1 classes"
    import torch
    from torch import nn

    from auditkit import Status, Subject
    from auditkit.checks import build_checks
    from tests.toys import halves_set

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 1))
    spec = auditkit.ModelSpec(module=net, class_names=["left"], input_size=(16, 16), name="one")
    data = halves_set(n=8)
    (check,) = build_checks([{"kind": kind, "steps": 2} if kind == "class-visualisation" else {"kind": kind}])
    with Subject(spec, device="cpu") as subject:
        result = check.execute(subject, data)
    assert result.status is Status.ERROR, result.summary()
    assert "needs a model of at least 2 classes, model 'one' has 1" in result.message
