"""`steer serve --model`: the bundled model and local folders stay offline; any other name is a
Hugging Face Hub id, left to vLLM to download as `vllm serve` does, once a cheap check (its
config.json in the HF cache, else readable on the Hub) says it can be had; one that cannot stops
the command with one plain sentence naming it and why (no traceback). No test here reaches the
network: the Hub is an unroutable local port and the HF cache a temporary folder."""

import argparse
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import huggingface_hub.constants as hub_constants
import pytest

import server.cli as cli
from clients.cli.main import main as steer_main
from server.default_model import DEFAULT_MODEL_NAME
from steering.engine.args import check_model

HUB_ID = "some-org/some-model"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, refused at once
ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty HF cache, an unreachable Hub, offline mode off, for this process (whose
    huggingface_hub read its settings at import) and for the ones it starts."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "")  # so that the delenv is undone too
        monkeypatch.delenv(name)
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setenv("STEER_CACHE_DIR", str(tmp_path / "steer"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        UNREACHABLE + "/{repo_id}/resolve/{revision}/{filename}")
    return cache


def go_offline(monkeypatch):
    """What a user's own HF_HUB_OFFLINE=1 amounts to."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def namespace(model, **extra) -> argparse.Namespace:
    """The fields of `steer serve`'s parsed arguments that settling the model reads."""
    fields = dict(model=model, model_path=None, served_model_name=None, revision=None,
                  load_format="auto", artifacts_dir=None)
    return argparse.Namespace(**{**fields, **extra})


def cached_snapshot(cache: Path) -> Path:
    """Hub model HUB_ID as the HF cache lays it out after a download (of its config here)."""
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (snapshot / "config.json").write_text("{}")
    return snapshot


def assert_one_plain_sentence(message: str, reason: str) -> None:
    assert message.startswith(f"steer serve: model {HUB_ID!r} is not a local folder and could "
                              "not be fetched from the Hugging Face Hub: "), message
    assert reason in message, message
    assert "\n" not in message and "Traceback" not in message, message


def no_hub(*args, **kwargs):
    raise AssertionError("the Hub was asked")


def test_offline_hub_id_exits_with_the_reason(hub, monkeypatch):
    go_offline(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        steer_main(["serve", "--model", HUB_ID])
    assert_one_plain_sentence(str(exit_.value.code), "HF_HUB_OFFLINE=1 is set")
    assert str(hub) in str(exit_.value.code)  # says where it looked


def test_serve_does_not_force_offline_for_a_hub_id(hub):
    """`steer serve --model org/name` must try the Hub (here: unreachable), not report offline
    mode that the user never set."""
    with pytest.raises(SystemExit) as exit_:
        steer_main(["serve", "--model", HUB_ID])
    assert_one_plain_sentence(str(exit_.value.code), f"the Hub at {UNREACHABLE} cannot be "
                              "reached (ConnectError")
    assert "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.parametrize("offline,reason", [
    (False, f"the Hub at {UNREACHABLE} cannot be reached"),
    (True, "HF_HUB_OFFLINE=1 is set"),
])
def test_a_hub_id_that_cannot_be_had_in_a_fresh_process(hub, offline, reason):
    """The real command, settings read from the environment as a user's shell gives them."""
    env = {**os.environ, **({"HF_HUB_OFFLINE": "1"} if offline else {})}
    done = subprocess.run([sys.executable, "-m", "clients.cli", "serve", HUB_ID], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("steer serve:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert_one_plain_sentence(errors[0], reason)
    assert "Traceback" not in done.stderr and "Retry" not in done.stderr, done.stderr[-3000:]


def test_a_local_folder_is_served_offline_and_never_looked_up(hub, monkeypatch, tmp_path):
    for name in ("get_hf_file_metadata", "try_to_load_from_cache"):
        monkeypatch.setattr(huggingface_hub, name, no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / HUB_ID).mkdir(parents=True)  # a local folder that reads like a Hub id
    args = namespace(HUB_ID)
    assert cli.resolve_model(args) is None
    assert args.model == HUB_ID and args.served_model_name is None
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hub_constants.HF_HUB_OFFLINE


def test_the_bundled_model_stays_offline(hub, monkeypatch, tmp_path):
    import server.default_model

    monkeypatch.setattr(server.default_model, "ensure_default_model", lambda: tmp_path)
    args = namespace(None)
    assert cli.resolve_model(args) == DEFAULT_MODEL_NAME
    assert args.model == str(tmp_path) and args.served_model_name == [DEFAULT_MODEL_NAME]
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hub_constants.HF_HUB_OFFLINE


def test_a_hub_id_in_the_cache_is_left_to_vllm_under_its_id(hub, monkeypatch):
    """Offline (the user's choice) and with the Hub out of reach alike, a Hub model whose config
    the cache holds passes without asking the Hub; `args.model` stays the id (vLLM resolves it,
    offline to the cached snapshot), served under it, its artifacts in a folder named after it."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    snapshot = cached_snapshot(hub)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_hub)
    for offline in (False, True):
        if offline:
            go_offline(monkeypatch)
        args = namespace(HUB_ID)
        assert cli.resolve_model(args) is None
        assert args.model == HUB_ID and args.served_model_name == [HUB_ID]
        assert cli.artifacts_folder(args, HUB_ID).name == "some-org--some-model"
        assert ("HF_HUB_OFFLINE" in os.environ) is offline  # a Hub id never forces offline
    assert AsyncEngineArgs(model=HUB_ID).model == str(snapshot)  # vLLM's own offline lookup
    args = namespace(None, model_path=HUB_ID, served_model_name=["mine"])  # positional MODEL
    cli.resolve_model(args)
    assert args.model == HUB_ID and args.served_model_name == ["mine"]


@pytest.mark.parametrize("error", [None, "RemoteEntryNotFoundError"])
def test_a_readable_hub_id_is_left_to_vllm(hub, monkeypatch, error):
    """Online and not cached: one HEAD for config.json (a repository without one, such as a
    Mistral-format model, is still vLLM's to judge), and nothing downloaded here."""
    from huggingface_hub import errors

    asked = []

    def head(url, **kwargs):
        asked.append(url)
        if error:
            response = SimpleNamespace(headers={}, request=None, status_code=404)
            raise getattr(errors, error)("missing", response=response)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", head)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    args = namespace(HUB_ID, revision="v1")
    assert cli.resolve_model(args) is None
    assert args.model == HUB_ID and args.served_model_name == [HUB_ID]
    assert asked == [f"{UNREACHABLE}/{HUB_ID}/resolve/v1/config.json"]
    assert not list(hub.glob("**/config.json")) and "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.parametrize("model", ["/no/such/model", "./no-such-model", "~/no-such-model",
                                   "no/such/model", "not a model"])
def test_what_is_neither_a_folder_nor_a_hub_id(hub, monkeypatch, model):
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_hub)
    with pytest.raises(ValueError, match="neither a local folder nor a Hugging Face Hub id"):
        cli.resolve_model(namespace(model))
    with pytest.raises(ValueError, match="neither a local folder nor a Hugging Face Hub id"):
        check_model(model)  # what build_engine_args checks
    check_model(HUB_ID)


@pytest.mark.parametrize("error,reason", [
    ("GatedRepoError", f"it is a gated repository: accept its conditions at {UNREACHABLE}/"
     f"{HUB_ID} and log in"),
    ("RepositoryNotFoundError", f"no such repository on {UNREACHABLE}"),
    ("RevisionNotFoundError", "the repository has no revision 'v9'"),
])
def test_hub_refusals_are_named(hub, monkeypatch, error, reason):
    """The Hub refuses the files of a gated repository, and refuses to know one that is missing
    or private, or a revision that is not there."""
    from huggingface_hub import errors

    def refuse(*args, **kwargs):
        response = SimpleNamespace(headers={}, request=None, status_code=401)
        raise getattr(errors, error)("refused", response=response)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", refuse)
    with pytest.raises(ValueError) as exc:
        cli.resolve_model(namespace(HUB_ID, revision="v9"))
    assert_one_plain_sentence(f"steer serve: {exc.value}", reason)
