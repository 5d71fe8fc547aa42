"""What the command's parts share."""

import pytest

from fiddlerc.cli import common


def test_ctrl_c_is_remembered_as_well_as_raised():
    common.interrupted.clear()
    with pytest.raises(KeyboardInterrupt):
        common.on_sigint(2, None)
    assert common.interrupted.is_set()
    common.interrupted.clear()
