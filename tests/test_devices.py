"""Which device each process audits on: one GPU per pytest-xdist worker, lists, and bad device texts.

Everything runs on a CPU-only machine: the worker id and the CUDA device count are given (or faked).
"""
import pytest
import torch

# pytester's in-process runs drop modules first imported inside a run; import the library here
import auditkit.checks.occlusion  # noqa: F401
import auditkit.report  # noqa: F401
import auditkit.runner  # noqa: F401
import auditkit.subject
import tests.toys  # noqa: F401
from auditkit.config import AuditConfig
from auditkit.runner import AuditSession
from auditkit.subject import AuditModelError, device_for_worker

WORKERS = ["gw0", "gw1", "gw2", "gw3"]


def devices(text, count, workers=WORKERS):
    return [device_for_worker(text, worker, count) for worker in workers]


def test_cuda_spreads_workers_over_the_gpus():
    assert devices("cuda", 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert devices("cuda", 3) == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert devices("cuda", 1) == ["cuda:0"] * 4
    assert device_for_worker("cuda", "gw13", 4) == "cuda:1"


def test_a_list_gives_worker_i_entry_i_mod_its_length():
    assert devices("cuda:0,cuda:1", 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert devices("cuda:1, cuda:0", 2) == ["cuda:1", "cuda:0", "cuda:1", "cuda:0"]  # order and spaces as given
    assert devices("cuda:0,cuda:0,cuda:1", 2) == ["cuda:0", "cuda:0", "cuda:1", "cuda:0"]
    assert devices("cuda:1,cpu", 2) == ["cuda:1", "cpu", "cuda:1", "cpu"]
    assert devices("cpu,cpu", 0) == ["cpu"] * 4


@pytest.mark.parametrize("worker", [None, "", "master", "gw", "gwx"])
def test_without_a_worker_a_list_means_its_first_entry_and_cuda_the_default(worker):
    assert device_for_worker("cuda:1,cuda:0", worker, 2) == "cuda:1"
    assert device_for_worker("cuda", worker, 2) == "cuda"
    assert device_for_worker("auto", worker, 2) == "cuda"
    assert device_for_worker("cuda:1", worker, 2) == "cuda:1"


def test_cpu_and_a_single_index_are_the_same_in_every_worker():
    assert devices("cpu", 0) == devices("cpu", 2) == ["cpu"] * 4
    assert device_for_worker("cpu", None, 2) == "cpu"
    assert devices("cuda:1", 2) == ["cuda:1"] * 4


def test_auto_is_cpu_without_cuda_and_spreads_like_cuda_with_it():
    assert devices("auto", 0) == ["cpu"] * 4
    assert device_for_worker("auto", None, 0) == device_for_worker(None, None, 0) == "cpu"
    assert devices("auto", 2) == devices(None, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert device_for_worker(" auto ", None, 2) == "cuda"


@pytest.mark.parametrize("text, entry", [("cuda:0,gpu1", "gpu1"), ("cuda:0,cuda", "cuda"), ("cpu,auto", "auto"),
                                         ("cuda:0,", ""), ("cuda:0,cuda:-1", "cuda:-1"), ("cpu,CPU", "CPU")])
def test_a_list_entry_that_is_not_a_device_names_it(text, entry):
    message = f"device {text!r} has the entry {entry!r}, which is not a device: expected cpu or cuda:N"
    for worker in (None, "gw0", "gw1"):  # whichever entry this process would get
        with pytest.raises(AuditModelError, match=f"^{message}"):
            device_for_worker(text, worker, 2)


@pytest.mark.parametrize("text", ["banana", "tpu", "cuda:x", "cuda:", "cuda0", "", "cpu:0"])
def test_a_single_text_that_is_not_a_device_says_what_is_expected(text):
    with pytest.raises(AuditModelError, match=rf"^device {text!r} is not valid: expected auto, cpu, cuda, cuda:N"):
        device_for_worker(text, "gw0", 2)


@pytest.mark.parametrize("text, entry", [("cuda:0,cuda:2", "cuda:2"), ("cuda:5", "cuda:5"), ("cuda:2,cuda:0", "cuda:2")])
def test_an_index_beyond_the_device_count_names_the_entry_and_the_range(text, entry):
    for worker in (None, "gw0", "gw1"):
        with pytest.raises(AuditModelError, match=rf"^device {text!r} asks for {entry!r}, but only 2 CUDA device\(s\) "
                                                  r"exist here: expected cuda:0 to cuda:1$"):
            device_for_worker(text, worker, 2)


@pytest.mark.parametrize("text, entry", [("cuda", "cuda"), ("cuda:0", "cuda:0"), ("cpu,cuda:0", "cuda:0")])
def test_cuda_without_cuda_is_an_error(text, entry):
    with pytest.raises(AuditModelError, match=rf"^device {text!r} asks for {entry!r}, but CUDA is not available here"):
        device_for_worker(text, "gw0", 0)


def test_the_count_defaults_to_torchs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert device_for_worker("cuda", "gw5") == "cuda:2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_for_worker("auto", "gw5") == "cpu"


class FakeSubject:
    """Stands in for Subject: records the device the session asked for and opens nothing."""

    def __init__(self, spec, device, batch_size, memory=None):
        self.spec, self.device, self.batch_size = spec, device, batch_size

    def open(self):
        return self


@pytest.mark.parametrize("cli, file, worker, expected", [
    (None, "cuda", "gw3", "cuda:1"),
    ("cuda", "cpu", "gw2", "cuda:0"),  # the option wins over the file
    (None, None, "gw1", "cuda:1"),  # the default, auto, with two GPUs
    ("cuda:1,cuda:0", None, "gw0", "cuda:1"),
    (None, "cuda:0,cuda:1", "gw3", "cuda:1"),
    (None, "cuda:0,cuda:1", None, "cuda:0"),  # no xdist: the first entry
    ("cuda", None, None, "cuda"),
    ("cpu", "cuda", "gw1", "cpu"),
])
def test_the_session_gives_each_worker_its_device(monkeypatch, cli, file, worker, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(auditkit.subject, "Subject", FakeSubject)
    if worker is None:
        monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    else:
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    session = AuditSession(["tests.toys:region_spec"], config=AuditConfig(device=file), device=cli, checks=[object()])
    subject = session.subject("tests.toys:region_spec")
    assert isinstance(subject, FakeSubject) and subject.device == expected


def test_a_bad_device_option_is_a_usage_error_naming_the_entry(project):
    result = project.runpytest("--audit-model", "good", "--audit-device", "cpu,gpu1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--audit-device: device 'cpu,gpu1' has the entry 'gpu1', which is not a device: "
                                 "expected cpu or cuda:N*"])


def test_a_bad_device_in_the_config_file_is_a_usage_error_naming_the_file(project):
    project.makepyprojecttoml('[tool.auditkit]\ndataset = "halves"\ndevice = "cpu,banana"\n'
                              '[[tool.auditkit.checks]]\nkind = "occlusion-drop"\nbaseline = "zero"\n')
    result = project.runpytest("--audit-model", "good")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*audit config *pyproject.toml: device 'cpu,banana' has the entry 'banana'*"])
    # the option wins over the file: the file's device is then not used, nor checked
    project.runpytest("--audit-model", "good", "--audit-device", "cpu").assert_outcomes(passed=1)
