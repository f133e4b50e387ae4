"""What the command-line clients share: the server address and keys."""

from __future__ import annotations

import argparse
import os

from clients.sdk import bearer_headers


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("STEER_URL", "http://127.0.0.1:8000"),
                        help="server address (env STEER_URL)")
    parser.add_argument("--api-key", default=os.environ.get("STEER_API_KEY"),
                        help="env STEER_API_KEY")
    parser.add_argument("--admin-key", default=os.environ.get("STEER_ADMIN_KEY"),
                        help="for uploads and deletions (env STEER_ADMIN_KEY)")


def auth_headers(args: argparse.Namespace, admin: bool = False) -> dict:
    """`bearer_headers` for the keys on the command line."""
    return bearer_headers(args.api_key, args.admin_key, admin)
