"""Per-step cost of the engine-free cores (typical mask, entropy, entropy gates) on CPU or GPU.

For a batch of random logits at a realistic vocabulary size, times `typical_mask`,
`entropy_varentropy` and a gate step (two gates per row, one sampling and one EAST action:
`GateTable.step` + `sample_chain`) against the work every sampling step does anyway (softmax +
one multinomial draw), in the same run, and checks the typical mask on this device equals HF's
warper run on the same device (on another device, float rounding in the cumulative sum may move
the cut by a token).
"""

from __future__ import annotations

import argparse
import time

import torch

from steering.entropy import entropy_varentropy
from steering.gates import Action, Gate, GatedRow, GateTable, Sampling, Signal, sample_chain
from steering.typical import typical_mask

BENCH_GATES = GatedRow(Sampling(temperature=1.0), (
    Gate(Signal.ENTROPY, above=3.0, hold=2, then=((Action.TEMPERATURE, 0.7),)),
    Gate(Signal.ENTROPY_EMA, below=1.5, ema=0.8, then=((Action.EAST, 1.0),)),
))


def gate_step(batch: int, device: torch.device):
    """One engine step of the gate processor's core over `batch` gated rows."""
    table = GateTable(batch, device)
    for row in range(batch):
        table.set_row(row, BENCH_GATES)
    rows = torch.arange(batch, device=device)
    position = iter(range(10**9))

    def step(logits: torch.Tensor) -> None:
        positions = torch.full((batch,), next(position), device=device)
        scaled = logits.clone()
        sample_chain(scaled, table.step(rows, positions, scaled))
    return step


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; vocab {args.vocab}; torch {torch.__version__}")

    from transformers.generation.logits_process import TypicalLogitsWarper

    g = torch.Generator().manual_seed(0)
    check = (torch.randn(4, args.vocab, generator=g) * 3).to(device)
    expected = torch.cat([TypicalLogitsWarper(mass=0.9)(None, r[None].clone()) for r in check])
    got = typical_mask(check, torch.full((4,), 0.9, device=device))
    same = torch.equal(got, torch.isinf(expected))
    print(f"typical mask on {device.type} equals HF's warper on {device.type}: {same}")

    print("| batch | sample ms | typical ms | x sample | entropy ms | x sample | gates ms "
          "| x sample |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        logits = torch.randn(batch, args.vocab, device=device) * 3
        mass = torch.full((batch,), 0.9, device=device)
        sample = _time(lambda: torch.multinomial(logits.softmax(-1), 1), device, args.repeats)
        typical = _time(lambda: typical_mask(logits, mass), device, args.repeats)
        entropy = _time(lambda: entropy_varentropy(logits), device, args.repeats)
        step = gate_step(batch, device)
        gates = _time(lambda: step(logits), device, args.repeats)
        print(f"| {batch} | {sample * 1e3:.3f} | {typical * 1e3:.3f} | {typical / sample:.1f} | "
              f"{entropy * 1e3:.3f} | {entropy / sample:.1f} | {gates * 1e3:.3f} | "
              f"{gates / sample:.1f} |")
    if not same:
        raise SystemExit("typical mask differs from HF")


if __name__ == "__main__":
    main()
