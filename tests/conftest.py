import pytest
import torch

from wrinklefree import ops

ISAS = ops.supported_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Run a test once per instruction set this CPU supports, restoring the default after."""
    before = ops.get_isa()
    ops.set_isa(request.param)
    yield request.param
    ops.set_isa(before)


@pytest.fixture
def threads():
    """Restore the kernel thread count after a test changes it."""
    before = ops.get_num_threads()
    yield
    ops.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
