"""Speed of CauTrigger's information-flow causal loss: batched vs loop implementations.

The causal loss needs ``I(z_c; Y)`` and ``I(z_s; Y)`` on ``n_x`` cells with ``n_alpha x
n_beta`` latent draws each. CauTrigger evaluates all of them in one batched pass
(:meth:`CauTriggerModule.causal_loss` -> :func:`cellsight.interpret.information_flow`); the
peers measured in the same run on the same draws are

* the engine's loop reference :func:`information_flow_loop` (one latent vector per call), and
* a per-(cell, alpha) loop that batches only the ``n_beta`` inner draws (a direct
  transcription of the estimator's two sums).

Prints the time per causal-loss evaluation and the ratios (goal >= 10x), and the largest
difference between the estimates. Sizes: the seed's defaults (n_x=5, n_alpha=25,
n_beta=100) on a 2L module with 100 upstream, 20 downstream features and 10 latent dims.
"""

from __future__ import annotations

import time

import torch

from cellsight.interpret.information_flow import draw_noise, information_flow_loop
from cellsight.models.cautrigger import CauTriggerModule

N_X, N_ALPHA, N_BETA = 5, 25, 100


def per_alpha_loop(f, mu, sd, dims, noise) -> torch.Tensor:
    k = mu.shape[1]
    a = sorted(dims)
    b = [d for d in range(k) if d not in a]
    out = []
    for i in range(mu.shape[0]):
        p_alpha = []
        for s in range(noise.alpha_nsa.shape[1]):
            z = torch.empty(noise.beta_nstb.shape[2], k)
            z[:, a] = noise.alpha_nsa[i, s]
            z[:, b] = mu[i, b] + sd[i, b] * noise.beta_nstb[i, s]
            p_alpha.append(f(z).mean(0))
        p = torch.stack(p_alpha).clamp(1e-8, 1)
        marg = p.mean(0)
        out.append(-(marg * marg.log()).sum() + (p * p.log()).sum(1).mean())
    return torch.stack(out)


def timed(fn, repeat: int) -> tuple[float, object]:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        res = fn()
    return (time.perf_counter() - t0) / repeat, res


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mod = CauTriggerModule(n_input=100, n_state=2, n_latent=10, n_causal=2, n_down=20).eval()
    mu, sd = torch.randn(N_X, 10), torch.rand(N_X, 10) + 0.2
    qc = torch.distributions.Normal(mu[:, :2], sd[:, :2])
    qs = torch.distributions.Normal(mu[:, 2:], sd[:, 2:])
    dims_c, dims_s = list(range(2)), list(range(2, 10))
    f = mod.predict_proba_from_latent

    def batched():
        torch.manual_seed(1)
        with torch.no_grad():
            return mod.causal_loss(qc, qs, N_X, N_ALPHA, N_BETA)[1:]

    torch.manual_seed(1)
    nc = draw_noise(N_X, 10, dims_c, N_ALPHA, N_BETA)
    ns = draw_noise(N_X, 10, dims_s, N_ALPHA, N_BETA)

    def loop():
        return (information_flow_loop(f, mu, sd, dims_c, nc).mean(),
                information_flow_loop(f, mu, sd, dims_s, ns).mean())

    def semi():
        with torch.no_grad():
            return (per_alpha_loop(f, mu, sd, dims_c, nc).mean(),
                    per_alpha_loop(f, mu, sd, dims_s, ns).mean())

    t_b, r_b = timed(batched, 20)
    t_s, r_s = timed(semi, 3)
    t_l, r_l = timed(loop, 1)
    diff = max(abs(float(x) - float(y)) for x, y in zip(r_b, r_l))
    diff_s = max(abs(float(x) - float(y)) for x, y in zip(r_s, r_l))
    print(f"causal loss (n_x={N_X}, n_alpha={N_ALPHA}, n_beta={N_BETA}), seconds per "
          f"evaluation: batched {t_b:.4f}, per-alpha loop {t_s:.4f}, full loop {t_l:.2f}")
    print(f"info-flow speed ratio vs per-alpha loop: {t_s / t_b:.1f}x (goal >= 10x)")
    print(f"info-flow speed ratio vs loop reference: {t_l / t_b:.1f}x (goal >= 10x)")
    print(f"max |batched - loop| over I(z_c), I(z_s): {diff:.2e} nats "
          f"(per-alpha loop: {diff_s:.2e})")


if __name__ == "__main__":
    main()
