"""Verifiable problems of graded difficulty, and the answer checker.

Small-model-sized arithmetic, counting and comparison questions with integer answers. Levels run
from 1 (one-step, small numbers) to 5 (several steps, larger numbers), so that a small model
solves most level-1 problems and few level-5 ones: the spread DiffAdapt's self-labelling and
the particle-filtering evaluation need. Generation is deterministic for a seed.

    python -m clients.experiments.problems --count 400 --seed 0 --out problems.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from clients.files import write_jsonl

LEVELS = (1, 2, 3, 4, 5)
ANSWER_FORMAT = "End with 'Answer: <number>'."
# What follows each question: the answer alone, or reasoning first (a model that answers in a
# few tokens otherwise leaves a multi-step method nothing to act on).
INSTRUCTIONS = {"answer": ANSWER_FORMAT,
                "steps": "Think step by step, then end with 'Answer: <number>'."}


@dataclass(frozen=True)
class Problem:
    id: str
    kind: str
    level: int
    question: str
    answer: int


def _sum(rng: random.Random, level: int) -> tuple[str, int]:
    terms, digits = [(2, 1), (2, 2), (3, 2), (4, 2), (4, 3)][level - 1]
    numbers = [rng.randint(10 ** (digits - 1), 10 ** digits - 1) for _ in range(terms)]
    signs = ["+"] + [rng.choice("+-") if level >= 3 else "+" for _ in numbers[1:]]
    expression = str(numbers[0]) + "".join(f" {s} {n}" for s, n in zip(signs[1:], numbers[1:]))
    value = numbers[0] + sum(n if s == "+" else -n for s, n in zip(signs[1:], numbers[1:]))
    return f"What is {expression}?", value


def _product(rng: random.Random, level: int) -> tuple[str, int]:
    low, high = [(2, 5), (2, 9), (6, 19), (11, 49), (21, 99)][level - 1]
    a, b = rng.randint(low, high), rng.randint(2, 9 if level < 4 else high)
    return f"What is {a} times {b}?", a * b


WORDS = ("apple", "book", "cat", "dog", "egg", "fish", "hat", "key", "lamp", "map", "pen",
         "ring", "shoe", "star", "tree", "cup")


def _count(rng: random.Random, level: int) -> tuple[str, int]:
    length = [3, 5, 7, 10, 14][level - 1]
    target = rng.choice(WORDS)
    others = [w for w in WORDS if w != target]
    hits = rng.randint(1, max(1, length // 2))
    items = [target] * hits + [rng.choice(others) for _ in range(length - hits)]
    rng.shuffle(items)
    return f"How many times does the word '{target}' appear in this list: {', '.join(items)}?", hits


def _compare(rng: random.Random, level: int) -> tuple[str, int]:
    count, digits = [(2, 1), (2, 2), (3, 2), (4, 3), (5, 3)][level - 1]
    numbers = rng.sample(range(10 ** (digits - 1), 10 ** digits), count)
    if rng.random() < 0.5:
        return f"Which is the largest of {', '.join(map(str, numbers))}?", max(numbers)
    return f"Which is the smallest of {', '.join(map(str, numbers))}?", min(numbers)


KINDS = {"sum": _sum, "product": _product, "count": _count, "compare": _compare}


def generate(count: int, seed: int = 0, levels=LEVELS, kinds=tuple(KINDS),
             instruction: str = "answer") -> list[Problem]:
    """`count` problems cycling through kinds × levels, shuffled; unique questions, each
    followed by INSTRUCTIONS[instruction]."""
    rng = random.Random(seed)
    grid = [(kind, level) for kind in kinds for level in levels]
    problems, seen = [], set()
    while len(problems) < count:
        kind, level = grid[len(problems) % len(grid)]
        question, answer = KINDS[kind](rng, level)
        if question in seen:
            continue
        seen.add(question)
        problems.append(Problem(id=f"{seed}-{len(problems)}", kind=kind, level=level,
                                question=f"{question} {INSTRUCTIONS[instruction]}",
                                answer=answer))
    rng.shuffle(problems)
    return problems


_BOXED = re.compile(r"\\boxed\{\s*(-?\d[\d,]*)\s*\}")
_ANSWER = re.compile(r"answer\s*(?:is)?\s*[:=]?\s*\**\s*(-?\d[\d,]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*")


def extract_answer(text: str) -> int | None:
    """The number in the last \\boxed{N} of the reply's answer (after its thinking, when that
    closed); else after the last 'Answer:' (or 'answer is'); else the last number."""
    text = text.rsplit("</think>", 1)[-1]
    found = _BOXED.findall(text) or _ANSWER.findall(text) or _NUMBER.findall(text)
    if not found:
        return None
    try:
        return int(found[-1].replace(",", ""))
    except ValueError:
        return None


def is_correct(text: str, answer: int) -> bool:
    return extract_answer(text) == answer


def read_problems(path: Path) -> list[Problem]:
    problems = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problems.append(Problem(id=str(record.get("id", number)), kind=record.get("kind", ""),
                                    level=int(record.get("level", 0)),
                                    question=str(record["question"]),
                                    answer=int(record["answer"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: expected {{'question': str, 'answer': int}} "
                             f"({exc})") from None
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clients.experiments.problems",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    args = parser.parse_args(argv)
    write_jsonl(generate(args.count, args.seed, kinds=tuple(args.kinds)), args.out)
    print(f"wrote {args.count} problems to {args.out}")


if __name__ == "__main__":
    main()
