import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny pipelines run hundreds of small ops: one thread avoids oversubscribing a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
