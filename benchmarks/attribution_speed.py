"""Integrated Gradients over 2,000 cells x 1,000 genes, 50 steps: cellsight's engine vs captum.

The explained function is a cell-type classifier on raw counts with its preprocessing inside
(``log1p`` -> 1000-128-64-10 MLP -> softmax); each cell is explained for its predicted class,
from the per-gene mean baseline (FADVI's ``predict(interpretability="ig")`` set-up).

Peers, run in the same process on the same data and weights, one torch thread each:

* the seeds' way: a loop over minibatches calling captum's ``IntegratedGradients`` per batch
  (cell2net's ``tf_attr`` uses ``batch_size=4``);
* captum in one call with its own ``internal_batch_size`` (the same rows per forward as ours).

Printed: seconds of each, the ratio ours / peer (goal <= 0.5 against the seeds' loop) and the
largest absolute difference of the attributions (they must agree). Exits 0 whatever the
numbers.

Usage: ``python benchmarks/attribution_speed.py [--cells 2000] [--genes 1000] [--steps 50]``
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from captum.attr import IntegratedGradients

from cellsight.interpret import attribute
from cellsight.interpret.batching import DEFAULT_MAX_BATCH_ELEMENTS


def _classifier(n_genes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(n_genes, 128), torch.nn.ReLU(),
                torch.nn.Linear(128, 64), torch.nn.ReLU(),
                torch.nn.Linear(64, 10),
            )

        def forward(self, x_ng: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.mlp(torch.log1p(x_ng)), dim=-1)

    return Classifier().eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=2000)
    p.add_argument("--genes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed-batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    rng = np.random.default_rng(args.seed)
    mu_g = rng.gamma(0.6, 2.0, args.genes)
    x_ng = torch.from_numpy(
        rng.poisson(mu_g * rng.gamma(4.0, 0.25, (args.cells, 1))).astype(np.float32)
    )
    model = _classifier(args.genes, args.seed)
    with torch.no_grad():
        target_n = model(x_ng).argmax(1)
    base_1g = x_ng.mean(0, keepdim=True)
    print(
        f"IG, {args.cells} cells x {args.genes} genes, {args.steps} steps, predicted class, "
        "mean baseline, 1 torch thread"
    )

    t0 = time.perf_counter()
    ours = attribute(
        model, x_ng, method="ig", baselines=base_1g, target=target_n, n_steps=args.steps
    )
    t_ours = time.perf_counter() - t0

    ig = IntegratedGradients(model)
    bs = args.seed_batch_size
    t0 = time.perf_counter()
    loop = torch.cat([
        ig.attribute(
            x_ng[i : i + bs], baselines=base_1g.expand(min(bs, args.cells - i), -1),
            target=target_n[i : i + bs], n_steps=args.steps,
        ).detach()
        for i in range(0, args.cells, bs)
    ]).numpy()
    t_loop = time.perf_counter() - t0

    rows = max(args.steps, (DEFAULT_MAX_BATCH_ELEMENTS // args.genes) // args.steps * args.steps)
    t0 = time.perf_counter()
    one = ig.attribute(
        x_ng, baselines=base_1g.expand(args.cells, -1), target=target_n, n_steps=args.steps,
        internal_batch_size=rows,
    ).detach().numpy()
    t_one = time.perf_counter() - t0

    print(
        f"ig seconds vs seeds' per-minibatch captum loop (batch_size {bs}): cellsight "
        f"{t_ours:.2f}, captum loop {t_loop:.2f}, ratio {t_ours / t_loop:.2f} (goal <= 0.5)"
    )
    print(
        f"ig seconds vs one captum call (internal_batch_size {rows}): cellsight {t_ours:.2f}, "
        f"captum {t_one:.2f}, ratio {t_ours / t_one:.2f}"
    )
    scale = float(np.abs(loop).max())
    d_loop = np.abs(ours - loop).max() / scale
    d_one = np.abs(ours - one).max() / scale
    print(
        f"max |attribution difference| / max |attribution|: vs loop {d_loop:.1e}, vs one call "
        f"{d_one:.1e} (goal <= 1e-4)"
    )


if __name__ == "__main__":
    main()
