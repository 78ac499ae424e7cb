"""The `dicom-router` command: serve, check, explain, transcode, queue, trace, pause, resume.

A thin shell over functions the tests also call. Exit codes: 0 ok, 1 runtime failure,
2 invalid configuration or usage. Every value that may have come from the network (UIDs, AE
titles, destinations' and pydicom's messages, attribute values) is printed through
`router.text` (`escape`, `field`): no control character reaches the terminal raw.
"""

from __future__ import annotations

import argparse
import functools
import os
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from router import __version__
from router.text import escape, field

if TYPE_CHECKING:
    from router import config

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _load(path: str):  # noqa: ANN202
    from router import config

    return config.load(path)


def _load_or_say_why(path: str):  # noqa: ANN202
    """The loaded configuration, or None after printing every problem to stderr."""
    from router.config import ConfigError

    try:
        return _load(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def _metrics_across_processes(spool_dir: Path, node: str = "") -> None:
    """Counters of every receiving process are summed from files here (set before prometheus_client
    is imported; emptied at each start). Nodes sharing a spool each have their own."""
    import os
    import shutil

    directory = spool_dir / "metrics" / node if node else spool_dir / "metrics"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700, parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def _configured(command: Callable[[argparse.Namespace, config.Loaded], int]) -> Callable[[argparse.Namespace], int]:
    """`command` given the configuration, loaded; EXIT_CONFIG, saying why, when it does not load."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        cfg = _load_or_say_why(args.config)
        if cfg is None:
            return EXIT_CONFIG
        return command(args, cfg)

    return run


def cmd_serve(args: argparse.Namespace) -> int:
    from router import log
    from router.config import ConfigError

    log.configure(args.log_format, args.log_level)
    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        log.get("cli").error("invalid_configuration", error=str(exc))
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    cfg.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _metrics_across_processes(cfg.spool_dir, cfg.router.queue.node if cfg.router.queue.url else "")
    from router.operate.service import Router

    try:
        Router(cfg, args.log_format, args.log_level).serve_forever()
    except RuntimeError as exc:
        log.get("cli").error("cannot_start", error=str(exc))
        return EXIT_FAILURE
    return EXIT_OK


def cmd_conformance(args: argparse.Namespace) -> int:
    from router.operate.conformance import statement

    cfg = None
    if args.config:
        cfg = _load_or_say_why(args.config)
        if cfg is None:
            return EXIT_CONFIG
    sys.stdout.write(statement(cfg))
    return EXIT_OK


def _check_deidentify(path: Path, number: int, rule) -> None:  # noqa: ANN001 - config.Rule
    """What a de-identifying rule does, and what in it may defeat it."""
    from router.codecs.deidentify import EDITION
    from router.codecs.header import is_identity

    deid = rule.deidentify
    where = f"{path}: rule {number}" + (f" ({rule.name!r})" if rule.name else "")
    options = ", ".join(deid.options) or "none"
    burned = "sent all the same" if deid.burned_in == "allow" else "refused (dead letters)"
    print(escape(f"{where}: de-identifies: PS3.15 E.1-1 ({EDITION}) basic profile; options: {options}; "
                 f"images that may carry burned-in identity: {burned}"))
    for attribute, text in rule.template.items():
        if any(is_identity(field) for _, field, _, _ in string.Formatter().parse(text) if field):
            print(escape(f"{where}: warning: template {attribute} reads the received header: it puts identity "
                         "back into the de-identified copy"))
    try:
        if deid.secret_file.stat().st_mode & 0o077:
            print(escape(f"{where}: warning: {deid.secret_file} can be read by other users; chmod 600 it"))
    except OSError:
        pass


@_configured
def cmd_check(args: argparse.Namespace, cfg: config.Loaded) -> int:
    from router.forward.waiting import pacing

    print(f"{cfg.path}: ok")
    for dest in cfg.destinations:
        d = dest.destination
        paced = pacing(d)
        protocol = "DICOMweb STOW-RS" if d.protocol == "dicomweb" else "DIMSE C-STORE"
        auth = f", {type(d.auth).__name__.removesuffix('Auth').replace('OAuth2', 'OAuth2 client credentials')} " \
               "authentication" if d.auth is not None else ""
        print(escape(f"{dest.path}: ok: destination {dest.name} -> {d.address} ({protocol}{auth}), "
                     f"{len(dest.rules)} rule(s)" + (f"; {paced}" if paced else "")))
        if d.protocol == "dicomweb" and d.url.startswith("http://") and d.auth is not None:
            print(f"{dest.path}: warning: {dest.name}'s credentials go in clear over http://; use https://")
        for number, rule in enumerate(dest.rules, start=1):
            if rule.deidentify is not None:
                _check_deidentify(dest.path, number, rule)
        last = dest.rules[-1]
        if last.match:
            print(f"{dest.path}: note: the last rule has a match table; instances matching no rule are not "
                  f"forwarded to {dest.name}")
    if not cfg.destinations:
        print(f"{cfg.router.rules.dir}: note: no rule files: received instances go nowhere")
    commitment = cfg.router.commitment
    if commitment.mode == "relay":
        asked = {dest.name: dest.destination.commitment_scp for dest in cfg.destinations}
        for name, scp in sorted(asked.items()):
            if scp is not None:
                print(f"commitment: relay: {name}'s storage commitment SCP {scp.ae_title}@{scp.host}:{scp.port} is "
                      f"asked after delivery; it must know this router as {cfg.router.listen.ae_title} to report")
        if not any(asked.values()):
            print("commitment: note: mode = \"relay\" but no destination has `commitment` set: every destination's "
                  "C-STORE success is its commitment, as in \"delivered\"")
    audit = cfg.router.audit
    if audit.url:
        mutual = " (mutual TLS)" if audit.tls is not None and audit.tls.cert is not None else ""
        print(escape(f"audit: IHE ATNA messages to {audit.url}{mutual}, Audit Source ID "
                     f"{audit.source_id or '(the node name)'}; waiting records at most {audit.max_spool_mb} MB"))
        if audit.transport == "udp":
            print("audit: note: over UDP a message the repository does not get is lost; tls:// keeps them")
    else:
        print("audit: note: no [audit] url: no audit messages are made (IHE ATNA needs a repository)")
    queue = cfg.router.queue
    if queue.url:
        from router.queue.postgres import probe

        try:
            print(f"queue: node {queue.node} on {probe(queue.url)}")
        except Exception as exc:  # noqa: BLE001 - say why, in one line
            print(escape(f"queue: cannot use {queue.url.split('@')[-1]}: {str(exc).strip().splitlines()[0]}"))
            return EXIT_FAILURE
    return EXIT_OK


@_configured
def cmd_explain(args: argparse.Namespace, cfg: config.Loaded) -> int:
    from router.receive.intake import decide_for
    from router.rules import Context

    context = Context(calling_ae=args.calling_ae, called_ae=args.called_ae or cfg.router.listen.ae_title,
                      source_ip=args.source_ip)
    status = EXIT_OK
    for name in args.files:
        try:
            header, decisions = decide_for(Path(name), context, cfg.destinations)
        except Exception as exc:  # noqa: BLE001 - the router would refuse it with the same words
            print(escape(f"{name}: cannot read: {exc}"))
            status = EXIT_FAILURE
            continue
        ts = header.file_meta.get("TransferSyntaxUID", "?")
        print(escape(f"{name}: {header.get('Modality', '?')} {header.get('SOPClassUID', '?')} in {ts}"))
        now = time.time()
        for rule_file, decision in decisions:
            target = decision.syntax if decision.forward else "not forwarded"
            print(escape(f"  {rule_file.name}: {target}  ({decision.reason})"))
            if decision.forward:
                print(f"  {' ' * len(rule_file.name)}  {_when(rule_file.destination, decision.priority, now)}")
            if decision.request is not None and decision.request.header:
                status = max(status, _explain_header(rule_file.name, header, decision.request, args.show_values))
    return status


def _explain_header(name: str, received, request, show_values: bool) -> int:  # noqa: ANN001
    """The header changes `request`'s rules would make: attribute, before -> after; values of
    patient identity hidden unless asked."""
    from router.codecs import header as rules

    indent = " " * (len(name) + 4)
    try:
        changes = rules.apply(rules.plan(received, request.header))
    except rules.HeaderRefused as exc:
        print(escape(f"{indent}header rules ({request.header_rule}): not sent: {exc}"))
        return EXIT_FAILURE
    if not changes:
        print(escape(f"{indent}header rules ({request.header_rule}): nothing to change"))
    for change in changes:
        def shown(value: str | None, after: bool = False) -> str:
            if value is None:
                return "(removed)" if change.action == "deidentify" and after else (
                    "(absent)" if change.action != "remove" else "(removed)")
            if after and change.action == "deidentify":
                return repr(value)  # a pseudonym, a dummy, a new UID: never the patient's
            if rules.is_identity(change.attribute, change.action) and not show_values:
                return "(value hidden: --show-values)"
            return repr(value)

        if change.action == "remove":
            print(escape(f"{indent}remove {change.attribute}" + (
                f": {shown(change.before)} -> (removed)" if change.before is not None else " (the group)")))
            continue
        print(escape(f"{indent}{change.action} {change.attribute}: {shown(change.before)} -> "
                     f"{shown(change.after, after=True)}"))
    return EXIT_OK


def _when(destination, priority: str, now: float) -> str:  # noqa: ANN001
    """When an instance received now would be sent to `destination`, and why then."""
    from router.forward.waiting import when

    at, why = when(destination, now)
    said = "now" if at <= now else (
        "never" if at == float("inf") else time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(at)))
    return f"sent {said} if received now ({why}); priority {priority} (high with a C-STORE Priority HIGH)"


def cmd_transcode(args: argparse.Namespace) -> int:
    """Exit 0 with the output written (a copy of the input when left alone); 2 for a bad option;
    1 with one line on stderr for any input it cannot take, whatever the reason."""
    import shutil
    import warnings

    from router import codecs
    from router.codecs.transcode import transcode_file
    from router.request import Request

    if args.destination:  # what that destination's rules make of this file, header rules included
        found = _destination_request(args)
        if isinstance(found, int):
            return found
        request = found
    elif not args.syntax:
        print("dicom-router transcode: give --syntax, or --config and --destination", file=sys.stderr)
        return EXIT_CONFIG
    else:
        request = Request(syntax=args.syntax, quality=args.quality, near=args.near, ratio=args.ratio,
                          fallback=args.fallback, verify=args.verify, max_error=args.max_error,
                          keep_sop_instance_uid=args.keep_uid)
    try:
        syntax = codecs.get(request.syntax)
        if request.fallback is not None:
            codecs.get(request.fallback)
        codecs.check_params(syntax, request.params)
    except codecs.ParameterError as exc:
        print(f"dicom-router transcode: --{exc.field}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyError as exc:
        print(escape(f"{args.input}: {exc.args[0] if exc.args else exc}"), file=sys.stderr)
        return EXIT_FAILURE
    try:
        # what pydicom warns about a damaged input is said, if it matters, in the one line below
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transcoded = transcode_file(Path(args.input), Path(args.output), request,
                                        max_decoded_bytes=args.max_decoded_mb * 2**20)
            if not transcoded.changed:
                shutil.copyfile(args.input, args.output)
    except Exception as exc:  # noqa: BLE001 - any input it cannot take: one line, no traceback
        print(escape(_one_line(args.input, exc)), file=sys.stderr)
        return EXIT_FAILURE
    ratio = f", ratio {transcoded.ratio:.2f}" if transcoded.ratio else ""
    print(escape(f"{args.output}: {transcoded.syntax} ({transcoded.transfer_syntax_uid}){ratio}: {transcoded.note}"))
    return EXIT_OK


def _destination_request(args: argparse.Namespace):  # noqa: ANN202 - a Request, or an exit code
    from router import config
    from router.receive.intake import decide_for
    from router.rules import Context

    if not args.config:
        print("dicom-router transcode: --destination needs --config", file=sys.stderr)
        return EXIT_CONFIG
    try:
        cfg = config.load(args.config)
        rule_file = cfg.destination(args.destination)
    except config.ConfigError as exc:
        print(escape(str(exc)), file=sys.stderr)
        return EXIT_CONFIG
    except KeyError:
        print(escape(f"dicom-router transcode: no destination {args.destination!r} in {args.config}"),
              file=sys.stderr)
        return EXIT_CONFIG
    try:
        _, [(_, decision)] = decide_for(Path(args.input), Context("", cfg.router.listen.ae_title, ""), [rule_file])
    except Exception as exc:  # noqa: BLE001 - the router would refuse it with the same words
        print(escape(_one_line(args.input, exc)), file=sys.stderr)
        return EXIT_FAILURE
    if decision.request is None:
        print(escape(f"{args.input}: not forwarded to {args.destination} ({decision.reason})"), file=sys.stderr)
        return EXIT_FAILURE
    return decision.request


def _one_line(path: str, exc: BaseException) -> str:
    """``exc`` said on one line that names ``path`` once."""
    from router.codecs.transcode import TranscodeError

    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror if exc.filename in (None, path) else f"{exc.filename}: {exc.strerror}"
    else:
        text = " ".join(str(exc).split())
    if not isinstance(exc, TranscodeError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if text.startswith(f"{path}: ") else f"{path}: {text}"


@_configured
def cmd_trace(args: argparse.Namespace, cfg: config.Loaded) -> int:
    """Where the instances of a study, series or SOP instance are, at each destination."""
    import json

    from router.operate.trace import summary, trace
    from router.queue import open_queue

    found = trace(open_queue(cfg), study=args.study, series=args.series, sop=args.sop)
    if args.json:
        print(json.dumps({"summary": summary(found), "instances": [w.as_dict() for w in found]}, indent=2))
    else:
        for where in found:
            print(escape(where.line()))
        print(escape(summary(found)))
    return EXIT_OK


@_configured
def cmd_hold(args: argparse.Namespace, cfg: config.Loaded) -> int:
    """pause / resume a destination; persisted in the spool, seen by a running router within a second."""
    from router import log
    from router.queue.holds import Holds

    names = [d.name for d in cfg.destinations]
    if args.destination not in names:
        print(f"no destination {args.destination!r} (known: {', '.join(names) or 'none'})", file=sys.stderr)
        return EXIT_CONFIG
    holds = Holds(cfg.spool_dir)
    changed = holds.pause(args.destination) if args.verb == "pause" else holds.resume(args.destination)
    state = "paused" if args.verb == "pause" else "resumed"
    if changed:
        log.get("cli").warning(f"destination_{state}", destination=args.destination)
        print(f"{args.destination}: {state}" + (": it keeps receiving into its queue" if state == "paused" else ""))
    else:
        print(f"{args.destination}: already {'paused' if state == 'paused' else 'sending'}")
    return EXIT_OK


@_configured
def cmd_queue(args: argparse.Namespace, cfg: config.Loaded) -> int:
    from router.queue import open_queue

    queue = open_queue(cfg)
    if args.action == "purge":
        return _purge(cfg, queue, args)
    if args.action == "retry":
        count = queue.retry_dead(args.destination, args.job)
        print(f"{count} dead letter(s) put back to pending")
        print("a running router picks them up within a second")
        return EXIT_OK
    from router.forward.waiting import waiting
    from router.queue.holds import Holds

    counts = queue.counts()
    oldest = queue.oldest_pending()
    paused = Holds(cfg.spool_dir).paused()
    now = time.time()
    rule_files = {d.name: d for d in cfg.destinations}
    names = sorted({d.name for d in cfg.destinations} | {d for d, _ in counts})
    print(f"{'destination':20} {'pending':>8} {'in_flight':>9} {'dead':>6} {'oldest_pending':>15}  state")
    for name in names:
        if args.destination and name != args.destination:
            continue
        age = oldest.get(name)
        state = (f"paused since {time.strftime('%Y-%m-%d %H:%M', time.localtime(paused[name]))}"
                 if name in paused else "-")
        if name not in paused and name in rule_files:
            state = waiting(name, rule_files[name].destination, queue, now).describe(now)
        print(f"{escape(name):20} {counts.get((name, 'pending'), 0):>8} {counts.get((name, 'in_flight'), 0):>9} "
              f"{counts.get((name, 'dead'), 0):>6} {(f'{age:.0f}s' if age is not None else '-'):>15}  {escape(state)}")
    nodes = queue.nodes()
    if nodes:
        print()
        print(f"{'node':20} {'host':20} {'pid':>7} {'heartbeat':>10} {'in_flight':>9}  state")
        for node in nodes:
            state = "alive" if node.alive else "gone: its jobs are taken over once their leases expire"
            age = f"{node.heartbeat_age_s:.0f}s ago"
            print(f"{escape(node.name):20} {escape(node.host):20} {node.pid:>7} {age:>10} {node.jobs_held:>9}  {state}")
    if args.action == "dead" or args.verbose:
        state = "dead" if args.action == "dead" else None
        listed = queue.jobs(args.destination, state)
        owners = queue.owners([job.id for job in listed if job.state == "in_flight"]) if nodes else {}
        for job in listed:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.instance.received_at))
            node = f" node={field(owners[job.id])}" if job.id in owners else ""
            print(f"job {job.id} {field(job.destination)} {job.state}{node} attempts={job.attempts} received={when} "
                  f"sop_instance_uid={field(job.instance.sop_instance_uid)} error={escape(job.last_error or '-')}")
    return EXIT_OK


def parse_duration(text: str) -> float:
    """'90s', '30m', '12h', '7d' (or plain seconds) -> seconds, for argparse (`schedule.parse_duration`)."""
    from router.schedule import parse_duration as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _purge(cfg, queue, args: argparse.Namespace) -> int:  # noqa: ANN001
    """Drop dead letters deliberately: only with --dead and --yes; logged and counted."""
    from router import log

    if not args.dead:
        print("queue purge drops dead letters only: say --dead", file=sys.stderr)
        return EXIT_CONFIG
    older_than = time.time() - args.older_than if args.older_than is not None else None
    if not args.yes:
        print(f"would drop the dead letters of {args.destination or 'every destination'}"
              + (f" dead for more than {args.older_than:.0f}s" if older_than is not None else "")
              + ": add --yes to drop them (nothing is dropped without it)", file=sys.stderr)
        return EXIT_FAILURE
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(cfg.spool_dir / "metrics"))
    from router import metrics
    from router.queue.spool import Spool

    purged = queue.purge_dead(args.destination, older_than)
    still = set(queue.paths())
    spool = Spool(cfg.spool_dir)
    for path in {job.instance.path for job in purged} - still:
        spool.remove(path)
    for job in purged:
        metrics.PURGED.labels(destination=job.destination).inc()
        log.get("cli").warning("dead_letter_purged", destination=job.destination,
                               sop_instance_uid=job.instance.sop_instance_uid, error=job.last_error)
    print(f"{len(purged)} dead letter(s) dropped")
    return EXIT_OK


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-router", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dicom-router {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="receive, queue, transcode and forward until SIGTERM")
    serve.add_argument("--config", required=True, help="path to router.toml")
    serve.add_argument("--log-format", choices=["json", "console"], default="json",
                       help="json (default): one event per line; console: for humans")
    serve.add_argument("--log-level", default="info", help="debug, info (default), warning, error")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check", help="validate router.toml and every rule file; exit 2 naming what is wrong")
    check.add_argument("--config", required=True)
    check.set_defaults(func=cmd_check)

    conformance = sub.add_parser("conformance", help="print the DICOM Conformance Statement (Markdown), for the "
                                                     "default configuration or a site's own")
    conformance.add_argument("--config", help="router.toml: the site's AE title, destinations and rules")
    conformance.set_defaults(func=cmd_conformance)

    explain = sub.add_parser("explain", help="print, per file and destination, the rule that matches and why")
    explain.add_argument("--config", required=True)
    explain.add_argument("--calling-ae", default="", help="CallingAE to assume (default: empty)")
    explain.add_argument("--called-ae", default="", help="CalledAE to assume (default: the listen AE title)")
    explain.add_argument("--source-ip", default="", help="SourceIP to assume (default: empty)")
    explain.add_argument("--show-values", action="store_true",
                         help="header rules: show the values of patient identity too (hidden by default)")
    explain.add_argument("files", nargs="+")
    explain.set_defaults(func=cmd_explain)

    from router.codecs import all_syntaxes

    def declared(name: str) -> str:
        """The syntaxes that take parameter `name`, with its bounds and default, from the registry."""
        ranges: dict[str, list[str]] = {}
        for syntax in all_syntaxes():
            for p in syntax.params:
                if p.name == name:
                    default = f", default {p.default}" if p.default is not None else ""
                    ranges.setdefault(f"{p.minimum}-{p.maximum}{default}", []).append(syntax.name)
        return "; ".join(f"{', '.join(names)}: {bounds}" for bounds, names in ranges.items())

    from router.config import Transcode

    max_decoded_mb = Transcode.model_fields["max_decoded_mb"].default
    transcode = sub.add_parser("transcode", help="run the router's transcoder on one file, offline")
    transcode.add_argument("--syntax", help="registry name (e.g. jpeg-ls-lossless) or UID")
    transcode.add_argument("--config", help="with --destination: router.toml")
    transcode.add_argument("--destination", help="write what this destination's rules make of the file "
                                                 "(its syntax and header rules) instead of --syntax")
    transcode.add_argument("--quality", type=int, help=f"encoder quality ({declared('quality')})")
    transcode.add_argument("--near", type=int, help=f"largest pixel error ({declared('near')})")
    transcode.add_argument("--ratio", type=float, help=f"target compression ratio ({declared('ratio')})")
    transcode.add_argument("--fallback", help="syntax for images the chosen one cannot carry")
    transcode.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                           help="decode again and compare (default: on for lossless syntaxes)")
    transcode.add_argument("--max-error", type=int, help="lossy: largest allowed absolute pixel difference")
    transcode.add_argument("--keep-uid", action="store_true", help="lossy output keeps the SOP Instance UID")
    transcode.add_argument("--max-decoded-mb", type=_positive, default=max_decoded_mb, metavar="MB",
                           help="refuse an input whose header declares more decoded pixel data, in MiB "
                                f"(default {max_decoded_mb}, as [transcode] max_decoded_mb)")
    transcode.add_argument("input")
    transcode.add_argument("output")
    transcode.set_defaults(func=cmd_transcode)

    queue = sub.add_parser("queue", help="show pending, in-flight and dead jobs; 'retry' puts dead letters back")
    queue.add_argument("action", nargs="?", choices=["list", "dead", "retry", "purge"], default="list",
                       help="list (default), dead (list dead letters), retry (dead letters back to pending), "
                            "purge (drop dead letters: needs --dead and --yes)")
    queue.add_argument("--config", required=True)
    queue.add_argument("--destination", help="only this destination (rule file name without .toml)")
    queue.add_argument("--job", type=int, action="append", help="retry: only this job id (repeatable)")
    queue.add_argument("-v", "--verbose", action="store_true", help="list: also print every job")
    queue.add_argument("--dead", action="store_true", help="purge: the dead letters (the only thing purge drops)")
    queue.add_argument("--older-than", type=parse_duration, metavar="DURATION",
                       help="purge: only those dead for longer than this (90s, 30m, 12h, 7d)")
    queue.add_argument("--yes", action="store_true", help="purge: really drop them")
    queue.set_defaults(func=cmd_queue)

    tracer = sub.add_parser("trace", help="where each instance of a study, series or SOP instance is, per destination")
    tracer.add_argument("--config", required=True)
    which = tracer.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="UID", help="Study Instance UID")
    which.add_argument("--series", metavar="UID", help="Series Instance UID")
    which.add_argument("--sop", metavar="UID", help="SOP Instance UID, as received or as sent")
    tracer.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    tracer.set_defaults(func=cmd_trace)

    for verb, what in (("pause", "put a destination on hold: it keeps receiving into its queue, sends nothing"),
                       ("resume", "take a destination off hold")):
        hold = sub.add_parser(verb, help=what)
        hold.add_argument("destination", help="the destination (rule file name without .toml)")
        hold.add_argument("--config", required=True)
        hold.set_defaults(func=cmd_hold, verb=verb)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.func not in (cmd_serve, cmd_transcode):
        # the command's own process: its events (and pydicom's warnings) are for the person at the
        # terminal, escaped; serve says how it logs, transcode says one line, and a caller of
        # main() keeps its own logging
        from router import log

        log.configure("console", "warning")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
