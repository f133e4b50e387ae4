"""Per-step cost of the engine-free cores (typical mask, entropy) on CPU or GPU.

For a batch of random logits at a realistic vocabulary size, times `typical_mask` and
`entropy_varentropy` against the work every sampling step does anyway (softmax + one multinomial
draw), in the same run, and checks the typical mask on this device equals HF's warper run on the
same device (on another device, float rounding in the cumulative sum may move the cut by a token).
"""

from __future__ import annotations

import argparse
import time

import torch

from steering.entropy import entropy_varentropy
from steering.typical import typical_mask


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

    print("| batch | sample ms | typical ms | x sample | entropy ms | x sample |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        logits = torch.randn(batch, args.vocab, device=device) * 3
        mass = torch.full((batch,), 0.9, device=device)
        sample = _time(lambda: torch.multinomial(logits.softmax(-1), 1), device, args.repeats)
        typical = _time(lambda: typical_mask(logits, mass), device, args.repeats)
        entropy = _time(lambda: entropy_varentropy(logits), device, args.repeats)
        print(f"| {batch} | {sample * 1e3:.3f} | {typical * 1e3:.3f} | {typical / sample:.1f} | "
              f"{entropy * 1e3:.3f} | {entropy / sample:.1f} |")
    if not same:
        raise SystemExit("typical mask differs from HF")


if __name__ == "__main__":
    main()
