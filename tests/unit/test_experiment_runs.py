"""What the experiments share: the order of paired rounds and the command line they record."""

import argparse
import shlex

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
