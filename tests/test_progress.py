"""Progress on long work: which check, step k of n, elapsed; throttled; silent in logs (issue 9, point 5)."""
from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from auditkit import progress
from auditkit.checks.occlusion import OcclusionDrop
from auditkit.checks.sanity import SaliencySanity
from auditkit.methods.optimise import optimise
from auditkit.subject import Subject
from tests.toys import SmallNet, halves_set, region_spec


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_tracker_waits_for_the_delay_then_throttles_and_closes_its_line():
    clock, events = Clock(), []
    tracker = progress.Tracker("occlusion-drop", events.append, delay_s=2.0, interval_s=0.5, clock=clock)
    tracker.update("inputs", 10, 100)
    clock.now = 1.9
    tracker.update("inputs", 20, 100)
    assert events == []  # a check shorter than the delay says nothing
    clock.now = 2.0
    tracker.update("inputs", 30, 100)
    clock.now = 2.3
    tracker.update("inputs", 40, 100)  # within the interval: dropped
    clock.now = 2.6
    tracker.update("steps", 3, 11)
    tracker.update("inputs", 8, 16)
    assert [e.line for e in events] == ["occlusion-drop: inputs 30/100 · 2 s",
                                        "occlusion-drop: inputs 40/100 · steps 3/11 · 3 s"]
    tracker.finish()
    assert events[-1].finished and (events[-1].check, events[-1].unit) == ("occlusion-drop", "inputs")
    quiet = progress.Tracker("c", events.append, clock=clock)
    quiet.finish()  # never shown: no closing event
    assert len(events) == 3


@pytest.fixture
def immediate(monkeypatch):
    """Checks' trackers show every update at once."""
    import auditkit.checks.base as base

    monkeypatch.setattr(base, "Tracker", lambda name, sink: progress.Tracker(name, sink, delay_s=0, interval_s=0))


def test_a_check_reports_its_chunks_to_the_subjects_sink_and_stops_afterwards(immediate):
    events = []
    with Subject(region_spec(), device="cpu", batch_size=4) as subject:
        subject.progress = events.append
        result = OcclusionDrop(patch=4, stride=4).execute(subject, halves_set(8))
        assert subject.tracker is None
        after = len(events)
        subject.predict(torch.rand(5, 3, 16, 16))  # no check running: nothing reported
    assert result.status.value != "error", result.summary()
    assert len(events) == after > 2 and events[-1].finished
    assert all(e.check == "occlusion-drop" and 0 < e.done <= e.total for e in events)
    assert any(e.unit == "inputs" and e.done == e.total for e in events)  # a loop seen to its end


def test_the_optimiser_and_the_cascade_report_their_steps(immediate):
    events = []
    spec = region_spec()
    spec.module = SmallNet()
    spec.layers = ["features.0", "features.3"]
    with Subject(spec, device="cpu", batch_size=4) as subject:
        subject.progress = events.append
        SaliencySanity(method="gradient", samples=8, max_steps=2).execute(subject, halves_set(8))
        sanity = [e.line for e in events]
        subject.tracker = progress.Tracker("opt", events.append, delay_s=0, interval_s=0)
        optimise(lambda x, rows: {"total": x.flatten(1).mean(1)}, (3, 3, 4, 4), steps=5, subject=subject)
    assert any("steps 2/2" in line for line in sanity) and all(line.startswith("saliency-sanity: ") for line in sanity)
    assert [e.done for e in events if e.check == "opt" and e.unit == "steps"] == [1, 2, 3, 4, 5]


def _reporter(tty: bool, width: int = 60, line: int = 20):
    writer = SimpleNamespace(fullwidth=width, width_of_current_line=line)
    reporter = SimpleNamespace(isatty=tty, _tw=writer)
    plugins = {"terminalreporter": reporter, "capturemanager": None}
    config = SimpleNamespace(pluginmanager=SimpleNamespace(get_plugin=plugins.get), get_verbosity=lambda: 0,
                             workerinput=None)
    del config.workerinput  # not an xdist worker
    return config


def test_terminal_sink_writes_in_place_and_erases_itself(capsys):
    from auditkit.pytest_plugin import _terminal_progress

    assert _terminal_progress(_reporter(tty=False)) is None  # a CI log: nothing
    sink = _terminal_progress(_reporter(tty=True, width=60, line=20))
    event = progress.ProgressEvent("occlusion-drop", "inputs", 3, 9, 4.0, "occlusion-drop: inputs 3/9 · 4 s")
    sink(event)
    first = capsys.readouterr().out
    assert first == " [occlusion-drop: inputs 3/9 · 4 s]"
    sink(progress.ProgressEvent("occlusion-drop", "inputs", 9, 9, 5.0, "x" * 80))  # cut to the line's room
    second = capsys.readouterr().out
    n = len(first)
    assert second.startswith("\b" * n + " " * n + "\b" * n) and len(second) - 3 * n == 60 - 20 - 2
    sink(progress.ProgressEvent("occlusion-drop", "inputs", 9, 9, 5.0, "", finished=True))
    m = len(second) - 3 * n
    assert capsys.readouterr().out == "\b" * m + " " * m + "\b" * m  # gone: pytest's line is as it was


def test_library_sink_without_tqdm_prints_lines(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    out = io.StringIO()
    sink = progress.tqdm_progress(out)
    sink(progress.ProgressEvent("c", "inputs", 1, 2, 0.0, "c: inputs 1/2 · 0 s"))
    sink(progress.ProgressEvent("c", "inputs", 2, 2, 0.0, "c: inputs 2/2 · 0 s", finished=True))
    assert out.getvalue() == "c: inputs 1/2 · 0 s\n"


def test_library_sink_with_tqdm_keeps_one_bar_per_check():
    pytest.importorskip("tqdm")
    out = io.StringIO()
    sink = progress.tqdm_progress(out)
    sink(progress.ProgressEvent("c", "inputs", 1, 4, 0.0, "c: inputs 1/4 · 0 s"))
    sink(progress.ProgressEvent("c", "inputs", 3, 4, 0.0, "c: inputs 3/4 · 0 s"))
    sink(progress.ProgressEvent("c", "inputs", 4, 4, 0.0, "c: inputs 4/4 · 0 s", finished=True))
    text = out.getvalue()
    assert "c:" in text and "3/4" in text and "4/4" in text
