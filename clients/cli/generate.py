"""`steer chat` and `steer complete`: one request to a running server from the shell.

    steer chat "Give me a name for a cat." --typical-p 0.9 --entropy
    steer chat "What is 17 times 3?" --diffadapt default
    steer chat "What is 17 times 3?" --particles 4 --no-stream
    steer complete "Once upon a time" --max-tokens 32 --east explore:4
    steer chat "Hello" --steering '{"dynatemp": {"range": 0.5}}'
    steer chat "Hello" --json          # the whole response body

The answer streams to standard output; the steering summary (methods, entropy, DiffAdapt's class,
particle statistics) goes to standard error. The server comes from --url / STEER_URL, the key
from --api-key / STEER_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import sys

from clients.cli.options import add_server_arguments
from clients.sdk import Client, SteerError


def _steering(args) -> dict | None:
    options: dict = json.loads(args.steering) if args.steering else {}
    if args.typical_p is not None:
        options["typical"] = {"p": args.typical_p}
    if args.east:
        name, _, scale = args.east.partition(":")
        options["east"] = {"vector": name, "scale": float(scale or 1.0)}
    if args.diffadapt:
        options["diffadapt"] = {"probe": args.diffadapt}
    if args.particles:
        options["particles"] = {"n": args.particles}
    if args.entropy:
        options["return_entropy"] = True
    return options or None


def _summary(steering: dict) -> str:
    parts = [f"methods: {', '.join(steering.get('methods') or ['none'])}"]
    entropy = steering.get("entropy") or {}
    if entropy.get("mean") is not None:
        parts.append(f"entropy mean {entropy['mean']:.3f} max {entropy['max']:.3f} nats")
    if "diffadapt" in steering:
        d = steering["diffadapt"]
        parts.append(f"difficulty {d['difficulty']} "
                     f"(p={d['probabilities'][d['difficulty']]:.2f})")
    if "particles" in steering:
        p = steering["particles"]
        parts.append(f"{len(p['steps'])} particle steps, {p['resamples']} resamples, "
                     f"{p['generated_tokens']} tokens generated")
    return "; ".join(parts)


def main(kind: str, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"steer {kind}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(parser)
    parser.add_argument("text", help="the user message (chat) or the prompt (complete)")
    if kind == "chat":
        parser.add_argument("--system", help="a system message first")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, help="default: the server's (1.0)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--typical-p", type=float, help="locally typical sampling mass")
    parser.add_argument("--east", metavar="VECTOR[:SCALE]", help="add a stored steering vector")
    parser.add_argument("--diffadapt", metavar="PROBE", help="pick the strategy with a probe")
    parser.add_argument("--particles", type=int, metavar="N", help="particle filtering")
    parser.add_argument("--entropy", action="store_true", help="per-token entropy too")
    parser.add_argument("--steering", metavar="JSON", help="any steering object, e.g. "
                        "'{\"vreason\": {\"every\": 2}}' (the flags above add to it)")
    parser.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    parser.add_argument("--json", action="store_true", help="print the raw response body")
    args = parser.parse_args(argv)

    params = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    if args.seed is not None:
        params["seed"] = args.seed
    if kind == "chat":
        payload = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.text}]
    else:
        payload = args.text
    try:
        steering = _steering(args)
    except ValueError as exc:
        sys.exit(f"steer {kind}: {exc}")
    try:
        with Client(args.url, api_key=args.api_key) as client:
            if args.no_stream or args.json:
                call = client.chat if kind == "chat" else client.complete
                result = call(payload, steering=steering, **params)
                if args.json:
                    print(json.dumps(result.raw, indent=2))
                    return
                print(result.text)
                report = result.steering
            else:
                stream = client.stream_chat if kind == "chat" else client.stream_complete
                report = {}
                for event in stream(payload, steering=steering, **params):
                    if event.progress:
                        print(f"[step {event.progress['step']}: ESS {event.progress['ess']:.2f}"
                              f", temperature {event.progress['temperature']:.2f}]",
                              file=sys.stderr)
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                    report = event.steering or report
                print()
            print(_summary(report), file=sys.stderr)
            if args.entropy and report.get("token_entropy") is not None:
                print("token entropy: " + " ".join(
                    "-" if h is None else f"{h:.2f}" for h in report["token_entropy"]),
                    file=sys.stderr)
    except (SteerError, OSError) as exc:
        sys.exit(f"steer {kind}: {exc}")
