"""Errors about the model under audit (no torch import: the pytest plugin and check base read them)."""


class AuditModelError(ValueError):
    """The model cannot be audited as declared; the message names the model and what was expected."""


class NotApplicable(AuditModelError):
    """The check does not apply to this model (a TorchScript module cannot be hooked); the message says why.
    Check.execute reports it as INFO with details["not_applicable"], never as an ERROR or a verdict."""
