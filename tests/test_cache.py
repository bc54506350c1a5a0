"""Work done once: the Subject keeps clean forwards and layer features within a memory budget (issue 9, point 2)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from auditkit import ModelSpec
from auditkit.cache import ResultCache, content_digest
from auditkit.config import AuditConfigError, parse_memory, parse_table, physical_memory
from auditkit.methods import embedding, features
from auditkit.subject import Subject


class Counted(nn.Module):
    """conv -> ReLU -> mean -> Linear, counting the images each forward sees."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.head(self.act(self.conv(x)).mean((2, 3)))


def _subject(memory=None, module=None):
    torch.manual_seed(0)
    module = module or Counted()
    spec = ModelSpec(module=module, class_names=["a", "b"], input_size=(8, 8), layers=["conv", "act"], name="counted")
    return Subject(spec, device="cpu", batch_size=4, memory=memory)


IMAGES = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# -- the budget and the store --------------------------------------------------------------------


def test_memory_budget_texts():
    assert parse_memory("2GB") == 2 * 10**9 and parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("0") == 0 and parse_memory("1000") == 1000 and parse_memory(" 1.5 gb ") == 1_500_000_000
    assert parse_memory("0.25") == int(0.25 * physical_memory()) > 0  # a fraction of physical memory
    assert parse_memory(None) == int(0.05 * physical_memory())  # the stated default
    for bad in ("-1", "lots", "inf", "2XB", "nan", True):
        with pytest.raises(ValueError, match=r"--audit-memory must be a size such as 2GB"):
            parse_memory(bad)
    with pytest.raises(AuditConfigError, match=r"audit config f.toml: memory must be a size"):
        parse_table({"memory": "much"}, "f.toml")
    assert parse_table({"memory": "1MB"}, "f.toml").memory == 10**6


def test_store_drops_the_least_recently_used_beyond_the_budget():
    cache = ResultCache(budget=3 * 400)  # three 100-float tensors
    for k in "abc":
        assert cache.put(k, torch.zeros(100))
    assert cache.get("a") is not None  # a is now the most recent
    assert cache.put("d", {"x": torch.zeros(50), "y": torch.zeros(50)})  # 400 bytes: b goes
    assert cache.get("b") is None and cache.get("c") is not None and cache.get("a") is not None
    assert not cache.put("huge", torch.zeros(1000))  # larger than the budget: not kept, nothing else dropped
    assert len(cache) == 3 and cache.stats.kept_bytes == 1200 and cache.stats.dropped == 2
    assert cache.stats.hits == 3 and cache.stats.misses == 1
    assert not ResultCache(0).put("a", torch.zeros(1))


def test_digest_is_by_content():
    copy = IMAGES.clone()
    assert content_digest(copy) == content_digest(IMAGES) == content_digest(IMAGES[:, :, :, :].contiguous())
    assert content_digest(IMAGES[:5]) != content_digest(IMAGES)
    changed = IMAGES.clone()
    changed[3, 1, 2, 2] += 1e-6
    assert content_digest(changed) != content_digest(IMAGES)
    assert content_digest(IMAGES.double()) != content_digest(IMAGES)  # dtype is part of it


# -- the Subject keeps clean forwards --------------------------------------------------------------


def test_predict_on_the_same_images_runs_the_model_once():
    with _subject() as subject:
        module = subject.module
        first = subject.predict(IMAGES)
        again = subject.predict(IMAGES.clone())  # a fresh copy of the same pixels hits
        assert module.rows == 6 and torch.equal(first, again)
        subject.predict(IMAGES[:3])  # other pixels run
        assert module.rows == 9
        probs = subject.probabilities(IMAGES)
        assert module.rows == 9 and torch.allclose(probs, torch.softmax(first, 1))


def test_features_are_kept_and_their_logits_serve_predict():
    with _subject() as subject:
        module = subject.module
        feats, logits = features.features_and_logits(subject, IMAGES, ["conv", "act"])
        assert module.rows == 6
        again = features.layer_features(subject, IMAGES, ["conv", "act"])
        maps = features.layer_features(subject, IMAGES, ["conv", "act"], flatten=False)
        assert module.rows == 6 and torch.equal(again["act"], feats["act"]) and maps["conv"].shape == (6, 4, 8, 8)
        assert torch.equal(subject.predict(IMAGES), logits) and module.rows == 6  # the sweep's logits
        again["act"] = None  # the dict is the caller's own
        assert features.layer_features(subject, IMAGES, ["conv", "act"])["act"] is not None
        pen = embedding.penultimate_features(subject, IMAGES, "head")
        rows = module.rows
        assert torch.equal(embedding.penultimate_features(subject, IMAGES, "head"), pen) and module.rows == rows
    with _subject(memory=0) as plain:  # the same numbers without a cache
        assert torch.equal(features.layer_features(plain, IMAGES, ["act"])["act"], feats["act"])
        assert torch.equal(plain.predict(IMAGES), logits)


@pytest.mark.parametrize("change", ["train mode", "hook", "parameter", "memory 0"])
def test_nothing_is_reused_once_the_model_is_not_as_opened(change):
    with _subject(memory=0 if change == "memory 0" else None) as subject:
        module = subject.module
        before = subject.predict(IMAGES)
        if change == "train mode":
            module.train()
        elif change == "hook":
            handle = module.conv.register_forward_hook(lambda _m, _i, out: out * 2)
        elif change == "parameter":
            with torch.no_grad():
                module.head.bias += 1.0
        after = subject.predict(IMAGES)
        assert module.rows == 12  # ran again
        if change in ("hook", "parameter"):
            assert not torch.allclose(after, before)  # and the new model's answer is what came back
        if change == "hook":
            handle.remove()


def test_restore_that_put_something_back_drops_what_was_kept():
    with _subject() as subject:
        module = subject.module
        subject.predict(IMAGES)
        assert subject.restore() == [] and len(subject.cache) == 1  # nothing changed: kept
        module.train()
        subject.restore()
        assert len(subject.cache) == 0
        subject.predict(IMAGES)
        assert module.rows == 12
    assert len(subject.cache) == 0  # close drops everything


def test_a_budget_too_small_recomputes_and_gives_the_same_result():
    with _subject(memory=100) as subject:  # 6 x 2 logits = 48 bytes fit, the features (6 x 4 x 8 x 8 x 4) do not
        module = subject.module
        a = features.layer_features(subject, IMAGES, ["conv"])["conv"]
        b = features.layer_features(subject, IMAGES, ["conv"])["conv"]
        assert module.rows == 12 and torch.equal(a, b) and subject.cache.stats.dropped >= 2
        subject.predict(IMAGES)
        assert module.rows == 12  # the logits were kept


def test_derived_copies_keep_their_own_results():
    with _subject(memory=10**6) as subject:
        subject.predict(IMAGES)
        with subject.randomised(seed=1) as other:
            assert other.cache is not subject.cache and other.cache.budget == 10**6 and len(other.cache) == 0
            assert not torch.allclose(other.predict(IMAGES), subject.predict(IMAGES))


def test_the_option_and_the_config_reach_the_subject(project):
    bad = project.runpytest("--audit-model", "good", "--audit-memory", "lots")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--audit-memory must be a size such as 2GB or 512MB*got 'lots'*"])
    (project.path / "gate.toml").write_text('memory = "-3GB"\n')
    bad = project.runpytest("--audit-model", "good", "--audit-config", "gate.toml")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*gate.toml: memory must be a size*"])


def test_the_session_passes_the_budget(monkeypatch):
    from auditkit import runner
    from auditkit.config import AuditConfig

    seen = {}

    class FakeSubject:
        def __init__(self, spec, device, batch_size, memory):
            seen["memory"] = memory

        def open(self):
            return self

    monkeypatch.setattr("auditkit.subject.Subject", FakeSubject)
    runner.AuditSession(models=["demo"], config=AuditConfig(memory=123), checks=[object()])._build_subject("demo")
    assert seen["memory"] == 123
    runner.AuditSession(models=["demo"], config=AuditConfig(memory=123), memory=0,
                        checks=[object()])._build_subject("demo")
    assert seen["memory"] == 0  # the option over the file
