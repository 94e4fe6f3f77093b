"""The predictive-coding engine: ``PredictiveNet.run`` implements ``shared/spec/dynamics.md``.

Timestep 0 is the plain feedforward sweep. Each later timestep sweeps the pcoders bottom to top:

    e_n(t) = beta_n f_n(e_{n-1}(t)) + lambda_n p_{n+1}(t-1) + (1 - beta_n - lambda_n) e_n(t-1)
             - alpha_n s_n G_n(t-1)

with p_n = g_n(e_n) the prediction of e_{n-1}, eps_n the per-image mean squared error of p_n against
e_{n-1} as it is in the same sweep, and G_n = d eps_n / d e_n computed as a vector-Jacobian product
through the decoder. Work no returned number depends on is skipped: a prediction is made only when it
is fed back (lambda of the pcoder below > 0), differentiated (alpha > 0) or returned, and the last
timestep makes none. Timestep 0 does not depend on the coefficients: ``timestep_zero`` computes it once
for runs of many coefficients on the same images (``pctune.pc.start``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import torch
from torch import Tensor, nn

from pctune.errors import PctuneError
from pctune.pc.fast_decoders import DecoderPlan, constant_error_grad
from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.scaling import gradient_scale
from pctune.pc.split import split_backbone
from pctune.pc.start import RunResult, TimestepZero, compute_timestep_zero

GradMode = Literal["none", "exact", "constant-error"]
_UNSET = object()


class PredictiveNet(nn.Module):
    """A feedforward backbone augmented with feedback decoders and predictive-coding dynamics.

    ``backbone`` is the original torchvision/timm module (its usual parameter names); ``decoders[i]``
    predicts the input of encoder i+1 from its output (``decoders[0]`` predicts the image). Encoders
    and the head are views of the backbone cut at ``encoder_modules`` and share its parameters.
    """

    def __init__(
        self,
        backbone: nn.Module,
        encoder_modules: Sequence[str],
        decoders: Sequence[nn.Module],
        *,
        name: str = "predictive-net",
        input_size: Sequence[int] = (3, 224, 224),
        gradient_scaling: bool = False,
        presets: dict[str, Hyperparameters] | None = None,
        cam_layer: str | None = None,
    ) -> None:
        super().__init__()
        if len(decoders) != len(encoder_modules):
            raise PctuneError(f"{len(encoder_modules)} encoders but {len(decoders)} decoders")
        self.backbone = backbone
        self.decoders = nn.ModuleList(decoders)
        self.encoder_modules = list(encoder_modules)
        self.name = name
        self.input_size = tuple(input_size)
        self.gradient_scaling = gradient_scaling
        self.presets = dict(presets or {})
        self.cam_layer = cam_layer or self.encoder_modules[-1]  # whose representation Grad-CAM explains
        if self.cam_layer not in self.encoder_modules:
            raise PctuneError(f"cam_layer {self.cam_layer!r} must end a pcoder (one of {self.encoder_modules})")
        # run() calls taps[n] on e_n(T) of its last sweep: a hook there sees what the last logits come from
        self.taps = nn.ModuleList(nn.Identity() for _ in self.encoder_modules)
        encoders, head = split_backbone(backbone, self.encoder_modules)
        # Plain lists: the pieces share the backbone's modules and must not appear twice in state_dict.
        self._encoders: list[nn.Module] = encoders
        self._head: nn.Module = head
        self._scale_cache: dict[tuple, float] = {}
        self._plans: dict[int, tuple[tuple[int, ...], DecoderPlan]] = {}
        self._channels_last = False
        self._autocast: torch.dtype | None = None
        self._compiled: tuple[list, nn.Module, list] | None = None
        self.requires_grad_(False)
        self.eval()

    # -- structure ----------------------------------------------------------------------------------
    @property
    def num_pcoders(self) -> int:
        return len(self.decoders)

    @property
    def cam_tap(self) -> nn.Module:
        return self.taps[self.encoder_modules.index(self.cam_layer)]

    @property
    def encoders(self) -> list[nn.Module]:
        return list(self._encoders)

    @property
    def head(self) -> nn.Module:
        return self._head

    def forward(self, x: Tensor) -> Tensor:
        """The plain feedforward network (equal to ``backbone(x)``)."""
        for encoder in self._encoders:
            x = encoder(x)
        return self._head(x)

    # -- speed options ------------------------------------------------------------------------------
    def optimize(
        self,
        *,
        channels_last: bool | None = None,
        autocast: torch.dtype | None = None,
        compile: bool = False,
        cudnn_benchmark: bool | None = None,
    ) -> PredictiveNet:
        """Choose how ``run`` executes; none of these changes what it computes beyond floating-point
        rounding, except ``autocast`` (reduced precision, an opt-in accuracy trade). Every call sets
        all the options (those not given to their defaults). Returns ``self``.

        channels_last: keep weights and activations in NHWC. Default: on for CUDA, off elsewhere (on
            a CPU it measured no faster). autocast: ``torch.bfloat16`` or ``torch.float16`` runs the
            convolutions and matrix products in that precision (``None``: full precision).
            compile: ``torch.compile`` the encoders, the head and the decoders (inference only;
            the first run pays the compilation). cudnn_benchmark: let cuDNN pick the fastest
            kernels for the shapes it sees (default: on when the model is on a CUDA device; a
            process-wide setting).
        """
        device = next(self.parameters()).device
        if channels_last is None:
            channels_last = device.type == "cuda"
        self.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self._channels_last = channels_last
        if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
            raise PctuneError(f"autocast must be torch.bfloat16, torch.float16 or None, got {autocast!r}")
        self._autocast = autocast
        if cudnn_benchmark is None:
            cudnn_benchmark = device.type == "cuda"
        if cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        self._compiled = ([torch.compile(e, dynamic=False) for e in self._encoders],
                          torch.compile(self._head, dynamic=False),
                          [torch.compile(d, dynamic=False) for d in self.decoders]) if compile else None
        return self

    def _pieces(self, grad_mode: str) -> tuple[list, nn.Module, list]:
        """(encoders, head, decoders) as ``run`` calls them: compiled ones only for inference."""
        if self._compiled is not None and grad_mode == "none":
            return self._compiled
        return self._encoders, self._head, list(self.decoders)

    def _decoder_plan(self, n: int) -> DecoderPlan:
        decoder = self.decoders[n]
        key = tuple(id(m) for m in decoder.modules())
        cached = self._plans.get(n)
        if cached is None or cached[0] != key:
            cached = (key, DecoderPlan(decoder))
            self._plans[n] = cached
        return cached[1]

    def hyperparameters(self, hparams: Hyperparameters | str | dict | None = None) -> Hyperparameters:
        """Resolve ``hparams`` (an object, a preset name such as ``"default"``, a mapping, or None for
        the ``"default"`` preset) to one triple per pcoder of this network."""
        if hparams is None:
            hparams = "default"
        if isinstance(hparams, str):
            if hparams == "feedforward":
                return Hyperparameters.feedforward(self.num_pcoders)
            if hparams not in self.presets:
                known = ", ".join(sorted([*self.presets, "feedforward"]))
                raise PctuneError(f"{self.name} has no hyperparameter preset {hparams!r} (known: {known})")
            hparams = self.presets[hparams]
        elif isinstance(hparams, dict):
            hparams = Hyperparameters.from_mapping(hparams, self.num_pcoders)
        return hparams.for_pcoders(self.num_pcoders)

    def gradient_scales(self, image_size: Sequence[int] | None = None) -> list[float]:
        """s_n for every pcoder at ``image_size`` (C, H, W; default: the model's input size); all 1.0
        when gradient scaling is off."""
        if not self.gradient_scaling:
            return [1.0] * self.num_pcoders
        size = tuple(image_size or self.input_size)
        param = next(self.parameters())
        with torch.no_grad():
            below = torch.zeros(1, *size, dtype=param.dtype, device=param.device)
            scales = []
            for n, encoder in enumerate(self._encoders):
                rep = encoder(below)
                scales.append(self._scale(n, rep, below))
                below = rep
        return scales

    def _scale(self, n: int, rep: Tensor, target: Tensor) -> float:
        key = (n, tuple(rep.shape[1:]), tuple(target.shape[1:]))
        if key not in self._scale_cache:
            self._scale_cache[key] = gradient_scale(self.decoders[n], key[1], key[2])
        return self._scale_cache[key]

    # -- dynamics -----------------------------------------------------------------------------------
    def run(
        self,
        x: Tensor,
        timesteps: int = 4,
        hparams: Hyperparameters | str | dict | None = None,
        *,
        return_states: bool = False,
        grad_mode: GradMode = "none",
        autocast: torch.dtype | object | None = _UNSET,
        return_representations: bool = False,
        start: TimestepZero | None = None,
    ) -> Tensor | RunResult:
        """Run the dynamics for ``timesteps`` steps after the feedforward pass.

        Returns the logits of every timestep, ``[T+1, batch, classes]`` (index 0 is the feedforward
        pass). With ``return_states=True`` returns a :class:`RunResult` that also holds, per timestep,
        the first decoder's reconstruction of the input and every pcoder's per-image error.

        ``grad_mode``: ``"none"`` for inference; ``"exact"`` keeps the whole computation
        differentiable, the error-correction term included (double backward); ``"constant-error"``
        is differentiable but treats the error gradient G as a constant, like the reference package.

        ``autocast``: ``torch.bfloat16``/``torch.float16`` for reduced-precision convolutions (returned
        tensors are float32), ``None`` for full precision; default: what :meth:`optimize` chose.

        ``return_representations=True`` (implies ``return_states``) also keeps every e_n(t), for the
        representation analyses (memory grows with T x the activations of every encoder).

        ``start``: timestep 0 of this ``x``, from :meth:`timestep_zero` with the same ``autocast``
        (inference only); the result is bit-identical to computing it, and ``start`` is not modified.
        """
        if timesteps < 0:
            raise PctuneError(f"timesteps must be >= 0, got {timesteps}")
        if grad_mode not in ("none", "exact", "constant-error"):
            raise PctuneError(f"grad_mode must be 'none', 'exact' or 'constant-error', got {grad_mode!r}")
        hp = self.hyperparameters(hparams)
        x, autocast, contexts = self._prepare(x, grad_mode, autocast)
        if start is not None:
            start.check_fits(x, grad_mode, autocast, self.num_pcoders)
        with contexts[0], contexts[1]:
            dynamics = _Dynamics(self, hp, grad_mode, return_states or return_representations, return_representations)
            result = dynamics.run(x, timesteps, start)
        return result if autocast is None else result.float()  # a RunResult's float() converts all

    def timestep_zero(self, x: Tensor, *, autocast: torch.dtype | object | None = _UNSET) -> TimestepZero:
        """Timestep 0 of ``run(x, ...)`` in inference. It does not depend on the coefficients: give it as
        ``run(x, ..., start=...)`` to the runs of many coefficients on ``x`` (a search's trials) so they
        share its work, at the memory cost of :meth:`TimestepZero.nbytes` (see ``pctune.pc.start``)."""
        x, autocast, contexts = self._prepare(x, "none", autocast)
        with contexts[0], contexts[1]:
            return compute_timestep_zero(self, x, autocast)

    def _prepare(self, x: Tensor, grad_mode: str, autocast) -> tuple[Tensor, torch.dtype | None, tuple]:
        """``x`` in the memory format ``run`` uses, the autocast dtype, and (grad, autocast) contexts."""
        if autocast is _UNSET:
            autocast = self._autocast
        if self._channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        context = torch.no_grad() if grad_mode == "none" else torch.enable_grad()
        reduced = nullcontext() if autocast is None else torch.autocast(x.device.type, dtype=autocast)
        return x, autocast, (context, reduced)


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _Dynamics:
    """One call of ``PredictiveNet.run``: the state of every pcoder across the sweeps."""

    def __init__(self, net: PredictiveNet, hp: Hyperparameters, grad_mode: GradMode, keep: bool,
                 keep_reps: bool) -> None:
        self.net = net
        self.n = net.num_pcoders
        self.beta, self.lam, self.alpha = hp.beta, hp.lambda_, hp.alpha
        self.grad_mode = grad_mode
        self.keep = keep
        self.encoders, self.head, self.decoders = net._pieces(grad_mode)
        # Which pcoders must predict during timesteps 0..T-1: the prediction is fed back to the
        # pcoder below (its lambda > 0; the top pcoder's lambda is ignored) or differentiated.
        self.feeds_back = [n > 0 and self.lam[n - 1] > 0 for n in range(self.n)]
        self.corrects = [a > 0 for a in self.alpha]
        self.keep_reps = keep_reps

    def run(self, x: Tensor, timesteps: int, start: TimestepZero | None) -> Tensor | RunResult:
        n_pc = self.n
        reps: list[Tensor] = [x] * n_pc
        preds: list[Tensor | None] = [None] * n_pc
        grads: list[Tensor | None] = [None] * n_pc
        scales = [1.0] * n_pc
        logits, recon, errors, kept = [], [], [], []

        for t in range(timesteps + 1):
            last = t == timesteps
            below = x
            step_errors = []
            for n in range(n_pc):
                if t > 0:
                    rep = self._update(n, below, reps[n], preds, grads[n], scales[n])
                else:
                    rep = self.encoders[n](below) if start is None else start.reps[n]
                    if self.net.gradient_scaling and self.corrects[n]:
                        scales[n] = start.scales[n] if start and start.scales else self.net._scale(n, rep, below)
                reps[n] = rep = self.net.taps[n](rep) if last else rep
                want_pred = self.keep or (not last and (self.feeds_back[n] or self.corrects[n]))
                want_grad = not last and self.corrects[n]
                # A compiled decoder's plain prediction may round differently from start's (the plan's).
                if t == 0 and start is not None and (want_grad or self.net._compiled is None):
                    preds[n], grads[n] = start.preds[n], start.grads[n] if want_grad else None
                    err = start.errors[n] if self.keep else None
                else:
                    preds[n], grads[n], err = self._predict(n, rep, below, want_pred, want_grad)
                step_errors.append(err)
                below = rep
            # (Running the head once on timesteps 1..T together would read its weights once, but a
            # matrix product's rounding may depend on the number of rows: every timestep is kept
            # bit-identical to the plain network when the coefficients are the feedforward ones.)
            logits.append(start.logits if t == 0 and start is not None else self.head(below))
            if self.keep:
                recon.append(preds[0])
                errors.append(torch.stack(step_errors))
            if self.keep_reps:
                kept.append(list(reps))

        stacked = torch.stack(logits)
        if not self.keep:
            return stacked
        return RunResult(logits=stacked, reconstructions=torch.stack(recon), errors=torch.stack(errors),
                         representations=kept if self.keep_reps else None)

    def _update(self, n: int, below: Tensor, previous: Tensor, preds: list, grad: Tensor | None,
                scale: float) -> Tensor:
        """e_n(t) from the feedforward drive, the feedback of t-1, the memory and the error gradient.
        Terms whose coefficient is zero are not computed."""
        beta = self.beta[n]
        lam = self.lam[n] if n < self.n - 1 else 0.0
        memory = 1.0 - beta - lam
        step = self.alpha[n] * scale
        if self.grad_mode == "none":
            # Inference: accumulate in place into the first fresh term (the same sums, no temporaries).
            if beta != 0:
                rep = self.encoders[n](below)
                if _shares_memory(rep, below):  # an encoder that returns (a view of) its input
                    rep = rep.clone()
                if beta != 1:
                    rep.mul_(beta)
                if lam != 0:
                    rep.add_(preds[n + 1], alpha=lam)
            elif lam != 0:
                rep = torch.mul(preds[n + 1], lam)
            else:
                rep = torch.mul(previous, memory) if memory != 0 else torch.zeros_like(previous)
                memory = 0.0
            if memory != 0:
                rep.add_(previous, alpha=memory)
            if step != 0:
                rep.add_(grad, alpha=-step)
            return rep
        terms = []
        if beta != 0:
            terms.append(beta * self.encoders[n](below))
        if lam != 0:
            terms.append(lam * preds[n + 1])
        if memory != 0:
            terms.append(memory * previous)
        if not terms:
            terms.append(torch.zeros_like(previous))
        rep = sum(terms[1:], terms[0])
        if step != 0:
            rep = rep - step * grad
        return rep

    def _predict(self, n: int, rep: Tensor, target: Tensor, want_pred: bool, want_grad: bool):
        """p_n = g_n(e_n), and when wanted G_n = d eps_n / d e_n and eps_n per image."""
        if not (want_pred or want_grad):
            return None, None, None
        decoder = self.decoders[n]
        per_elem = 2.0 / target[0].numel()
        if self.grad_mode == "exact":
            source = rep if rep.requires_grad else rep.detach().requires_grad_(True)
            pred = decoder(source)
            diff = pred - target
            grad = None
            if want_grad:
                eps_sum = diff.square().flatten(1).mean(1).sum()
                (grad,) = torch.autograd.grad(eps_sum, source, create_graph=True)
            err = diff.detach().square().flatten(1).mean(1) if self.keep else None
            return pred, grad, err
        if self.grad_mode == "constant-error":
            pred = decoder(rep)
            grad = constant_error_grad(decoder, rep, target, per_elem) if want_grad else None
            err = (pred - target).detach().square().flatten(1).mean(1) if self.keep else None
            return pred, grad, err
        # Inference: the decoder's VJP with the per-image error's output gradient, computed layer by
        # layer without an autograd graph (pctune.pc.fast_decoders).
        if want_grad:
            pred, grad, diff = self.net._decoder_plan(n).forward_vjp(rep, target, per_elem)
        else:
            grad = None
            pred = decoder(rep) if self.net._compiled is not None else self.net._decoder_plan(n).forward(rep)
            diff = pred - target if self.keep else None
        err = diff.square().flatten(1).mean(1) if self.keep else None
        return pred, grad, err
