"""An independent, deliberately plain implementation of shared/spec/dynamics.md for the tests.

Every pcoder predicts at every timestep with autograd enabled, and the error gradient is taken with
``torch.autograd.grad`` of the per-image mean squared error (summed over the batch); nothing is
skipped. It only borrows the network's pieces (encoders, decoders, head) as callables.
"""

import torch


def reference_run(net, x, timesteps, beta, lam, alpha, scales=None):
    n_pc = net.num_pcoders
    scales = scales or [1.0] * n_pc
    e = [None] * n_pc
    p = [None] * n_pc
    g = [None] * n_pc

    def predict(n, below):
        with torch.enable_grad():
            rep = e[n].detach().requires_grad_(True)
            pred = net.decoders[n](rep)
            err = ((pred - below.detach()) ** 2).flatten(1).mean(1).sum()
            (grad,) = torch.autograd.grad(err, rep)
        p[n], g[n] = pred.detach(), grad

    logits = []
    with torch.no_grad():
        below = x
        for n in range(n_pc):
            e[n] = net.encoders[n](below)
            predict(n, below)
            below = e[n]
        logits.append(net.head(e[-1]))
        for _ in range(timesteps):
            below = x
            for n in range(n_pc):
                ff = net.encoders[n](below)
                if n < n_pc - 1:
                    e[n] = beta[n] * ff + lam[n] * p[n + 1] + (1 - beta[n] - lam[n]) * e[n] \
                        - alpha[n] * scales[n] * g[n]
                else:
                    e[n] = beta[n] * ff + (1 - beta[n]) * e[n] - alpha[n] * scales[n] * g[n]
                predict(n, below)
                below = e[n]
            logits.append(net.head(e[-1]))
    return torch.stack(logits)
