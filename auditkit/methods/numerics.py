"""Numerical guards shared by every method: finiteness and "constant up to rounding".

A NaN or inf in an attribution map, a feature tensor or a loss must never
reach a verdict: `require_finite` raises NonFiniteError naming the method,
the layer and the first samples at fault. A map or feature row whose spread
is within rounding of its magnitude is constant (`constant_rows`), so a
Spearman correlation or a normalisation is not computed on rounding noise.
"""
from __future__ import annotations

from typing import Sequence

import torch

#: Relative spread below which a row counts as constant: (max - min) <= CONSTANT_RTOL * max |x|.
#: About 80 float32 ulps; real maps and features spread by order 1 relative to their magnitude.
CONSTANT_RTOL = 1e-5


class NonFiniteError(ValueError):
    """A tensor a method produced holds NaN or inf; the message names the method, layer and samples."""


def _names(sample_ids: Sequence[object] | None, rows: list[int]) -> list[str]:
    if sample_ids is None:
        return [str(r) for r in rows]
    return [repr(sample_ids[r]) if r < len(sample_ids) else str(r) for r in rows]


def require_finite(tensor: torch.Tensor, what: str, *, method: str = "", layer: str = "",
                   sample_ids: Sequence[object] | None = None) -> torch.Tensor:
    """Return `tensor` unchanged when every element is finite, else raise NonFiniteError.

    Dimension 0 indexes samples; the message names `what`, `method`, `layer`
    and up to five bad samples (by id when `sample_ids` is given, else by index).
    """
    if tensor.is_floating_point() or tensor.is_complex():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad_rows = (~finite).reshape(finite.shape[0], -1).any(1) if finite.dim() else finite.new_ones(1)
            rows = bad_rows.nonzero().flatten().tolist()
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
            raise non_finite_error(what, rows, max(1, tensor.shape[0] if tensor.dim() else 1), kind,
                                   method=method, layer=layer, sample_ids=sample_ids)
    return tensor


def non_finite_error(what: str, rows: list[int], total: int, kind: str, *, method: str = "", layer: str = "",
                     sample_ids: Sequence[object] | None = None) -> NonFiniteError:
    """The NonFiniteError require_finite raises: `what` (method, layer) is not finite (`kind`) for
    len(rows) of `total` samples, naming the first five (by id when `sample_ids` is given)."""
    where = ", ".join(part for part in (f"method {method!r}" if method else "",
                                        f"layer {layer!r}" if layer else "") if part)
    shown = ", ".join(_names(sample_ids, rows[:5])) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
    return NonFiniteError(f"{what}{' (' + where + ')' if where else ''} is not finite ({kind}) for "
                          f"{len(rows)} of {total} sample(s): {shown}")


def constant_rows(x: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Bool per row of x (N x ...): True when the row is constant up to rounding.

        constant  <=>  max - min <= rtol * max(|max|, |min|)

    with rtol = max(CONSTANT_RTOL, 8 * eps(dtype)) unless given; an all-zero
    row and an empty row are constant; a row holding NaN is not constant (NaN
    is caught by require_finite, not hidden here).
    """
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] == 0:
        return torch.ones(flat.shape[0], dtype=torch.bool, device=x.device)
    if not flat.is_floating_point():
        flat = flat.double()
    if rtol is None:
        rtol = max(CONSTANT_RTOL, 8 * torch.finfo(flat.dtype).eps)
    hi, lo = flat.amax(1), flat.amin(1)
    scale = torch.maximum(hi.abs(), lo.abs())
    return (hi - lo) <= rtol * scale
