"""Fixtures of the property tests."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def single_thread() -> Iterator[None]:
    """Run the properties on one intra-op thread: their tensors are tiny, so a second thread only adds
    synchronisation, which costs up to 10× on a busy 2-core machine. The previous setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
