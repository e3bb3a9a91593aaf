"""``zonegate``: one command for every program and tool."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence
from pathlib import Path

from runtime.configload import config_kind, load_yaml
from runtime.program import add_program_arguments, guarded


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zonegate`` console script."""
    args = _parser().parse_args(argv)
    return guarded(lambda: int(args.run(args)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zonegate", description="zonegate: token-exchange sidecar and exchange server"
    )
    parser.add_argument("--version", action="version", version=f"zonegate {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text)

    for name, run, text in (
        ("sidecar", _run_sidecar, "run the sidecar proxy"),
        ("exchange", _run_exchange, "run the standalone exchange server"),
        ("injector", _run_injector, "run the Kubernetes mutating admission webhook (TLS)"),
    ):
        p = command(name, text)
        add_program_arguments(p)
        p.set_defaults(run=run)

    demo = command(
        "demo",
        "everything on 127.0.0.1 in one process: a dev OpenID Provider, the exchange, the "
        "sidecar and two zone backends; prints every hop",
    )
    demo.add_argument("--once", action="store_true", help="run the walkthrough and exit")
    demo.add_argument("--remote", action="store_true", help="use the standalone exchange server")
    demo.set_defaults(run=_run_demo)

    check = command(
        "check", "validate a sidecar, exchange or injector config (exit 0, or 2 listing errors)"
    )
    check.add_argument("file", type=Path)
    check.set_defaults(run=_run_check)

    keys = command("keys", "manage zone signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    gen_text = "write a private key (PEM, mode 0600) for a zone; missing folders are made 0700"
    gen = keys_sub.add_parser("generate", help=gen_text, description=gen_text)
    gen.add_argument("--alg", default="ES256", choices=("ES256", "RS256", "PS256", "EdDSA"))
    gen.add_argument("--out", required=True, type=Path)
    gen.add_argument("--force", action="store_true", help="overwrite an existing file")
    gen.set_defaults(run=_run_keys_generate)

    explain = command(
        "explain", "dry-run the exchange core's decision for a token, minting nothing"
    )
    explain.add_argument("--config", required=True, type=Path, help="exchange or sidecar config")
    explain.add_argument(
        "--subject-token", required=True, help="the token, or @FILE, or - for stdin"
    )
    explain.add_argument("--audience", action="append", default=[])
    explain.add_argument("--resource", action="append", default=[])
    explain.add_argument("--scope")
    explain.add_argument("--client", help="client_id (default: the only client, or the sidecar's)")
    explain.set_defaults(run=_run_explain)

    dev = command(
        "dev-provider",
        "serve a development OpenID Provider (discovery, JWKS, GET /dev/token): not for production",
    )
    dev.add_argument("--listen", default="127.0.0.1:8080", help="host:port (default %(default)s)")
    dev.add_argument("--alg", default="ES256", choices=("ES256", "RS256", "PS256", "EdDSA"))
    dev.set_defaults(run=_run_dev_provider)
    return parser


def version() -> str:
    """The installed distribution's version."""
    try:
        return importlib.metadata.version("zonegate")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _run_dev_provider(args: argparse.Namespace) -> int:
    from devkit.provider import main as provider_main

    return provider_main(args.listen, args.alg)


def _run_sidecar(args: argparse.Namespace) -> int:
    from sidecar.app import main as sidecar_main

    return sidecar_main(args.config, log_level=args.log_level)


def _run_exchange(args: argparse.Namespace) -> int:
    from exchange.server.app import main as server_main

    return server_main(args.config, log_level=args.log_level)


def _run_injector(args: argparse.Namespace) -> int:
    from injector.server import main as injector_main

    return injector_main(args.config, log_level=args.log_level)


def _run_demo(args: argparse.Namespace) -> int:
    from devkit.demo import main as demo_main

    return demo_main(once=args.once, remote=args.remote)


def _run_explain(args: argparse.Namespace) -> int:
    from zonegate.explain import main as explain_main

    return explain_main(args)


def _run_check(args: argparse.Namespace) -> int:
    path: Path = args.file
    kind = config_kind(load_yaml(path))
    if kind == "sidecar":
        from sidecar.config import load_sidecar_config

        load_sidecar_config(path)
    elif kind == "injector":
        from injector.config import load_injector_config

        load_injector_config(path)
    else:
        from exchange.config import load_exchange_config
        from exchange.server.keyfiles import load_keyring

        load_keyring(load_exchange_config(path))
    print(f"{path}: valid {kind} config")
    return 0


def _run_keys_generate(args: argparse.Namespace) -> int:
    from exchange.keys import generate_private_key, signing_key
    from exchange.server.keyfiles import write_private_key

    out: Path = args.out
    if out.exists() and not args.force:
        print(f"zonegate: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    key = generate_private_key(args.alg)
    try:
        make_private_folders(out.parent)
        write_private_key(key, out)
    except OSError as e:
        print(f"zonegate: cannot write {out}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {args.alg} private key to {out} (kid {signing_key(key, args.alg).kid})")
    return 0


def make_private_folders(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each readable by its owner only (0700)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        path.mkdir(mode=0o700)
        path.chmod(0o700)  # mkdir's mode is filtered by the umask


if __name__ == "__main__":
    sys.exit(main())
