"""Shared test set-up: one torch thread per test process (CI has 2 cores, pytest -n 2)."""

import os

import matplotlib

matplotlib.use("Agg")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)
