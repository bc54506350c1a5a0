"""Check `max-activating-patches`: what the units of a layer respond to (Zeiler & Fergus 2014; CS231n).

Evidence only (Status.INFO): for chosen channels of chosen layers, the `top` audit-set patches that
activate the channel most - each patch is the unit's receptive field, measured on the model - beside the
DeconvNet projection of that single activation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from auditkit import evidence as ev
from auditkit.checks.base import Check, CheckConfigError, CheckResult, Evidence, require_at_least
from auditkit.checks.inversion import spread_layers
from auditkit.methods import patches as pt

_PANEL = 64  # target display size of one patch, pixels
_MAX_PANEL = 96  # patches larger than this are shrunk to it


def parse_channel(entry: str, check: str = "max-activating-patches") -> tuple[str, int]:
    """'layer:channel' -> (layer, channel); the layer may contain dots, the channel is an int >= 0."""
    layer, sep, channel = str(entry).rpartition(":")
    if not sep or not layer or not channel.strip().isdigit():
        raise CheckConfigError(f"check {check!r}: channels entry {entry!r} should be 'layer:channel' with a "
                               "channel index >= 0, e.g. 'stage2:5'")
    return layer, int(channel)


@dataclass
class MaxActivatingPatches(Check):
    """For each chosen channel, the `top` units with the largest activation over the audit set (at most one
    per image unless distinct_images is false), shown as the input patch each unit sees and the DeconvNet
    projection of that one activation. The receptive field is measured on the model (support of
    d unit / d input on a structural copy), so it is right for any convolutional model. Default channels:
    the `channels_per_layer` channels of each layer with the highest peak activation; `channels` adds
    explicit 'layer:channel' entries. Evidence only: no threshold, never fails a run.
    """

    kind = "max-activating-patches"
    title = "Maximally activating patches"
    description = (
        "Per channel c of a layer, the top-k units by activation a_c(image, y, x) over the audit set (one per "
        "image by default), each shown as its receptive field box(y, x) = (start_x + x * stride_x, start_y + "
        "y * stride_y, + width, + height) cut from the image - the field measured as the support of "
        "d unit / d input on a structural copy of the model - and as the DeconvNet projection of that single "
        "activation (backprop with ReLU backward g_in = relu(g_out)), cropped to the same box. Evidence only."
    )

    layers: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    channels_per_layer: int = 4
    top: int = 9
    distinct_images: bool = True
    max_layers: int = 6  # without `layers`: this many named layers, first to last (0: all of them)

    def validate(self) -> None:
        require_at_least(self, channels_per_layer=0, max_layers=0)
        if not 1 <= self.top <= 64:
            raise CheckConfigError(f"check {self.name!r}: top must be in 1..64, got {self.top}")
        for entry in self.channels:
            parse_channel(entry, self.name)
        if self.channels_per_layer == 0 and not self.channels:
            raise CheckConfigError(f"check {self.name!r}: channels_per_layer is 0 and no channels are given: "
                                   "nothing to show")

    def _selection(self, tops: dict[str, pt.TopUnits], auto_layers: list[str]) -> dict[str, list[int]]:
        """layer -> channels: the peak-ranked default of each automatic layer, then the explicit entries."""
        chosen: dict[str, list[int]] = {}
        for layer in auto_layers:
            peaks = tops[layer].peaks()
            k = min(self.channels_per_layer, peaks.numel())
            order = peaks.sort(descending=True, stable=True).indices[:k]
            chosen[layer] = order.tolist()
        for entry in self.channels:
            layer, channel = parse_channel(entry, self.name)
            count = tops[layer].channels
            if channel >= count:
                raise CheckConfigError(f"check {self.name!r}: channels entry {entry!r}: layer {layer!r} has "
                                       f"{count} channels (0..{count - 1})")
            if channel not in chosen.setdefault(layer, []):
                chosen[layer].append(channel)
        return {layer: chans for layer, chans in chosen.items() if chans}

    def run(self, subject, audit_set) -> CheckResult:
        explicit = [parse_channel(entry, self.name)[0] for entry in self.channels]
        auto_layers = list(self.layers) if self.layers else (
            [] if self.channels else list(spread_layers(subject.layers, self.max_layers)))
        if self.channels_per_layer == 0:
            auto_layers = []
        layers = list(dict.fromkeys(auto_layers + explicit))
        if not layers:
            raise CheckConfigError(f"check {self.name!r}: model {subject.name!r} names no layers; give layers")
        for layer in layers:
            subject.layer(layer)  # unknown layers fail here, listing the valid ones
        images = audit_set.images()
        size = (int(images.shape[-2]), int(images.shape[-1]))
        ids = [sample.id or str(i) for i, sample in enumerate(audit_set)]
        tops = pt.top_activations(subject, images, layers, self.top, distinct_images=self.distinct_images,
                                  sample_ids=ids)
        chosen = self._selection(tops, auto_layers)

        rows, evidence, fields = [], [], {}
        for layer, chans in chosen.items():
            rf = pt.receptive_field(subject, layer, size)
            fields[layer] = {"size": list(rf.size), "stride": list(rf.stride), "start": list(rf.start),
                             "token_cell": rf.token_cell}
            t = tops[layer]
            idx = torch.tensor(chans)
            image, y, x, values = t.image[idx], t.y[idx], t.x[idx], t.values[idx]  # channels x k
            k = values.shape[1]
            units = torch.stack([image.flatten(), idx.repeat_interleave(k), y.flatten(), x.flatten()], 1)
            patches = pt.crop_units(images[units[:, 0]], rf, units[:, 2], units[:, 3], fill=0.5)
            proj = pt.crop_units(pt.deconv_projections(subject, images, layer, units, ids), rf, units[:, 2], units[:, 3])
            shown = pt.display_projection(proj)
            for r, channel in enumerate(chans):
                rows.append({
                    "layer": layer, "channel": channel, "rf": f"{rf.size[0]}x{rf.size[1]}",
                    "stride": f"{rf.stride[0]}x{rf.stride[1]}", "peak": float(values[r, 0]),
                    "top_activations": ", ".join(f"{v:.3g}" for v in values[r].tolist()),
                    "images": ", ".join(str(i) for i in image[r].tolist()),
                })
            evidence.append(self._grid(layer, rf, chans, image, values, patches, shown))

        message = (f"{len(rows)} channels over {len(chosen)} layers, top {self.top} "
                   f"{'images' if self.distinct_images else 'units'} each; receptive fields: "
                   + ", ".join(f"{l} {f['size'][0]}x{f['size'][1]} px (stride {f['stride'][1]}"
                               f"{'; global (attention or global pooling): its own grid cell is shown' if f['token_cell'] else ''})"
                               for l, f in fields.items()))
        result = self.info_result(message=message, metric="channels shown", value=len(rows), rows=rows,
                                  columns=["layer", "channel", "rf", "stride", "peak", "top_activations", "images"],
                                  details={"receptive_fields": fields, "top": self.top,
                                           "distinct_images": self.distinct_images, "images": len(audit_set)})
        result.evidence = evidence
        return result

    def _grid(self, layer, rf, chans, image, values, patches, shown) -> Evidence:
        """One PNG per layer: a row per channel, its `top` patches on the left and their projections on the right."""
        k = values.shape[1]
        grid, titles = [], []
        patch_panels, proj_panels = _panels(patches), _panels(shown)
        for r in range(len(chans)):
            cells = patch_panels[r * k : (r + 1) * k]
            proj = proj_panels[r * k : (r + 1) * k]
            grid.append(cells + [None] + proj)
            titles.append([f"#{int(image[r, i])} {float(values[r, i]):.3g}" for i in range(k)] + [""]
                          + [f"#{int(image[r, i])}" for i in range(k)])
        picture = ev.panel_grid(grid, titles=titles, row_labels=[f"ch {c}" for c in chans], scale=1)
        return ev.png_evidence(
            f"Maximally activating patches: {layer}", picture,
            f"Each row is a channel of {layer}: its top {k} audit patches (title: image index and activation; "
            f"grey = outside the image), then the DeconvNet projection of each activation (grey = 0). "
            f"Receptive field {rf.size[0]}x{rf.size[1]} px, stride {rf.stride[0]}x{rf.stride[1]}"
            + (": attention or a global pooling (squeeze-excitation) makes each unit's field the whole image, so "
               "the patch shown is the unit's own grid cell, and the projection shows where in the image the "
               "activation came from." if rf.token_cell else "."))


def _panels(batch: torch.Tensor) -> list[Image.Image]:
    """U x C x h x w patches in [0, 1] as pictures about _PANEL px wide: upscaled (nearest) or shrunk (bilinear).
    The 8-bit conversion is done once for the whole batch."""
    side = max(batch.shape[-2:])
    rgb = batch if batch.shape[1] == 3 else batch[:, :1]
    out = []
    for pil in ev.to_pil_batch(rgb):
        if side > _MAX_PANEL:
            f = _MAX_PANEL / side
            out.append(pil.resize((max(1, round(pil.width * f)), max(1, round(pil.height * f))), Image.BILINEAR))
        else:
            out.append(ev.upscale(pil, max(1, round(_PANEL / side))))
    return out
