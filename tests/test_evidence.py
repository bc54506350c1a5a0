"""Tests for auditkit.evidence: colormaps, overlays, panel grids, PNG/SVG evidence and charts."""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from auditkit.data import Box
from auditkit.evidence import (
    GRID_PAD,
    argmax_xy,
    bar_chart_svg,
    colormap,
    draw_boxes,
    line_chart_svg,
    mark_point,
    nice_ticks,
    overlay,
    panel_grid,
    png_evidence,
    scatter_svg,
    svg_evidence,
    to_pil,
)

SVG_NS = "{http://www.w3.org/2000/svg}"
HOSTILE = '<b>&"x\'</b>'


def _texts(svg: str) -> list[str]:
    root = ET.fromstring(svg)
    return ["".join(el.itertext()) for el in root.iter(f"{SVG_NS}text")]


# -- images --------------------------------------------------------------------


def test_to_pil_modes_and_clamping() -> None:
    rgb = to_pil(torch.tensor([[[2.0]], [[-1.0]], [[0.5]]]))
    assert rgb.mode == "RGB" and rgb.size == (1, 1)
    assert rgb.getpixel((0, 0)) == (255, 0, 128)
    gray = to_pil(torch.full((1, 4, 6), 0.25))
    assert gray.mode == "L" and gray.size == (6, 4)
    with pytest.raises(ValueError):
        to_pil(torch.zeros(2, 4, 4))


@pytest.mark.parametrize("cmap", ["inferno", "coolwarm"])
def test_colormap_shape_and_range(cmap: str) -> None:
    values = torch.randn(5, 7) * 10
    out = colormap(values, cmap=cmap)
    assert out.shape == (3, 5, 7) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_colormap_inferno_ends_and_explicit_range() -> None:
    out = colormap(torch.tensor([[0.0, 1.0]]))
    low, high = out[:, 0, 0], out[:, 0, 1]
    assert float(low.sum()) < 0.1  # near black
    assert float(high.sum()) > 2.0  # pale yellow
    # With vmax far above the data every value maps near the low end.
    dim = colormap(torch.tensor([[0.0, 1.0]]), vmin=0.0, vmax=100.0)
    assert float(dim.sum()) < 0.3


def test_colormap_coolwarm_symmetric_about_zero() -> None:
    out = colormap(torch.tensor([[-1.0, 0.0, 4.0]]), cmap="coolwarm")
    neutral = out[:, 0, 1]
    assert torch.allclose(neutral, neutral.mean().expand(3), atol=0.02)  # grey at 0 although the data is skewed
    assert out[2, 0, 0] > out[0, 0, 0]  # negative: blue
    assert out[0, 0, 2] > out[2, 0, 2]  # positive: red


def test_colormap_constant_nan_and_bad_name() -> None:
    out = colormap(torch.tensor([[3.0, float("nan")]]))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError):
        colormap(torch.zeros(2, 2), cmap="jet")


def test_overlay_keeps_image_size_and_resizes_heat() -> None:
    image = torch.rand(3, 20, 30)
    out = overlay(image, torch.rand(5, 5))
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (30, 20)
    signed = overlay(torch.rand(1, 12, 12), torch.randn(12, 12), alpha=0.7, signed=True)
    assert signed.size == (12, 12)


def test_draw_boxes_and_mark_point_copy_the_image() -> None:
    base = Image.new("RGB", (10, 10), (0, 0, 0))
    boxed = draw_boxes(base, [Box(0, 0, 10, 10), (2, 2, 5, 5)], color=(0, 255, 0))
    assert base.getpixel((0, 0)) == (0, 0, 0)  # input untouched
    assert boxed.getpixel((0, 0)) == (0, 255, 0) and boxed.getpixel((9, 9)) == (0, 255, 0)  # x1/y1 exclusive
    assert boxed.getpixel((4, 4)) == (0, 255, 0) and boxed.getpixel((5, 5)) == (0, 0, 0)
    heat = torch.zeros(10, 10)
    heat[7, 3] = 1.0
    assert argmax_xy(heat) == (3, 7)
    marked = mark_point(torch.zeros(3, 10, 10), argmax_xy(heat), color=(255, 0, 0))
    assert marked.size == (10, 10) and marked.getpixel((3, 7)) == (255, 0, 0)


def test_panel_grid_size_arithmetic() -> None:
    a = Image.new("RGB", (10, 10), (255, 0, 0))
    b = Image.new("RGB", (6, 12), (0, 0, 255))
    grid = panel_grid([[a, b], [b]], scale=2)
    # Columns: max(20, 12) and 12 wide; rows: max(20, 24) and 24 high.
    assert grid.size == (GRID_PAD * 3 + 20 + 12, GRID_PAD * 3 + 24 + 24)
    assert grid.getpixel((0, 0)) == (255, 255, 255)
    titled = panel_grid([[a, b]], titles=[["a", "b"]], row_labels=["row"], scale=3)
    assert titled.width > GRID_PAD * 3 + 30 + 18  # room for the row label
    assert titled.height > GRID_PAD * 2 + 36  # room for the titles


def test_png_and_svg_evidence() -> None:
    ev = png_evidence("t", Image.new("RGB", (4, 4)), "cap")
    assert ev.media_type == "image/png" and ev.suffix == ".png" and ev.caption == "cap"
    assert ev.data is not None and ev.data.startswith(b"\x89PNG\r\n\x1a\n")
    sv = svg_evidence("s", '<svg xmlns="http://www.w3.org/2000/svg"/>')
    assert sv.media_type == "image/svg+xml" and sv.suffix == ".svg" and sv.data == b'<svg xmlns="http://www.w3.org/2000/svg"/>'


# -- charts ---------------------------------------------------------------------


def test_nice_ticks() -> None:
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = nice_ticks(0.13, 0.87)
    assert ticks[0] <= 0.13 and ticks[-1] >= 0.87
    t = nice_ticks(5, 5)
    assert t[0] < 5 < t[-1]


def test_line_chart_is_valid_xml_and_escapes_names() -> None:
    svg = line_chart_svg(
        {HOSTILE: ([0, 1, 2, 3], [0.1, float("nan"), 0.3, 0.4]), "plain": ([0, 1], [1.0, 2.0])},
        title="t <i>", x_label="x & y", y_label="p",
    )
    root = ET.fromstring(svg)  # parses, so every text is escaped
    assert root.tag == f"{SVG_NS}svg"
    assert HOSTILE not in svg and "&lt;b&gt;&amp;&quot;" in svg
    texts = _texts(svg)
    assert HOSTILE in texts and "x & y" in texts and "t <i>" in texts
    assert len(root.findall(f".//{SVG_NS}polyline")) >= 2
    assert "nan" not in svg.lower()


def test_line_chart_log_y_with_zeros_and_empty() -> None:
    svg = line_chart_svg({"a": ([0, 1, 2, 3], [0.0, 1e-3, 0.1, 10.0]), "b": ([0], [-1.0])}, log_y=True)
    texts = _texts(svg)
    assert "0.001" in texts and "10" in texts
    assert "nan" not in svg.lower() and "inf" not in svg.lower()
    ET.fromstring(line_chart_svg({"none": ([0, 1], [0.0, -2.0])}, log_y=True))
    ET.fromstring(line_chart_svg({}))


def test_scatter_and_bar_chart() -> None:
    pts = [(math.cos(i), math.sin(i)) for i in range(12)] + [(float("nan"), 0.0)]
    svg = scatter_svg(pts, [i % 2 for i in range(13)], ["cat", HOSTILE], title="emb")
    root = ET.fromstring(svg)
    assert len(root.findall(f".//{SVG_NS}circle")) >= 12
    assert HOSTILE in _texts(svg)
    bars = bar_chart_svg(["a", HOSTILE, "c"], [0.2, 0.9, float("nan")], threshold=0.5, direction=">=", title="b")
    root = ET.fromstring(bars)
    assert any("threshold" in t for t in _texts(bars))
    assert any(el.get("stroke-dasharray") for el in root.iter(f"{SVG_NS}line"))
    assert len(root.findall(f".//{SVG_NS}rect")) == 1 + 2  # background + two finite bars
    with pytest.raises(ValueError):
        bar_chart_svg(["a"], [1.0, 2.0])


def test_to_pil_batch_matches_to_pil_image_by_image():
    from auditkit.evidence import to_pil, to_pil_batch

    rgb = torch.rand(3, 3, 5, 4)
    rgb[0, 0, 0, 0] = float("nan")
    for pic, img in zip(to_pil_batch(rgb), rgb):
        assert pic.mode == "RGB" and np.array_equal(np.asarray(pic), np.asarray(to_pil(img)))
    grey = torch.rand(2, 1, 5, 4)
    for pic, img in zip(to_pil_batch(grey), grey):
        assert np.array_equal(np.asarray(pic), np.asarray(to_pil(img).convert("RGB")))
    with pytest.raises(ValueError, match="N x C x H x W"):
        to_pil_batch(torch.rand(3, 5, 4))


# -- a stated colour scale (issue 13, point 10: a near-zero occlusion map looked hot) -------------


def test_overlay_on_a_fixed_scale_shows_a_near_zero_map_as_zero() -> None:
    from auditkit.evidence import colormap, overlay

    image = torch.full((3, 12, 12), 0.5)
    tiny = torch.rand(12, 12, generator=torch.Generator().manual_seed(0)) * 1e-4
    fixed = np.asarray(overlay(image, tiny, signed=True, vmin=-1.0, vmax=1.0)).astype(int)
    zero = np.asarray(overlay(image, torch.zeros(12, 12), signed=True, vmin=-1.0, vmax=1.0)).astype(int)
    assert np.abs(fixed - zero).max() <= 1  # within one 8-bit level of "no change" everywhere
    neutral = colormap(torch.zeros(1, 1), cmap="coolwarm", vmin=-1.0, vmax=1.0)[:, 0, 0]
    assert np.allclose(zero[0, 0] / 255, 0.5 * 0.5 + 0.5 * neutral.numpy(), atol=2 / 255)
    # the map's own range would stretch 1e-4 to the full colour range: the hot end shows up
    stretched = np.asarray(overlay(image, tiny, signed=True)).astype(int)
    assert np.abs(stretched - zero).max() > 40
    # and a real drop of 1 is the hot end of the fixed scale
    hot = np.asarray(overlay(image, torch.ones(12, 12), signed=True, vmin=-1.0, vmax=1.0)).astype(int)
    assert hot[0, 0, 0] > hot[0, 0, 2] + 40


def test_colorbar_shows_the_scale_with_ticks() -> None:
    from auditkit.evidence import colorbar, colormap

    bar = colorbar(-1.0, 1.0, height=101, width=10, label="drop in p")
    assert bar.mode == "RGB" and bar.height > 101 and bar.width > 10
    arr = np.asarray(bar).astype(int)
    strip = colorbar_strip(arr, 10)
    assert strip.shape[0] == 101
    expect = lambda v: (colormap(torch.tensor([[v]]), cmap="coolwarm", vmin=-1.0, vmax=1.0)[:, 0, 0].numpy() * 255)  # noqa: E731
    assert np.allclose(strip[0], expect(1.0), atol=1.5)  # top: vmax
    assert np.allclose(strip[50], expect(0.0), atol=1.5)  # middle: 0
    assert np.allclose(strip[-1], expect(-1.0), atol=1.5)  # bottom: vmin
    # tick labels are drawn to the right of the strip (dark text on white)
    right = arr[:, arr.shape[1] // 2:]
    assert (right.sum(axis=2) < 300).sum() > 20
    plain = colorbar(0.0, 1.0, cmap="inferno", height=50)
    assert np.asarray(plain).shape[0] < bar.height + 50


def colorbar_strip(arr: np.ndarray, width: int) -> np.ndarray:
    """A colour bar's strip colours, top to bottom: the longest run of non-white rows in the middle of the first coloured column."""
    coloured = [x for x in range(arr.shape[1]) if (arr[:, x].sum(axis=1) < 3 * 250).sum() > arr.shape[0] // 2]
    assert coloured, "no colour strip found"
    column = arr[:, coloured[0] + width // 2]
    best, start = (0, 0), None
    for y, white in enumerate(list((column == 255).all(axis=1)) + [True]):
        if not white and start is None:
            start = y
        elif white and start is not None:
            best, start = max(best, (y - start, start)), None
    length, top = best
    return column[top: top + length]


def test_a_map_constant_up_to_rounding_is_drawn_flat_not_stretched() -> None:
    # before: 1 +- 1e-7 (what the checks call constant) spanned the whole colour range
    noise = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    near = 1.0 + 1e-7 * noise
    flat = colormap(near)
    assert torch.equal(flat, colormap(torch.ones(8, 8)))
    assert not torch.equal(colormap(1.0 + 1e-2 * noise), flat)  # a real spread still shows
    # a range the caller states is kept: the map is then drawn on that scale
    assert colormap(near, vmin=0.0, vmax=2.0).std(dim=(1, 2)).max() < 1e-3


def test_a_filter_constant_up_to_rounding_normalises_to_grey() -> None:
    from auditkit.checks.representation import normalise_filters

    weight = torch.stack([torch.full((3, 3, 3), 0.2) + 1e-9 * torch.randn(3, 3, 3), torch.randn(3, 3, 3)])
    out = normalise_filters(weight)
    assert torch.equal(out[0], torch.full((3, 3, 3), 0.5))
    assert out[1].min() == 0.0 and out[1].max() == 1.0
