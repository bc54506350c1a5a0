"""Evidence rendering: tensors to pictures (PNG) and small charts (SVG) for the report.

Conventions (see auditkit.data): images are float tensors C x H x W in [0, 1]
with 1 or 3 channels; maps (heat maps, attributions) are H x W float tensors;
boxes are `auditkit.data.Box` (x0, y0, x1, y1) in pixels, x1/y1 exclusive.

Only torch, numpy and PIL are used: colormaps are linear interpolations of a
few anchor colours, text is drawn with PIL's built-in default font, and the
charts are hand-written, standalone SVG documents with every text escaped.
"""
from __future__ import annotations

import io
import math
import re
from typing import Iterable, Mapping, Sequence
from xml.sax.saxutils import escape as _xml_escape

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from auditkit.checks.base import Evidence
from auditkit.data import Box
from auditkit.methods.numerics import constant_rows

__all__ = [
    "to_pil",
    "colormap",
    "overlay",
    "colorbar",
    "draw_boxes",
    "mark_point",
    "argmax_xy",
    "panel_grid",
    "png_evidence",
    "svg_evidence",
    "nice_ticks",
    "line_chart_svg",
    "scatter_svg",
    "bar_chart_svg",
    "GRID_PAD",
    "PALETTE",
]

Color = tuple[int, int, int]

# -- colormaps ----------------------------------------------------------------

# Anchor colours, evenly spaced on [0, 1]; values in between are interpolated.
_INFERNO = (
    "#000004", "#160b39", "#420a68", "#6a176e", "#932667", "#bc3754",
    "#dd513a", "#f37819", "#fca50a", "#f6d746", "#fcffa4",
)
_COOLWARM = (
    "#3b4cc0", "#5977e3", "#7b9ff9", "#aac7fd", "#dddddd",
    "#f7b89c", "#f49a7b", "#e7745b", "#b40426",
)
_CMAPS: dict[str, tuple[str, ...]] = {"inferno": _INFERNO, "coolwarm": _COOLWARM}

_NAN_RGB = (0.55, 0.55, 0.55)  # colour of NaN pixels in a colormap


def _hex_to_rgb(code: str) -> tuple[float, float, float]:
    code = code.lstrip("#")
    return tuple(int(code[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]


def _anchors(cmap: str) -> torch.Tensor:
    if cmap not in _CMAPS:
        raise ValueError(f"unknown colormap {cmap!r}; expected one of {', '.join(_CMAPS)}")
    return torch.tensor([_hex_to_rgb(c) for c in _CMAPS[cmap]], dtype=torch.float32)


def colormap(
    values: torch.Tensor,
    *,
    cmap: str = "inferno",
    vmin: float | None = None,
    vmax: float | None = None,
) -> torch.Tensor:
    """Map an H x W tensor to a 3 x H x W float RGB tensor in [0, 1].

    "inferno" is sequential: vmin/vmax default to the finite min/max of the map.
    "coolwarm" is diverging and symmetric about 0: by default vmin = -m and
    vmax = m with m the largest finite |value|, so 0 is always the neutral grey.
    Values outside [vmin, vmax] are clipped; NaN pixels come out mid-grey; a
    constant map comes out as the lowest colour (inferno) or the middle (coolwarm).
    """
    v = torch.as_tensor(values).detach().to("cpu", torch.float32)
    if v.ndim != 2:
        raise ValueError(f"colormap expects an H x W map, got shape {tuple(v.shape)}")
    anchors = _anchors(cmap)
    finite = torch.isfinite(v)
    vals = v[finite]
    if cmap == "coolwarm":
        m = float(vals.abs().max()) if vals.numel() else 0.0
        lo = -m if vmin is None else float(vmin)
        hi = m if vmax is None else float(vmax)
    else:
        lo = float(vals.min()) if vmin is None and vals.numel() else (0.0 if vmin is None else float(vmin))
        hi = float(vals.max()) if vmax is None and vals.numel() else (1.0 if vmax is None else float(vmax))
    own_range = vmin is None and vmax is None
    if hi > lo and not (own_range and bool(constant_rows(vals.view(1, -1))[0])):
        t = (v - lo) / (hi - lo)
    else:  # constant (or empty) map, or constant up to rounding on its own range: no noise stretched to colour
        t = torch.full_like(v, 0.5 if cmap == "coolwarm" else 0.0)
    t = torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)

    # Linear interpolation between the two nearest anchors.
    pos = t * (len(anchors) - 1)
    i0 = pos.floor().long().clamp(0, len(anchors) - 2)
    frac = (pos - i0.float()).unsqueeze(-1)
    rgb = anchors[i0] * (1.0 - frac) + anchors[i0 + 1] * frac  # H x W x 3
    rgb[~finite] = torch.tensor(_NAN_RGB)
    return rgb.permute(2, 0, 1).contiguous().clamp(0.0, 1.0)


# -- images -------------------------------------------------------------------


def _as_chw(image: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(image).detach().to("cpu", torch.float32)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"expected an image C x H x W with 1 or 3 channels, got shape {tuple(t.shape)}")
    return t


def to_pil(image: torch.Tensor) -> Image.Image:
    """A PIL image from a C x H x W tensor in [0, 1] (1 channel -> mode "L", 3 -> "RGB").

    Values are clamped to [0, 1] (NaN -> 0) and rounded to 8 bits. An H x W
    tensor is accepted as a 1-channel image.
    """
    t = torch.nan_to_num(_as_chw(image), nan=0.0).clamp(0.0, 1.0)
    arr = (t.mul(255.0).round().to(torch.uint8).permute(1, 2, 0).numpy())
    if arr.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(arr[:, :, 0]), mode="L")
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def to_pil_batch(batch: torch.Tensor) -> list[Image.Image]:
    """N RGB PIL images from an N x C x H x W tensor in [0, 1] (C = 1 is shown as grey).

    As to_pil (clamped, NaN -> 0, 8 bits), with the conversion done once for the whole batch.
    """
    t = torch.as_tensor(batch).detach().to("cpu", torch.float32)
    if t.ndim != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"expected images N x C x H x W with 1 or 3 channels, got shape {tuple(t.shape)}")
    rgb = t if t.shape[1] == 3 else t.expand(-1, 3, -1, -1)
    arrays = torch.nan_to_num(rgb, nan=0.0).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return [Image.fromarray(a, mode="RGB") for a in arrays.permute(0, 2, 3, 1).contiguous().numpy()]


def _to_rgb_image(img: Image.Image | torch.Tensor) -> Image.Image:
    """A new RGB PIL image (never the caller's object)."""
    if isinstance(img, Image.Image):
        return img.convert("RGB") if img.mode != "RGB" else img.copy()
    return to_pil(img).convert("RGB")


def overlay(
    image: torch.Tensor,
    heat: torch.Tensor,
    *,
    alpha: float = 0.5,
    signed: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Image.Image:
    """The heat map blended over a slightly desaturated copy of the image; an RGB image of the image's size.

    `heat` (H' x W') is resized bilinearly to the image's H x W if sizes differ.
    Unsigned maps use "inferno", signed maps "coolwarm". By default the scale
    is the map's own (min/max, or symmetric about 0 when signed), so a
    near-zero map is stretched to the full colour range; give vmin/vmax to
    put every map on one stated scale (and draw it with colorbar()). `alpha`
    is the weight of the heat colours.
    """
    img = torch.nan_to_num(_as_chw(image), nan=0.0).clamp(0.0, 1.0)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    _, h, w = img.shape
    hm = torch.as_tensor(heat).detach().to("cpu", torch.float32)
    if hm.ndim == 3 and hm.shape[0] == 1:
        hm = hm[0]
    if hm.ndim != 2:
        raise ValueError(f"overlay expects an H x W heat map, got shape {tuple(hm.shape)}")
    if tuple(hm.shape) != (h, w):
        hm = F.interpolate(hm[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    colors = colormap(hm, cmap="coolwarm" if signed else "inferno", vmin=vmin, vmax=vmax)
    # Desaturate (and lighten a touch) so the heat colours stand out.
    gray = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).unsqueeze(0)
    base = 0.55 * img + 0.45 * gray
    a = float(min(max(alpha, 0.0), 1.0))
    return to_pil((1.0 - a) * base + a * colors)


def upscale(img: Image.Image | torch.Tensor, scale: int) -> Image.Image:
    """An RGB picture enlarged `scale` times with nearest-neighbour sampling (pixels stay crisp)."""
    pil = _to_rgb_image(img)
    if scale <= 1:
        return pil
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def draw_boxes(
    img: Image.Image | torch.Tensor,
    boxes: Iterable[Box | Sequence[float]],
    *,
    color: Color = (0, 255, 0),
    width: int = 1,
) -> Image.Image:
    """A copy of the image (as RGB) with each box outlined; the input is not modified.

    Boxes are `Box` or (x0, y0, x1, y1) in pixels with x1/y1 exclusive, so the
    outline covers the box's outermost pixels (a full-image box traces the border).
    """
    out = _to_rgb_image(img)
    draw = ImageDraw.Draw(out)
    for box in boxes:
        x0, y0, x1, y1 = box.as_tuple() if isinstance(box, Box) else tuple(box)
        # Exclusive x1/y1 -> the last pixel inside the box.
        r = [round(x0), round(y0), max(round(x0), round(x1) - 1), max(round(y0), round(y1) - 1)]
        draw.rectangle(r, outline=tuple(color), width=max(1, int(width)))
    return out


def argmax_xy(values: torch.Tensor) -> tuple[int, int]:
    """(x, y) pixel position of the maximum of an H x W map (NaN ignored; first maximum wins)."""
    v = torch.as_tensor(values).detach().to("cpu", torch.float32)
    if v.ndim != 2:
        raise ValueError(f"argmax_xy expects an H x W map, got shape {tuple(v.shape)}")
    v = torch.nan_to_num(v, nan=-math.inf)
    idx = int(torch.argmax(v))
    return idx % v.shape[1], idx // v.shape[1]


def mark_point(
    img: Image.Image | torch.Tensor,
    xy: tuple[float, float],
    *,
    color: Color = (0, 255, 255),
    radius: int | None = None,
) -> Image.Image:
    """A copy of the image (as RGB) with a small ring marker (and centre dot) on pixel xy = (x, y).

    The ring has a dark outline so it stays visible on any background; radius
    defaults to about 1/10 of the shorter side (at least 2 px). Use
    `argmax_xy(map)` to mark the maximum of a map.
    """
    out = _to_rgb_image(img)
    draw = ImageDraw.Draw(out)
    x, y = float(xy[0]), float(xy[1])
    r = radius if radius is not None else max(2, round(min(out.size) / 10))
    dark = (0, 0, 0)
    draw.ellipse([x - r - 1, y - r - 1, x + r + 1, y + r + 1], outline=dark, width=3)
    draw.ellipse([x - r, y - r, x + r, y + r], outline=tuple(color), width=1)
    draw.rectangle([x - 1, y - 1, x + 1, y + 1], fill=dark)
    draw.point((x, y), fill=tuple(color))
    return out


# -- panel grids ----------------------------------------------------------------

GRID_PAD = 8  # pixels of white around and between panels in panel_grid
_CAPTION_GAP = 3  # pixels between a caption and its panel
_FONT_SIZE = 11


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font (no files, no network); the FreeType one at 11 px when available."""
    try:
        return ImageFont.load_default(size=_FONT_SIZE)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def _text_size(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    x0, y0, x1, y1 = font.getbbox(text or " ")
    return int(math.ceil(x1 - min(0, x0))), int(math.ceil(y1 - min(0, y0)))


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    return _text_size(font, "Hgjy|")[1]


def _fit_text(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str, max_width: int) -> str:
    """The text, shortened with an ellipsis so it fits max_width pixels."""
    text = " ".join(str(text).split())
    if _text_size(font, text)[0] <= max_width:
        return text
    while text and _text_size(font, text + "…")[0] > max_width:
        text = text[:-1]
    return text + "…" if text else ""


def panel_grid(
    rows: list[list[Image.Image | torch.Tensor | None]],
    *,
    titles: list[list[str]] | None = None,
    row_labels: list[str] | None = None,
    scale: int = 2,
) -> Image.Image:
    """Panels laid out in rows and columns on a white RGB canvas.

    Each panel is upscaled by `scale` (nearest neighbour). A column is as wide
    as its widest scaled panel, a row as tall as its tallest; None leaves a
    cell empty; rows may differ in length. Titles (if given) are drawn above
    each panel, shortened to the column width; row labels (if given) go on the
    left. With P = GRID_PAD, T = caption line height + a 3 px gap (0 without
    titles) and L = widest row label + P (0 without labels):

        width  = P + L + sum(column widths) + P * (columns - 1) + P
        height = P + sum(T + row heights)   + P * (rows - 1)    + P
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    font = _font()
    cells = [[None if p is None else _to_rgb_image(p) for p in row] for row in rows]
    cells = [[None if p is None else p.resize((p.width * scale, p.height * scale), Image.NEAREST) for p in row] for row in cells]
    n_cols = max((len(r) for r in cells), default=0)
    col_w = [max((r[c].width for r in cells if c < len(r) and r[c] is not None), default=0) for c in range(n_cols)]
    row_h = [max((p.height for p in r if p is not None), default=0) for r in cells]
    has_titles = bool(titles) and any(any(str(t) for t in row) for row in titles or [])
    title_h = _line_height(font) + _CAPTION_GAP if has_titles else 0
    labels = [str(s) for s in (row_labels or [])]
    label_w = max((_text_size(font, s)[0] for s in labels), default=0)
    label_w = min(label_w, 160) + GRID_PAD if labels else 0

    width = GRID_PAD + label_w + sum(col_w) + GRID_PAD * max(0, n_cols - 1) + GRID_PAD
    height = GRID_PAD + sum(title_h + h for h in row_h) + GRID_PAD * max(0, len(cells) - 1) + GRID_PAD
    canvas = Image.new("RGB", (max(1, width), max(1, height)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    y = GRID_PAD
    for r, row in enumerate(cells):
        if r < len(labels):
            text = _fit_text(font, labels[r], label_w - GRID_PAD)
            th = _text_size(font, text)[1]
            draw.text((GRID_PAD, y + title_h + (row_h[r] - th) // 2), text, fill=(40, 40, 40), font=font)
        x = GRID_PAD + label_w
        for c in range(n_cols):
            panel = row[c] if c < len(row) else None
            title = ""
            if titles and r < len(titles) and c < len(titles[r]):
                title = _fit_text(font, str(titles[r][c]), col_w[c])
            if title:
                tw = _text_size(font, title)[0]
                draw.text((x + (col_w[c] - tw) // 2, y), title, fill=(40, 40, 40), font=font)
            if panel is not None:
                # Centre the panel in its cell, below the caption line.
                px = x + (col_w[c] - panel.width) // 2
                py = y + title_h + (row_h[r] - panel.height) // 2
                canvas.paste(panel, (px, py))
            x += col_w[c] + GRID_PAD
        y += title_h + row_h[r] + GRID_PAD
    return canvas


def colorbar(
    vmin: float,
    vmax: float,
    *,
    cmap: str = "coolwarm",
    height: int = 160,
    width: int = 14,
    label: str = "",
    ticks: Sequence[float] | None = None,
) -> Image.Image:
    """A vertical colour bar on white: `cmap` from vmax (top) to vmin (bottom), tick marks and values on its right.

    Strip row r (of `height`) shows v = vmax - (vmax - vmin) * r / (height - 1),
    coloured as colormap(v, cmap=cmap, vmin=vmin, vmax=vmax) colours it, so
    the bar is the legend of maps drawn with the same vmin/vmax. `ticks`
    default to nice_ticks(vmin, vmax) that lie in [vmin, vmax]; `label`
    (e.g. the quantity) is written above the strip.
    """
    if not (math.isfinite(vmin) and math.isfinite(vmax) and vmax > vmin):
        raise ValueError(f"colorbar needs finite vmin < vmax, got {vmin}, {vmax}")
    if height < 2 or width < 1:
        raise ValueError(f"colorbar needs height >= 2 and width >= 1, got {height}, {width}")
    font = _font()
    values = torch.linspace(float(vmax), float(vmin), height)[:, None].expand(height, width)
    strip = to_pil(colormap(values, cmap=cmap, vmin=vmin, vmax=vmax))
    if ticks is None:
        eps = (vmax - vmin) * 1e-9
        ticks = [t for t in nice_ticks(vmin, vmax, 5) if vmin - eps <= t <= vmax + eps]
    texts = [_tick_label(float(t)) for t in ticks]
    line_h = _line_height(font)
    pad, tick_len, gap = 4, 4, 2
    label_h = line_h + _CAPTION_GAP if label else 0
    text_w = max((_text_size(font, t)[0] for t in texts), default=0)
    top = pad + label_h + line_h // 2  # room for the top tick's text
    total_w = max(pad + width + tick_len + gap + text_w + pad, pad + _text_size(font, label)[0] + pad if label else 0)
    canvas = Image.new("RGB", (total_w, top + height + line_h // 2 + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if label:
        draw.text((pad, pad), label, fill=(40, 40, 40), font=font)
    canvas.paste(strip, (pad, top))
    for t, text in zip(ticks, texts):
        y = top + round((vmax - float(t)) / (vmax - vmin) * (height - 1))
        x = pad + width
        draw.line([(x, y), (x + tick_len - 1, y)], fill=(40, 40, 40))
        th = _text_size(font, text)[1]
        draw.text((x + tick_len + gap, y - th // 2), text, fill=(40, 40, 40), font=font)
    return canvas


# -- evidence -------------------------------------------------------------------


def png_evidence(title: str, image: Image.Image, caption: str = "") -> Evidence:
    """An Evidence holding the image as PNG bytes (media_type "image/png"), zlib level 6.

    (optimize=True saves under 1% on these noisy pictures and costs 7x the time.)
    """
    if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "1"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return Evidence(title=str(title), media_type="image/png", data=buf.getvalue(), caption=str(caption))


def svg_evidence(title: str, svg: str, caption: str = "") -> Evidence:
    """An Evidence holding SVG text as UTF-8 bytes (media_type "image/svg+xml")."""
    return Evidence(title=str(title), media_type="image/svg+xml", data=svg.encode("utf-8"), caption=str(caption))


# -- SVG charts -----------------------------------------------------------------

# Tableau 10: distinct, print-friendly series colours.
PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)
_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
_CHAR_W = 6.2  # approximate width of one 11 px character, for layout
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _esc(text: object, limit: int | None = None) -> str:
    """Text safe inside an SVG element or a double-quoted attribute (control characters dropped)."""
    s = _INVALID_XML.sub("", str(text))
    if limit is not None and len(s) > limit:
        s = s[: limit - 1] + "…"
    return _xml_escape(s, {'"': "&quot;", "'": "&#39;"})


def _num(x: float) -> str:
    """A coordinate with two decimals at most."""
    return f"{x:.2f}".rstrip("0").rstrip(".") if math.isfinite(x) else "0"


def _nice(x: float, round_: bool) -> float:
    """Heckbert's nice number: 1, 2, 5 or 10 times a power of ten near x."""
    exp = math.floor(math.log10(x))
    f = x / 10**exp
    if round_:
        nf = 1 if f < 1.5 else 2 if f < 3 else 5 if f < 7 else 10
    else:
        nf = 1 if f <= 1 else 2 if f <= 2 else 5 if f <= 5 else 10
    return nf * 10**exp


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n evenly spaced "nice" tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi].

    The first tick is <= lo and the last >= hi; a degenerate range is widened.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if lo > hi:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.5 or 0.5
        lo, hi = lo - pad, hi + pad
    span = _nice(hi - lo, False)
    step = _nice(span / max(1, n - 1), True)
    start = math.floor(lo / step) * step
    stop = math.ceil(hi / step) * step
    count = int(round((stop - start) / step))
    ticks = [start + i * step for i in range(count + 1)]
    # Remove float noise such as 0.30000000000000004.
    digits = max(0, -math.floor(math.log10(step)) + 1)
    return [round(t, digits) + 0.0 for t in ticks]


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")
    return f"{v:.6g}"


def _svg_open(width: int, height: int, title: str) -> list[str]:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="{_esc(_FONT)}" font-size="11" role="img">',
        f"<title>{_esc(title)}</title>" if title else "",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    if title:
        parts.append(
            f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="13" '
            f'font-weight="600" fill="#1f2328">{_esc(title, 90)}</text>'
        )
    return [p for p in parts if p]


def _legend(names: Sequence[str], colors: Sequence[str], x0: float, y0: float, max_w: float, *, marker: str = "line") -> tuple[list[str], float]:
    """Legend items flowing left to right in rows; returns the SVG parts and the height used."""
    parts: list[str] = []
    x, y, row_h = x0, y0, 16.0
    for name, color in zip(names, colors):
        label = _esc(name, 40)
        shown = min(len(str(name)), 40)
        item_w = 22 + shown * _CHAR_W + 14
        if x > x0 and x + item_w > x0 + max_w:
            x, y = x0, y + row_h
        if marker == "line":
            parts.append(f'<line x1="{_num(x)}" y1="{_num(y)}" x2="{_num(x + 16)}" y2="{_num(y)}" stroke="{color}" stroke-width="2.5"/>')
        else:
            parts.append(f'<circle cx="{_num(x + 8)}" cy="{_num(y)}" r="4" fill="{color}"/>')
        parts.append(f'<text x="{_num(x + 22)}" y="{_num(y + 4)}" fill="#1f2328">{label}</text>')
        x += item_w
    return parts, (y - y0 + row_h) if names else 0.0


def _legend_height(names: Sequence[str], max_w: float) -> float:
    return _legend(names, ["#000"] * len(names), 0.0, 0.0, max_w)[1]


def _axes(
    parts: list[str],
    box: tuple[float, float, float, float],
    xt: Sequence[float],
    yt: Sequence[float],
    sx,
    sy,
    *,
    x_labels: Sequence[str] | None = None,
    y_labels: Sequence[str] | None = None,
    x_label: str = "",
    y_label: str = "",
) -> None:
    """Grid lines, tick labels, the axis frame and axis titles for the plot box (left, top, right, bottom)."""
    left, top, right, bottom = box
    for i, t in enumerate(yt):
        y = sy(t)
        parts.append(f'<line x1="{_num(left)}" y1="{_num(y)}" x2="{_num(right)}" y2="{_num(y)}" stroke="#e6e8eb" stroke-width="1"/>')
        text = y_labels[i] if y_labels else _tick_label(t)
        parts.append(f'<text x="{_num(left - 6)}" y="{_num(y + 3.5)}" text-anchor="end" fill="#57606a">{_esc(text)}</text>')
    for i, t in enumerate(xt):
        x = sx(t)
        parts.append(f'<line x1="{_num(x)}" y1="{_num(bottom)}" x2="{_num(x)}" y2="{_num(bottom + 4)}" stroke="#8c959f" stroke-width="1"/>')
        text = x_labels[i] if x_labels else _tick_label(t)
        parts.append(f'<text x="{_num(x)}" y="{_num(bottom + 16)}" text-anchor="middle" fill="#57606a">{_esc(text)}</text>')
    parts.append(f'<line x1="{_num(left)}" y1="{_num(bottom)}" x2="{_num(right)}" y2="{_num(bottom)}" stroke="#8c959f" stroke-width="1"/>')
    parts.append(f'<line x1="{_num(left)}" y1="{_num(top)}" x2="{_num(left)}" y2="{_num(bottom)}" stroke="#8c959f" stroke-width="1"/>')
    if x_label:
        parts.append(
            f'<text x="{_num((left + right) / 2)}" y="{_num(bottom + 32)}" text-anchor="middle" fill="#1f2328">{_esc(x_label, 80)}</text>'
        )
    if y_label:
        cy = (top + bottom) / 2
        parts.append(
            f'<text x="14" y="{_num(cy)}" text-anchor="middle" fill="#1f2328" '
            f'transform="rotate(-90 14 {_num(cy)})">{_esc(y_label, 60)}</text>'
        )


def _finite_pairs(xs: Sequence[float], ys: Sequence[float], log_y: bool) -> list[tuple[float, float] | None]:
    """(x, y) pairs as floats; None marks a skipped point (NaN/inf, or y <= 0 on a log axis)."""
    out: list[tuple[float, float] | None] = []
    for x, y in zip(xs, ys):
        try:
            fx, fy = float(x), float(y)
        except (TypeError, ValueError):
            out.append(None)
            continue
        if not (math.isfinite(fx) and math.isfinite(fy)) or (log_y and fy <= 0):
            out.append(None)
        else:
            out.append((fx, math.log10(fy) if log_y else fy))
    return out


def _no_data(parts: list[str], box: tuple[float, float, float, float]) -> None:
    left, top, right, bottom = box
    parts.append(
        f'<text x="{_num((left + right) / 2)}" y="{_num((top + bottom) / 2)}" text-anchor="middle" '
        f'fill="#8c959f" font-style="italic">no data</text>'
    )


def line_chart_svg(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    log_y: bool = False,
    width: int = 480,
    height: int = 300,
) -> str:
    """A standalone SVG line chart: one line (with point markers) per series, axes, nice ticks, a legend.

    `series` maps a name to (xs, ys). Points whose x or y is NaN/inf are
    skipped and break the line; with log_y the y axis is log10 (ticks at
    powers of ten) and non-positive y values are skipped too. Every text is
    XML-escaped; the result parses as XML and sets the SVG namespace.
    """
    names = [str(n) for n in series]
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(names))]
    data = {n: _finite_pairs(xs, ys, log_y) for n, (xs, ys) in zip(names, series.values())}
    points = [p for pts in data.values() for p in pts if p is not None]

    top = 30.0 if title else 12.0
    left = 58.0 if y_label else 44.0
    right = width - 16.0
    legend_h = _legend_height(names, right - left) if names else 0.0
    bottom = height - (36.0 if x_label else 24.0) - (legend_h + 6 if legend_h else 0.0)
    parts = _svg_open(width, height, title)
    box = (left, top, right, bottom)

    if points:
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        xt = nice_ticks(min(xs), max(xs), 6)
        if log_y:
            lo, hi = math.floor(min(ys)), math.ceil(max(ys))
            if hi == lo:
                hi = lo + 1
            step = max(1, math.ceil((hi - lo) / 6))
            yt = [float(k) for k in range(lo, hi + 1, step)]
            if yt[-1] < hi:
                yt.append(yt[-1] + step)
            y_labels = [_tick_label(10.0**k) for k in yt]
        else:
            yt = nice_ticks(min(ys), max(ys), 5)
            y_labels = None
        x_lo, x_hi, y_lo, y_hi = xt[0], xt[-1], yt[0], yt[-1]
        sx = lambda v: left + (v - x_lo) / (x_hi - x_lo) * (right - left)  # noqa: E731
        sy = lambda v: bottom - (v - y_lo) / (y_hi - y_lo) * (bottom - top)  # noqa: E731
        _axes(parts, box, xt, yt, sx, sy, y_labels=y_labels, x_label=x_label, y_label=y_label)
        for name, color in zip(names, colors):
            pts = data[name]
            segment: list[str] = []
            segments: list[list[str]] = []
            for p in pts + [None]:
                if p is None:
                    if segment:
                        segments.append(segment)
                    segment = []
                else:
                    segment.append(f"{_num(sx(p[0]))},{_num(sy(p[1]))}")
            group = [f'<g fill="none" stroke="{color}"><title>{_esc(name)}</title>']
            for seg in segments:
                if len(seg) > 1:
                    group.append(f'<polyline points="{" ".join(seg)}" stroke-width="2" stroke-linejoin="round" stroke-linecap="round"/>')
            n_points = sum(len(s) for s in segments)
            if n_points <= 60:
                for seg in segments:
                    for xy in seg:
                        cx, cy = xy.split(",")
                        group.append(f'<circle cx="{cx}" cy="{cy}" r="2.6" fill="{color}" stroke="#ffffff" stroke-width="0.8"/>')
            group.append("</g>")
            parts.extend(group)
    else:
        _axes(parts, box, [], [], None, None, x_label=x_label, y_label=y_label)
        _no_data(parts, box)

    if names:
        legend, _ = _legend(names, colors, left, bottom + (36.0 if x_label else 24.0) + 8, right - left)
        parts.extend(legend)
    parts.append("</svg>")
    return "\n".join(parts)


def scatter_svg(
    points: Sequence[tuple[float, float]],
    groups: Sequence[int],
    group_names: Sequence[str],
    *,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    width: int = 420,
    height: int = 420,
) -> str:
    """A standalone SVG scatter plot; point i is coloured by group index groups[i], with a legend.

    Group k is named group_names[k] ("group k" when the list is too short).
    Points with a NaN/inf coordinate are skipped. Every text is XML-escaped.
    """
    if len(points) != len(groups):
        raise ValueError(f"scatter_svg: {len(points)} points but {len(groups)} group indices")
    used = sorted({int(g) for g in groups}) or list(range(len(group_names)))
    names = [str(group_names[g]) if 0 <= g < len(group_names) else f"group {g}" for g in used]
    color_of = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(used)}

    top = 30.0 if title else 12.0
    left = 58.0 if y_label else 44.0
    right = width - 16.0
    legend_h = _legend_height(names, right - left)
    bottom = height - (36.0 if x_label else 24.0) - (legend_h + 6 if legend_h else 0.0)
    box = (left, top, right, bottom)
    parts = _svg_open(width, height, title)

    pairs = [(float(p[0]), float(p[1]), int(g)) for p, g in zip(points, groups)]
    pairs = [p for p in pairs if math.isfinite(p[0]) and math.isfinite(p[1])]
    if pairs:
        xt = nice_ticks(min(p[0] for p in pairs), max(p[0] for p in pairs), 5)
        yt = nice_ticks(min(p[1] for p in pairs), max(p[1] for p in pairs), 5)
        sx = lambda v: left + (v - xt[0]) / (xt[-1] - xt[0]) * (right - left)  # noqa: E731
        sy = lambda v: bottom - (v - yt[0]) / (yt[-1] - yt[0]) * (bottom - top)  # noqa: E731
        _axes(parts, box, xt, yt, sx, sy, x_label=x_label, y_label=y_label)
        r = 3.2 if len(pairs) <= 500 else 2.0
        for g in used:
            parts.append(f'<g fill="{color_of[g]}" fill-opacity="0.75" stroke="#ffffff" stroke-width="0.5">')
            parts.extend(
                f'<circle cx="{_num(sx(x))}" cy="{_num(sy(y))}" r="{r}"/>' for x, y, gg in pairs if gg == g
            )
            parts.append("</g>")
    else:
        _axes(parts, box, [], [], None, None, x_label=x_label, y_label=y_label)
        _no_data(parts, box)
    legend, _ = _legend(names, [color_of[g] for g in used], left, bottom + (36.0 if x_label else 24.0) + 8, right - left, marker="dot")
    parts.extend(legend)
    parts.append("</svg>")
    return "\n".join(parts)


def bar_chart_svg(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str = "",
    threshold: float | None = None,
    direction: str | None = None,
    y_label: str = "",
    width: int = 480,
    height: int = 300,
) -> str:
    """A standalone SVG bar chart (one vertical bar per label, from 0), with an optional dashed threshold line.

    If `direction` (">=" or "<=") is given with a threshold, bars that fail
    `value direction threshold` are red and the others green; otherwise all
    bars share one colour. NaN values leave an empty slot marked "n/a".
    Long or many labels are drawn slanted. Every text is XML-escaped.
    """
    if len(labels) != len(values):
        raise ValueError(f"bar_chart_svg: {len(labels)} labels but {len(values)} values")
    vals = []
    for v in values:
        try:
            fv = float(v)
        except (TypeError, ValueError):
            fv = math.nan
        vals.append(fv if math.isfinite(fv) else math.nan)
    finite = [v for v in vals if not math.isnan(v)]
    if threshold is not None and math.isfinite(float(threshold)):
        finite_thr = [float(threshold)]
    else:
        threshold, finite_thr = None, []
    n = len(labels)
    max_label = max((len(str(s)) for s in labels), default=0)
    slanted = n > 0 and (max_label * _CHAR_W > (width - 60) / n - 4)
    label_space = min(90.0, 12 + min(max_label, 18) * _CHAR_W * 0.72) if slanted else 22.0

    top = 30.0 if title else 14.0
    left = 58.0 if y_label else 44.0
    right = width - 16.0
    bottom = height - label_space - 6
    box = (left, top, right, bottom)
    parts = _svg_open(width, height, title)

    lo = min(finite + finite_thr + [0.0])
    hi = max(finite + finite_thr + [0.0])
    yt = nice_ticks(lo, hi if hi > lo else lo + 1.0, 5)
    sy = lambda v: bottom - (v - yt[0]) / (yt[-1] - yt[0]) * (bottom - top)  # noqa: E731
    slot = (right - left) / max(1, n)
    _axes(parts, box, [], yt, None, sy, y_label=y_label)
    zero = sy(0.0)
    for i, (label, v) in enumerate(zip(labels, vals)):
        cx = left + slot * (i + 0.5)
        if math.isnan(v):
            parts.append(f'<text x="{_num(cx)}" y="{_num(zero - 4)}" text-anchor="middle" fill="#8c959f">n/a</text>')
        else:
            color = PALETTE[0]
            if threshold is not None and direction in (">=", "<="):
                ok = v >= threshold if direction == ">=" else v <= threshold
                color = "#2da44e" if ok else "#cf222e"
            bw = max(1.0, min(slot * 0.7, 60.0))
            y0, y1 = sorted((sy(v), zero))
            parts.append(
                f'<rect x="{_num(cx - bw / 2)}" y="{_num(y0)}" width="{_num(bw)}" height="{_num(max(0.5, y1 - y0))}" '
                f'fill="{color}"><title>{_esc(label)}: {_esc(_tick_label(v) if abs(v) >= 1e5 else f"{v:.4g}")}</title></rect>'
            )
        text = _esc(label, 18)
        if slanted:
            parts.append(
                f'<text x="{_num(cx)}" y="{_num(bottom + 12)}" text-anchor="end" fill="#57606a" '
                f'transform="rotate(-35 {_num(cx)} {_num(bottom + 12)})">{text}</text>'
            )
        else:
            parts.append(f'<text x="{_num(cx)}" y="{_num(bottom + 16)}" text-anchor="middle" fill="#57606a">{text}</text>')
    if threshold is not None:
        ty = sy(float(threshold))
        parts.append(
            f'<line x1="{_num(left)}" y1="{_num(ty)}" x2="{_num(right)}" y2="{_num(ty)}" stroke="#1f2328" '
            f'stroke-width="1.5" stroke-dasharray="5 4"/>'
        )
        sign = {">=": "≥ ", "<=": "≤ "}.get(direction or "", "")
        parts.append(
            f'<text x="{_num(right - 2)}" y="{_num(ty - 5)}" text-anchor="end" fill="#1f2328" '
            f'font-weight="600">threshold {sign}{_esc(f"{float(threshold):.4g}")}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)
