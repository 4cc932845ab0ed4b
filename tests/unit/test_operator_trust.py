"""Issue 13: safe defaults and honest messages, each checked without a broker.

The demo never empties a folder it did not write; errors name flags that exist; --help
keeps its text; reports say when a window is empty; publish --raw sends nothing from a
bad file.
"""

from __future__ import annotations


import pytest
from typer.testing import CliRunner

from spotbatch.cli import app
from spotbatch.demo import MARKER, OutputNotEmpty, prepare_output


pytestmark = pytest.mark.usefixtures("clean_env")  # tests/conftest.py


@pytest.fixture
def runner():
    return CliRunner()


# --- 1. demo --output never deletes what it did not write ----------------------------------

def test_demo_refuses_a_folder_with_a_planted_file(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputNotEmpty, match="thesis.tex.*--force"):
        prepare_output(tmp_path)
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_demo_cli_refuses_before_starting_anything(runner, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = runner.invoke(app, ["demo", "--output", str(tmp_path), "--bootstrap", "127.0.0.1:1"])
    assert result.exit_code == 2
    line = " ".join(result.output.split())
    assert f"error: --output {tmp_path} holds 1 entry a demo did not write (e.g. keep.txt)" in line
    assert "--force" in line
    assert (tmp_path / "keep.txt").exists()


def test_demo_never_empties_the_working_directory_even_with_force(tmp_path, monkeypatch):
    (tmp_path / "src.py").write_text("x")
    monkeypatch.chdir(tmp_path)
    for target in (".", str(tmp_path)):
        with pytest.raises(OutputNotEmpty, match="working directory"):
            prepare_output(target, force=True)
    with pytest.raises(OutputNotEmpty, match="working directory"):
        prepare_output(tmp_path.parent, force=True)  # a folder above it
    assert (tmp_path / "src.py").exists()


def test_demo_reuses_its_own_previous_output(tmp_path):
    out = tmp_path / "demo-out"
    prepare_output(out)
    assert (out / "logs" / MARKER).exists()
    (out / "demo-000001.parquet").write_bytes(b"PAR1")
    (out / "_checkpoints").mkdir()
    (out / "logs" / "worker-0.log").write_text("log")
    prepare_output(out)
    assert [p.name for p in out.iterdir()] == ["logs"]  # the job files are all a demo leaves at the top
    assert [p.name for p in (out / "logs").iterdir()] == [MARKER]


def test_a_stranger_in_a_previous_output_needs_force(tmp_path):
    out = tmp_path / "o"
    prepare_output(out)
    (out / "notes.md").write_text("mine")
    with pytest.raises(OutputNotEmpty, match="notes.md"):
        prepare_output(out)
    prepare_output(out, force=True)
    assert not (out / "notes.md").exists()


def test_demo_accepts_an_empty_or_new_folder_and_refuses_a_file(tmp_path):
    prepare_output(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    prepare_output(tmp_path / "empty")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputNotEmpty, match="is a file"):
        prepare_output(tmp_path / "f", force=True)


# --- 3. an error names only ways of setting that exist ---------------------------------------

VERBS_WITH_SETTINGS = [
    ["worker"], ["publish", "jobs.jsonl"], ["scale-local"], ["lag", "--group", "g"], ["scaler", "serve"],
    ["scheduler", "report"], ["dlq", "list", "--topic", "t"], ["dlq", "show", "--topic", "t", "1"],
    ["dlq", "redrive", "--topic", "t", "--code", "x"],
]


def _click_command(argv: list[str]):
    import typer

    command = typer.main.get_command(app)
    for word in argv:
        if word.startswith("-") or not hasattr(command, "commands") or word not in command.commands:
            break
        command = command.commands[word]
    return command


@pytest.mark.parametrize("argv", VERBS_WITH_SETTINGS, ids=lambda a: " ".join(a[:2]))
def test_every_flag_a_verb_names_in_errors_exists(runner, monkeypatch, argv):
    """The settings a verb passes as flags are exactly the ones its errors call flags: each
    of them is an option of that verb."""
    import spotbatch.cli.common as common
    from spotbatch.config import ConfigError, flag_for

    seen: dict = {}

    def capture(config, **flags):
        seen.update(flags)
        raise ConfigError("captured")

    monkeypatch.setattr(common, "load_settings", capture)
    result = runner.invoke(app, argv)
    assert "captured" in result.output, result.output
    options = {opt for p in _click_command(argv).params for opt in p.opts}
    missing = [flag_for(k) for k in seen if flag_for(k) not in options]
    assert not missing, f"{' '.join(argv)} would tell users to pass {missing}, which it does not have"


def test_bad_pool_env_names_the_env_var_not_a_missing_flag(runner, monkeypatch):
    monkeypatch.setenv("SPOTBATCH_POOL", "spotty")
    result = runner.invoke(app, ["worker"])
    assert result.exit_code == 2
    line = " ".join(result.output.split())
    assert "setting 'pool': Input should be 'spot', 'on-demand' or 'unknown' " \
           "(env SPOTBATCH_POOL or YAML key pool)" in line
    assert "--pool" not in line
    assert "No such option" in runner.invoke(app, ["worker", "--pool", "spot"]).output


def test_bad_security_protocol_env_names_no_flag(runner, monkeypatch):
    monkeypatch.setenv("SPOTBATCH_KAFKA_SECURITY_PROTOCOL", "TLS")
    for argv in (["worker"], ["lag", "--group", "g"]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 2
        line = " ".join(result.output.split())
        assert "(env SPOTBATCH_KAFKA_SECURITY_PROTOCOL or YAML key kafka_security_protocol)" in line
        assert "--kafka-security-protocol" not in line


def test_a_bad_value_of_a_real_flag_still_names_it(runner):
    result = runner.invoke(app, ["worker", "--max-batch-rows", "0"])
    assert result.exit_code == 2
    assert "(flag --max-batch-rows, env SPOTBATCH_MAX_BATCH_ROWS or YAML key max_batch_rows)" \
        in " ".join(result.output.split())


# --- 6. reports that do not mislead ---------------------------------------------------------

def _report_fixtures():
    from spotbatch.scheduler.prices import InstancePrice
    from tests.unit.test_ledger import T0, usage

    return {"g5.xlarge": InstancePrice("g5.xlarge", 1.006, 0.3622, 1, "us-east-1")}, T0, usage


def test_a_worker_not_told_its_pool_is_unknown_and_priced_on_demand():
    from spotbatch.config import load_settings
    from spotbatch.scheduler.ledger import Ledger, Window
    from spotbatch.scheduler.report import compute_report

    assert load_settings().pool == "unknown"
    prices, t0, usage = _report_fixtures()
    report = compute_report(Ledger.from_values([usage(0, t0, t0 + 3600, pool="unknown", rows=1000)]), prices, Window())
    assert [p.pool for p in report.pools] == ["spot", "on-demand", "unknown"]
    unknown = report.pools[2]
    assert unknown.cost == pytest.approx(1.006) and unknown.savings == 0 and report.total.savings == 0
    # a fleet that did say its pools gets no `unknown` column
    said = compute_report(Ledger.from_values([usage(0, t0, t0 + 60)]), prices, Window())
    assert [p.pool for p in said.pools] == ["spot", "on-demand"]


def test_empty_report_window_says_so_and_exits_1(runner, monkeypatch, tmp_path):
    from spotbatch.scheduler import ledger as ledger_mod
    from spotbatch.scheduler.ledger import Ledger
    from spotbatch.scheduler.prices import save_prices

    prices, t0, usage = _report_fixtures()
    monkeypatch.setattr(ledger_mod, "read_ledger", lambda bootstrap, topic, **_: Ledger.from_values(
        [usage(0, t0, t0 + 60)]))
    save_prices(tmp_path / "p.yaml", prices)
    args = ["scheduler", "report", "--prices", str(tmp_path / "p.yaml"), "--since", "2020-01-01T00:00:00Z",
            "--until", "2020-01-02T00:00:00Z"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    line = " ".join(result.output.split())
    assert ("no usage records in this window (2020-01-01T00:00:00Z .. 2020-01-02T00:00:00Z); workers publish one "
            "to spotbatch.usage every 60s: widen --since, or check --bootstrap and --usage-topic") in line
    assert "cost report" not in line  # no all-zero table
    as_json = runner.invoke(app, args + ["--json"])
    assert as_json.exit_code == 1 and '"workers": 0' in as_json.stdout


def _plot_texts(report, tmp_path, monkeypatch):
    """Every text the plot draws, as matplotlib lays it out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spotbatch.scheduler.report import plot_report

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    plot_report(report, tmp_path / "c.png")
    (fig,) = figures
    return [t for ax in fig.axes for t in [ax.title, ax.yaxis.label, *ax.texts]]


def test_plot_title_and_axis_keep_their_dollars_and_a_readable_bucket(tmp_path, monkeypatch):
    from spotbatch.scheduler.ledger import Ledger, Window
    from spotbatch.scheduler.report import compute_report

    prices, t0, usage = _report_fixtures()
    report = compute_report(Ledger.from_values([usage(0, t0, t0 + 240)]), prices, Window(), bucket_s=5)
    texts = _plot_texts(report, tmp_path, monkeypatch)
    title = next(t for t in texts if t.get_text().startswith("spotbatch cost"))
    assert title.get_text() == "spotbatch cost: $0.02, saved $0.04 vs all on-demand"
    assert not title._parse_math  # drawn as typed: "$" signs stay, nothing in italics
    ylabel = next(t for t in texts if t.get_text().startswith("cost"))
    assert ylabel.get_text() == "cost ($) per 5 s" and not ylabel._parse_math


def test_plot_of_an_empty_window_says_so(tmp_path, monkeypatch):
    from spotbatch.scheduler.ledger import Ledger, Window
    from spotbatch.scheduler.report import compute_report

    report = compute_report(Ledger([]), _report_fixtures()[0], Window(0, 3600))
    texts = [t.get_text() for t in _plot_texts(report, tmp_path, monkeypatch)]
    assert texts.count("no usage records in this window (1970-01-01T00:00:00Z .. 1970-01-01T01:00:00Z)") == 2


# --- 4. --help shows what was written, with each setting's env var ------------------------

def _help_text(runner, argv: list[str]) -> str:
    result = runner.invoke(app, [*argv, "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def _captured_settings(runner, monkeypatch, argv):
    import spotbatch.cli.common as common
    from spotbatch.config import ConfigError

    seen: dict = {}

    def capture(config, **flags):
        seen.update(flags)
        raise ConfigError("captured")

    monkeypatch.setattr(common, "load_settings", capture)
    runner.invoke(app, argv)
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("argv", VERBS_WITH_SETTINGS, ids=lambda a: " ".join(a[:2]))
def test_help_shows_each_settings_env_var_and_no_other(runner, monkeypatch, argv):
    import re

    from spotbatch.config import flag_for

    keys = _captured_settings(runner, monkeypatch, argv)
    command = _click_command(argv)
    words = [w for w in argv if not w.startswith("-")][: len(argv)]
    verb = words[:2] if words[0] in ("scaler", "scheduler", "dlq") else words[:1]
    text = _help_text(runner, verb)
    rows = {}
    for param in command.params:
        for opt in param.opts:
            rows[opt] = param
    for key in keys:
        param = rows[flag_for(key)]
        if param.required:
            continue  # a required flag: no env var to mention
        assert f"SPOTBATCH_{key.upper()}" in (param.help or ""), f"{' '.join(verb)} {flag_for(key)}: no env var"
        assert f"SPOTBATCH_{key.upper()}" in text  # and the user sees it
    named = set(re.findall(r"SPOTBATCH_([A-Z_]+)", " ".join(p.help or "" for p in command.params)))
    assert named - {k.upper() for k in keys} - {"CONFIG"} == set(), f"{' '.join(verb)} names env vars it ignores"


@pytest.mark.parametrize("argv", [[], ["scheduler"], ["worker"], ["publish"], ["scale-local"], ["lag"],
                                  ["scaler", "serve"], ["scheduler", "report"], ["scheduler", "plan"], ["dlq", "list"],
                                  ["demo"]])
def test_help_text_is_not_eaten_as_markup_and_metavars_say_what_to_type(runner, argv):
    text = _help_text(runner, argv)
    import re

    assert not re.search(r"[a-z] \.(\s|$)", text)  # "Kafka bootstrap servers ." was a hint eaten as markup
    assert "<bool>" not in text and "<str>" not in text
    assert "{" not in text.split("Usage:")[1].split("\n")[0]  # `publish [OPTIONS] FILE`, not `{file}`
    if "--bootstrap" in text:
        assert "HOST:PORT" in text


def test_publish_usage_reads_file(runner):
    text = _help_text(runner, ["publish"])
    assert "Usage: root publish [OPTIONS] FILE" in " ".join(text.split())


# --- 7. publish --raw sends nothing from a file with a bad line ----------------------------

def test_publish_raw_validates_the_whole_file_before_sending(runner, tmp_path, monkeypatch):
    import json

    import spotbatch.cli.publish as cli
    from tests.unit.test_cli import FakeProducer

    FakeProducer.instances = []
    monkeypatch.setattr(cli, "KafkaProducer", FakeProducer)
    good = json.dumps({"job_id": "j1", "model": "tiny", "inputs": {"rows": [{"id": "1", "text": "t"}]}})
    path = tmp_path / "jobs.jsonl"
    path.write_text(f"{good}\n{{not json\n{good.replace('j1', 'j3')}\n{{also bad\n")
    result = runner.invoke(app, ["publish", "--raw", "--topic", "t", str(path)])
    assert result.exit_code == 2
    assert FakeProducer.instances == []  # checked before connecting: line 1 was not sent before line 2 failed
    line = " ".join(result.output.split())
    assert line.startswith("error: line 2: malformed_json:")
    assert line.endswith("(and 1 more bad line); nothing was sent: fix the file and publish it again")


# --- 8. each demo notice goes to a worker not yet noticed ------------------------------------

def test_demo_notices_go_to_workers_that_have_not_had_one():
    import random
    from types import SimpleNamespace

    from spotbatch.demo import _Fleet

    class Fake:
        def __init__(self):
            self.notices = 0

        def notice(self, **_):
            self.notices += 1

    fleet = object.__new__(_Fleet)  # no broker: only the notice bookkeeping runs
    fakes = {0: Fake(), 1: Fake()}
    running = [SimpleNamespace(index=0), SimpleNamespace(index=1)]
    fleet._fakes, fleet._rng, fleet.notices_sent, fleet._noticed = fakes, random.Random(7), 0, set()
    fleet.scaler = SimpleNamespace(pool=SimpleNamespace(running=running))
    sent = [fleet.interrupt_one() for _ in range(4)]  # both still draining: the last two land nowhere
    assert sent == [True, True, False, False]
    assert [f.notices for f in fakes.values()] == [1, 1] and fleet.notices_sent == 2
    fakes[2] = Fake()
    running.append(SimpleNamespace(index=2))  # the autoscaler's replacement
    assert fleet.interrupt_one() and fakes[2].notices == 1 and fleet.notices_sent == 3


# --- 9. set-up prints no setuptools deprecation banner ---------------------------------------

def test_pyproject_has_no_deprecated_license_table(tmp_path):
    """setuptools >= 77 warns (a boxed banner on every install) for `license = {text = ...}`."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    shutil.copy(repo / "pyproject.toml", tmp_path)
    shutil.copy(repo / "README.md", tmp_path)
    code = ("from setuptools.config.pyprojecttoml import apply_configuration\n"
            "from setuptools.dist import Distribution\n"
            "apply_configuration(Distribution(), 'pyproject.toml')\n")
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_readme_says_what_the_code_does():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    # `spotbatch broker` picks a free port unless told one: the export must match the command
    broker = re.search(r"^spotbatch broker(.*)\n(export SPOTBATCH_KAFKA_BOOTSTRAP=\S+)", readme, re.M)
    port = broker.group(2).rsplit(":", 1)[1]
    assert f"--port {port}" in broker.group(1)
    assert "connect to Kafka without SASL/TLS" not in readme  # they connect with it (config.env + Secret)
    assert "talks to its embedded broker only" not in readme  # demo --bootstrap exists
    assert "~6 min" not in readme
    assert re.search(r"^\| `pool`.*\| `unknown`", readme, re.M)  # the settings table has pool and its default
    for alert in ("SpotbatchJobsDeadLettered", "SpotbatchLagGrowingAtMaxReplicas", "SpotbatchOnDemandFallbackActive"):
        assert alert in readme


# --- 5. long work says it is working ---------------------------------------------------------

def test_plan_reports_progress_on_stderr_even_with_json(runner):
    import json

    result = runner.invoke(app, ["scheduler", "plan", "--synthetic", "steady", "--days", "1", "--mean-rows-per-s", "50",
                                 "--max-replicas", "4", "--baselines", "0,1", "--fallback-caps", "0", "--seeds", "1",
                                 "--jobs", "1", "--slo-drain", "30m", "--json"])
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # stdout is still one JSON object
    import re

    started, done = result.stderr.splitlines()
    assert started == "plan: simulations: started"
    assert re.fullmatch(r"plan: simulations: 3/3 \(100%\) done, \d+s elapsed", done)


def test_progress_lines_are_throttled():
    from rich.console import Console

    from spotbatch.cli.common import ProgressLines

    console, now = Console(record=True, force_terminal=False, width=200), [0.0]
    lines = ProgressLines("plan", every_s=10, console=console, clock=lambda: now[0])
    for done in range(1, 101):
        now[0] = done * 0.5  # 50 s in all
        lines.update(done, 100)
    text = console.export_text().splitlines()
    assert text[0] == "plan: started" and text[-1] == "plan: 100/100 (100%) done, 50s elapsed"
    assert len(text) == 1 + 5 + 1 - 1  # start, every 10 s (10, 20, 30, 40), and the end at 50 s


def test_publish_raw_library_sends_nothing_from_a_bad_file():
    import json

    from spotbatch.publish import PublishError, publish_raw
    from tests.unit.test_cli import FakeProducer

    good = json.dumps({"job_id": "j1", "model": "tiny", "inputs": {"rows": [{"id": "1", "text": "t"}]}}).encode()
    producer = FakeProducer()
    with pytest.raises(PublishError, match=r"^line 3: malformed_json: .*; nothing was sent$"):
        publish_raw(producer, "t", [good, good.replace(b"j1", b"j2"), b"{bad"])
    assert producer.sent == []
