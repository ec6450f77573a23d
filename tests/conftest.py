"""Test-wide settings: one intra-op thread per worker (pytest-xdist runs workers in parallel)."""

import os

import torch

torch.set_num_threads(int(os.environ.get("FXMERGE_TEST_THREADS", "1")))
