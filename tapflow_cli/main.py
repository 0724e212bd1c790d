"""``tapflow``: run the service and talk to a running one.

    tapflow run [--relay-url URL] [--bind :2480] [--data-dir DIR] ...   start the service
    tapflow status [--watch]                                             live view of a service
    tapflow add DID|HANDLE...  /  tapflow remove DID|HANDLE...           track / untrack repos
    tapflow info DID                                                     one repo's state
    tapflow tail [--ack|--no-ack] [--max N]                              events as JSON lines

Every command but ``run`` takes ``--url`` (env ``TAP_URL``, default http://127.0.0.1:2480)
and ``--password`` (env ``TAP_ADMIN_PASSWORD``). Only the standard library and
tapflow_client (aiohttp) are used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from tapflow_client import (AuthError, NotFound, ParseError, TapClient, TapError, TapHTTPError, TapUnreachable)
from tapflow_client._lex import is_did, is_handle

DEFAULT_URL = "http://127.0.0.1:2480"
ROOT = Path(__file__).resolve().parent.parent


class CLIError(Exception):
    """A one-line message for the user; exit status 1."""


# --- tapflow run --------------------------------------------------------------------------

def _settings() -> Sequence[Any]:
    try:
        import config
    except ImportError:  # pragma: no cover - running from outside the project
        sys.path.insert(0, str(ROOT))
        import config
    return config.SETTINGS


def _flag(attr: str) -> str:
    return "--" + attr.replace("_", "-")


def _settings_epilog() -> str:
    lines = ["environment (every flag sets the variable; the process environment and ./.env work too):"]
    for s in _settings():
        names = " / ".join(s.env)
        default = s.default if s.default != "" else '""'
        lines.append(f"  {names}  (default {default})")
        lines.append(f"      {s.help}")
    return "\n".join(lines)


def _add_run_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="start the service (python -m bytewax.run flows.tap)",
                       description="Start tapflow: sets TAP_* from the flags below, then runs "
                                   "`python -m bytewax.run flows.tap`. Arguments after `--` go to bytewax.run.",
                       epilog=_settings_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    metavars = {"str": "VALUE", "int": "N", "bool": "", "duration": "DURATION", "list": "A,B", "url": "URL",
                "bind": "HOST:PORT"}
    for s in _settings():
        dest = "set_" + s.attr
        if s.kind == "bool":
            on_by_default = s.default.lower() in ("true", "1", "t")
            flag = "--no-" + s.attr.replace("_", "-") if on_by_default else _flag(s.attr)
            p.add_argument(flag, dest=dest, action="store_const", const=not on_by_default, default=None,
                           help=f"{s.help} (sets {s.env[0]}={'false' if on_by_default else 'true'})".replace("%", "%%"))
        else:
            p.add_argument(_flag(s.attr), dest=dest, metavar=metavars.get(s.kind, "VALUE"), default=None,
                           help=f"{s.help} ({s.env[0]}, default {s.default or 'empty'})".replace("%", "%%"))
    p.add_argument("--dry-run", action="store_true", help="print the environment and command instead of running")
    p.add_argument("bytewax_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def cmd_run(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    changed: dict[str, str] = {}
    for s in _settings():
        v = getattr(args, "set_" + s.attr)
        if v is None:
            continue
        text = ("true" if v else "false") if isinstance(v, bool) else str(v)
        env[s.env[0]] = text
        changed[s.env[0]] = text
    extra = list(args.bytewax_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    try:
        import config

        config.load_config(env)
    except ImportError:  # pragma: no cover
        pass
    except ValueError as e:  # ConfigError: every bad value at once
        print(f"tapflow: {e}", file=sys.stderr)
        return 2
    if (ROOT / "flows" / "tap.py").exists():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "bytewax.run", "flows.tap", *extra]
    if args.dry_run:
        for k, v in sorted(changed.items()):
            shown = "***" if "PASSWORD" in k and v else v
            print(f"{k}={shown}")
        print(" ".join(cmd))
        return 0
    sys.stdout.flush()
    # The flow turns SIGTERM into SIGINT (bytewax's clean stop). A SIGINT ignored by whoever
    # started us (`cmd &` in a script) would survive exec and make SIGTERM a no-op.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execvpe(cmd[0], cmd, env)
    return 0  # pragma: no cover


# --- handles -----------------------------------------------------------------------------

async def resolve_handle(handle: str, resolvers: Sequence[str], timeout: float = 5.0) -> str:
    """DID for a handle: DNS TXT ``_atproto.<handle>``, ``https://<handle>/.well-known/atproto-did``,
    or ``xrpc:<url>`` (com.atproto.identity.resolveHandle at that service), in that order."""
    import aiohttp

    problems: list[str] = []
    for r in resolvers:
        r = r.strip()
        try:
            if r == "dns":
                did = await _resolve_dns(handle, timeout)
            elif r == "https":
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
                    async with s.get(f"https://{handle}/.well-known/atproto-did") as resp:
                        text = (await resp.text()).strip() if resp.status == 200 else ""
                did = text.splitlines()[0].strip() if text else None
            elif r.startswith("xrpc:"):
                base = r[len("xrpc:"):].rstrip("/")
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
                    async with s.get(f"{base}/xrpc/com.atproto.identity.resolveHandle",
                                     params={"handle": handle}) as resp:
                        body = await resp.json(content_type=None) if resp.status == 200 else {}
                did = body.get("did") if isinstance(body, dict) else None
            else:
                problems.append(f"unknown resolver {r!r}")
                continue
        except Exception as e:  # noqa: BLE001 - try the next resolver
            problems.append(f"{r}: {type(e).__name__} {e}".strip())
            continue
        if did and is_did(did):
            return did
        problems.append(f"{r}: no DID")
    raise CLIError(f"could not resolve handle {handle} ({'; '.join(problems) or 'no resolver'}); "
                   f"pass its DID (did:plc:... / did:web:...) instead")


async def _resolve_dns(handle: str, timeout: float) -> Optional[str]:
    try:
        import dns.asyncresolver
    except ImportError:
        raise RuntimeError("dnspython is not installed") from None
    res = dns.asyncresolver.Resolver()
    res.lifetime = timeout
    answer = await res.resolve(f"_atproto.{handle}", "TXT")
    for rr in answer:
        text = b"".join(rr.strings).decode("ascii", "replace")
        if text.startswith("did="):
            return text[4:]
    return None


async def to_dids(items: Sequence[str], resolvers: Sequence[str]) -> list[tuple[str, str]]:
    """(what the user typed, DID) for each argument; handles are resolved."""
    out = []
    for raw in items:
        item = raw.strip()
        for prefix in ("at://", "@"):
            if item.startswith(prefix):
                item = item[len(prefix):]
        item = item.rstrip("/")
        if item.startswith("did:"):
            if not is_did(item):
                raise CLIError(f"not a valid DID: {raw}")
            out.append((raw, item))
        elif is_handle(item):
            out.append((raw, await resolve_handle(item.lower(), resolvers)))
        else:
            raise CLIError(f"not a DID or handle: {raw}")
    return out


# --- client commands -----------------------------------------------------------------------

def _client(args: argparse.Namespace) -> TapClient:
    url = args.url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CLIError(f"--url must start with http:// or https:// (got {args.url})")
    return TapClient(url, admin_password=args.password or None, timeout=args.timeout)


async def cmd_add(args: argparse.Namespace) -> int:
    pairs = await to_dids(args.repos, args.handle_resolver.split(","))
    async with _client(args) as tap:
        await tap.add_repos([d for _, d in pairs])
    for raw, did in pairs:
        print(f"added {did}" + (f" ({raw})" if raw != did else ""))
    return 0


async def cmd_remove(args: argparse.Namespace) -> int:
    pairs = await to_dids(args.repos, args.handle_resolver.split(","))
    async with _client(args) as tap:
        await tap.remove_repos([d for _, d in pairs])
    for raw, did in pairs:
        print(f"removed {did}" + (f" ({raw})" if raw != did else ""))
    return 0


async def cmd_info(args: argparse.Namespace) -> int:
    pairs = await to_dids([args.repo], args.handle_resolver.split(","))
    did = pairs[0][1]
    async with _client(args) as tap:
        try:
            info = await tap.info(did)
        except NotFound:
            raise CLIError(f"{did} is not tracked (tapflow add {did})") from None
    fields = {"did": info.did, "handle": info.handle, "state": info.state, "status": info.status,
              "rev": info.rev, "records": info.records, "retries": info.retries, "error": info.error}
    if args.json:
        print(_json({k: v for k, v in fields.items() if v is not None}))
    else:
        for k, v in fields.items():
            if v is None:
                continue
            print(f"{k:<8} {v if v != '' else '-'}")
    return 0


async def cmd_tail(args: argparse.Namespace) -> int:
    async with _client(args) as tap:
        await tap.health()  # a clear message now rather than silent retries
        count = 0
        out = sys.stdout
        if not args.ack:
            print("tapflow tail: not acking (--no-ack); unacked events are redelivered after TAP_RETRY_TIMEOUT",
                  file=sys.stderr)
        def on_error(e: Exception) -> None:
            print(f"tapflow tail: {e}", file=sys.stderr)

        def on_reconnect(e: BaseException, n: int, initial: bool) -> None:
            print(f"tapflow tail: {'connecting' if initial else 'reconnecting'} ({e or type(e).__name__})",
                  file=sys.stderr)

        async with tap.events(auto_ack=args.ack, on_error=on_error, on_reconnect_error=on_reconnect) as events:
            async for ev in events:
                out.write(_json(ev.to_wire()) + "\n")
                out.flush()
                count += 1
                if args.max and count >= args.max:
                    break
    return 0


# --- status --------------------------------------------------------------------------------

IN_PROGRESS = ("pending", "resyncing", "desynchronized")
ERROR_DETAILS = 10


class Snapshot:
    def __init__(self, t: float, stats: dict[str, Any], states: Optional[dict[str, int]],
                 errors: list[Any], listed: int, truncated: bool, health: str):
        self.t = t
        self.stats = stats
        self.states = states
        self.errors = errors
        self.listed = listed
        self.truncated = truncated
        self.health = health

    @property
    def done(self) -> Optional[int]:
        if self.states is None:
            return None
        return sum(n for s, n in self.states.items() if s not in IN_PROGRESS)


async def take_snapshot(tap: TapClient, max_repos: int) -> Snapshot:
    health = (await tap.health()).get("status", "?")
    stats = await tap.stats()
    states: Optional[dict[str, int]] = {}
    errors: list[Any] = []
    listed = 0
    truncated = False
    try:
        async for page in tap.list_repos(limit=min(1000, max_repos)):
            for r in page:
                states[r.state] = states.get(r.state, 0) + 1  # type: ignore[index]
                if r.state == "error" or r.error:
                    errors.append(r)
            listed += len(page)
            if listed >= max_repos and page.cursor:
                truncated = True
                break
    except NotFound:
        states = None  # a Tap without GET /repos
    # the listing has no error messages: ask /info for the first few
    details = await asyncio.gather(*(tap.info(r.did) for r in errors[:ERROR_DETAILS]), return_exceptions=True)
    for i, d in enumerate(details):
        if not isinstance(d, BaseException):
            errors[i] = d
    return Snapshot(time.monotonic(), stats, states, errors, listed, truncated, str(health))


def _rate(now: Snapshot, then: Optional[Snapshot], key: str) -> Optional[float]:
    if then is None or now.t <= then.t:
        return None
    a, b = now.stats.get(key), then.stats.get(key)
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None
    return (a - b) / (now.t - then.t)


def _fmt_rate(r: Optional[float]) -> str:
    if r is None:
        return ""
    return f"  ({'+' if r >= 0 else ''}{r:,.1f}/s)"


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Style:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled else text


def render(url: str, now: Snapshot, prev: Optional[Snapshot], first: Optional[Snapshot], width: int,
           style: Style, max_errors: int = ERROR_DETAILS) -> str:
    s = now.stats
    lines = [f"{style('tapflow', '1')} at {url}   health: "
             + (style(now.health, '32') if now.health == "ok" else style(now.health, '31'))]
    total = s.get("repo_count")
    if now.states is not None:
        order = ["active", "pending", "resyncing", "desynchronized", "error", "takendown", "suspended", "deactivated"]
        names = sorted(now.states, key=lambda k: (order.index(k) if k in order else len(order), k))
        parts = [f"{k} {now.states[k]:,}" for k in names]
        scope = f" (first {now.listed:,} listed)" if now.truncated else ""
        lines.append(f"repos      {total if total is not None else now.listed:,} tracked{scope}   " + "  ".join(parts))
        listed = max(now.listed, 1)
        done = now.done or 0
        frac = done / listed
        bar_w = max(10, min(40, width - 50))
        fill = int(round(frac * bar_w))
        bar = "[" + "#" * fill + "-" * (bar_w - fill) + "]"
        eta = ""
        remaining = listed - done
        if remaining == 0:
            eta = "   done"
        elif first is not None and first.done is not None and now.t > first.t and done > first.done:
            per_s = (done - first.done) / (now.t - first.t)
            eta = f"   ETA {_fmt_eta(remaining / per_s)}  ({per_s:,.1f} repos/s)"
        elif first is not None and now.t > first.t:
            eta = "   ETA -"
        lines.append(f"backfill   {bar} {frac * 100:5.1f}%  {done:,}/{listed:,}{eta}")
    else:
        lines.append(f"repos      {total:,} tracked   (this service has no GET /repos: no per-state counts)"
                     if isinstance(total, int) else "repos      ?")
    rec = s.get("record_count")
    if isinstance(rec, int):
        lines.append(f"records    {rec:,}{_fmt_rate(_rate(now, prev, 'record_count'))}")
    fh = s.get("firehose")
    if fh is not None:
        lines.append(f"firehose   cursor {fh:,}{_fmt_rate(_rate(now, prev, 'firehose'))}"
                     if isinstance(fh, int) else f"firehose   cursor {fh}")
    lr = s.get("list_repos")
    if lr:
        lines.append(f"crawler    cursor {lr}")
    ob = s.get("outbox_buffer")
    if isinstance(ob, int):
        lines.append(f"outbox     {ob:,} undelivered or unacked{_fmt_rate(_rate(now, prev, 'outbox_buffer'))}")
    rb = s.get("resync_buffer")
    if isinstance(rb, int):
        lines.append(f"resync buf {rb:,} live commits waiting for a snapshot")
    if now.errors:
        lines.append(style(f"errors     {len(now.errors):,} repos", "31"))
        for r in now.errors[:max_errors]:
            msg = (r.error or "").replace("\n", " ")
            room = max(20, width - len(r.did) - 20)
            if len(msg) > room:
                msg = msg[:room - 1] + "…"
            lines.append(f"  {r.did}  {r.state}  retries {r.retries or 0}  {msg}")
        if len(now.errors) > max_errors:
            lines.append(f"  ... and {len(now.errors) - max_errors:,} more")
    else:
        lines.append("errors     none")
    return "\n".join(lines)


async def cmd_status(args: argparse.Namespace) -> int:
    width = shutil.get_terminal_size((100, 24)).columns
    tty = sys.stdout.isatty()
    style = Style(tty and not os.environ.get("NO_COLOR"))
    async with _client(args) as tap:
        first = await take_snapshot(tap, args.max_repos)
        if not args.watch:
            await asyncio.sleep(args.sample)
            now = await take_snapshot(tap, args.max_repos)
            print(render(tap.url, now, first, first, width, style))
            return 0
        prev: Optional[Snapshot] = None
        now = first
        while True:
            text = render(tap.url, now, prev, first, width, style)
            stamp = time.strftime("%H:%M:%S")
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")
            sys.stdout.write(text + f"\n\n{stamp}  every {args.interval:g}s, Ctrl-C to quit\n")
            sys.stdout.flush()
            await asyncio.sleep(args.interval)
            prev = now
            now = await take_snapshot(tap, args.max_repos)


# --- main ------------------------------------------------------------------------------------

def _json(obj: Any) -> str:
    try:
        import orjson

        return orjson.dumps(obj).decode()
    except ImportError:  # pragma: no cover
        import json

        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("TAP_URL", DEFAULT_URL),
                        help="the service (env TAP_URL, default %(default)s)")
    common.add_argument("--password", default=os.environ.get("TAP_ADMIN_PASSWORD", ""),
                        help="admin password (env TAP_ADMIN_PASSWORD)")
    common.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds (default 30)")
    resolver = argparse.ArgumentParser(add_help=False)
    resolver.add_argument("--handle-resolver", default=os.environ.get("TAP_HANDLE_RESOLVER", "dns,https"),
                          help="how to turn handles into DIDs: dns, https, xrpc:<url> (comma list; "
                               "env TAP_HANDLE_RESOLVER, default %(default)s)")

    parser = argparse.ArgumentParser(prog="tapflow", description="tapflow: atproto repo sync, Tap-compatible. "
                                     "`tapflow run --help` lists every TAP_* setting.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_run_parser(sub)

    p = sub.add_parser("status", parents=[common], help="live view of a running service")
    p.add_argument("--watch", "-w", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--sample", type=float, default=1.0,
                   help="without --watch: seconds between the two samples rates come from (default 1)")
    p.add_argument("--max-repos", type=int, default=20000,
                   help="list at most this many repos per refresh for the state counts (default 20000)")

    p = sub.add_parser("add", parents=[common, resolver], help="track repos (DIDs or handles)")
    p.add_argument("repos", nargs="+", metavar="DID|HANDLE")
    p = sub.add_parser("remove", parents=[common, resolver], help="stop tracking repos and forget their records")
    p.add_argument("repos", nargs="+", metavar="DID|HANDLE")
    p = sub.add_parser("info", parents=[common, resolver], help="one repo's state")
    p.add_argument("repo", metavar="DID|HANDLE")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("tail", parents=[common], help="print events from /channel as JSON lines")
    p.add_argument("--ack", action=argparse.BooleanOptionalAction, default=False,
                   help="ack what is printed (default: --no-ack, so another consumer still gets every event "
                        "after TAP_RETRY_TIMEOUT)")
    p.add_argument("--max", "-n", type=int, default=0, help="stop after N events")
    return parser


_ASYNC = {"status": cmd_status, "add": cmd_add, "remove": cmd_remove, "info": cmd_info, "tail": cmd_tail}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    url = getattr(args, "url", DEFAULT_URL)
    try:
        return asyncio.run(_ASYNC[args.command](args))
    except KeyboardInterrupt:
        return 130
    except TapUnreachable:
        print(f"tapflow is not reachable at {url}", file=sys.stderr)
    except AuthError:
        hint = "wrong" if getattr(args, "password", "") else "missing"
        print(f"tapflow: {hint} admin password for {url} (401): use --password or TAP_ADMIN_PASSWORD",
              file=sys.stderr)
    except CLIError as e:
        print(f"tapflow: {e}", file=sys.stderr)
    except TapHTTPError as e:
        print(f"tapflow: {url} answered {e.status} {e.message}", file=sys.stderr)
    except (ParseError, TapError) as e:
        print(f"tapflow: {e}", file=sys.stderr)
    except BrokenPipeError:  # `tapflow tail | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
