"""One optimiser loop for images, shared by feature inversion, texture synthesis and class visualisation.

A method supplies only its objective: a function of a pixel batch (the rows `rows` of the N x C x H x W
images, in [0, 1], on the device) returning a dict of per-image terms (each a tensor of one value per
row). The key "total" is the loss
that is minimised (its sum over the batch, so every image gets its own gradient); the other keys are
recorded as curves too. The loop owns everything else:

- parametrisation: pixels are never clipped. "sigmoid": x = sigmoid(z), z an unconstrained tensor the
  shape of the images. "fourier": x = sigmoid(irfft2(s * w) * 4), s a complex spectrum per channel and
  w(f) = 1 / max(f, 1 / max(H, W))^decay the 1/f weight of natural images (Lucid's `fft_image`; the
  colour decorrelation Lucid adds is ImageNet-specific and left out). Either way x stays in (0, 1) at
  every step and gradients never vanish at a clip boundary; the start is seeded noise whose logits have
  standard deviation `init_scale`;
- the optimiser, `optimiser`:
  "adam": Adam, with a cosine learning-rate schedule from `lr` down to `lr * final_lr_ratio` over `steps`.
  The small final rate makes the last steps settle, so a converged loss plateaus. One step is one
  evaluation (forward + backward of the batch). Needed for a stochastic objective (jitter);
  "lbfgs": L-BFGS (torch.optim.LBFGS, `history` correction pairs, strong-Wolfe line search, `lr` the
  initial step length, 1 the textbook value), the optimiser Gatys et al. used for texture synthesis.
  The line search makes a step cost one or more evaluations (about 1.05 on average, measured on the
  demo and ResNet-18); the point a line search accepted is not evaluated again at the next step. All
  images are one problem (one line search for the batch), so results depend on the batch. It needs a
  deterministic objective, so jitter must be 0. On a smooth objective it reaches in 60 steps a lower
  loss than Adam in 200 (texture synthesis on the demo model and its random copy).
  Whether the result is any good is judged on the objective's own error, not on the plateau;
- `steps` is a budget: with `plateau` > 0 the loop stops early, at the first step t >= `window` at which
  every image's total has settled, |L_i(t) - L_i(t - window)| <= plateau * |L_i(t - window)| (neither
  still falling nor rising by more than `plateau`, relative, over the last `window` steps); the images
  returned are those of step t, `settled_step` is t, and `steps` counts the steps run (t + 1). L-BFGS
  also settles at a step whose line search found no step to take;
- optional jitter: at each step the objective sees the batch rolled by a random shift of up to `jitter`
  pixels in each direction (one shift for the whole batch, drawn from the seeded generator);
- per-term, per-image loss curves (steps_done x N, on the CPU), one row per step: the point the step
  starts from (for L-BFGS, the point the previous line search accepted);
- NaN / inf detection: a non-finite "total", or a non-finite gradient of it (a finite loss can have
  one), stops the loop at that step before the parameters move; `diverged` marks the images whose total
  or gradient was not finite and `diverged_step` is the step (at step 0 it is an error instead: the
  objective is not finite where nothing has moved yet). The images returned are those of that
  step, so they are always finite; a check must fail (or error) on any diverged image, never pass.

Everything is batched: each step is one forward and one backward of the whole batch, split into chunks by
the Subject's chunked forward + backward (Subject.gradients, which halves the chunk on out-of-memory) when
`subject` is given. The images are independent, so the gradient, and the result, do not depend on the
chunks.
`forward_to` gives an objective the outputs of named layers and stops the forward once all are computed.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from auditkit.layers import NAME_LAYERS_HINT
from auditkit.methods.numerics import non_finite_error
from auditkit.progress import report
from auditkit.subject import AuditModelError, value_and_gradient

#: (pixels of some rows, those rows of the batch) -> per-image terms, each a tensor of one value per row
Objective = Callable[[torch.Tensor, slice], dict[str, torch.Tensor]]
Parametrisation = Literal["sigmoid", "fourier"]
Optimiser = Literal["adam", "lbfgs"]
OPTIMISERS = ("adam", "lbfgs")
#: At most this many evaluations in one L-BFGS line search (torch's strong-Wolfe default, 25)
LINE_SEARCH_EVALUATIONS = 25


@dataclass
class OptimiseResult:
    """The optimised images and how the loss got there."""

    images: torch.Tensor  # N x C x H x W, pixels in [0, 1], CPU
    curves: dict[str, torch.Tensor]  # term -> steps_done x N, float32, CPU
    diverged: torch.Tensor  # N bool: "total" became NaN / inf
    diverged_step: int | None  # the step at which the loop stopped, None if it ran to the end
    steps: int  # steps run (one row of each curve per step)
    settled_step: int | None = None  # the step at which every image's loss had settled (plateau), None if none
    budget: int = 0  # the steps allowed
    evaluations: int = 0  # objective evaluations (forward + backward of the batch): steps, plus line searches'


class _Stop(Exception):
    """Raised by a forward hook once every requested layer output is captured (never escapes forward_to)."""


def forward_to(subject, pixels: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Outputs of `layers` (layer -> tensor, with autograd as the caller's context allows) for `pixels`.

    The forward stops as soon as every layer has produced its output (a hook raises a private exception
    that is caught here), so layers after the deepest one requested, and the head, are never run. A layer
    called more than once in a forward contributes its first output. The hooks are Subject.forward_hook's,
    removed even when the forward raises.
    """
    wanted = list(dict.fromkeys(layers))
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            if name not in captured and isinstance(output, torch.Tensor):
                captured[name] = output
                if len(captured) == len(wanted):
                    raise _Stop
        return hook

    with ExitStack() as stack:
        for name in wanted:
            stack.enter_context(subject.forward_hook(name, hook_for(name)))
        try:
            subject.forward(pixels)
        except _Stop:
            pass
    missing = [name for name in wanted if name not in captured]
    if missing:
        raise AuditModelError(f"model {subject.name!r}: layer(s) {', '.join(map(repr, missing))} produced no "
                              f"tensor output in the forward pass; {NAME_LAYERS_HINT}")
    return captured


def layer_outputs(subject, pixels: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """forward_to for any number of images under no_grad, chunk by chunk (Subject.chunks): layer -> the
    outputs of all images, detached, on the Subject's device."""
    wanted = list(dict.fromkeys(layers))

    def outputs_of(rows: slice) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {k: v.detach() for k, v in forward_to(subject, pixels[rows], wanted).items()}

    parts = list(subject.chunks(pixels.shape[0], outputs_of))
    return {layer: torch.cat([part[layer] for part in parts]) for layer in wanted}


def _frequency_weight(h: int, w: int, decay: float, device: torch.device) -> torch.Tensor:
    """1 / max(f, 1 / max(h, w))^decay on the rfft2 grid (h x (w // 2 + 1)), f in cycles per pixel."""
    fy = torch.fft.fftfreq(h, device=device).view(-1, 1)
    fx = torch.fft.rfftfreq(w, device=device).view(1, -1)
    f = torch.sqrt(fy * fy + fx * fx)
    return 1.0 / f.clamp(min=1.0 / max(h, w)).pow(decay)


class _Pixels:
    """The optimised parameter and its map to pixels in (0, 1)."""

    def __init__(self, shape: tuple[int, ...], parametrisation: str, init_scale: float, decay: float,
                 generator: torch.Generator, device: torch.device):
        n, c, h, w = shape
        self.kind, self.hw = parametrisation, (h, w)
        if parametrisation == "sigmoid":
            self.param = (init_scale * torch.randn(shape, generator=generator)).to(device)
        elif parametrisation == "fourier":
            self.weight = _frequency_weight(h, w, decay, device)
            # spectrum entries drawn so that the initial logits have about `init_scale` standard deviation
            spec = torch.randn((n, c, h, w // 2 + 1, 2), generator=generator).to(device)
            rms = torch.fft.irfft2(torch.view_as_complex(spec) * self.weight, s=(h, w)).std()
            self.param = spec * (init_scale / (4.0 * float(rms)))
        else:
            raise ValueError(f"parametrisation must be 'sigmoid' or 'fourier', got {parametrisation!r}")
        self.param.requires_grad_(True)

    def pixels(self) -> torch.Tensor:
        if self.kind == "sigmoid":
            return torch.sigmoid(self.param)
        return torch.sigmoid(4.0 * torch.fft.irfft2(torch.view_as_complex(self.param) * self.weight, s=self.hw))


def optimise(objective: Objective, shape: Sequence[int], *, steps: int, lr: float = 0.05,
             final_lr_ratio: float = 0.01, jitter: int = 0, parametrisation: Parametrisation = "sigmoid",
             init_scale: float = 0.5, decay: float = 1.0, seed: int = 0, plateau: float = 0.0, window: int = 10,
             optimiser: Optimiser = "adam", history: int = 10, device: str | torch.device = "cpu",
             subject=None, method: str = "", layer: str = "",
             row_names: Sequence[object] | None = None) -> OptimiseResult:
    """Minimise sum_i objective(x)["total"][i] over images x of `shape` (N x C x H x W), from seeded noise,
    for at most `steps` steps; with `plateau` > 0, stop once every image's total changed by at most
    `plateau` (relative) over the last `window` steps.

    See the module doc for the parametrisation, optimisers, schedule, early stop, jitter and divergence rules.
    A total or gradient that is not finite at the starting images (step 0, before anything moved) is the
    model's fault, not the optimiser's: NonFiniteError naming `method`, `layer` and the rows (by
    `row_names` when given).
    """
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape must be N x C x H x W with every size >= 1, got {tuple(shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0 < final_lr_ratio <= 1:
        raise ValueError(f"final_lr_ratio must be in (0, 1], got {final_lr_ratio}")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    if not plateau >= 0:
        raise ValueError(f"plateau must be >= 0, got {plateau}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if optimiser not in OPTIMISERS:
        raise ValueError(f"optimiser must be one of {', '.join(OPTIMISERS)}, got {optimiser!r}")
    if optimiser == "lbfgs" and jitter:
        raise ValueError(f"optimiser 'lbfgs' needs a deterministic objective (its line search compares losses "
                         f"of the same objective): jitter must be 0, got {jitter}; use optimiser 'adam' with jitter")
    if history < 1:
        raise ValueError(f"history must be >= 1, got {history}")
    device = torch.device(device)
    n = int(shape[0])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = _Pixels(tuple(int(s) for s in shape), parametrisation, init_scale, decay, gen, device)
    stepper = (_AdamSteps(params, lr, steps, final_lr_ratio) if optimiser == "adam" else
               _LbfgsSteps(params, lr, history))

    curves: dict[str, list[torch.Tensor]] = {}
    diverged = torch.zeros(n, dtype=torch.bool)
    diverged_step = settled_step = None
    done = 0
    with torch.enable_grad():
        for step in range(steps):
            shift = (torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist() if jitter else None)
            terms, grad = stepper.evaluate(lambda x: _terms_and_gradient(objective, x, subject), shift)
            report(subject, "steps", step + 1, steps)
            for key, value in terms.items():
                curves.setdefault(key, []).append(value.float())
            done = step + 1
            total = terms["total"]
            bad = ~torch.isfinite(total)
            if grad is not None:  # a finite loss can still have a NaN gradient (sqrt at 0, where traps)
                bad = bad | ~torch.isfinite(grad).flatten(1).all(1)
            flags = [bad.any()]
            if plateau > 0 and step >= window:
                before = curves["total"][step - window].to(total.device)
                flags.append(((total.float() - before).abs() <= plateau * before.abs()).all())
            stop = torch.stack(flags).tolist()  # one sync per step
            if stop[0] and step == 0:
                kind = "NaN" if bool(torch.isnan(total).any()) or grad is not None and bool(grad.isnan().any()) \
                    else "inf"
                raise non_finite_error("loss or its pixel gradient at the starting images (step 0)",
                                       bad.nonzero().flatten().tolist(), n, kind, method=method, layer=layer,
                                       sample_ids=row_names)
            if stop[0]:  # the images stay those this step saw
                diverged, diverged_step = bad.cpu(), step
                break
            if len(stop) > 1 and stop[1]:  # settled: the images are those whose loss was just recorded
                settled_step = step
                break
            moved = stepper.step()
            if moved is None:  # the line search left no finite point: every image diverged here
                diverged, diverged_step = torch.ones(n, dtype=torch.bool), step
                break
            if not moved:  # a line search that found no step: the optimiser can get no further
                settled_step = step
                break
    with torch.no_grad():
        images = params.pixels().detach().float().cpu()
    stacked = {k: torch.stack(v).cpu() for k, v in curves.items()}
    return OptimiseResult(images=images, curves=stacked, diverged=diverged, diverged_step=diverged_step, steps=done,
                          settled_step=settled_step, budget=steps, evaluations=stepper.evaluations)


Evaluation = Callable[[torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]


class _AdamSteps:
    """Adam on the pixel parameter with a cosine schedule; one evaluation per step."""

    def __init__(self, params: _Pixels, lr: float, steps: int, final_lr_ratio: float):
        self.params, self.evaluations = params, 0
        self.opt = torch.optim.Adam([params.param], lr=lr)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=steps, eta_min=lr * final_lr_ratio)

    def evaluate(self, evaluation: Evaluation, shift: list[int] | None):
        """The terms at the current parameter (pixels rolled by `shift`), and the pixel gradient; the
        parameter's gradient is set for step()."""
        x = self.params.pixels()
        if shift:
            x = torch.roll(x, shifts=tuple(shift), dims=(-2, -1))
        terms, grad = evaluation(x)
        self.evaluations += 1
        self.opt.zero_grad(set_to_none=True)
        x.backward(grad)
        return terms, self.params.param.grad

    def step(self) -> bool:
        self.opt.step()
        self.sched.step()
        return True  # Adam always moves


class _LbfgsSteps:
    """torch.optim.LBFGS, one iteration (direction and line search) per step.

    Each step starts by evaluating the current point, which the previous line search evaluated already
    (its accepted point): the last evaluation is remembered by the parameter's exact value and returned
    instead of run again. A non-finite trial loss counts as +inf for the line search; one that still ends
    at a non-finite parameter is undone (the parameter goes back to where the step started, so the images
    stay finite) and the optimisation stops there, every image diverged. A step that does not lower the
    summed loss (its line search found no step: the optimum to rounding, or a wall of non-finite values)
    is undone too and the loop stops there as settled, where another step would search the same line.
    The batch is one problem with one line search: an image's result depends on the others in the batch
    (per-image losses can rise while their sum falls), which Adam's per-coordinate steps do not do."""

    def __init__(self, params: _Pixels, lr: float, history: int):
        self.params, self.evaluations = params, 0
        # max_eval bounds one step() call's evaluations, the line search's included (its default, 1.25 x
        # max_iter, would leave a one-iteration call no line search at all)
        self.opt = torch.optim.LBFGS([params.param], lr=lr, max_iter=1, max_eval=1 + LINE_SEARCH_EVALUATIONS,
                                     history_size=history, line_search_fn="strong_wolfe", tolerance_grad=0.0,
                                     tolerance_change=0.0)
        self.last: tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor] | None = None  # (param, terms, grad)
        self.evaluation: Evaluation | None = None

    def _evaluated(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(terms, parameter gradient) at the current parameter, from the last evaluation when it was there;
        the parameter's .grad is set, as LBFGS reads it."""
        param = self.params.param
        if self.last is None or not torch.equal(self.last[0], param):
            with torch.enable_grad():
                x = self.params.pixels()
                terms, pixel_grad = self.evaluation(x)
                grad, = torch.autograd.grad(x, param, pixel_grad)
            self.evaluations += 1
            self.last = (param.detach().clone(), terms, grad)
        _, terms, grad = self.last
        param.grad = grad.clone()
        return terms, grad

    def evaluate(self, evaluation: Evaluation, shift: list[int] | None):
        self.evaluation = evaluation
        return self._evaluated()

    def step(self) -> bool | None:
        """One L-BFGS iteration: True when it moved to a point of lower summed loss; False when it did not
        (a line search that found no step: the optimum to rounding, or a wall of non-finite values); None
        when it ended at a non-finite parameter. Unless True, the parameter is put back where the step
        started, so the images stay those whose loss was recorded last."""
        start, start_terms, _ = self.last  # the step starts from the point evaluate() saw (a kept copy)
        start_total = float(start_terms["total"].sum())

        def closure() -> torch.Tensor:
            total = self._evaluated()[0]["total"].sum()
            return total if torch.isfinite(total) else total.new_tensor(math.inf)

        self.opt.step(closure)
        finite = bool(torch.isfinite(self.params.param).all())
        if finite and not torch.equal(self.params.param, start):
            terms, _ = self._evaluated()  # the accepted point: the line search's last evaluation, as a rule
            if float(terms["total"].sum()) < start_total:
                return True
        with torch.no_grad():
            self.params.param.copy_(start)
        return False if finite else None


def _terms_and_gradient(objective: Objective, x: torch.Tensor, subject) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The objective's terms for every image (detached) and d sum(total) / d x, chunk by chunk through
    subject.gradients (one chunk without a Subject)."""
    leaf, n = x.detach(), x.shape[0]

    def checked(pixels: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
        terms = objective(pixels, rows)
        _check_terms(terms, pixels.shape[0])
        return terms

    if subject is None:
        whole = slice(0, n)
        parts = [(whole, *value_and_gradient(checked, leaf, whole, leaf.device))]
    else:
        parts = subject.gradients(n, lambda rows: leaf[rows], checked)
    grad, pieces = torch.empty_like(leaf), {}
    for rows, part_grad, terms in parts:
        grad[rows] = part_grad
        for key, value in terms.items():
            pieces.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in pieces.items()}, grad


def _check_terms(terms: object, n: int) -> None:
    if not isinstance(terms, dict) or "total" not in terms:
        keys = f" with keys {sorted(terms)}" if isinstance(terms, dict) else ""
        raise ValueError("the objective must return a dict of per-image terms with a 'total' key, "
                         f"got {type(terms).__name__}{keys}")
    for key, value in terms.items():
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (n,):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"objective term {key!r} must be a tensor of {n} per-image values, got {got}")


def relative_fall(curve: torch.Tensor, start: int, end: int = -1) -> float:
    """(curve[start] - curve[end]) / curve[start] for a 1-D curve; NaN when curve[start] <= 0 or not finite."""
    first, last = float(curve[start]), float(curve[end])
    return (first - last) / first if first > 0 and math.isfinite(first) else math.nan
