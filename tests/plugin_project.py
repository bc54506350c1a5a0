"""A pytester project for the plugin tests: toy models, a toy audit set and a small gate."""
import json
import pathlib
import textwrap

CONFTEST = textwrap.dedent("""
    import auditkit
    from tests.toys import halves_set, region_spec

    @auditkit.register_model("good")
    def good():
        return region_spec()

    @auditkit.register_model("shortcut")
    def shortcut():
        return region_spec(offset=0.0)  # grey over the object leaves its half bright: no drop

    @auditkit.register_model("broken")
    def broken():
        raise RuntimeError("weights file is corrupt")

    @auditkit.register_dataset("halves")
    def halves():
        return halves_set(8)  # 8 > the 7 samples a one-sided test needs at alpha = 0.01
""")


def one_check_gate(baseline: str) -> str:
    """A [tool.auditkit] table of one occlusion-drop check on the halves set with the given baseline
    ("grey": the toy model "good" fails it; "zero": it passes)."""
    return textwrap.dedent(f"""
        [tool.auditkit]
        dataset = "halves"
        device = "cpu"
        [[tool.auditkit.checks]]
        kind = "occlusion-drop"
        baseline = "{baseline}"
    """)


PYPROJECT = one_check_gate("zero") + textwrap.dedent("""\
    [[tool.auditkit.checks]]
    kind = "occlusion-drop"
    name = "occlusion-grey"
    baseline = "grey"
""")


def make_project(pytester, monkeypatch):
    """A pytester folder with the toy models (good, shortcut, broken), the halves set and a two-check gate."""
    monkeypatch.syspath_prepend(str(pytester.path))
    pytester.makeconftest(CONFTEST)
    pytester.makepyprojecttoml(PYPROJECT)
    repo = str(pathlib.Path(__file__).parent.parent)
    pytester.syspathinsert(repo)
    monkeypatch.setenv("PYTHONPATH", repo)  # for runpytest_subprocess
    from auditkit import registry

    for namespace in (registry.MODELS, registry.DATASETS, registry.CHECKS):
        # in-process runs register into the process-wide registries: give each test its own copy
        monkeypatch.setattr(namespace, "factories", dict(namespace.factories))
    return pytester


def report_json(pytester, folder="audit-report"):
    return json.loads((pytester.path / folder / "audit.json").read_text())
