"""The cost report: numbers reconcile with the ledger, every output carries the same ones."""

from __future__ import annotations

import csv
import io
import json

import pytest
from rich.console import Console
from typer.testing import CliRunner

from spotbatch.cli import app
from spotbatch.scheduler import ledger as ledger_mod
from spotbatch.scheduler.ledger import Ledger, Window
from spotbatch.scheduler.prices import InstancePrice, save_prices
from spotbatch.scheduler.report import (COLUMNS, UnpricedError, auto_bucket_s, compute_report, plot_report,
                                        render_table, report_csv, report_json)
from tests.unit.test_ledger import T0, usage

PRICES = {"g5.xlarge": InstancePrice("g5.xlarge", 1.006, 0.3622, 1, "us-east-1"),
          "p4d.24xlarge": InstancePrice("p4d.24xlarge", 21.9576, 8.783, 8, "us-east-1")}


def fleet() -> list[dict]:
    """Two spot workers (one interrupted), one on-demand worker on a bigger type."""
    return [
        usage(0, T0, T0 + 3600, worker="s1", rows=10_000, jobs=100, busy=3000),
        usage(1, T0 + 3600, T0 + 5400, worker="s1", rows=4_000, jobs=40, busy=1500, final=True, interruptions=1,
              recomputed=250),
        usage(0, T0 + 1800, T0 + 9000, worker="s2", rows=20_000, jobs=200, busy=7000, final=True),
        usage(0, T0, T0 + 7200, worker="o1", pool="on-demand", itype="p4d.24xlarge", gpus=8, rows=50_000, jobs=500,
              busy=3600),
    ]


def expected_cost(records: list[dict], window: Window, *, on_demand: bool = False) -> float:
    """Independent of the ledger's code: sum over records of seconds inside x price."""
    lo, hi = window.bounds()
    total = 0.0
    for r in records:
        inside = max(0.0, min(r["end"], hi) - max(r["start"], lo)) / (r["end"] - r["start"]) * r["seconds_alive"]
        price = PRICES[r["instance_type"]]
        total += inside / 3600 * (price.on_demand_per_h if on_demand or r["pool"] == "on-demand" else price.spot_per_h)
    return total


def test_costs_reconcile_with_the_ledger():
    records = fleet()
    report = compute_report(Ledger.from_values(records), PRICES, Window())
    spot, od = report.pools
    assert spot.cost == pytest.approx((1.5 + 2.0) * 0.3622, rel=1e-12)  # 5400 s + 7200 s
    assert od.cost == pytest.approx(2 * 21.9576, rel=1e-12)
    assert report.total.cost == pytest.approx(expected_cost(records, Window()), rel=1e-12)
    assert report.total.on_demand_cost == pytest.approx(expected_cost(records, Window(), on_demand=True), rel=1e-12)
    assert report.total.savings == pytest.approx(3.5 * (1.006 - 0.3622), rel=1e-12)
    assert report.savings_fraction == pytest.approx(report.total.savings / report.total.on_demand_cost)
    assert (spot.gpu_hours, od.gpu_hours, od.instance_hours) == (pytest.approx(3.5), pytest.approx(16), pytest.approx(2))
    assert spot.busy_fraction == pytest.approx(11_500 / 12_600)
    assert (spot.rows, spot.jobs, spot.interruptions, spot.rows_recomputed, spot.workers) == (34_000, 340, 1, 250, 2)
    assert spot.cost_per_1k_rows == pytest.approx(spot.cost / 34)
    assert (report.total.workers, report.total.rows, report.total.interruptions) == (3, 84_000, 1)


def test_redelivered_records_do_not_double_count():
    records = fleet()
    once = compute_report(Ledger.from_values(records), PRICES, Window())
    twice = compute_report(Ledger.from_values([json.dumps(r) for r in records + records[::-1]]), PRICES, Window())
    assert twice.total == once.total and twice.duplicates == len(records)


def test_window_clips_pro_rata():
    records = fleet()
    window = Window(T0 + 1800, T0 + 5400)
    report = compute_report(Ledger.from_values(records), PRICES, window)
    assert report.total.cost == pytest.approx(expected_cost(records, window), rel=1e-12)
    spot = report.pools[0]
    assert spot.instance_hours == pytest.approx(2.0)  # s1 and s2 each alive the whole hour of the window
    assert spot.rows == pytest.approx(10_000 / 2 + 4_000 + 20_000 / 2)
    assert spot.interruptions == 1  # s1's last record ends at T0+5400, inside (since, until]
    later = compute_report(Ledger.from_values(records), PRICES, Window(T0 + 5400, None))
    assert later.pools[0].interruptions == 0 and later.pools[1].rows == pytest.approx(50_000 / 4)


def test_unknown_instance_type_is_an_error_with_the_fix():
    records = fleet() + [usage(9, T0, T0 + 60, worker="x", itype="g9.mystery")]
    with pytest.raises(UnpricedError, match="'g9.mystery'.*add 'g9.mystery: \\{on_demand_per_h"):
        compute_report(Ledger.from_values(records), PRICES, Window(), prices_source="p.yaml")
    # outside the window it costs nothing, so it needs no price
    assert compute_report(Ledger.from_values(records), PRICES, Window(T0 + 120, None)).total.cost > 0


def test_empty_ledger_gives_zero_report():
    report = compute_report(Ledger([]), PRICES, Window())
    assert report.total.cost == 0 and report.total.cost_per_1k_rows is None and report.savings_fraction is None
    assert report.timeline == []


def test_timeline_costs_add_up_to_the_total():
    report = compute_report(Ledger.from_values(fleet()), PRICES, Window(), bucket_s=900)
    assert len(report.timeline) == 10
    assert sum(sum(p["cost"].values()) for p in report.timeline) == pytest.approx(report.total.cost, rel=1e-12)
    assert report.timeline[0]["replicas"] == {"spot": pytest.approx(1), "on-demand": pytest.approx(1)}
    assert report.timeline[3]["replicas"]["spot"] == pytest.approx(2)


def test_auto_bucket():
    assert auto_bucket_s(600) == 60 and auto_bucket_s(86400) == 1800 and auto_bucket_s(30 * 86400) == 86400


def test_json_csv_and_table_carry_the_same_numbers():
    report = compute_report(Ledger.from_values(fleet()), PRICES, Window())
    body = json.loads(json.dumps(report_json(report)))
    rows = list(csv.DictReader(io.StringIO(report_csv(report))))
    assert [r["pool"] for r in rows] == ["spot", "on-demand", "total"] and list(rows[0]) == list(COLUMNS)
    console = Console(record=True, width=250)
    console.print(render_table(report))
    table_text = console.export_text()
    for row in rows:
        reference = body["total"] if row["pool"] == "total" else body["pools"][row["pool"]]
        for key in COLUMNS[1:]:
            assert (float(row[key]) if row[key] else None) == reference[key], key
        assert f"{float(row['cost']):.4f}" in table_text
        assert f"{float(row['rows']):,.0f}" in table_text
        assert f"{float(row['gpu_hours']):.3f}" in table_text
    assert f"{body['total']['savings']:.4f}" in table_text


def test_plot_writes_a_png(tmp_path):
    report = compute_report(Ledger.from_values(fleet()), PRICES, Window())
    path = plot_report(report, tmp_path / "cost.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000


# ---- the CLI over an in-memory ledger (the topic read is the integration test's) --------


@pytest.fixture
def cli_ledger(monkeypatch, tmp_path):
    monkeypatch.setattr(ledger_mod, "read_ledger", lambda bootstrap, topic, **_: Ledger.from_values(fleet()))
    path = tmp_path / "prices.yaml"
    save_prices(path, PRICES)
    return path


def test_cli_formats(cli_ledger, tmp_path):
    runner = CliRunner()
    args = ["scheduler", "report", "--prices", str(cli_ledger), "--since", "all"]
    as_json = runner.invoke(app, args + ["--json", "--plot", str(tmp_path / "c.png")])
    assert as_json.exit_code == 0, as_json.output
    body = json.loads(as_json.stdout)
    assert body["total"]["cost"] == pytest.approx(expected_cost(fleet(), Window()), rel=1e-12)
    assert (tmp_path / "c.png").is_file()
    as_csv = runner.invoke(app, args + ["--csv"])
    assert list(csv.DictReader(io.StringIO(as_csv.stdout)))[2]["cost"] == str(body["total"]["cost"])
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "savings vs all on-demand" in table.stdout


@pytest.mark.parametrize("extra, words", [
    (["--json", "--csv"], "pick one"),
    (["--plot", "x.jpg"], ".png"),
    (["--since", "last tuesday"], "ISO 8601"),
    (["--prices", "/nonexistent.yaml"], "does not exist"),
])
def test_cli_bad_input(cli_ledger, extra, words):
    result = CliRunner().invoke(app, ["scheduler", "report", "--prices", str(cli_ledger)] + extra)
    assert result.exit_code == 2 and words in result.output


def test_cli_unpriced_type_without_prices_file(cli_ledger):
    result = CliRunner().invoke(app, ["scheduler", "report", "--since", "all"])  # demo prices know only "local"
    assert result.exit_code == 2 and "g5.xlarge" in result.output and "--prices" in result.output


def test_json_round_trips_to_the_same_report():
    from spotbatch.scheduler.report import report_from_json

    report = compute_report(Ledger.from_values(fleet()), PRICES, Window(T0, T0 + 4000))
    assert report_from_json(json.loads(json.dumps(report_json(report)))) == report
