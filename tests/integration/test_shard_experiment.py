"""scripts/shard_experiment.py: a ``--quick`` run really writes its results.

The subprocess test starts real clusters and the real threaded baseline on loopback, so
it checks that every planned run produced a row with real numbers. It asserts nothing
about speed: timing goals are judged by the full experiment (docs/PERFORMANCE.md), not
by tests.
"""

from __future__ import annotations

import csv
import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from scripts import shard_experiment as se

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "shard_experiment.py"

# (scenario, server, shards) of every run ``--quick`` makes: fanout swept over 1,2 and the
# other scenarios at 2 shards, each also against the baseline.
QUICK_RUNS = {
    ("fanout", "cluster", "1"),
    ("fanout", "cluster", "2"),
    ("fanout", "baseline", ""),
    ("fanout-200", "cluster", "2"),
    ("fanout-200", "baseline", ""),
    ("connections", "cluster", "2"),
    ("connections", "baseline", ""),
    ("longpoll", "cluster", "2"),
    ("longpoll", "baseline", ""),
    ("stuck", "cluster", "2"),
    ("stuck", "baseline", ""),
}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU/RSS sampling reads /proc")
@pytest.mark.timeout(120)
def test_quick_run_writes_csv_markdown_and_json(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=str(ROOT),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    progress = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert len(progress) == len(QUICK_RUNS), done.stderr
    assert done.stderr.startswith("11 configurations x 1 = 11 runs"), done.stderr
    assert f"results into {tmp_path}" in done.stderr.splitlines()[0]
    # The tables go to stdout (progress stays on stderr): the same as the Markdown's.
    assert not any(line.startswith("[") for line in done.stdout.splitlines())
    assert done.stdout.startswith("## Runs\n")
    assert done.stdout.count("| fanout | cluster |") == 2
    assert "## Routers x shards" not in done.stdout  # only with --routers

    with (tmp_path / "shard_experiment.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {(r["scenario"], r["server"], r["shards"]) for r in rows} == QUICK_RUNS
    assert len(rows) == len(QUICK_RUNS)
    for row in rows:
        where = f"{row['scenario']} {row['server']} {row['shards']}: {row['error']}"
        assert row["status"] == "ok", where
        assert row["kept"] == "True" and row["repeat"] == "1", where  # --quick: one of each
        assert float(row["deliveries_per_s"]) > 0, where
        assert float(row["p99_ms"]) > 0, where
        assert int(row["connections"]) > 0, where
        assert float(row["router_cpu_pct"]) >= 0, where
        assert float(row["total_rss_mb"]) > 0, where
        if row["server"] == "cluster":
            assert row["max_shard_cpu_pct"] != "", where
            assert float(row["shards_rss_mb"]) > 0, where
            # One router (the default): the router plus its shards; CPU per tier measured.
            assert row["routers"] == "1", where
            assert int(row["server_processes"]) == int(row["shards"]) + 1, where
            assert float(row["router_us_per_delivery"]) >= 0, where
            assert float(row["shard_us_per_message"]) >= 0, where

    markdown = (tmp_path / "shard_experiment.md").read_text(encoding="utf-8")
    for heading in ("## Runs", "## Cluster against the threaded baseline", "## Goals"):
        assert heading in markdown
        assert heading in done.stdout
    assert done.stdout.strip() in markdown
    assert markdown.count("| fanout | cluster |") == 2
    assert "not measured" not in markdown  # every goal had its runs

    document = json.loads((tmp_path / "shard_experiment.json").read_text(encoding="utf-8"))
    assert len(document["runs"]) == len(QUICK_RUNS)
    assert all("deliveries_per_s" in run["result"] for run in document["runs"])

    if "no plot: matplotlib is not installed" not in done.stderr:
        png = tmp_path / "shard_experiment.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def fake_row(
    scenario: str,
    server: str,
    shards: Optional[int],
    deliveries: float,
    p99: float,
    **extra: Any,
) -> Dict[str, Any]:
    """A made-up result row for checking the arithmetic (never written anywhere)."""
    row: Dict[str, Any] = dict.fromkeys(se.COLUMNS)
    row.update(scenario=scenario, server=server, shards=shards, status="ok", members=20)
    row.update(deliveries_per_s=deliveries, p99_ms=p99, **extra)
    return row


def goals_by_verdict(rows: List[Dict[str, Any]]) -> Dict[str, str]:
    return {g.name.split(" (")[0]: g.verdict for g in se.evaluate_goals(rows, 2)}


def test_goal_arithmetic_ratios_and_shard_cost() -> None:
    rows = [
        fake_row("fanout", "cluster", 1, 100_000.0, 4.0),
        fake_row("fanout", "cluster", 2, 95_000.0, 4.0),
        fake_row("fanout", "cluster", 8, 89_000.0, 5.0),
        fake_row("fanout", "baseline", None, 40_000.0, 10.0),
        fake_row("stuck", "cluster", 2, 90_250.0, 4.0),
    ]
    verdicts = goals_by_verdict(rows)
    assert verdicts["fan-out 10x20x2 deliveries/s vs baseline"] == "met"  # 2.375x
    assert verdicts["fan-out 10x20x2 p99 vs baseline"] == "met"  # 0.4x
    assert verdicts["fan-out cost of 1->8 shards"] == "not met"  # 11% > 10%
    assert verdicts["1 room x 200 deliveries/s vs baseline"] == "not measured"
    cost, label = se.shard_cost(rows)
    assert label == "1->8" and cost == pytest.approx(0.11)
    kept = se.stuck_kept(rows, "cluster", 2)
    assert kept["raw"] == pytest.approx(0.95)
    assert kept["per_reader"] == pytest.approx(1.0)  # 19 readers instead of 20: no loss


def test_failed_run_is_not_used_for_a_goal() -> None:
    rows = [
        fake_row("longpoll", "cluster", 2, 0.0, 0.0),
        fake_row("longpoll", "baseline", None, 4_000.0, 20.0),
    ]
    rows[0].update(status="failed", error="loadgen exited 1")
    verdicts = goals_by_verdict(rows)
    assert verdicts["long-poll 10x20x2 deliveries/s vs baseline"] == "not measured"
    assert verdicts["long-poll p99 ms"] == "not measured"


def test_plan_adds_the_fanout_reference_for_stuck_and_the_fixed_count() -> None:
    runs = se.plan_runs(["stuck"], [1, 8], ["fanout"], 2, quick=True)
    assert [(r.scenario.name, r.server, r.shards) for r in runs] == [
        ("fanout", "cluster", 2),
        ("fanout", "baseline", None),
        ("stuck", "cluster", 2),
        ("stuck", "baseline", None),
    ]
    swept = se.plan_runs(["fanout"], [1, 8], ["fanout"], 2, quick=False)
    assert [r.shards for r in swept] == [1, 2, 8, None]


def test_results_go_to_a_fresh_directory_unless_out_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(se, "RESULTS", tmp_path / "results")
    _, _, _, quick = se.resolve(se.parse_args(["--quick"]))
    _, _, _, full = se.resolve(se.parse_args([]))
    assert quick.parent == full.parent == tmp_path / "results"
    assert quick.name.endswith("-quick") and quick.is_dir() and full.is_dir()
    assert quick != full
    assert se.resolve(se.parse_args(["--out", "docs/perf"]))[3] == Path("docs/perf")
    assert not (ROOT / "docs" / "perf").samefile(quick)


def test_a_fresh_directory_is_never_one_used_before(tmp_path: Path) -> None:
    now = datetime.datetime(2026, 11, 26, 14, 25, 1)
    made = [se.fresh_directory(tmp_path, quick=False, now=now) for _ in range(3)]
    assert [path.name for path in made] == [
        "2026-11-26-142501",
        "2026-11-26-142501-2",
        "2026-11-26-142501-3",
    ]
    assert se.fresh_directory(tmp_path, quick=True, now=now).name == "2026-11-26-142501-quick"


def test_the_estimate_says_how_long_the_plan_takes() -> None:
    full = se.estimate_seconds(39, se.FULL_TIMING, 0)
    assert 9 * 60 <= full <= 12 * 60  # the full run measured about 11 minutes
    assert se.about(full) == "about 10 minutes"
    assert se.about(se.estimate_seconds(11, se.QUICK_TIMING, 0)) == "about 35 s"


def test_the_plot_hint_keeps_an_editable_install() -> None:
    assert 'pip install -e ".[test,plot]"' in se.PLOT_HINT
    assert 'pip install ".[plot]"' not in se.PLOT_HINT
