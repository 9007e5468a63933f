import pytest
import torch


@pytest.fixture
def one_thread():
    """Small problems: on a busy 2-core machine, thread hand-offs cost more than the maths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
