"""The plan's own rules: what its fields decide."""


def test_fetch_rule_is_from_the_threshold_on():
    from fiddlerc.plan import fetches

    assert not fetches(None, 10**6)  # no threshold: never fetched (decode, CPU-only targets)
    assert not fetches(8, 7) and fetches(8, 8) and fetches(8, 9)
