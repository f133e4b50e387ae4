"""What the experiments share: the order of paired rounds, the command line they record, and
the check for their plotting library before they start."""

import argparse
import importlib
import shlex
import sys

import pytest

from clients.experiments import runs
from clients.experiments.runs import paired_order, parse_recorded


def test_paired_rounds_alternate_which_side_runs_first():
    assert [paired_order(("a", "b", "c"), r) for r in range(3)] == [
        ["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
    assert paired_order({"x": 1, "y": 2}.items(), 1) == [("y", 2), ("x", 1)]


def test_the_recorded_command_runs_the_same_arguments():
    parser = argparse.ArgumentParser(prog="python -m clients.experiments.particles_eval")
    parser.add_argument("--delimiter")
    parser.add_argument("--n", type=int)
    argv = ["--delimiter", "\n\n", "--n", "4"]
    args = parse_recorded(parser, argv)
    assert args.command_line.startswith("python -m clients.experiments.particles_eval ")
    again = parser.parse_args(shlex.split(args.command_line)[3:])
    assert (again.delimiter, again.n) == ("\n\n", 4) == (args.delimiter, args.n)


@pytest.mark.parametrize("module,argv", [
    ("bandit", ["run", "--out", "{out}"]),
    ("deepconf_eval", ["run", "--out", "{out}"]),
    ("diffadapt_eval", ["run", "--out", "{out}"]),
    ("gates_eval", ["--out", "{out}"]),
    ("particles_eval", ["run", "--out", "{out}"]),
    ("vreason_eval", ["run", "--out", "{out}"]),
])
def test_an_experiment_without_matplotlib_stops_before_it_starts_a_server(
        module, argv, tmp_path, monkeypatch):
    experiment = importlib.import_module(f"clients.experiments.{module}")

    def no_server(*args, **kwargs):
        raise AssertionError("started a server without the plotting library")

    monkeypatch.setattr(runs, "experiment_server", no_server)
    monkeypatch.setattr(experiment, "experiment_server", no_server, raising=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[docs\]'"):
        experiment.main([a.format(out=tmp_path) for a in argv])
