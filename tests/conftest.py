"""Shared test set-up: one torch thread per test process (CI has 2 cores, pytest -n 2)."""

import os

import matplotlib

matplotlib.use("Agg")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)

import sys  # noqa: E402

# tests/ on sys.path so test helpers (toymodel.py) import from any subfolder and in spawned
# DDP workers (multiprocessing passes sys.path to its children)
sys.path.insert(0, os.path.dirname(__file__))
