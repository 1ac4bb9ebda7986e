"""scripts/shard_experiment.py's router dimension: planning, process tiers from /proc, CPU
per tier, tables. Pure functions only: no process is started (the real runs are in
tests/integration/test_shard_experiment.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from scripts import shard_experiment as se


def row(
    scenario: str,
    routers: Optional[int],
    shards: Optional[int],
    deliveries: float,
    **extra: Any,
) -> Dict[str, Any]:
    """A made-up result row (never written anywhere)."""
    server = "baseline" if shards is None else "cluster"
    out: Dict[str, Any] = dict.fromkeys(se.COLUMNS)
    out.update(scenario=scenario, server=server, routers=routers, shards=shards, status="ok")
    out.update(deliveries_per_s=deliveries, p99_ms=5.0, members=20)
    out["server_processes"] = se.server_processes(routers, shards)
    out.update(extra)
    return out


def configs(runs: List[se.RunSpec]) -> List[tuple]:
    return [(r.scenario.name, r.server, r.routers, r.shards) for r in runs]


# --- planning ----------------------------------------------------------------------------


def test_one_router_plans_the_same_runs_as_before() -> None:
    default = se.plan_runs(["fanout", "longpoll"], [1, 2, 4, 8], ["fanout"], 2, quick=False)
    assert configs(default) == [
        ("fanout", "cluster", 1, 1),
        ("fanout", "cluster", 1, 2),
        ("fanout", "cluster", 1, 4),
        ("fanout", "cluster", 1, 8),
        ("fanout", "baseline", 1, None),
        ("longpoll", "cluster", 1, 2),
        ("longpoll", "baseline", 1, None),
    ]
    assert [r.label for r in default][:2] == ["fanout cluster shards=1", "fanout cluster shards=2"]


def test_several_routers_sweep_fanout_and_longpoll_over_routers_x_shards() -> None:
    names = ["fanout", "connections", "longpoll"]
    runs = se.plan_runs(names, [1, 2, 4], ["fanout"], 2, False, [1, 2, 4], [1, 2, 4])
    swept = {(r, n) for r in (1, 2, 4) for n in (1, 2, 4)}
    for scenario in ("fanout", "longpoll"):
        cluster = [(r.routers, r.shards) for r in runs if r.scenario.name == scenario]
        cluster = [c for c in cluster if c[1] is not None]
        assert cluster == sorted(swept), scenario  # by router count, then shard count
    # The other scenarios stay at the fewest routers and the fixed shard count.
    assert [(r.server, r.routers, r.shards) for r in runs if r.scenario.name == "connections"] == [
        ("cluster", 1, 2),
        ("baseline", 1, None),
    ]
    assert "fanout cluster shards=4 routers=2" in [r.label for r in runs]


def test_one_router_count_other_than_one_runs_every_cluster_run_with_it() -> None:
    runs = se.plan_runs(["fanout", "longpoll"], [1, 2], ["fanout"], 2, True, [2])
    assert {r.routers for r in runs if r.server == "cluster"} == {2}
    assert [r.shards for r in runs if r.scenario.name == "longpoll"] == [2, None]


def test_the_stuck_reference_is_not_router_swept() -> None:
    runs = se.plan_runs(["stuck"], [1], ["fanout"], 2, False, [1, 2], [1, 2])
    assert [(r.scenario.name, r.routers, r.shards) for r in runs if r.server == "cluster"] == [
        ("fanout", 1, 2),
        ("stuck", 1, 2),
    ]


def test_the_documented_router_sweep_and_its_estimate() -> None:
    args = se.parse_args(
        ["--scenarios", "fanout,longpoll", "--routers", "1,2,4", "--shards", "1,2,4"]
    )
    counts, router_shards = se.resolve_routers(args)
    assert (counts, router_shards) == ([1, 2, 4], [1, 2, 4])
    runs = se.plan_runs(args.scenarios, [1, 2, 4], ["fanout"], 2, False, counts, router_shards)
    assert len(runs) == 20  # 2 x (9 cluster + 1 baseline)
    assert se.about(se.estimate_seconds(len(runs) * 3, se.FULL_TIMING, 0)) == "about 16 minutes"
    small = se.plan_runs(["fanout"], [1, 2], ["fanout"], 2, False, [1, 2], [1, 2])
    timing = se.replace(se.FULL_TIMING, duration=3.0, warmup=1.0)
    assert len(small) == 5 and se.about(se.estimate_seconds(5, timing, 0)) == "about 40 s"


def test_routers_option() -> None:
    assert se.parse_args([]).routers == [1]
    assert se.parse_args(["--routers", "4,1,2"]).routers == [4, 1, 2]
    assert se.resolve_routers(se.parse_args(["--routers", "4,1,2,2"]))[0] == [1, 2, 4]
    assert se.resolve_routers(se.parse_args(["--quick", "--routers", "1,2"]))[1] == [1, 2]
    for bad in ("0", "two", ""):
        with pytest.raises(SystemExit) as exited:
            se.parse_args(["--routers", bad])
        assert exited.value.code == 2


def test_server_argv_passes_the_router_count() -> None:
    scenario = se.SCENARIOS["fanout"]
    argv, sharded = se.server_argv(se.RunSpec(scenario, "cluster", 4, scenario.size, 2))
    assert sharded
    assert argv[argv.index("--routers") + 1] == "2" and argv[argv.index("--shards") + 1] == "4"
    baseline, _ = se.server_argv(se.RunSpec(scenario, "baseline", None, scenario.size))
    assert "--routers" not in baseline


def test_server_processes_counts_the_supervisor_only_with_several_routers() -> None:
    assert se.server_processes(1, 4) == 5
    assert se.server_processes(2, 4) == 7
    assert se.server_processes(4, 1) == 6
    assert se.server_processes(None, None) == 1  # the baseline


# --- processes by tier -------------------------------------------------------------------


def test_tiers_by_name_under_the_started_process() -> None:
    processes = {
        100: (1, "shardchat"),  # the supervisor
        101: (100, "python3"),  # multiprocessing's resource tracker
        102: (100, "shardchat-sh1"),
        103: (100, "shardchat-sh0"),
        110: (100, "shardchat-r1"),
        104: (100, "shardchat-r0"),
        105: (103, "shardchat-sh9"),  # a descendant further down still counts
        200: (1, "shardchat"),  # another cluster: not ours
        201: (200, "shardchat-r0"),
        202: (200, "shardchat-sh0"),
        300: (104, "shardchat-rx"),  # not a tier name
    }
    tiers = se.classify_tiers(100, processes, routers=2)
    assert tiers.routers == (104, 110) and tiers.shards == (103, 102, 105)
    assert tiers.supervised
    assert tiers.pids == [100, 104, 110, 103, 102, 105]
    one = se.classify_tiers(200, processes, routers=1)
    assert one.routers == (200,) and one.shards == (202,) and not one.supervised
    assert one.pids == [200, 202]  # the router is not listed twice
    assert se.classify_tiers(999, processes, routers=2) == se.Tiers(999, (), ())


def test_read_processes_parses_stat_after_the_last_parenthesis(tmp_path: Path) -> None:
    def fake(pid: int, comm: str, ppid: int) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(comm + "\n", encoding="ascii")
        stat = f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 1 0 0 0 7 3 0 0 20 0 1"
        (tmp_path / str(pid) / "stat").write_text(stat + "\n", encoding="ascii")

    fake(10, "shardchat", 1)
    fake(11, "odd) name (x", 10)  # a comm may hold ") "
    (tmp_path / "12").mkdir()  # exited between listing and reading
    (tmp_path / "self").mkdir()
    assert se.read_processes(tmp_path) == {10: (1, "shardchat"), 11: (10, "odd) name (x")}
    assert se.read_processes(tmp_path / "missing") == {}


# --- CPU per tier ------------------------------------------------------------------------


def resources(**cpu_percent: float) -> Dict[str, Any]:
    """The loadgen's ``resources`` with ``p<pid>=percent`` entries."""
    out: Dict[str, Any] = {
        name[1:]: {"pid": int(name[1:]), "cpu_percent": pct, "rss_max_kib": 20_000}
        for name, pct in cpu_percent.items()
    }
    out["machine"] = {"cores": 2, "cpu_percent": 190.0, "others_cpu_percent": 3.0}
    return out


def test_tier_cpu_seconds_undo_the_loadgens_percent_over_the_window() -> None:
    measured = resources(p10=2.0, p11=80.0, p12=70.0, p13=30.0)
    assert se.tier_cpu_seconds(measured, [11, 12], 10.0) == pytest.approx(15.0)
    assert se.tier_cpu_seconds(measured, [13, 99], 10.0) == pytest.approx(3.0)  # 99 exited
    assert se.tier_cpu_seconds(measured, [99], 10.0) is None
    assert se.tier_cpu_seconds(measured, [], 10.0) is None
    assert se.tier_cpu_seconds(measured, [11], None) is None
    assert se.tier_cpu_seconds(measured, [11], 0.0) is None


def test_us_per_delivery_and_per_message() -> None:
    assert se.us_per(1.5, 300_000) == 5.0
    assert se.us_per(0.25, 3) == pytest.approx(83333.33)
    assert se.us_per(None, 100) is None
    assert se.us_per(1.0, 0) is None
    assert se.us_per(1.0, None) is None


def test_tier_columns_for_a_two_router_run() -> None:
    tiers = se.Tiers(10, (11, 12), (13,))
    result = {
        "measured_s": 10.0,
        "deliveries": 1_500_000,
        "published": 75_000,
        "resources": resources(p10=1.0, p11=80.0, p12=70.0, p13=30.0),
    }
    assert se.tier_columns(result, tiers) == {
        "router_tier_cpu_s": 15.0,
        "shard_tier_cpu_s": 3.0,
        "router_us_per_delivery": 10.0,  # 15 s / 1.5 M deliveries
        "shard_us_per_message": 40.0,  # 3 s / 75,000 messages
    }
    assert se.tier_columns({**result, "resources": {"available": False}}, tiers) == {}
    assert se.tier_columns(result, None) == {}
    failed = se.tier_columns({"error": "loadgen exited 1"}, tiers)
    assert set(failed.values()) == {None}  # nothing measured: empty, never made up


def test_make_row_carries_routers_processes_and_cpu_per_tier() -> None:
    scenario = se.SCENARIOS["fanout"]
    spec = se.RunSpec(scenario, "cluster", 1, scenario.size, 2)
    result = {
        "deliveries_per_s": 150_000.0,
        "deliveries": 1_500_000,
        "published": 75_000,
        "measured_s": 10.0,
        "latency_ms": {"p50": 1.0, "p99": 4.0, "max": 9.0, "samples": 100},
        "resources": resources(p10=1.0, p11=80.0, p12=70.0, p13=30.0),
    }
    made = se.make_row(spec, result, se.Tiers(10, (11, 12), (13,)))
    assert (made["routers"], made["shards"], made["server_processes"]) == (2, 1, 4)
    assert made["router_us_per_delivery"] == 10.0 and made["shard_us_per_message"] == 40.0
    assert made["router_cpu_pct"] == 150.0  # the router tier, not the supervisor
    assert made["max_shard_cpu_pct"] == 30.0
    assert made["total_rss_mb"] == se.kib_to_mb(4 * 20_000)  # with the supervisor's
    one = se.make_row(
        se.RunSpec(scenario, "cluster", 1, scenario.size),
        {**result, "resources": resources(p10=75.0, p13=30.0)},
        se.Tiers(10, (10,), (13,)),
    )
    assert one["router_cpu_pct"] == 75.0 and one["router_us_per_delivery"] == 5.0
    assert one["server_processes"] == 2
    base = se.make_row(se.RunSpec(scenario, "baseline", None, scenario.size), result, None)
    assert base["routers"] is None and base["router_us_per_delivery"] is None
    assert "router tier 10.00 us/delivery" in se.progress_line("x", {**made, "wall_s": 1.0})


# --- results -----------------------------------------------------------------------------


def test_repeats_are_kept_per_router_count() -> None:
    rows = [row("fanout", r, 1, d) for r, d in ((1, 10.0), (2, 30.0), (1, 20.0), (2, 40.0))]
    kept = se.mark_kept(rows)
    assert sorted((k["routers"], k["deliveries_per_s"]) for k in kept) == [(1, 10.0), (2, 30.0)]
    assert {k["routers"]: k["deliveries_max"] for k in kept} == {1: 20.0, 2: 40.0}


def test_goals_and_shard_cost_use_the_fixed_router_count_only() -> None:
    rows = [
        row("fanout", 1, 1, 100_000.0),
        row("fanout", 1, 2, 95_000.0),
        row("fanout", 2, 2, 190_000.0),
        row("fanout", 2, 4, 10_000.0),
        row("fanout", None, None, 40_000.0),
    ]
    assert se.find_row(rows, "fanout", "cluster", 2)["deliveries_per_s"] == 95_000.0
    assert se.find_row(rows, "fanout", "cluster", 2, 2)["deliveries_per_s"] == 190_000.0
    assert se.shard_cost(rows)[0] == pytest.approx(0.05)
    assert se.shard_cost(rows, 2)[1] == "2->4"
    goals = {g.name: g for g in se.evaluate_goals(rows, 2)}
    assert goals["fan-out 10x20x2 deliveries/s vs baseline (2 shards)"].measured == "2.38"
    at_two = {g.name: g for g in se.evaluate_goals(rows, 2, routers=2)}
    assert at_two["fan-out 10x20x2 deliveries/s vs baseline (2 shards, 2 routers)"].measured == (
        "4.75"
    )


def test_router_table_and_where_it_appears() -> None:
    kept = [
        row("longpoll", 2, 1, 5_000.0, router_us_per_delivery=12.5),
        row("fanout", 2, 1, 150_000.0, router_us_per_delivery=4.25, shard_us_per_message=30.0),
        row("fanout", 1, 1, 100_000.0, router_us_per_delivery=5.0),
        row("fanout", None, None, 40_000.0),
    ]
    table = se.router_table(kept)
    body = [line for line in table if line.startswith("| ") and "---" not in line][1:]
    assert body[0].startswith("| fanout | 1 | 1 | 2 | 100,000 | 5.00 |")
    assert body[1] == ("| fanout | 2 | 1 | 4 | 150,000 | 5.00 | - | - | 4.25 | 30.00 | ok |")
    assert body[2].startswith("| longpoll | 2 | 1 | 4 | 5,000 |")
    assert len(body) == 3  # the baseline is not in it
    meta = {"repeats": 1, "fixed_shards": 1, "fixed_routers": 1, "router_counts": [1, 2]}
    lines = se.summary_lines(kept, kept, meta)
    assert "## Routers x shards" in lines
    runs = lines[lines.index("## Runs") + 2]
    assert runs.startswith("| scenario | server | routers | shards |")
    ratios = lines.index("## Cluster against the threaded baseline")
    assert lines[ratios + 2].startswith("| scenario | routers | shards |")
    assert "| fanout | 2 | 1 | 3.75x | 1.00x |" in lines
    plain = se.summary_lines(kept[2:], kept[2:], {**meta, "router_counts": [1]})
    assert "## Routers x shards" not in plain
    assert plain[2].startswith("| scenario | server | shards |")  # as before routers


def test_router_plot_lines_are_per_scenario_and_router_count() -> None:
    kept = [
        row("fanout", 1, 1, 1.0),
        row("fanout", 1, 2, 2.0),
        row("fanout", 2, 1, 3.0),
        row("longpoll", 1, 2, 4.0),  # one router count only: no line
        row("fanout", None, None, 5.0),
    ]
    lines = se.router_lines(kept)
    assert [(s, n, [r["shards"] for r in points]) for s, n, points in lines] == [
        ("fanout", 1, [1, 2]),
        ("fanout", 2, [1]),
    ]
    assert se.router_lines(kept[3:]) == []


def test_router_plot_is_a_png_when_matplotlib_is_there(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    kept = [
        row("fanout", r, n, 1000.0 * r * n, router_us_per_delivery=5.0 / r)
        for r in (1, 2)
        for n in (1, 2)
    ]
    path = tmp_path / se.ROUTER_PLOT
    assert se.write_router_plot(path, kept, 2) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert se.write_router_plot(tmp_path / "none.png", kept[:2], 2) is not None
    # The shard-count plot keeps to one router count.
    assert se.write_plot(tmp_path / "shards.png", kept, 2, routers=2) is None
