"""The pytest plugin: `pytest --audit-model NAME` turns each (model, check) into a test item.

Nothing here imports torch until an --audit-* option is used: a pytest run
of an unrelated project pays only for this module and the registry.
Items are `audit[MODEL]::CHECK`, carry the `audit` marker (so `-m audit`
runs the audit alone) and attach their CheckResult to the test report; the
controller (xdist-aware) writes index.html and audit.json at the end.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from auditkit.registry import DATASETS, MODELS, UnknownNameError

SESSION_KEY = pytest.StashKey["Any"]()
RESULT_PROPERTY = "auditkit_result"
MODEL_PROPERTY = "auditkit_model"
EVIDENCE_PROPERTY = "auditkit_evidence"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("auditkit", "auditkit: audit what a vision model looks at")
    group.addoption("--audit-model", action="append", default=[], dest="audit_models", metavar="NAME",
                    help="audit the registered model NAME (a registered name or 'package.module:callable'); repeatable")
    group.addoption("--audit-dataset", dest="audit_dataset", metavar="NAME",
                    help="audit set to use for every model (default: [tool.auditkit] dataset, else the model's own)")
    group.addoption("--audit-config", dest="audit_config", metavar="PATH",
                    help="TOML file with the audit configuration (default: [tool.auditkit] in pyproject.toml)")
    group.addoption("--audit-device", dest="audit_device", metavar="DEVICE",
                    help="auto (default), cpu, cuda or cuda:N")
    group.addoption("--audit-report", dest="audit_report", metavar="DIR",
                    help="folder for index.html, audit.json and evidence (default: audit-report)")
    group.addoption("--audit-batch-size", dest="audit_batch_size", type=int, metavar="N",
                    help="largest batch for the model's forward (default 64; halves on out-of-memory)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "audit: an auditkit check item (select the audit alone with -m audit)")
    models = config.getoption("audit_models")
    if not models:
        return
    from auditkit.checks.base import CheckConfigError
    from auditkit.config import AuditConfigError, load_config
    from auditkit.runner import DEFAULT_REPORT_DIR, AuditSession

    for name in models:
        if not MODELS.has(name):
            raise pytest.UsageError(MODELS.unknown_message(name))
    try:
        settings = load_config(config.getoption("audit_config"), config.rootpath)
        dataset = config.getoption("audit_dataset") or settings.dataset
        if dataset and not DATASETS.has(dataset):
            raise pytest.UsageError(DATASETS.unknown_message(dataset))
        report_dir = config.getoption("audit_report") or settings.report_dir or DEFAULT_REPORT_DIR
        session = AuditSession(
            models=list(dict.fromkeys(models)), config=settings, dataset=dataset,
            device=config.getoption("audit_device"), batch_size=config.getoption("audit_batch_size"),
            report_dir=Path(config.rootpath, report_dir) if not Path(report_dir).is_absolute() else Path(report_dir),
        )
    except (AuditConfigError, CheckConfigError, UnknownNameError) as exc:
        raise pytest.UsageError(str(exc)) from exc
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(AuditReporter(config), "auditkit-reporter")


def _session(config: pytest.Config):
    return config.stash.get(SESSION_KEY, None)


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


# -- collection ----------------------------------------------------------------
class AuditCheckFailed(AssertionError):
    """A check ran and its condition does not hold."""


class AuditCheckError(Exception):
    """A check could not run."""


class AuditCollector(pytest.Collector):
    """`audit[MODEL]`: one item per configured check."""

    def __init__(self, *, model: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model

    def collect(self) -> list[pytest.Item]:
        session = _session(self.config)
        return [AuditItem.from_parent(self, name=check.name, model=self.model, check=check) for check in session.checks]


class AuditItem(pytest.Item):
    """`audit[MODEL]::CHECK`: runs one check on one model."""

    def __init__(self, *, model: str, check: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.check = check
        self.result = None
        self.add_marker("audit")

    def runtest(self) -> None:
        session = _session(self.config)
        result = session.run(self.model, self.check)
        self.result = result
        self.user_properties.append((RESULT_PROPERTY, result.to_dict()))
        self.user_properties.append((MODEL_PROPERTY, session.model_info(self.model)))
        if result.status.value == "error":
            raise AuditCheckError(result)
        if result.status.value == "failed":
            raise AuditCheckFailed(result)

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
    """Adds pictures from a plain test to the audit report (saved at once under evidence/)."""

    def __init__(self, item: pytest.Item, report_dir: Path) -> None:
        self._item = item
        self._dir = report_dir
        self._count = 0

    def add(self, evidence: Any) -> None:
        """Save an auditkit Evidence and list it with this test in the report."""
        from auditkit.checks.base import safe_filename

        evidence.save(self._dir / "evidence", f"test__{safe_filename(self._item.nodeid)}__{self._count:02d}")
        self._count += 1
        self._item.user_properties.append((EVIDENCE_PROPERTY, evidence.to_dict()))

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
    from auditkit.runner import DEFAULT_REPORT_DIR

    report_dir = audit.report_dir if audit is not None else Path(request.config.rootpath, DEFAULT_REPORT_DIR)
    return EvidenceRecorder(request.node, report_dir)


# -- results and the report ----------------------------------------------------------
class AuditReporter:
    """Collects results on the process that writes the report (the controller under xdist) and writes it."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: dict[str, dict] = {}
        self.models: dict[str, dict] = {}
        self.tests: dict[str, dict] = {}
        self.written: tuple[Path, list] | None = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        props = report.user_properties or []
        for key, value in props:
            if key == RESULT_PROPERTY:
                self.results[report.nodeid] = value
            elif key == MODEL_PROPERTY:
                self.models[value["name"]] = value
        evidence = [v for k, v in props if k == EVIDENCE_PROPERTY]
        if evidence and report.nodeid not in self.results:
            self.tests[report.nodeid] = {
                "outcome": report.outcome, "duration": report.duration, "evidence": evidence,
                "longrepr": str(report.longrepr) if report.failed else "",
            }

    def check_results(self) -> list:
        """Audit results, then plain tests that recorded evidence, as CheckResults."""
        from auditkit.checks.base import CheckResult, Evidence, Status

        results = [CheckResult.from_dict(d) for d in self.results.values()]
        for nodeid, test in self.tests.items():
            results.append(CheckResult(
                check=nodeid, kind="test", title=nodeid, duration_s=test["duration"],
                status=Status.PASSED if test["outcome"] == "passed" else Status.FAILED,
                message=test["longrepr"][-2000:], evidence=[Evidence.from_dict(e) for e in test["evidence"]],
            ))
        return results

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        audit = _session(self.config)
        audit.close()
        results = self.check_results()
        if _is_worker(self.config) or not results:
            return
        from auditkit.report import write_report
        from auditkit.runner import report_meta

        models = {name: self.models.get(name, {"name": name}) for name in audit.models}
        html, _ = write_report(results, report_meta(models, audit.started), audit.report_dir)
        self.written = (html, results)

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        if self.written is None:
            return
        from auditkit.report import count_statuses

        html, results = self.written
        terminalreporter.section("auditkit")
        for r in results:
            if r.kind != "test":
                terminalreporter.write_line(f"{r.model}: {r.summary()}")
        counts = ", ".join(f"{n} {status}" for status, n in count_statuses(results).items() if n and status != "total")
        terminalreporter.write_line(f"audit: {counts}")
        terminalreporter.write_line(f"report: {_display_path(html)} (audit.json beside it)")


def _display_path(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)
