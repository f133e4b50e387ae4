"""`steer probe`: DiffAdapt difficulty probes: self-label questions with the served model, train
a probe on its hidden states, and manage probes on a running server.

    python -m clients.experiments.problems --count 400 --out problems.jsonl
    steer probe label --recipe paper --problems problems.jsonl --out labels.json
    steer probe train --labels labels.json --name mine --out mine.safetensors --upload
    steer probe list | show NAME | upload FILE [--name NAME] | delete NAME

`label` asks the server (chat route) for k sampled answers per question, framed and sampled as
the recipe says (steering.diffadapt.RECIPES), and checks them; a question's mean accuracy and
mean token entropy give its class by the recipe's rule and thresholds α, β, γ (paper: 0.85,
0.35, 0.6 on a top-10 entropy; variant: from the data, see
steering.diffadapt.thresholds_from_data). It also records the hidden state after the final norm
at the last token of the question as the recipe's probe reads it when serving (paper: after a
difficulty-eliciting assistant prefill). `train` fits the recipe's 2-layer MLP on a held-out
split and reports its accuracy and macro-F1 against a linear head and the majority class. The
server comes from --url / STEER_URL, keys from --api-key / STEER_API_KEY and --admin-key /
STEER_ADMIN_KEY.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import httpx
import torch
from tqdm import tqdm

from clients.cli.options import add_server_arguments, auth_headers
from clients.experiments.problems import Problem, is_correct, read_problems
from clients.files import write_text_atomic
from clients.sdk import SteerError, checked
from steering.artifacts import read_artifact, write_artifact
from steering.framing import THINK_CLOSE, THINK_OPEN, Framing
from steering.methods.diffadapt.core import (
    CLASSES,
    RECIPES,
    DifficultyProbe,
    Recipe,
    RecipeSpec,
    Thresholds,
    accuracy,
    difficulty_labels,
    has_think_tags,
    held_out_split,
    macro_f1,
    majority_accuracy,
    thresholds_from_data,
    top_logprob_entropy,
    train_probe,
)


async def thinks(client: httpx.AsyncClient) -> bool:
    """Whether the served model has `<think>` tags (each one token)."""
    counts = [checked(await client.post("/tokenize", json={
        "prompt": tag, "add_special_tokens": False}))["count"] for tag in (THINK_OPEN, THINK_CLOSE)]
    return has_think_tags(*counts)


def conversation(framing: Framing, question: str) -> dict:
    """Chat fields that put `question` to the model as `framing` says."""
    messages = [{"role": "user", "content": framing.wrap(question)}]
    if framing.system:
        messages.insert(0, {"role": "system", "content": framing.system})
    if not framing.prefill:
        return {"messages": messages}
    return {"messages": [*messages, {"role": "assistant", "content": framing.prefill}],
            "continue_final_message": True, "add_generation_prompt": False}


def _choice_entropy(choice: dict, top_logprobs: int) -> float | None:
    """A sample's mean token entropy: the server's (full distribution), or over each token's
    top log-probs plus the sampled token, renormalised (the authors' labelling)."""
    if not top_logprobs:
        return choice["steering"]["entropy"]["mean"]
    rows = []
    for token in choice["logprobs"]["content"]:
        listed = {t["token"]: t["logprob"] for t in token["top_logprobs"]}
        listed.setdefault(token["token"], token["logprob"])
        rows.append(list(listed.values()))
    if not rows:
        return None
    width = max(map(len, rows))
    padded = torch.tensor([r + [-math.inf] * (width - len(r)) for r in rows])
    return float(top_logprob_entropy(padded).mean())


async def _label_one(client: httpx.AsyncClient, problem: Problem, recipe: RecipeSpec,
                     thinks: bool, max_tokens: int) -> dict:
    labelling = recipe.labelling
    features = checked(await client.post("/v1/chat/completions", json={
        **conversation(recipe.probe_framing.for_model(thinks), problem.question),
        "max_tokens": 1, "temperature": 0.0, "steering": {"return_hidden_states": ["final"]}}))
    sampling = {"n": labelling.samples, "temperature": labelling.temperature,
                "top_p": labelling.top_p, "max_tokens": max_tokens}
    if labelling.top_logprobs:
        sampling |= {"logprobs": True, "top_logprobs": labelling.top_logprobs}
    answers = checked(await client.post("/v1/chat/completions", json={
        **conversation(labelling.framing.for_model(thinks), problem.question), **sampling}))
    texts = [c["message"]["content"] or "" for c in answers["choices"]]
    entropies = [_choice_entropy(c, labelling.top_logprobs) for c in answers["choices"]]
    return {"id": problem.id, "kind": problem.kind, "level": problem.level,
            "question": problem.question, "answer": problem.answer,
            "accuracy": sum(is_correct(t, problem.answer) for t in texts) / len(texts),
            "entropy": statistics.fmean(e for e in entropies if e is not None),
            "output_tokens": answers["usage"]["completion_tokens"] / len(texts),
            "features": features["choices"][0]["steering"]["hidden_states"]["final"]}


async def _label_all(url: str, headers: dict, problems: list[Problem], recipe: RecipeSpec,
                     max_tokens: int, concurrency: int) -> tuple[str, list[dict]]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=900) as client:
        model = checked(await client.get("/v1/models"))["data"][0]["id"]
        model_thinks = await thinks(client)
        bar = tqdm(total=len(problems), desc="labelling", unit="question")

        async def one(problem: Problem) -> dict:
            async with gate:
                row = await _label_one(client, problem, recipe, model_thinks, max_tokens)
                bar.update()
                return row

        rows = await asyncio.gather(*(one(p) for p in problems))
        bar.close()
    return model, rows


def label(url: str, headers: dict, problems: list[Problem], recipe: Recipe, max_tokens: int,
          concurrency: int, samples: int | None = None, temperature: float | None = None,
          alpha: float | None = None, beta: float | None = None,
          gamma: float | None = None) -> dict:
    """Self-labelled questions (with features) and the thresholds used, as one JSON object.
    `samples`, `temperature` and the thresholds default to the recipe's."""
    spec = RECIPES[recipe]
    labelling = replace(spec.labelling, samples=samples or spec.labelling.samples,
                        temperature=spec.labelling.temperature if temperature is None
                        else temperature)
    spec = replace(spec, labelling=labelling)
    model, rows = asyncio.run(_label_all(url, headers, problems, spec, max_tokens,
                                         concurrency))
    accuracies = [r["accuracy"] for r in rows]
    entropies = [r["entropy"] for r in rows]
    found = spec.thresholds or thresholds_from_data(accuracies, entropies, labelling.samples)
    thresholds = Thresholds(alpha=found.alpha if alpha is None else alpha,
                            beta=found.beta if beta is None else beta,
                            gamma=found.gamma if gamma is None else gamma)
    labels = difficulty_labels(torch.tensor(accuracies), torch.tensor(entropies), thresholds,
                               recipe)
    for row, index in zip(rows, labels.tolist()):
        row["label"] = CLASSES[index]
    return {"model": model, "recipe": recipe.value, "samples": labelling.samples,
            "temperature": labelling.temperature, "top_p": labelling.top_p,
            "top_logprobs": labelling.top_logprobs, "max_tokens": max_tokens,
            "thresholds": vars(thresholds), "questions": rows}


def labelled_recipe(labelled: dict) -> Recipe:
    return Recipe(labelled.get("recipe", Recipe.VARIANT.value))


def train(labelled: dict, width: int | None, epochs: int, test_fraction: float,
          seed: int) -> tuple[DifficultyProbe, dict]:
    """The MLP probe trained on the training split as the labels' recipe trains it, and
    held-out metrics for it, a linear head trained the same way and the majority class (the
    held-out split is never seen by the paper recipe's checkpoint selection)."""
    training = RECIPES[labelled_recipe(labelled)].training
    training = replace(training, epochs=epochs,
                       width=training.width if width is None else width)
    rows = labelled["questions"]
    features = torch.tensor([r["features"] for r in rows])
    labels = torch.tensor([CLASSES.index(r["label"]) for r in rows])
    train_idx, test_idx = held_out_split(labels, test_fraction, seed)
    x_train, y_train = features[train_idx], labels[train_idx]
    x_test, y_test = features[test_idx], labels[test_idx]
    probe, validation = train_probe(x_train, y_train, training, seed)
    linear, _ = train_probe(x_train, y_train, replace(training, width=0), seed)
    metrics = {"held_out_accuracy": accuracy(probe, x_test, y_test),
               "held_out_macro_f1": macro_f1(probe.probabilities(x_test).argmax(-1), y_test),
               "linear_accuracy": accuracy(linear, x_test, y_test),
               "majority_accuracy": majority_accuracy(y_train, y_test),
               "train_accuracy": accuracy(probe, x_train, y_train),
               "train_size": len(train_idx), "test_size": len(test_idx)}
    if validation:  # the checkpoint's score on the split the paper recipe selects it by
        metrics["validation_macro_f1"] = max(validation)
    for name, index in zip(CLASSES, range(len(CLASSES))):
        metrics[f"test_{name}"] = int((y_test == index).sum())
    return probe, metrics


def probe_meta(name: str, probe: DifficultyProbe, labelled: dict, metrics: dict, source: str,
               description: str) -> dict:
    return {"name": name, "model": labelled["model"], "hidden_size": probe.hidden_size,
            "width": probe.width, "classes": list(CLASSES),
            "thresholds": labelled["thresholds"], "metrics": metrics, "source": source,
            "description": description, "created": time.time(),
            "recipe": labelled_recipe(labelled).value}


def upload(url: str, admin_headers: dict, name: str, tensors: dict, meta: dict) -> dict:
    return checked(httpx.post(f"{url}/v1/steering/probes", headers=admin_headers, timeout=120,
                            json={"name": name, "model": meta["model"],
                                  "weights": {k: v.tolist() for k, v in tensors.items()},
                                  "thresholds": meta["thresholds"], "metrics": meta["metrics"],
                                  "source": meta["source"],
                                  "recipe": meta.get("recipe", Recipe.VARIANT.value),
                                  "description": meta["description"]}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="steer probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="stored probes")
    show = sub.add_parser("show", help="one probe's metadata")
    show.add_argument("name")
    up = sub.add_parser("upload", help="store a probe file made by `train`")
    up.add_argument("file", type=Path)
    up.add_argument("--name", help="default: the name inside the file")
    delete = sub.add_parser("delete", help="remove a stored probe")
    delete.add_argument("name")
    lab = sub.add_parser("label", help="self-label questions with the served model")
    lab.add_argument("--problems", type=Path, required=True,
                     help="JSONL: {'question': str, 'answer': int} per line")
    lab.add_argument("--out", type=Path, required=True, help="labels JSON to write")
    lab.add_argument("--recipe", choices=[r.value for r in Recipe], default=Recipe.VARIANT.value,
                     help="paper: the authors' prompts, sampling, top-10 entropy and "
                     "thresholds; variant: this project's")
    lab.add_argument("--samples", type=int, help="answers per question (k; paper 10, "
                     "variant 8)")
    lab.add_argument("--temperature", type=float, help="paper 0.6, variant 0.8")
    lab.add_argument("--max-tokens", type=int, default=256)
    lab.add_argument("--concurrency", type=int, default=8)
    lab.add_argument("--alpha", type=float, help="accuracy a Normal question needs")
    lab.add_argument("--beta", type=float, help="entropy a Normal question may not exceed")
    lab.add_argument("--gamma", type=float, help="accuracy below which a question is Hard")
    tr = sub.add_parser("train", help="train a probe on labelled questions")
    tr.add_argument("--labels", type=Path, required=True, help="the JSON `label` wrote")
    tr.add_argument("--name", required=True)
    tr.add_argument("--out", type=Path, help="probe file to write (.safetensors)")
    tr.add_argument("--upload", action="store_true", help="store it on the server")
    tr.add_argument("--width", type=int, help="MLP hidden width (0: linear; default: the "
                    "labels' recipe's, paper 512, variant 256)")
    tr.add_argument("--epochs", type=int, default=100)
    tr.add_argument("--test-fraction", type=float, default=0.3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--description", default="")
    args = parser.parse_args(argv)

    url = args.url.rstrip("/")
    read, admin = auth_headers(args), auth_headers(args, admin=True)
    try:
        if args.command == "list":
            for p in checked(httpx.get(f"{url}/v1/steering/probes", headers=read))["data"]:
                print(f"{p['id']:24s} width {p['width']:4d}  held-out accuracy "
                      f"{p['metrics'].get('held_out_accuracy', float('nan')):.3f}  "
                      f"{p['description']}")
        elif args.command == "show":
            print(json.dumps(checked(httpx.get(f"{url}/v1/steering/probes/{args.name}",
                                             headers=read)), indent=2))
        elif args.command == "upload":
            tensors, meta = read_artifact(args.file)
            stored = upload(url, admin, args.name or meta["name"], tensors, meta)
            print(f"stored '{stored['id']}'")
        elif args.command == "delete":
            checked(httpx.delete(f"{url}/v1/steering/probes/{args.name}", headers=admin))
            print(f"deleted '{args.name}'")
        elif args.command == "label":
            labelled = label(url, read, read_problems(args.problems), Recipe(args.recipe),
                             args.max_tokens, args.concurrency, args.samples, args.temperature,
                             args.alpha, args.beta, args.gamma)
            write_text_atomic(args.out, json.dumps(labelled))
            counts = Counter(r["label"] for r in labelled["questions"])
            print(json.dumps({"questions": len(labelled["questions"]),
                              "recipe": labelled["recipe"],
                              "thresholds": labelled["thresholds"],
                              "classes": {c: counts[c] for c in CLASSES}}, indent=2))
        else:
            labelled = json.loads(args.labels.read_text())
            probe, metrics = train(labelled, args.width, args.epochs, args.test_fraction,
                                   args.seed)
            print(json.dumps(metrics, indent=2))
            meta = probe_meta(args.name, probe, labelled, metrics,
                              f"steer probe train --labels {args.labels.name} "
                              f"--width {probe.width}", args.description)
            if args.out:
                write_artifact(args.out, probe.tensors(), meta)
            if args.upload:
                upload(url, admin, args.name, probe.tensors(), meta)
                print(f"stored '{args.name}'")
    except (SteerError, httpx.HTTPError) as exc:
        sys.exit(f"steer probe: {exc}")


if __name__ == "__main__":
    main()
