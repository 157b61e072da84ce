"""Every test here uses tiny tensors: run them on one torch thread."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Applies the shared ``one_torch_thread`` fixture to every test in this folder."""
