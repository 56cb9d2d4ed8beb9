"""Fixtures shared by the torch test files."""
import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch's intra-op threads spin on tiny tensors and a shared machine (1 ms per sqrt): a
    module that uses this runs torch on one thread (``pytestmark = pytest.mark.usefixtures(
    "one_torch_thread")``) and restores the count after."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
