"""Per-step cost of the engine-free cores (typical mask, entropy, entropy gates) on CPU or GPU.

For a batch of random logits at a realistic vocabulary size (or, with `--model`, a model's own
next-token distributions over a fixed passage), times `typical_mask` with each
cut-off search (the CPU's sorted-prefix search and the GPU's radix select), `entropy_varentropy`
and a gate step (two gates per row, one sampling and one EAST action:
`GateTable.step` + `sample_chain`) against the work every sampling step does anyway (softmax +
one multinomial draw), in the same run. First it checks both searches against HF's warper run on
the same device, and counts the tokens each (and HF's float32 warper) places differently from
HF's warper run in float64: float rounding of the cumulative mass near τ moves the cut by a
few tokens in any summation order.
"""

from __future__ import annotations

import argparse
import time

import torch

from steering.entropy import entropy_varentropy
from steering.methods.gates.core import (
    Action,
    Gate,
    GatedRow,
    GateTable,
    Sampling,
    Signal,
    sample_chain,
)
from steering.methods.typical.core import CutoffSearch, typical_mask

PASSAGE = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who kept a "
    "secret. Every morning he rowed out before dawn.\n\nQuestion: A train travels 120 km in 1.5 "
    "hours. What is its average speed?\nAnswer: 120 / 1.5 = 80, so the speed is 80 km/h.\n\n"
    "def mean(values):\n    return sum(values) / len(values)\n\nThe capital of France is Paris,"
    " and the largest planet in the solar system is Jupiter."
)
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


def model_logits(path: str, device: torch.device) -> torch.Tensor:
    """The model's next-token logits (float32) at every position of `PASSAGE`: real
    distributions, peaked and flat, where random logits are all equally flat."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)(PASSAGE, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0].to(device)


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
    parser.add_argument("--mass", type=float, default=0.9, help="typical τ of the timed rows")
    parser.add_argument("--model", help="time on this HF model's logits over a fixed passage "
                        "(rows repeat to fill a batch) instead of random logits")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    passage = model_logits(args.model, device) if args.model else None
    vocab = args.vocab if passage is None else passage.shape[1]
    source = f"{args.model}'s logits over {len(passage)} positions" if args.model else "random"
    print(f"device: {name}; vocab {vocab}; {source}; τ {args.mass}; torch {torch.__version__}")

    same = check_typical(device, vocab)

    searches = list(CutoffSearch)
    print("| batch | sample ms | " + " | ".join(f"typical {s} ms | x sample" for s in searches)
          + " | entropy ms | x sample | gates ms | x sample |")
    print("|---:|---:|" + "---:|---:|" * (len(searches) + 2))
    for batch in args.batches:
        if passage is None:
            logits = torch.randn(batch, vocab, device=device) * 3
        else:
            logits = passage[torch.arange(batch, device=device) % len(passage)]
        mass = torch.full((batch,), args.mass, device=device)
        sample = _time(lambda: torch.multinomial(logits.softmax(-1), 1), device, args.repeats)
        typical = [_time(lambda: typical_mask(logits, mass, search), device, args.repeats)
                   for search in searches]
        entropy = _time(lambda: entropy_varentropy(logits), device, args.repeats)
        step = gate_step(batch, device)
        gates = _time(lambda: step(logits), device, args.repeats)
        cells = [f"{sample * 1e3:.3f}"] + [
            f"{t * 1e3:.3f} | {t / sample:.1f}" for t in (*typical, entropy, gates)]
        print(f"| {batch} | " + " | ".join(cells) + " |")
    if not same:
        raise SystemExit("a typical search differs from HF's warper at τ = 0.9")


def check_typical(device: torch.device, vocab: int) -> bool:
    """Both searches against HF's warper on this device; True when both equal it at τ = 0.9."""
    from transformers.generation.logits_process import TypicalLogitsWarper

    def hf(scores: torch.Tensor, mass: float) -> torch.Tensor:
        return torch.isinf(TypicalLogitsWarper(mass=mass)(None, scores.clone()))

    g = torch.Generator().manual_seed(0)
    check = (torch.randn(8, vocab, generator=g) * 3).to(device)
    same = True
    for mass in (0.9, 0.99, 0.999):
        exact, hf32 = hf(check.double(), mass), hf(check, mass)
        line = [f"τ {mass}: HF float32 {int((hf32 != exact).sum())}"]
        for search in CutoffSearch:
            got = typical_mask(check, torch.full((8,), mass, device=device), search)
            line.append(f"{search} {int((got != exact).sum())} ({int((got != hf32).sum())} vs HF)")
            same &= mass != 0.9 or torch.equal(got, hf32)
        print("tokens placed differently from HF's float64 warper, 8 rows, " + ", ".join(line))
    return same

if __name__ == "__main__":
    main()
