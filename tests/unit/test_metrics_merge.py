"""router.metrics.merge: several routers' expositions as one."""

from __future__ import annotations

from router.metrics import merge

ONE = """# HELP a_total A.
# TYPE a_total counter
a_total{router="0"} 1
# HELP b B.
# TYPE b gauge
b{router="0",shard="0"} 2
"""
TWO = ONE.replace('router="0"', 'router="1"').replace(" 1\n", " 5\n")


def test_each_family_once_with_every_routers_samples() -> None:
    merged = merge([ONE, TWO]).splitlines()
    assert merged == [
        "# HELP a_total A.",
        "# TYPE a_total counter",
        'a_total{router="0"} 1',
        'a_total{router="1"} 5',
        "# HELP b B.",
        "# TYPE b gauge",
        'b{router="0",shard="0"} 2',
        'b{router="1",shard="0"} 2',
    ]


def test_one_router_is_unchanged() -> None:
    assert merge([ONE]) == ONE
