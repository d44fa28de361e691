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


@pytest.fixture(autouse=True)
def wf_cache_dir(tmp_path_factory, monkeypatch):
    """Tokenizers and token caches go to one folder per test session, never to ~/.cache: trained once
    per session, shared by the runs that need them."""
    monkeypatch.setenv("WF_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "wf-cache"))
