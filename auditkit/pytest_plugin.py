"""The pytest plugin: `pytest --audit-model NAME` turns each (model, check) into a test item.

Nothing here imports torch until an --audit-* option is used: a pytest run
of an unrelated project pays only for this module and the registry.
Items are `audit[MODEL]::CHECK`, carry the `audit` marker (so `-m audit`
runs the audit alone) and attach their CheckResult to the test report; the
controller (xdist-aware) writes index.html and audit.json at the end.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from auditkit.registry import DATASETS, MODELS, UnknownNameError

SESSION_KEY = pytest.StashKey["Any"]()
RESULT_KEY = pytest.StashKey["tuple"]()  # (result dict, model info) of an audit item, once it ran
EVIDENCE_KEY = pytest.StashKey["list"]()  # evidence dicts a plain test recorded
STRICT_KEY = pytest.StashKey[bool]()  # whether an INCONCLUSIVE check fails
STAGING_INPUT = "auditkit_staging"  # xdist workerinput key: the run's staging folder
CONFIG_INPUT = "auditkit_config"  # xdist workerinput key: the configuration file the controller read ("": none)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("auditkit", "auditkit: audit what a vision model looks at")
    group.addoption("--audit-model", action="append", default=[], dest="audit_models", metavar="NAME",
                    help="audit the registered model NAME (a registered name or 'package.module:callable'); repeatable")
    group.addoption("--audit-dataset", dest="audit_dataset", metavar="NAME",
                    help="audit set to use for every model (default: [tool.auditkit] dataset, else the model's own)")
    group.addoption("--audit-config", dest="audit_config", metavar="PATH",
                    help="TOML file with the audit configuration (default: [tool.auditkit] in pyproject.toml)")
    group.addoption("--audit-device", dest="audit_device", metavar="DEVICE",
                    help="auto (default), cpu, cuda, cuda:N, or a list such as cuda:0,cuda:1; under pytest-xdist "
                         "worker i takes list entry i mod its length, and cuda or auto takes GPU i mod the GPU count")
    group.addoption("--audit-report", dest="audit_report", metavar="DIR",
                    help="folder for index.html, audit.json and evidence (default: audit-report)")
    group.addoption("--audit-batch-size", dest="audit_batch_size", type=int, metavar="N",
                    help="largest batch for the model's forward (default 64; halves on out-of-memory)")
    group.addoption("--audit-memory", dest="audit_memory", metavar="SIZE",
                    help="memory for results reused across checks (clean forwards, layer features): a size "
                         "such as 2GB or 512MB, 0 for none, or a fraction of physical memory such as 0.1 "
                         "(default: [tool.auditkit] memory, else 5 %% of physical memory)")
    group.addoption("--audit-strict", action="store_true", default=None, dest="audit_strict",
                    help="an INCONCLUSIVE check (the audit set cannot decide) fails instead of passing with a "
                         "warning (default: [tool.auditkit] strict, else false)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "audit: an auditkit check item (select the audit alone with -m audit)")
    models = config.getoption("audit_models")
    if not models:
        return
    from auditkit.checks.base import CheckConfigError
    from auditkit.config import AuditConfigError
    from auditkit.reportdir import ReportFolderError, make_staging
    from auditkit.runner import AuditSession

    for name in models:
        if not MODELS.has(name):
            raise pytest.UsageError(MODELS.unknown_message(name))
    batch_size = config.getoption("audit_batch_size")
    if batch_size is not None and batch_size < 1:
        raise pytest.UsageError(f"--audit-batch-size must be a positive integer, got {batch_size}")
    memory = config.getoption("audit_memory")
    if memory is not None:
        from auditkit.config import parse_memory

        try:
            memory = parse_memory(memory)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from exc
    invocation_dir = Path(config.invocation_params.dir)
    try:
        for name in models:
            MODELS.check_importable(name)
        settings = _load_settings(config, invocation_dir)
        dataset = config.getoption("audit_dataset") or settings.dataset
        if dataset and not DATASETS.has(dataset):
            raise pytest.UsageError(DATASETS.unknown_message(dataset))
        if dataset:
            DATASETS.check_importable(dataset)
        _check_device(config.getoption("audit_device"), settings)
        target = settings.report_path(config.getoption("audit_report"), invocation_dir)
        if _is_worker(config):
            staging = Path(config.workerinput[STAGING_INPUT])
        else:
            staging = make_staging(target)
        session = AuditSession(
            models=list(dict.fromkeys(models)), config=settings, dataset=dataset,
            device=config.getoption("audit_device"), batch_size=batch_size, memory=memory, report_dir=staging,
        )
    except (AuditConfigError, CheckConfigError, UnknownNameError, ReportFolderError) as exc:
        raise pytest.UsageError(str(exc)) from exc
    config.stash[SESSION_KEY] = session
    config.stash[STRICT_KEY] = bool(config.getoption("audit_strict") or settings.strict)
    if not _is_worker(config):
        config.pluginmanager.register(AuditReporter(config, session, staging, target), "auditkit-reporter")


def _load_settings(config: pytest.Config, invocation_dir: Path):
    """The audit configuration: --audit-config, else the [tool.auditkit] table found from what the
    command line names (-c, --rootdir, path arguments) and the invocation directory, never from the
    rootdir or configuration file pytest settled on by itself (auditkit.config.lookup_places).
    An xdist worker reads the file its controller read."""
    from auditkit.config import AuditConfig, holds_table, load_config

    if _is_worker(config) and CONFIG_INPUT in config.workerinput:
        chosen = config.workerinput[CONFIG_INPUT]
        return load_config(chosen, invocation_dir) if chosen else AuditConfig()
    explicit = config.getoption("audit_config")
    if explicit is not None:
        return load_config(explicit, invocation_dir)
    args = list(config.args) if config.args_source == pytest.Config.ArgsSource.ARGS else []
    settings = load_config(None, invocation_dir, inifile=config.getoption("inifilename"),
                           rootdir=config.getoption("rootdir"), args=args)
    # pytest's own choices, where they hold a table that was not read: say so (pytest takes an
    # option value such as --audit-report /other/project/reports for a path and moves them there;
    # that is why they are not followed)
    seen = {Path(file).resolve() for file in (settings.source, *(f for f, _ in settings.not_read))}
    pytest_choices = [(config.inipath, "pytest's configfile"),
                      (config.rootpath / "pyproject.toml", "in pytest's rootdir")]
    for file, how in pytest_choices:
        if file is not None and Path(file).resolve() not in seen and holds_table(file):
            seen.add(Path(file).resolve())
            settings.not_read.append((str(file), f"{how}, which auditkit does not follow: it looks from -c, "
                                                  f"--rootdir, the path arguments and the invocation directory"))
    return settings


def _check_device(option: str | None, settings: Any) -> None:
    """A usage error, naming where the device came from, when --audit-device (else the file's device)
    is not a device this machine has; xdist's controller checks it before any worker starts."""
    from auditkit.subject import AuditModelError, device_for_worker

    try:
        device_for_worker(option or settings.device, None)  # checks every entry, whichever this process gets
    except AuditModelError as exc:
        origin = "--audit-device" if option else f"audit config {settings.source}"
        raise pytest.UsageError(f"{origin}: {exc}") from exc


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    """Which configuration file the audit read, and where its report goes."""
    session = _session(config)
    if session is None or _is_worker(config):
        return None
    reporter = config.pluginmanager.get_plugin("auditkit-reporter")
    lines = [f"auditkit: {line}" for line in session.config.describe()]
    if reporter is not None:
        lines.append(f"auditkit: report to {_display_path(reporter.target)}")
    return lines


def _session(config: pytest.Config):
    return config.stash.get(SESSION_KEY, None)


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


# -- collection ----------------------------------------------------------------
class AuditCheckFailed(AssertionError):
    """A check ran and its condition does not hold."""


class AuditCheckError(Exception):
    """A check could not run."""


class AuditInconclusiveWarning(pytest.PytestWarning):
    """A check could not decide on this audit set (INCONCLUSIVE); it passes unless --audit-strict."""


class AuditCollector(pytest.Collector):
    """`audit[MODEL]`: one item per configured check."""

    def __init__(self, *, model: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model

    def collect(self) -> list[pytest.Item]:
        session = _session(self.config)
        return [AuditItem.from_parent(self, name=check.name, model=self.model, check=check) for check in session.checks]


class AuditItem(pytest.Item):
    """`audit[MODEL]::CHECK`: runs one check on one model.

    The check runs in the setup phase, so a check that could not run (ERROR)
    is a pytest error (JUnit <error>), and a check whose condition fails is
    a test failure (JUnit <failure>) raised in the call phase.
    """

    def __init__(self, *, model: str, check: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.check = check
        self.result = None
        self.add_marker("audit")

    def setup(self) -> None:
        session = _session(self.config)
        result = session.run(self.model, self.check, progress=_terminal_progress(self.config))
        self.result = result
        self.stash[RESULT_KEY] = (result.to_dict(), session.model_info(self.model))
        for key, value in junit_properties(result):
            self.user_properties.append((key, value))
        if result.status.value == "error":
            raise AuditCheckError(result)

    def runtest(self) -> None:
        if self.result is None:
            return
        status = self.result.status.value
        if status == "failed":
            raise AuditCheckFailed(self.result)
        if status == "inconclusive":
            if self.config.stash.get(STRICT_KEY, False):
                raise AuditCheckFailed(self.result)
            import warnings

            warnings.warn(AuditInconclusiveWarning(
                f"audit[{self.model}]::{self.name} is INCONCLUSIVE (passes; --audit-strict fails it): "
                f"{self.result.message}"))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, (AuditCheckFailed, AuditCheckError)):
            result = excinfo.value.args[0]
            lines = [result.summary()]
            failing = [r for r in result.rows if r.get("passed") is False][:5]
            if failing:
                lines.append("first failing rows:")
                lines += ["  " + ", ".join(f"{k}={_short(v)}" for k, v in row.items()) for row in failing]
            if result.error and result.status.value == "error":
                lines.append(result.error.rstrip())
            return "\n".join(lines)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"audit[{self.model}]::{self.name}"


def _terminal_progress(config: pytest.Config):
    """A progress sink that writes the check's line in place on pytest's terminal, or None where nothing
    should be shown: output not on an interactive terminal (a CI log), an xdist worker, -q -q."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or _is_worker(config) or not bool(reporter.isatty) or config.get_verbosity() < -1:
        return None
    capture = config.pluginmanager.get_plugin("capturemanager")
    writer = reporter._tw  # pytest's TerminalWriter: its width and the current line's
    shown = {"width": 0}

    def sink(event: Any) -> None:
        width = shown["width"]
        room = writer.fullwidth - writer.width_of_current_line - 2  # the writer never sees our text
        text = "" if event.finished else f" [{event.line}]"[: max(0, room)]
        erase = "\b" * width + " " * width + "\b" * width  # back over our last text, leaving pytest's own
        # straight to the terminal (capture suspended), not through pytest's writer, whose count of the
        # line's width places its own "[ 40%]"; what we write is erased again
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            sys.stdout.write(erase + text)
            sys.stdout.flush()
        shown["width"] = len(text)

    return sink


def junit_properties(result: Any) -> list[tuple[str, str]]:
    """Short JUnit properties of a result: status, metric, value, threshold (no Python reprs)."""
    props = [("audit_status", result.status.value)]
    if result.metric:
        props.append(("audit_metric", result.metric[:80]))
    if result.value is not None:
        props.append(("audit_value", f"{result.value:.6g}"))
    if result.threshold is not None:
        props.append(("audit_threshold", f"{result.direction} {result.threshold:.6g}"))
    return props


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Carry an audit item's result (and a plain test's evidence) on its report, across xdist too."""
    report = yield
    if call.excinfo is not None and isinstance(call.excinfo.value, (AuditCheckFailed, AuditCheckError)):
        report.longrepr = item.repr_failure(call.excinfo)  # pytest formats setup errors without repr_failure
    stashed = item.stash.get(RESULT_KEY, None)
    if stashed is not None and call.when == "setup":
        report.auditkit_result, report.auditkit_model = stashed
    evidence = item.stash.get(EVIDENCE_KEY, None)
    if evidence and call.when == "call":
        report.auditkit_evidence = list(evidence)
    return report


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the audit items first, before -k / -m deselection sees the list."""
    audit = _session(config)
    if audit is None:
        return
    new: list[pytest.Item] = []
    for model in audit.models:
        collector = AuditCollector.from_parent(session, name=f"audit[{model}]", nodeid=f"audit[{model}]", model=model)
        collected = collector.collect()
        # tell the terminal (and other plugins) what was collected, as for any collector
        config.hook.pytest_collectreport(report=pytest.CollectReport(collector.nodeid, "passed", None, collected))
        new += collected
    items[:0] = new


# -- fixtures for plain tests ------------------------------------------------------
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    audit = _session(metafunc.config)
    uses = {"audit_subject", "audit_set", "audit_model"} & set(metafunc.fixturenames)
    if audit is not None and uses:
        metafunc.parametrize("audit_model", audit.models, ids=[f"audit-{m}" for m in audit.models], scope="session")


@pytest.fixture(scope="session")
def audit_model(request: pytest.FixtureRequest) -> str:
    """The name of the model under audit (one test per --audit-model); skips without --audit-model."""
    pytest.skip("needs --audit-model NAME")


@pytest.fixture
def audit_subject(request: pytest.FixtureRequest, audit_model: str):
    """The open auditkit Subject of the model under audit."""
    return _session(request.config).subject(audit_model)


@pytest.fixture
def audit_set(request: pytest.FixtureRequest, audit_model: str):
    """The audit set of the model under audit, resized to its input, labels in its class order."""
    return _session(request.config).audit_set(audit_model)


class EvidenceRecorder:
    """Adds pictures from a plain test to the audit report (saved at once under the report's evidence/).

    Without an audit (no --audit-model) there is no report: the pictures are
    drawn but not kept, so no file is left behind.
    """

    def __init__(self, item: pytest.Item, report_dir: Path | None) -> None:
        self._item = item
        self._dir = report_dir
        self._count = 0

    def add(self, evidence: Any) -> None:
        """Save an auditkit Evidence and list it with this test in the report."""
        if self._dir is None:
            return
        from auditkit.reportdir import evidence_stem

        evidence.save(self._dir, evidence_stem("test", self._item.nodeid, index=self._count))
        self._count += 1
        self._item.stash.setdefault(EVIDENCE_KEY, []).append(evidence.to_dict())

    def image(self, title: str, image: Any, caption: str = "") -> None:
        """A picture from a C x H x W tensor in [0, 1] or a PIL image."""
        from auditkit import evidence as ev

        pil = image if hasattr(image, "save") else ev.to_pil(image)
        self.add(ev.png_evidence(title, pil, caption))

    def heatmap(self, title: str, image: Any, heat: Any, caption: str = "") -> None:
        """A heat map (H x W) over an image (C x H x W)."""
        from auditkit import evidence as ev

        self.add(ev.png_evidence(title, ev.overlay(image, heat), caption))

    def svg(self, title: str, svg: str, caption: str = "") -> None:
        from auditkit import evidence as ev

        self.add(ev.svg_evidence(title, svg, caption))


@pytest.fixture
def audit_evidence(request: pytest.FixtureRequest) -> EvidenceRecorder:
    """A recorder whose pictures appear with this test in the audit report."""
    audit = _session(request.config)
    return EvidenceRecorder(request.node, audit.report_dir if audit is not None else None)


# -- results and the report ----------------------------------------------------------
class AuditReporter:
    """On the process that writes the report (the controller under xdist): journals the run as it goes,
    then writes the report from the journal and publishes the folder (auditkit.journal.finalise).

    A watchdog process finalises the journal instead when this process dies first.
    """

    def __init__(self, config: pytest.Config, session: Any, staging: Path, target: Path) -> None:
        from auditkit import watchdog
        from auditkit.journal import Journal

        self.config = config
        self.staging = staging
        self.target = target
        self.planned = {f"audit[{model}]::{check.name}": (model, check) for model in session.models
                        for check in session.checks}
        self.resulted: set[str] = set()
        self.xdist_collected: set[str] | None = None
        self.finished = False
        self.written: Path | None = None  # index.html once published
        self.journal = Journal(staging)
        self.journal.write(
            "meta", models=session.models, started=session.started, command=_command(config),
            config=session.config.source, strict=config.stash.get(STRICT_KEY, False),
            config_not_read="; ".join(f"{file} ({how})" for file, how in session.config.not_read),
            planned=[{"nodeid": n, "model": m, "check": c.name, "kind": c.kind} for n, (m, c) in self.planned.items()],
        )
        self.watchdog = watchdog.start(staging, target)

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """xdist: every worker writes its evidence into this run's staging folder."""
        node.workerinput[STAGING_INPUT] = str(self.staging)
        settings = _session(self.config).config
        node.workerinput[CONFIG_INPUT] = settings.source if settings.folder is not None else ""

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        self.xdist_collected = (self.xdist_collected or set()) | set(ids)

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        ids = [item.nodeid for item in items if item.nodeid in self.planned]
        if ids:
            self.journal.write("deselected", nodeids=ids)

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        if nodeid in self.planned:
            self.journal.write("begin", nodeid=nodeid)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        nodeid = report.nodeid
        result = getattr(report, "auditkit_result", None)
        if result is not None and nodeid not in self.resulted:
            self.resulted.add(nodeid)
            self.journal.write("result", nodeid=nodeid, result=result, model_info=getattr(report, "auditkit_model", {}))
        elif nodeid in self.planned and report.failed and nodeid not in self.resulted:
            # the item ended without a result: e.g. its xdist worker crashed
            self.resulted.add(nodeid)
            self.journal.write("lost", nodeid=nodeid, message=f"the check ended without a result: {_tail(report)}")
        evidence = getattr(report, "auditkit_evidence", None)
        if evidence and nodeid not in self.planned:
            self.journal.write("test", nodeid=nodeid, outcome=report.outcome, duration=report.duration,
                               evidence=evidence, longrepr=str(report.longrepr) if report.failed else "")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        from auditkit import watchdog
        from auditkit.journal import finalise
        from auditkit.reportdir import discard

        _session(self.config).close()
        if self.xdist_collected is not None:
            missing = [n for n in self.planned if n not in self.xdist_collected]
            if missing:
                self.journal.write("deselected", nodeids=missing)
        self.journal.close()
        try:
            if self.config.getoption("collectonly"):
                discard(self.staging)  # nothing ran, nothing was meant to: the published report stays
            else:
                # always, even with no result (Ctrl-C before the first, -k matching no check): the
                # report of an earlier run must not stand for this one
                self.written = finalise(self.staging, self.target, int(exitstatus))
        finally:
            self.finished = True
            watchdog.stop(self.watchdog)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        """A run that ended before sessionfinish (a usage error in collection) leaves nothing behind."""
        if not self.finished:
            from auditkit import watchdog
            from auditkit.reportdir import discard

            self.journal.close()
            discard(self.staging)
            watchdog.stop(self.watchdog)

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        if self.written is None:
            return
        from auditkit.checks.base import CheckResult

        html = self.written
        terminalreporter.section("auditkit")
        doc = json.loads((html.parent / "audit.json").read_text(encoding="utf-8"))
        meta = doc["meta"]
        for r in (CheckResult.from_dict(d) for d in doc["results"]):
            if r.kind != "test":
                terminalreporter.write_line(f"{r.model}: {r.summary()}")
        counts = ", ".join(f"{n} {status}" for status, n in meta["counts"].items() if n and status != "total")
        terminalreporter.write_line(f"audit: {counts or 'no check ran'}")
        undecided = meta["counts"].get("inconclusive", 0)
        if undecided:
            terminalreporter.write_line(
                f"audit: {undecided} check(s) INCONCLUSIVE: the audit set cannot decide them; "
                + ("they fail (strict)" if meta.get("strict") else "they pass with a warning (--audit-strict fails them)"),
                yellow=True)
        run = meta.get("run") or {}
        if not run.get("complete", True):
            terminalreporter.write_line(
                f"audit INCOMPLETE: {run.get('ran')} of {run.get('planned')} checks ran; {run.get('reason')}", yellow=True)
        for line in _session(self.config).config.describe()[1:]:
            terminalreporter.write_line(f"audit configuration {line}", yellow=True)
        terminalreporter.write_line(f"report: {_display_path(html)} (audit.json beside it)")


def _tail(report: pytest.TestReport, limit: int = 600) -> str:
    text = str(report.longrepr or "").strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def _command(config: pytest.Config) -> str:
    return " ".join(["pytest", *map(str, config.invocation_params.args)])


def _display_path(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)
