"""Lets the tests in this folder import the top-level modules (train, data, apa, ppo) from any working directory, and
gives each test torch's own thread count: train.train sets one thread for the tiny GPT (model.set_cpu_threads)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def torch_threads():
    yield
    torch.set_num_threads(THREADS)
