"""Host copies of weights: exact, and on huge pages where the kernel gives them."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.conftest import mapping_of


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_host_copy_is_exact_and_aligned_to_huge_pages():
    from fiddlerc.runtime.host_memory import HUGE_PAGE, host_copy, huge_pages_available

    t = torch.randn(1024, 1536)  # 6 MiB: three huge pages
    c = host_copy(t)
    assert torch.equal(c, t) and c.is_contiguous() and c.data_ptr() % HUGE_PAGE == 0
    assert torch.equal(host_copy(t, torch.bfloat16), t.to(torch.bfloat16))
    small = torch.randn(8, 8)
    s = host_copy(small)
    assert torch.equal(s, small) and s.data_ptr() != small.data_ptr()
    if huge_pages_available():
        assert mapping_of(c.data_ptr())[1] > 0, "the kernel allows transparent huge pages but gave none"
