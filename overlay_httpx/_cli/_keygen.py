"""``overlay-httpx keygen``: make an identity file and show what it means to peers.

A node's address is derived from its key, so the key file *is* the node's
permanent name: this command refuses to replace one unless told to.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .._exceptions import IdentityError, IdentityExists
from .._http._transport import IDENTITY_ENV, default_identity_path
from .._identity import Identity, default_address
from ._common import command_parser
from ._errors import CliError

__all__ = ["add_parser"]

DESCRIPTION = """\
Create a new identity (an X25519 key for the tunnels' Noise handshakes and an
Ed25519 key for signatures) in a file only you can read (mode 0600), then print
the overlay address it gives a node and its public identity, which peers pass
to --peer. An existing file is never replaced unless --force is given: the old
key, and with it the node's address, would be lost."""

EXAMPLES = f"""\
examples:
  overlay-httpx keygen                      # ${IDENTITY_ENV}, else the per-user default
  overlay-httpx keygen --out llm.key
  overlay-httpx keygen --out llm.key --force --json
"""


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
) -> None:
    parser = command_parser(
        subparsers,
        parents,
        "keygen",
        "create an identity file and print its address and public identity",
        DESCRIPTION,
        EXAMPLES,
    )
    parser.add_argument(
        "--out",
        metavar="PATH",
        help=f"where to write it (default: ${IDENTITY_ENV}, else "
        "$XDG_CONFIG_HOME/overlay_httpx/identity or ~/.config/overlay_httpx/identity)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    explicit: str | None = args.out
    path = Path(explicit).expanduser() if explicit is not None else default_identity_path()
    if explicit is None:  # the default lives in a per-user directory we may create
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    elif not path.parent.is_dir():
        raise CliError(
            f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist "
            "(expected --out in an existing directory)"
        )
    if path.is_dir():
        raise CliError(f"cannot write {str(path)!r}: it is a directory (expected a file path)")
    identity = Identity.generate()
    try:
        identity.save(path, overwrite=args.force)
    except IdentityExists:
        raise CliError(
            f"identity file {str(path)!r} already exists; pass --force to replace it "
            "(its key and address will be lost)"
        ) from None
    except (IdentityError, OSError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CliError(f"cannot write identity file {str(path)!r}: {detail}") from None
    public = identity.public
    address = default_address(public)
    if args.json:
        document = {
            "path": str(path),
            "address": str(address),
            "host": address.host,
            "identity": str(public),
            "fingerprint": public.fingerprint,
        }
        print(json.dumps(document), flush=True)
    else:
        print(f"wrote {path}", flush=True)
        print(f"address:     {address}  (URL host {address.host})")
        print(f"identity:    {public}")
        print(f"fingerprint: {public.fingerprint}", flush=True)
    return 0
