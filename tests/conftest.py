import os

import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter; the flag must be
# set before any kernel is defined (tests/test_triton.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from wrinklefree import ops  # noqa: E402

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
