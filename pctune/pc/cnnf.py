"""CNN-F (Huang et al., NeurIPS 2020: "Neural networks with recurrent generative feedback"), pure PyTorch.

A CNN of blocks (a convolution or a linear map, optionally CNN-F's instance norm, a learned bias, a
ReLU and a max pool) whose generative feedback runs the same weights transposed from the logits back
down to the input of block ``ind``. Iteration 0 is the plain CNN (ReLU, MaxPool); every later iteration
feeds the generated features (blended with the previous ones by ``res``) forward again through the
adaptive nonlinearities, whose latent masks follow the sign of the feedback at the same place
(Theorem 2.1 C of the paper):

- AdaReLU keeps a unit where its value and the feedback agree in sign: ``f * 1(f * g > 0)``, that is
  ReLU(f) where g > 0 and -ReLU(-f) = min(f, 0) where g < 0 (the sign of f is kept, as for AdaPool;
  ``../shared/papers/cnnf-neurips2020.md`` writes "ReLU(-f)", which would flip it);
- AdaPool takes a window's max where g > 0 and its min where g < 0 (0 where g = 0);
- with the residual parameter ``res`` (the authors' "resReLU"), a later iteration's ReLU input is first
  blended towards the feedback, ``f' = f + res * (g - f)``, and ``f'`` is what the mask keeps.

The feedback of a block undoes it in reverse: CNN-F's instance norm (without the bias), the pool's
unpooling through the winning positions of the last forward pass, the ReLU's mask, then the transposed
weights (no bias). The instance norm divides each channel's map by its root mean square, without
centring (it keeps the feedback's l2 norm constant, an assumption of the derivation); the learned
per-channel bias after it is a separate parameter.

The facts of the layers were checked against the authors' released code (read to learn, not copied):
masks are recomputed at every forward pass and reused by the feedback that follows it; gradients flow
through every iteration (the masks are constants).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-8  # inside the square root of the instance norm, as the authors'


def instance_norm(x: Tensor, eps: float = EPS) -> Tensor:
    """Each channel's map divided by its root mean square over H, W (no centring, no parameters)."""
    return x / torch.sqrt(x.pow(2).mean(dim=(-2, -1), keepdim=True) + eps)


def ada_relu(f: Tensor, g: Tensor | None, res: float = 0.0) -> tuple[Tensor, Tensor]:
    """(output, mask): plain ReLU when ``g`` is None (iteration 0), else the unit kept where the
    (res-blended) value agrees in sign with the feedback ``g``."""
    if g is None:
        mask = f > 0
        return f * mask, mask
    blended = f + res * (g - f)
    mask = blended * g > 0
    return blended * mask, mask


@dataclass
class PoolState:
    """What a pool's forward pass chose, for the feedback that follows: the winning positions and, after
    iteration 0, where the feedback took the max (``pos``) or the min (``neg``)."""

    size: torch.Size
    max_index: Tensor
    min_index: Tensor | None = None
    pos: Tensor | None = None
    neg: Tensor | None = None


def ada_pool(f: Tensor, g: Tensor | None, k: int) -> tuple[Tensor, PoolState]:
    """MaxPool(f) when ``g`` is None, else the max of each window where ``g`` > 0 and its min where
    ``g`` < 0 (0 where ``g`` = 0)."""
    top, max_index = F.max_pool2d(f, k, return_indices=True)
    if g is None:
        return top, PoolState(f.shape, max_index)
    neg_bottom, min_index = F.max_pool2d(-f, k, return_indices=True)
    pos, neg = g > 0, g < 0
    return top * pos - neg_bottom * neg, PoolState(f.shape, max_index, min_index, pos, neg)


def unpool(g: Tensor, state: PoolState, k: int) -> Tensor:
    """The feedback through a pool: ``g`` placed at the positions its forward pass chose."""
    size = state.size[-2:]
    if state.pos is None:
        return F.max_unpool2d(g, state.max_index, k, output_size=size)
    return (F.max_unpool2d(g * state.pos, state.max_index, k, output_size=size)
            + F.max_unpool2d(g * state.neg, state.min_index, k, output_size=size))


@dataclass(frozen=True)
class Block:
    """One block: ``kind`` "conv" (3x3-style, stride 1) or "linear", then optionally the instance norm
    (conv only), a learned bias, the adaptive ReLU and a max pool of ``pool`` x ``pool``."""

    kind: str
    in_features: int
    out_features: int
    kernel: int = 3
    padding: int = 1
    norm: bool = False
    relu: bool = True
    pool: int = 0


@dataclass
class Latents:
    """The state one forward pass leaves for the feedback: per block its ReLU mask and pool state, the
    feedback each ReLU and pool saw last (what the next forward pass adapts to), and the input shapes."""

    masks: list[Tensor | None]
    pools: list[PoolState | None]
    relu_g: list[Tensor | None]
    pool_g: list[Tensor | None]
    shapes: list[torch.Size]

    @classmethod
    def empty(cls, blocks: int) -> Latents:
        return cls([None] * blocks, [None] * blocks, [None] * blocks, [None] * blocks, [torch.Size()] * blocks)


@dataclass
class Iterations:
    """What :meth:`CNNF.iterate` returns: the logits at t = 0..T, the reconstructions of block ``ind``'s
    input at t = 1..T, and that input in the plain pass (the reconstruction target)."""

    logits: list[Tensor]
    reconstructions: list[Tensor]
    target: Tensor


class CNNF(nn.Module):
    """A CNN-F of ``blocks``: feedback to the input of block ``ind``, residual parameter ``res``."""

    def __init__(self, blocks: Sequence[Block], ind: int = 0, res: float = 0.1, *, name: str = "cnnf",
                 input_size: Sequence[int] | None = None) -> None:
        super().__init__()
        if not 0 <= ind < len(blocks):
            raise ValueError(f"ind = {ind}: there are {len(blocks)} blocks (0..{len(blocks) - 1})")
        self.blocks, self.ind, self.res = tuple(blocks), ind, res
        self.name, self.input_size = name, tuple(input_size) if input_size else None
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for block in self.blocks:
            if block.kind == "conv":
                weight = torch.empty(block.out_features, block.in_features, block.kernel, block.kernel)
                nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
                shape = (1, block.out_features, 1, 1)
            elif block.kind == "linear":
                weight = torch.empty(block.out_features, block.in_features)
                nn.init.kaiming_uniform_(weight, a=5 ** 0.5)  # torch's nn.Linear default
                shape = (1, block.out_features)
            else:
                raise ValueError(f"block kind {block.kind!r}: 'conv' or 'linear'")
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(torch.zeros(shape)))

    # -- the two pathways ------------------------------------------------------------------------
    def forward_from(self, x: Tensor, start: int = 0, previous: Latents | None = None) -> tuple[Tensor, Latents]:
        """The feedforward pathway from the input of block ``start``: plain ReLU/MaxPool when
        ``previous`` is None (iteration 0), else adapted to the feedback ``previous`` holds."""
        return self._run(x, start, len(self.blocks), previous)

    def _run(self, x: Tensor, start: int, stop: int, previous: Latents | None) -> tuple[Tensor, Latents]:
        """Blocks ``start`` to ``stop`` - 1."""
        state = Latents.empty(len(self.blocks))
        for i in range(start, stop):
            block = self.blocks[i]
            state.shapes[i] = x.shape
            x = self._linear_map(x, i)
            if block.norm:
                x = instance_norm(x)
            x = x + self.biases[i]
            if block.relu:
                x, state.masks[i] = ada_relu(x, previous.relu_g[i] if previous else None,
                                             self.res if previous else 0.0)
            if block.pool:
                x, state.pools[i] = ada_pool(x, previous.pool_g[i] if previous else None, block.pool)
        return x, state

    def feedback(self, logits: Tensor, state: Latents) -> Tensor:
        """The generative pathway from the logits down to the input of block ``ind``, through the masks
        ``state`` holds; records the feedback each ReLU and pool saw, for the next forward pass."""
        g = logits
        for i in range(len(self.blocks) - 1, self.ind - 1, -1):
            block = self.blocks[i]
            if block.norm:
                g = instance_norm(g)
            if block.pool:
                state.pool_g[i] = g
                g = unpool(g, state.pools[i], block.pool)
            if block.relu:
                state.relu_g[i] = g
                g = g * state.masks[i]
            g = self._transposed_map(g, i, state.shapes[i])
        return g

    def iterate(self, x: Tensor, iterations: int) -> Iterations:
        """Algorithm 1: the plain pass, then ``iterations`` rounds of feedback to block ``ind``'s input,
        blended with the previous input by ``res``, and a forward pass from there."""
        h = self._input_of(x, self.ind)
        logits, state = self.forward_from(h, self.ind)
        out = Iterations([logits], [], h)
        current = h
        for _ in range(iterations):
            generated = self.feedback(logits, state)
            out.reconstructions.append(generated)
            current = current + self.res * (generated - current)
            logits, state = self.forward_from(current, self.ind, previous=state)
            out.logits.append(logits)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """The plain CNN (iteration 0)."""
        return self.forward_from(x)[0]

    def run(self, x: Tensor, timesteps: int = 4, hparams: None = None, *, grad_mode: str = "none") -> Tensor:
        """The logits of every iteration, ``[T+1, batch, classes]`` (index 0: the plain CNN), the contract
        of :meth:`pctune.pc.network.PredictiveNet.run` that the evaluation stages call. CNN-F has no
        test-time coefficients besides the iterations (``hparams`` must be None); ``grad_mode`` "none"
        is inference, any other differentiates end to end through the iterations (the masks are
        constants, as in the authors' end-to-end attack)."""
        if hparams is not None:
            raise ValueError("CNN-F takes no test-time hyperparameters besides the iterations")
        with torch.no_grad() if grad_mode == "none" else torch.enable_grad():
            return torch.stack(self.iterate(x, timesteps).logits)

    # -- helpers ---------------------------------------------------------------------------------
    def _input_of(self, x: Tensor, block: int) -> Tensor:
        """The input of ``block`` in the plain pass (x itself for block 0)."""
        return self._run(x, 0, block, None)[0]

    def _linear_map(self, x: Tensor, i: int) -> Tensor:
        block = self.blocks[i]
        if block.kind == "conv":
            return F.conv2d(x, self.weights[i], padding=block.padding)
        return F.linear(x.flatten(1), self.weights[i])

    def _transposed_map(self, g: Tensor, i: int, input_shape: torch.Size) -> Tensor:
        """The adjoint of block ``i``'s weights (no bias), shaped as the block's input (a linear block
        after a convolution: its input's feature maps)."""
        block = self.blocks[i]
        if block.kind == "conv":
            return F.conv_transpose2d(g, self.weights[i], padding=block.padding)
        g = g @ self.weights[i]
        return g.reshape(input_shape) if len(input_shape) > 2 else g


def cnnf_losses(out: Iterations, labels: Tensor, reconstruction_weight: float = 0.1) -> dict[str, Tensor]:
    """The training loss of one batch: cross-entropy averaged over the iterations t = 0..T, plus
    ``reconstruction_weight`` times the mean squared error of the reconstructions (t = 1..T) of block
    ``ind``'s input, averaged over the iterations."""
    ce = torch.stack([F.cross_entropy(logits, labels) for logits in out.logits]).mean()
    rec = (torch.stack([F.mse_loss(r, out.target) for r in out.reconstructions]).mean()
           if out.reconstructions else ce.new_zeros(()))
    return {"cross_entropy": ce, "reconstruction": rec, "total": ce + reconstruction_weight * rec}


def train_epoch(net: CNNF, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor, *, iterations: int,
                batch_size: int = 64, reconstruction_weight: float = 0.1,
                generator: torch.Generator | None = None) -> dict[str, float]:
    """One epoch over ``images`` in a seeded order (``generator``), training with ``iterations``
    feedback iterations; returns the mean of each loss over the batches."""
    net.train()
    order = torch.randperm(len(images), generator=generator)
    sums: dict[str, float] = {}
    batches = 0
    for start in range(0, len(images), batch_size):
        index = order[start:start + batch_size]
        losses = cnnf_losses(net.iterate(images[index], iterations), labels[index], reconstruction_weight)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + value.item()
        batches += 1
    return {key: value / batches for key, value in sums.items()}
