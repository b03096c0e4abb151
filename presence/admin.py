"""presence-admin: everything the web pages do to applications and grants, from a shell.

    presence-admin [--database URL] [--create] [--allow-ports] [--allow-private] apps list [--developer EMAIL]
    presence-admin apps create DEVELOPER DOMAIN NAME [--description TEXT]
    presence-admin apps show APP
    presence-admin apps verify APP [--force]
    presence-admin apps activate APP          (prints the API key, once)
    presence-admin apps deactivate APP
    presence-admin grants list [--email EMAIL] [--app APPID]
    presence-admin grants add EMAIL APPID     (prints the per-application user id)
    presence-admin grants revoke EMAIL APPID
    presence-admin check [--env] [--strict] [twistd presence options]   (validate a configuration)

presence-admin opens the database the node uses and never creates one unless asked (``--create``):
a missing SQLite file is an error naming the path it looked for.

APP is the application's number (shown by ``apps list``) or its public app id. ``apps verify`` fetches
like the pages' Verify (presence/verification.py): one deadline, a small body limit, redirects only
on the same host, and no private, loopback or link-local address unless ``--allow-private``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from presence.apps import Applications
from presence.config import Config
from presence.store import App, Store, StoreUnavailable, open_store


class AdminError(Exception):
    """A mistake the operator can fix; printed without a traceback."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="presence-admin", description="Manage a Presence node's applications and grants.")
    p.add_argument("--database", default=Config.database,
                   help="sqlite:PATH or postgresql://user:password@host:port/database (default: %(default)s)")
    p.add_argument("--create", action="store_true",
                   help="create the SQLite database if it does not exist (otherwise presence-admin refuses: "
                        "a missing file usually means the wrong working directory or --database)")
    p.add_argument("--allow-ports", action="store_true",
                   help="accept domains with a :port (local and test setups)")
    p.add_argument("--allow-private", action="store_true",
                   help="let apps verify fetch private, loopback and link-local addresses (local and test setups)")
    top = p.add_subparsers(dest="area", required=True)

    apps = top.add_parser("apps", help="applications").add_subparsers(dest="command", required=True)
    c = apps.add_parser("list", help="list applications")
    c.add_argument("--developer")
    c = apps.add_parser("create", help="register an application (prints its verification key)")
    c.add_argument("developer")
    c.add_argument("domain")
    c.add_argument("name")
    c.add_argument("--description", default="")
    for name, text in [("show", "show one application, with its verification key while pending"),
                       ("verify", "fetch http://<domain>/__presence (public addresses only, unless --allow-private)"
                                  " and compare it with the verification key"),
                       ("activate", "generate a new API key (printed once; rotates an existing one)"),
                       ("deactivate", "remove the API key: the application's streams stop")]:
        c = apps.add_parser(name, help=text)
        c.add_argument("app")
        if name == "verify":
            c.add_argument("--force", action="store_true", help="mark verified without fetching (operator's word)")

    grants = top.add_parser("grants", help="who allowed which application").add_subparsers(dest="command", required=True)
    c = grants.add_parser("list", help="list grants")
    c.add_argument("--email")
    c.add_argument("--app")
    for name, text in [("add", "allow an application to see a person (prints the per-application user id)"),
                       ("revoke", "stop an application from seeing a person")]:
        c = grants.add_parser(name, help=text)
        c.add_argument("email")
        c.add_argument("app")

    c = top.add_parser(
        "check", help="validate a node's configuration and store (takes every option of twistd presence)",
        description="Validate the configuration twistd presence would run with (the same options; "
                    "--database as for presence-admin) and its store, without binding or writing anything. "
                    "One line per check: OK, WARNING or PROBLEM with its fix. Exit status 1 on a problem.")
    c.add_argument("--env", action="store_true", help="read the PRESENCE_* variables, like presence.tac")
    c.add_argument("--strict", action="store_true", help="exit with status 1 on warnings too")
    c.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the database (default: 10)")
    return p


def _describe(app: App) -> str:
    return f"{app.id}\t{app.app_id or '-'}\t{app.state}\t{app.domain}\t{app.name}\t{app.developer}"


async def _find(store: Store, ref: str) -> App:
    app = await store.get_app_by_id(int(ref)) if ref.isdigit() else None
    app = app or await store.get_app(ref)
    if app is None:
        raise AdminError(f"no application {ref!r}; see presence-admin apps list")
    return app


def missing_database(database: str) -> str | None:
    """Why presence-admin will not open ``database`` without --create, or None: a SQLite file that
    does not exist (SQLite would silently make an empty one, and every listing would be empty)."""
    if not database.startswith("sqlite:"):
        return None
    path = database[len("sqlite:"):]
    if path in ("", ":memory:") or path.startswith("file:") or os.path.exists(path):
        return None
    return (f"no database at {os.path.abspath(path)} (--database {database}, relative to the working directory "
            f"{os.getcwd()}); run presence-admin where the node runs, or give --database sqlite:/absolute/path "
            "to the node's file; add --create only to start a new, empty database")


async def run(args: argparse.Namespace, reactor: Any, out=sys.stdout) -> None:
    why = None if getattr(args, "create", False) else missing_database(args.database)
    if why:
        raise AdminError(why)
    store = open_store(args.database, reactor=reactor)
    await store.open()
    try:
        apps = Applications(store, reactor, allow_ports=args.allow_ports)
        await _dispatch(args, store, apps, reactor, out)
    finally:
        await store.close()


async def _dispatch(args: argparse.Namespace, store: Store, apps: Applications, reactor: Any, out) -> None:
    say = lambda text: print(text, file=out)  # noqa: E731
    if args.area == "apps":
        if args.command == "list":
            for app in await store.list_apps(args.developer):
                say(_describe(app))
        elif args.command == "create":
            try:
                app = await apps.register(args.developer, args.domain, args.name, args.description)
            except ValueError as e:
                raise AdminError(str(e))
            say(_describe(app))
            say(f"serve this key as text/plain at http://{app.domain}/__presence, then run: "
                f"presence-admin apps verify {app.id}")
            say(app.verification_key)
        else:
            app = await _find(store, args.app)
            if args.command == "show":
                say(_describe(app))
                if app.state == "pending":
                    say(app.verification_key)
            elif args.command == "verify":
                if app.state != "pending":
                    say(f"already verified: app id {app.app_id}")
                    return
                if not args.force:
                    from presence.verification import PRIVATE, VerificationFailed, check_domain, safe_client

                    timeout = Config.verify_timeout
                    http = safe_client(reactor, args.allow_private, connect_timeout=timeout)
                    try:
                        await check_domain(http, reactor, app.domain, app.verification_key, timeout)
                    except VerificationFailed as e:
                        hint = " (for a local setup, add --allow-private)" if e.reason == PRIVATE else ""
                        # the operator sees why (the pages show developers only what must be served)
                        raise AdminError(f"not verified: {e.detail}{hint}")
                app = await apps.mark_verified(app)
                say(f"verified: app id {app.app_id}")
            elif args.command == "activate":
                try:
                    app, key = await apps.activate(app)
                except ValueError as e:
                    raise AdminError(str(e))
                say(f"active: app id {app.app_id}; its API key (shown only now):")
                say(key)
            elif args.command == "deactivate":
                try:
                    app = await apps.deactivate(app)
                except (KeyError, ValueError) as e:
                    raise AdminError(str(e))
                say(f"deactivated: {app.app_id}")
    else:
        if args.command == "list":
            for g in await store.list_grants(email=args.email, app_id=args.app):
                say(f"{g.email}\t{g.app_id}\t{g.uid}")
        elif args.command == "add":
            app = await _find(store, args.app)
            try:
                grant = await apps.grant(args.email, app.app_id or "")
            except KeyError as e:
                raise AdminError(str(e.args[0]))
            say(grant.uid)
        elif args.command == "revoke":
            app = await _find(store, args.app)
            if not await apps.revoke(args.email, app.app_id or ""):
                raise AdminError(f"{args.email} had not granted {app.app_id}")
            say("revoked")


def main(argv: Sequence[str] | None = None) -> None:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and args.area != "check":
        p.error(f"unrecognized arguments: {' '.join(extra)}")

    async def go(reactor: Any) -> None:
        if args.area == "check":  # the twistd presence options after "check" are its own
            from presence import check

            raise SystemExit(await check.run(extra, args.database, reactor, env=args.env, strict=args.strict,
                                             timeout=args.timeout))
        try:
            await run(args, reactor)
        except (AdminError, StoreUnavailable, ValueError) as e:
            print(f"presence-admin: {e}", file=sys.stderr)
            raise SystemExit(1)

    react(lambda reactor: ensureDeferred(go(reactor)))


if __name__ == "__main__":
    main()
