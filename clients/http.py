"""What the command-line clients share: server address and keys, and error handling."""

from __future__ import annotations

import argparse
import os

import httpx


class ServerError(RuntimeError):
    pass


def check(response: httpx.Response) -> dict:
    """The JSON body of a successful response; otherwise a ServerError with the server's
    message."""
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise ServerError(f"HTTP {response.status_code}: {message}")
    return response.json()


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("STEER_URL", "http://127.0.0.1:8000"),
                        help="server address (env STEER_URL)")
    parser.add_argument("--api-key", default=os.environ.get("STEER_API_KEY"),
                        help="env STEER_API_KEY")
    parser.add_argument("--admin-key", default=os.environ.get("STEER_ADMIN_KEY"),
                        help="for uploads and deletions (env STEER_ADMIN_KEY)")


def bearer_headers(api_key: str | None, admin_key: str | None, admin: bool = False) -> dict:
    """Bearer headers: the API key, or for writes the admin key (falling back to the API key)."""
    key = (admin_key or api_key) if admin else api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


def auth_headers(args: argparse.Namespace, admin: bool = False) -> dict:
    """`bearer_headers` for the keys on the command line."""
    return bearer_headers(args.api_key, args.admin_key, admin)
