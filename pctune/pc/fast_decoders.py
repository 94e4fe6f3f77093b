"""Decoder forward passes and their exact vector-Jacobian products without autograd graphs.

The engine needs, for a pcoder that corrects its representation (alpha > 0), the prediction
p = g(e) and G = J_g(e)^T v with v = 2 (p - target) / K. A decoder made of transposed convolutions,
convolutions and ReLUs has a VJP that is a handful of plain kernels: the adjoint of a transposed
convolution is a convolution with the same weight, the adjoint of a convolution is a transposed
convolution, and ReLU's is a mask. ``DecoderPlan`` computes these directly, so inference keeps no
autograd graph; any other layer (an upsampling, a SiLU, a custom module) becomes one small autograd
step of its own, so every decoder is supported and the result is the same VJP.

On a CPU, a strided transposed convolution whose output is exactly ``stride`` times its input (PVGG16's
k=10/14, s=2 decoders) is computed in its polyphase form: one ordinary convolution producing the
stride**2 output phases as channels, then a pixel shuffle. It is the same linear map (the sums are
merely ordered differently, a floating-point rounding difference) and avoids the slow transposed
convolution kernels; the rearranged weight is cached and rebuilt when the weight changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Devices on which a strided transposed convolution uses its polyphase form. Measured faster on a
#: CPU (oneDNN's transposed convolutions are slower than its convolutions); on CUDA cuDNN's own
#: transposed-convolution kernels are used (not measured here: no GPU was available).
POLYPHASE_DEVICES = {"cpu"}


class _Step:
    """One layer: ``forward`` returns (output, saved); ``adjoint`` maps an output gradient back."""

    fresh_output = True  # the forward's output is a new tensor the caller may modify in place

    def forward(self, x: Tensor, save: bool) -> tuple[Tensor, object]:
        raise NotImplementedError

    def adjoint(self, grad: Tensor, saved: object) -> Tensor:
        raise NotImplementedError


class _Identity(_Step):
    fresh_output = False

    def forward(self, x, save):
        return x, None

    def adjoint(self, grad, saved):
        return grad


class _ReLU(_Step):
    def __init__(self) -> None:
        self.in_place_ok = False  # set by the plan: True when the input is a fresh tensor

    def forward(self, x, save):
        y = torch.relu_(x) if self.in_place_ok else torch.relu(x)
        return y, y

    def adjoint(self, grad, saved):
        # autograd's ReLU backward: the gradient where the output is > 0, else 0
        return grad.masked_fill_(saved <= 0, 0.0)


class _ConvTranspose(_Step):
    def __init__(self, module: nn.ConvTranspose2d) -> None:
        self.m = module
        self._cache_key: tuple | None = None
        self._poly: tuple[Tensor, int] | None = None

    def forward(self, x, save):
        m = self.m
        poly = self._polyphase(x) if x.device.type in POLYPHASE_DEVICES else None
        if poly is None:
            return m(x), None
        kernel, bias, pad = poly
        return F.pixel_shuffle(F.conv2d(x, kernel, bias, 1, pad), m.stride[0]), None

    def adjoint(self, grad, saved):
        m = self.m
        return F.conv2d(grad, m.weight, None, m.stride, m.padding, m.dilation, m.groups)

    def _polyphase(self, x: Tensor) -> tuple[Tensor, Tensor | None, int] | None:
        m = self.m
        s = m.stride[0]
        if (s == 1 or m.stride[1] != s or m.groups != 1 or m.dilation != (1, 1) or m.output_padding != (0, 0)
                or m.padding_mode != "zeros" or m.kernel_size[0] != m.kernel_size[1]
                or m.padding[0] != m.padding[1] or x.dim() != 4):
            return None
        k, p = m.kernel_size[0], m.padding[0]
        if k - 2 * p != s:  # output size is not exactly stride * input size
            return None
        w, b = m.weight, m.bias
        key = (id(w), w.data_ptr(), w._version, w.dtype, w.device, w.shape, w.stride())
        if b is not None:
            key += (id(b), b.data_ptr(), b._version, b.dtype)
        if key != self._cache_key:
            kernel = _polyphase_kernel(w.detach(), s, p)
            bias = None if b is None else b.detach().repeat_interleave(s * s)
            self._poly = None if kernel is None else (kernel[0], bias, kernel[1])
            self._cache_key = key
        return self._poly


def _polyphase_kernel(weight: Tensor, s: int, p: int) -> tuple[Tensor, int] | None:
    """The conv2d weight [C_out * s * s, C_in, L, L] and padding computing the transposed convolution's
    output phase (rh, rw) as channel c * s * s + rh * s + rw (the order ``pixel_shuffle`` expects)."""
    c_in, c_out, k, _ = weight.shape
    # Output o = s*q + r receives input i through tap kk = o + p - s*i: i - q = (r + p - kk) / s.
    taps = {r: [((r + p - kk) // s, kk) for kk in range(k) if (r + p - kk) % s == 0] for r in range(s)}
    offsets = [o for r in taps for o, _ in taps[r]]
    lo, hi = min(offsets), max(offsets)
    if -lo != hi:  # needs asymmetric padding: not worth it
        return None
    size = hi - lo + 1
    kernel = weight.new_zeros(c_out, s, s, c_in, size, size)
    w_t = weight.transpose(0, 1)  # [c_out, c_in, k, k]
    for rh in range(s):
        for oh, kh in taps[rh]:
            for rw in range(s):
                for ow, kw in taps[rw]:
                    kernel[:, rh, rw, :, oh - lo, ow - lo] = w_t[:, :, kh, kw]
    kernel = kernel.reshape(c_out * s * s, c_in, size, size)
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        kernel = kernel.contiguous(memory_format=torch.channels_last)
    return kernel, hi


class _Conv(_Step):
    def __init__(self, module: nn.Conv2d) -> None:
        self.m = module

    def forward(self, x, save):
        return self.m(x), x.shape

    def adjoint(self, grad, saved):
        m = self.m
        in_size = saved[-2:]
        out_pad = []
        for d in range(2):
            natural = (grad.shape[2 + d] - 1) * m.stride[d] - 2 * m.padding[d] + m.dilation[d] * (
                m.kernel_size[d] - 1) + 1
            out_pad.append(in_size[d] - natural)
        return F.conv_transpose2d(grad, m.weight, None, m.stride, m.padding, tuple(out_pad), m.groups, m.dilation)


class _Generic(_Step):
    """Any other layer: its own small autograd graph, used only for its VJP."""

    def __init__(self, module: Callable[[Tensor], Tensor]) -> None:
        self.m = module

    def forward(self, x, save):
        if not save:
            return self.m(x), None
        with torch.enable_grad():
            source = x.detach().requires_grad_(True)
            out = self.m(source)
        return out.detach(), (source, out)

    fresh_output = False  # a module may return its input or a view of it

    def adjoint(self, grad, saved):
        source, out = saved
        (g,) = torch.autograd.grad(out, source, grad_outputs=grad)
        return g


def _steps(module: nn.Module) -> list[_Step]:
    if isinstance(module, nn.Sequential):
        return [s for child in module for s in _steps(child)]
    if isinstance(module, nn.ConvTranspose2d) and module.padding_mode == "zeros":
        return [_ConvTranspose(module)]
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
        return [_Conv(module)]
    if isinstance(module, nn.ReLU):
        return [_ReLU()]
    if isinstance(module, nn.Identity):
        return [_Identity()]
    if isinstance(module, nn.Dropout) and not module.training:
        return [_Identity()]
    return [_Generic(module)]


class DecoderPlan:
    """``g(e)`` and ``J_g(e)^T v`` for one decoder, with no autograd graph for the known layers."""

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder
        self.steps = _steps(decoder)
        fresh = False  # the decoder's input (the representation) must never be modified
        for step in self.steps:
            if isinstance(step, _ReLU):
                step.in_place_ok = fresh
            fresh = step.fresh_output if not isinstance(step, _ReLU) else fresh

    def forward(self, x: Tensor) -> Tensor:
        """The prediction only (no VJP will follow)."""
        for step in self.steps:
            x, _ = step.forward(x, False)
        return x

    def forward_vjp(self, x: Tensor, target: Tensor, per_elem: float) -> tuple[Tensor, Tensor, Tensor]:
        """(prediction, G = J^T (per_elem * (prediction - target)), prediction - target)."""
        saved = []
        y = x
        for step in self.steps:
            y, s = step.forward(y, True)
            saved.append(s)
        pred = y
        diff = pred - target
        grad = diff * per_elem
        for step, s in zip(reversed(self.steps), reversed(saved), strict=True):
            grad = step.adjoint(grad, s)
        return pred, grad, diff


def constant_error_grad(decoder: nn.Module, rep: Tensor, target: Tensor, per_elem: float) -> Tensor:
    """G = J_g(e)^T (per_elem (p - target)) with the error p - target held constant."""
    with torch.enable_grad():
        source = rep.detach().requires_grad_(True)
        pred = decoder(source)
        (grad,) = torch.autograd.grad(pred, source, grad_outputs=(pred - target.detach()).detach() * per_elem)
    return grad
