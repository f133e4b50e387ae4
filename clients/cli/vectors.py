"""`steer vectors`: manage steering vectors on a running server, and compute new ones with it.

`compute` never loads a second copy of the model: it asks the server for completions and for
the residual stream at each prompt's last token (`steering.return_hidden_states`), computes the
vector here, and uploads it.

    steer vectors list
    steer vectors show NAME [--values]
    steer vectors upload NAME FILE --layer L      (FILE: .json list of floats or .safetensors)
    steer vectors delete NAME
    steer vectors compute east --prompts P.jsonl --layer L --name NAME --action-pattern RE
    steer vectors compute contrastive --prompts POS.jsonl --negative NEG.jsonl --layer L --name N

Prompts files hold one JSON object per line: {"prompt": "..."} (completions) or
{"messages": [...]} (chat). The server comes from --url / STEER_URL, keys from --api-key /
STEER_API_KEY and --admin-key / STEER_ADMIN_KEY.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from tqdm import tqdm

from clients.cli.options import add_server_arguments, auth_headers
from clients.sdk import SteerError, checked
from steering.methods.east.core import Centring, action_entropy, contrastive_vector, east_vector


def read_prompts(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not ({"prompt", "messages"} & record.keys()):
            raise SystemExit(f"{path}:{number}: expected {{'prompt': ...}} or {{'messages': ...}}")
        records.append(record)
    if not records:
        raise SystemExit(f"{path}: no prompts")
    return records


async def sample_with_activations(client: httpx.AsyncClient, record: dict, layer: int,
                                  samples: int, max_tokens: int, temperature: float,
                                  seed: int) -> tuple[list[str], list[float]]:
    """`samples` completions of one prompt, and the layer's residual stream at its last
    prompt token."""
    body = {"n": samples, "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
            "steering": {"return_hidden_states": [layer]}}
    if "messages" in record:
        reply = checked(await client.post("/v1/chat/completions",
                                         json={**body, "messages": record["messages"]}))
        texts = [c["message"]["content"] for c in reply["choices"]]
    else:
        reply = checked(await client.post("/v1/completions",
                                         json={**body, "prompt": record["prompt"]}))
        texts = [c["text"] for c in reply["choices"]]
    return texts, reply["choices"][0]["steering"]["hidden_states"][str(layer)]


def parse_action(pattern: re.Pattern, text: str) -> str | None:
    match = pattern.search(text)
    if match is None:
        return None
    return match.group(1) if match.groups() else match.group(0)


async def collect(url: str, headers: dict, records: list[dict], layer: int, samples: int,
                  max_tokens: int, temperature: float, concurrency: int, desc: str):
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        bar = tqdm(total=len(records), desc=desc, unit="prompt")

        async def one(i: int, record: dict):
            async with semaphore:
                result = await sample_with_activations(client, record, layer, samples,
                                                       max_tokens, temperature, seed=i)
            bar.update()
            return result
        try:
            return await asyncio.gather(*(one(i, r) for i, r in enumerate(records)))
        finally:
            bar.close()


@dataclass
class EastSamples:
    """What the EAST recipe measures of each prompt: its last-token activation, the entropy of
    its sampled actions (NaN where none was valid), its run."""

    activations: torch.Tensor
    entropies: torch.Tensor
    runs: torch.Tensor | None  # None when a prompt has no "run"
    valid_action_rate: float


def sample_east(url: str, headers: dict, records: list[dict], layer: int, samples: int,
                pattern: str, max_tokens: int, temperature: float,
                concurrency: int) -> EastSamples:
    """Per prompt, `samples` completions and the layer's activation at its last token."""
    regex = re.compile(pattern)
    results = asyncio.run(collect(url, headers, records, layer, samples, max_tokens,
                                  temperature, concurrency, "sampling actions"))
    activations, entropies, valid = [], [], 0
    for texts, activation in results:
        actions = [parse_action(regex, t) for t in texts]
        valid += sum(a is not None for a in actions)
        h = action_entropy(actions)
        activations.append(activation)
        entropies.append(math.nan if h is None else h)
    if all(math.isnan(h) for h in entropies):
        raise SystemExit("no completion matched --action-pattern: nothing to compute from")
    runs = None
    if all("run" in r for r in records):
        ids = {run: i for i, run in enumerate(dict.fromkeys(r["run"] for r in records))}
        runs = torch.tensor([ids[r["run"]] for r in records])
    return EastSamples(torch.tensor(activations), torch.tensor(entropies, dtype=torch.float64),
                       runs, valid / (len(records) * samples))


def east_from_samples(measured: EastSamples, centring: Centring, activation_norm: bool,
                      shuffle_seed: int | None = None) -> tuple[torch.Tensor, dict]:
    """The vector (Eq. 1 with `Centring.RUN`, which needs every prompt's run).

    With `activation_norm` it is rescaled to the mean norm of the activations, so that a scale
    β of 1 adds a perturbation as large as a typical activation at that layer (the weighted,
    centred mean itself is orders of magnitude smaller); without it β is the paper's.
    `shuffle_seed` makes the control vector: the entropies are permuted among the prompts
    (seeded), so it keeps the activations and loses their link to the entropy."""
    weights = measured.entropies
    if shuffle_seed is not None:
        order = torch.randperm(len(weights), generator=torch.Generator().manual_seed(shuffle_seed))
        weights = weights[order]
    vector = east_vector(measured.activations, weights, centring, measured.runs)
    used = measured.entropies[~measured.entropies.isnan()]
    stats = {"prompts": len(weights), "prompts_used": len(used),
             "runs": len(measured.runs.unique()) if centring is Centring.RUN else None,
             "centring": centring.value, "shuffled": shuffle_seed,
             "valid_action_rate": measured.valid_action_rate,
             "mean_action_entropy": float(used.mean()), "raw_norm": float(vector.norm())}
    if activation_norm:
        stats["mean_activation_norm"] = float(measured.activations.norm(dim=1).mean())
        vector = vector / vector.norm() * stats["mean_activation_norm"]
    return vector, stats


def compute_contrastive(url: str, headers: dict, positive: list[dict], negative: list[dict],
                        layer: int, concurrency: int) -> tuple[torch.Tensor, dict]:
    acts = []
    for records, desc in ((positive, "positive prompts"), (negative, "negative prompts")):
        results = asyncio.run(collect(url, headers, records, layer, 1, 1, 0.0, concurrency,
                                      desc))
        acts.append(torch.tensor([activation for _, activation in results]))
    return contrastive_vector(*acts), {"positive": len(positive), "negative": len(negative)}


def upload(url: str, admin_headers: dict, name: str, vector, layer: int, method: str,
           source: str, description: str) -> dict:
    return checked(httpx.post(f"{url}/v1/steering/vectors", headers=admin_headers, timeout=60,
                             json={"name": name, "values": [float(v) for v in vector],
                                   "layer": layer, "method": method, "source": source,
                                   "description": description}))


def _load_vector_file(path: Path) -> list[float]:
    if path.suffix == ".json":
        values = json.loads(path.read_text())
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
        values = (tensors.get("vector", next(iter(tensors.values())))).flatten().tolist()
    else:
        raise SystemExit(f"{path}: expected a .json list of numbers or a .safetensors file")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="steer vectors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="stored vectors")
    show = sub.add_parser("show", help="one vector's metadata")
    show.add_argument("name")
    show.add_argument("--values", action="store_true", help="include the values")
    up = sub.add_parser("upload", help="store a vector from a file")
    up.add_argument("name")
    up.add_argument("file", type=Path)
    up.add_argument("--layer", type=int, required=True)
    up.add_argument("--description", default="")
    delete = sub.add_parser("delete", help="remove a stored vector")
    delete.add_argument("name")
    compute = sub.add_parser("compute", help="compute a vector with the server's model")
    compute.add_argument("method", choices=["east", "contrastive"])
    compute.add_argument("--prompts", type=Path, required=True)
    compute.add_argument("--negative", type=Path, help="contrastive: the other prompt set")
    compute.add_argument("--layer", type=int, required=True)
    compute.add_argument("--name", required=True)
    compute.add_argument("--samples", type=int, default=8, help="east: completions per prompt")
    compute.add_argument("--action-pattern", help="east: regex; group 1 (or the match) is "
                         "the action")
    compute.add_argument("--max-tokens", type=int, default=8)
    compute.add_argument("--temperature", type=float, default=1.0)
    compute.add_argument("--concurrency", type=int, default=4)
    compute.add_argument("--centring", choices=[c.value for c in Centring],
                         help="east: 'run' centres each activation on its own run's mean (the "
                         "paper's Eq. 1; needs a \"run\" in every prompt), 'global' on every "
                         "prompt's mean, 'none' not at all (default: run where every prompt "
                         "has a run, else global)")
    compute.add_argument("--norm", choices=["raw", "activation"],
                         help="east: keep Eq. 1's vector as it is (the paper's β) or rescale it "
                         "to the mean activation norm (β relative; default: raw with run "
                         "centring, else activation)")
    compute.add_argument("--shuffled", type=int, metavar="SEED",
                         help="east: the control vector, with the entropies permuted among the "
                         "prompts (seeded)")
    compute.add_argument("--description", default="")
    args = parser.parse_args(argv)

    url = args.url.rstrip("/")
    read, admin = auth_headers(args), auth_headers(args, admin=True)
    try:
        if args.command == "list":
            for v in checked(httpx.get(f"{url}/v1/steering/vectors", headers=read))["data"]:
                print(f"{v['id']:24s} layer {v['layer']:3d}  norm {v['norm']:9.3f}  "
                      f"{v['method']:12s} {v['description']}")
        elif args.command == "show":
            print(json.dumps(checked(httpx.get(
                f"{url}/v1/steering/vectors/{args.name}", headers=read,
                params={"include_values": args.values})), indent=2))
        elif args.command == "upload":
            meta = upload(url, admin, args.name, _load_vector_file(args.file), args.layer,
                          "uploaded", args.file.name, args.description)
            print(f"stored '{meta['id']}' (layer {meta['layer']}, norm {meta['norm']:.3f})")
        elif args.command == "delete":
            checked(httpx.delete(f"{url}/v1/steering/vectors/{args.name}", headers=admin))
            print(f"deleted '{args.name}'")
        else:
            records = read_prompts(args.prompts)
            if args.method == "east":
                if not args.action_pattern:
                    raise SystemExit("east needs --action-pattern")
                has_runs = all("run" in r for r in records)
                centring = Centring(args.centring or ("run" if has_runs else "global"))
                if centring is Centring.RUN and not has_runs:
                    raise SystemExit("--centring run needs a \"run\" in every prompt (as "
                                     "`python -m clients.experiments.bandit runs` writes)")
                norm = args.norm or ("raw" if centring is Centring.RUN else "activation")
                measured = sample_east(url, read, records, args.layer, args.samples,
                                       args.action_pattern, args.max_tokens, args.temperature,
                                       args.concurrency)
                vector, stats = east_from_samples(measured, centring, norm == "activation",
                                                  args.shuffled)
            else:
                if not args.negative:
                    raise SystemExit("contrastive needs --negative")
                vector, stats = compute_contrastive(url, read, records,
                                                    read_prompts(args.negative), args.layer,
                                                    args.concurrency)
            meta = upload(url, admin, args.name, vector, args.layer, args.method,
                          f"{args.prompts.name}: {json.dumps(stats)}", args.description)
            print(json.dumps({"stored": meta["id"], "layer": meta["layer"],
                              "norm": meta["norm"], **stats}, indent=2))
    except (SteerError, httpx.HTTPError) as exc:
        sys.exit(f"steer vectors: {exc}")


if __name__ == "__main__":
    main()
