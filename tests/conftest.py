"""Shared fixtures for the unit tests.

Single-threaded torch: on a 2-core machine with other load, intra-op threads make small-net
steps far slower (OpenMP spin-waits), so every test session runs with one thread.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    """The bundled sklearn digits (N, 1, 8, 8) in [0, 1], loaded once per session."""
    from fipray.data import get_data

    return get_data("digits")
