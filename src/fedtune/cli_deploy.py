"""The deployment commands of `fedtune`: `server`, `client` and `certs`."""

from __future__ import annotations

import argparse
import logging

from rich.console import Console


def _show_transport_log() -> None:
    for name in ("fedtune.transport", "fedtune.deploy"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)


def _cmd_server(args: argparse.Namespace) -> int:
    from fedtune.cli_common import check_early
    from fedtune.config import split_recipe_args
    from fedtune.track.reporter import quiet_libraries

    recipe, overrides = split_recipe_args(args.items)
    if args.address:
        overrides.append(f"transport.address={args.address}")
    if args.resume is None:
        check_early(recipe, overrides)
    quiet_libraries()
    from fedtune.runtime.deploy_server import serve

    _show_transport_log()
    serve(recipe, overrides, resume=args.resume)
    return 0


def _server_interrupted(args: argparse.Namespace, exc: BaseException) -> str:
    from fedtune.cli_common import resume_hint

    return resume_hint("server", getattr(exc, "run_dir", None) or args.resume)


def _cmd_client(args: argparse.Namespace) -> int:
    from fedtune.config import split_recipe_args
    from fedtune.track.reporter import quiet_libraries

    quiet_libraries()
    from fedtune.runtime.deploy_client import participate

    recipe, overrides = split_recipe_args(args.items)
    _show_transport_log()
    participate(recipe, overrides, name=args.name, server=args.server, data=args.data,
                token_file=args.token_file)
    return 0


def _client_interrupted(args: argparse.Namespace, exc: BaseException) -> str:
    return f"interrupted; start the client again to rejoin as {args.name}"


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedtune.transport.certs import make_certs, recipe_snippet

    clients = args.clients or [f"client_{i}" for i in range(args.n)]
    paths = make_certs(args.out_dir, clients, hostnames=args.hostname, days=args.days)
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"wrote a trial CA, a server certificate and {len(clients)} client certificates and "
              f"tokens to {paths['dir']}")
    out.print("give each client only ca.pem and its own .pem/.key/.token; keep ca.key and tokens.json "
              "on the server. Recipe section:\n")
    out.print(recipe_snippet(paths["dir"]), markup=False)
    return 0


def add_deploy_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("server", help="serve a deployed federation over gRPC",
                       description="Wait for the recipe's clients, run its rounds over gRPC and write "
                                   "the same run directory as `fedtune run`.")
    p.add_argument("items", nargs="*", metavar="RECIPE|KEY=VALUE")
    p.add_argument("--address", metavar="HOST:PORT", help="listen here (transport.address)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped server from its last checkpoint")
    p.set_defaults(func=_cmd_server, interrupted=_server_interrupted)

    p = sub.add_parser("client", help="join a deployed federation as one client",
                       description="Dial the server, train on this party's data when asked, and exit "
                                   "when the server finishes.")
    p.add_argument("items", nargs="*", metavar="RECIPE|KEY=VALUE")
    p.add_argument("--server", metavar="HOST:PORT", help="the server's address (transport.address)")
    p.add_argument("--name", required=True, help="this client's name, e.g. client_0")
    p.add_argument("--data", metavar="PATH", help="this party's own data file (default: its partition "
                                                  "of the recipe's split, for trials)")
    p.add_argument("--token-file", metavar="PATH", help="file with this client's token (transport.token_file)")
    p.set_defaults(func=_cmd_client, interrupted=_client_interrupted)

    p = sub.add_parser("certs", help="make a trial CA, certificates and tokens",
                       description="Self-signed credentials for trials: a CA, a server certificate, "
                                   "client certificates and tokens.")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--clients", nargs="+", metavar="NAME", help="client names (default client_0 ...)")
    p.add_argument("-n", type=int, default=3, help="number of clients when --clients is not given")
    p.add_argument("--hostname", action="append", default=[],
                   help="extra server name or IP for its certificate (repeatable)")
    p.add_argument("--days", type=int, default=30, help="validity in days")
    p.set_defaults(func=_cmd_certs)
