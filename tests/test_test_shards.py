"""The split of the Triton tests into shards of equal time (conftest.shard_items, scripts/test)."""
from types import SimpleNamespace

from conftest import SHORT_TEST_DEFAULT, shard_items


def test_every_test_runs_in_one_shard_in_order_and_long_tests_spread():
    items = [SimpleNamespace(nodeid=f"t{n}") for n in range(9)]
    durations = {"t0": 50.0, "t1": 40.0, "t2": 30.0, "t5": 20.0}
    shards = [shard_items(items, index, 2, durations) for index in range(2)]
    assert sorted(item.nodeid for shard in shards for item in shard) == sorted(item.nodeid for item in items)
    for shard in shards:
        assert shard == sorted(shard, key=items.index)
    seconds = [sum(durations.get(item.nodeid, SHORT_TEST_DEFAULT) for item in shard) for shard in shards]
    assert abs(seconds[0] - seconds[1]) <= 10.0 + 5 * SHORT_TEST_DEFAULT  # 50 + 20 against 40 + 30
    assert {item.nodeid for item in shards[0]} >= {"t0", "t5"}
