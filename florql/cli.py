"""The `florql` command: runs, show, query, explain, serve, ui, check, rebuild, demo, replay-server."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from florql import reads
from florql.errors import FlorqlError, UsageError
from florql.uptime import process_age_s


def _connect(args: argparse.Namespace):
    import florql

    options = {}
    if getattr(args, "executor", None):
        options["executor"] = args.executor
    if getattr(args, "ray_address", None):
        options["ray_address"] = args.ray_address
    if getattr(args, "workers", None):
        options["workers"] = args.workers
    return florql.connect(args.store, **options)


def _table(table, max_rows: int = 60) -> str:
    """A readable fixed-width table of an Arrow table."""
    rows = table.slice(0, max_rows).to_pylist()
    names = table.column_names
    cells = [[_fmt(r[n]) for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    line = "  ".join(n.ljust(w) for n, w in zip(names, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    if table.num_rows > max_rows:
        out.append(f"… {table.num_rows - max_rows} more rows ({table.num_rows} in all)")
    else:
        out.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(out)


def _fmt(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _numeric(text: str) -> bool:
    return text.replace(".", "", 1).replace("-", "", 1).replace("e", "", 1).isdigit()


RUNS_SQL = (
    "SELECT run_id, status, script_rel AS script, strftime(started_at, '%Y-%m-%d %H:%M:%S') AS started,"
    " round(duration_s, 1) AS seconds, outer_completed AS iterations, checkpoints_taken AS checkpoints,"
    " round(100 * checkpoint_overhead, 2) AS ckpt_overhead_pct, c.per_checkpoint AS ckpt_bytes,"
    " c.stored AS ckpt_stored_bytes FROM runs LEFT JOIN (SELECT run_id, round(avg(bytes))::BIGINT AS per_checkpoint,"
    " sum(stored_bytes)::BIGINT AS stored FROM checkpoints GROUP BY run_id) c USING (run_id) ORDER BY run_id"
)


def cmd_runs(args: argparse.Namespace) -> int:
    # Straight to the store: a fixed SQL over the `runs` view needs no parsing, binding or replay,
    # and skipping the query API's imports (sqlglot's dialects, the planner) keeps the command quick.
    import duckdb

    from florql.errors import from_duckdb
    from florql.storage.layout import locate_store
    from florql.storage.shared import shared_database

    location = locate_store(args.store)
    database = shared_database(location.db_path)
    try:
        database.sync(location.run_files())
        with database.lease() as conn:
            table = conn.sql(RUNS_SQL).to_arrow_table()
    except duckdb.Error as err:
        raise from_duckdb(err) from err
    print(_table(table, 1000))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    db = _connect(args)
    rows = db.sql("SELECT * FROM runs WHERE run_id = ?", [args.run]).arrow().to_pylist()
    if not rows:
        raise UsageError(f"there is no run {args.run}; see `florql runs`")
    for key, value in rows[0].items():
        print(f"{key:>20}: {_fmt(value)}")
    info = next(t for t in db.tables() if t.name == f"run_{args.run}")
    print(f"\n{'columns of run_' + str(args.run):>20}:")
    for col in info.columns:
        print(f"{col.name:>20}  {col.comment}")
    ckpts = db.sql(
        "SELECT name, bytes, stored_bytes, chunks, round(stall_s * 1000, 2) AS stall_ms,"
        " round(persist_s * 1000, 1) AS persist_ms FROM checkpoints WHERE run_id = ? ORDER BY outer_index, name",
        [args.run],
    ).arrow()
    stored = sum(ckpts.column("stored_bytes").to_pylist())
    # bytes: the state a restore reads; stored_bytes: what the checkpoint added (a shared chunk counts once)
    print(f"\ncheckpoints: {stored} bytes stored in all\n{_table(ckpts, 50)}")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    db = _connect(args)
    result = db.sql(args.sql)
    table = result.arrow()
    fmt = args.format
    if fmt in ("svg", "png") or (fmt == "table" and args.output and _format_of(args.output) in ("svg", "png")):
        _write_chart(result, fmt if fmt != "table" else _format_of(args.output), args.output)
    elif args.output:
        _write(table, fmt if fmt != "table" else _format_of(args.output), args.output)
        print(f"wrote {table.num_rows} rows to {args.output}", file=sys.stderr)
    elif fmt == "table":
        print(_table(table, args.max_rows))
    else:
        _write(table, fmt, None)
    if result.plan is not None:
        print("\nreplayed:\n" + result.plan.describe(), file=sys.stderr)
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    return 0


def _format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext not in ("csv", "json", "parquet", "svg", "png"):
        raise FlorqlError(f"cannot tell the format of {path!r}; pass --format csv|json|parquet|svg|png")
    return ext


def _write_chart(result, fmt: str, path: str | None) -> None:
    """The answer's automatic chart (loop coordinates on x) as an SVG or PNG file."""
    chart = result.plot(title=os.path.basename(path) if path else "")
    if fmt == "svg" and path is None:
        sys.stdout.write(chart.svg() + "\n")
        return
    if path is None:
        raise UsageError("--format png needs -o FILE.png")
    picture = chart.svg().encode() if fmt == "svg" else chart.png()
    with open(path, "wb") as f:
        f.write(picture)
    print(f"wrote a chart of {chart.points()} points in {len(chart.series)} line(s) to {path}", file=sys.stderr)


def _write(table, fmt: str, path: str | None) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        if path is None:
            raise FlorqlError("--format parquet needs -o FILE")
        pq.write_table(table, path)
    elif fmt == "csv":
        table = _flat_for_csv(table)
        if path:
            pacsv.write_csv(table, path)
        else:
            sink = __import__("io").BytesIO()
            pacsv.write_csv(table, sink)
            sys.stdout.write(sink.getvalue().decode())
    elif fmt == "json":
        text = "\n".join(json.dumps(r, default=str) for r in table.to_pylist()) + "\n"
        if path:
            with open(path, "w") as f:
                f.write(text)
        else:
            sys.stdout.write(text)


def _flat_for_csv(table):
    """CSV has no lists or structs: such columns are written as JSON text (`[36, 37]`)."""
    import pyarrow as pa

    for i, field in enumerate(table.schema):
        if pa.types.is_nested(field.type):
            text = pa.array([None if v is None else json.dumps(v, default=str) for v in table.column(i).to_pylist()])
            table = table.set_column(i, pa.field(field.name, pa.string()), text)
    return table


def cmd_explain(args: argparse.Namespace) -> int:
    plan = _connect(args).replay_plan(args.sql)
    before_jobs = process_age_s()  # what `florql query` pays too before its jobs: the interpreter, imports, planning
    print(plan.describe())
    if plan.jobs and before_jobs is not None:
        print(
            f"as a command: ~{before_jobs + plan.est_s:.1f} s (`florql query` first spends ~{before_jobs:.1f} s "
            "starting and planning, as this command did)"
        )
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from florql.storage.database import rebuild
    from florql.storage.layout import locate_store

    loc = locate_store(args.store)
    rebuild(loc.db_path, loc.run_files())
    print(f"rebuilt {loc.db_path} from the run files in {loc.runs_url}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove what no checkpoint needs: chunks that lost their record and dead writes' temporary
    files, in runs that are not recording. Nothing a checkpoint refers to is ever touched."""
    from florql.storage import layout
    from florql.storage.checkpoints import CorruptCheckpoint, find_garbage
    from florql.storage.database import effective_status
    from florql.storage.manifest import Manifest

    if args.older_than < 0:
        raise UsageError(f"--older-than {args.older_than:g}: give an age in seconds, 0 or more")
    files = layout.locate_store(args.store).run_files()
    verb = "would remove" if args.dry_run else "removed"
    total_files = total_bytes = 0
    for run_dir in files.list_dirs("runs"):
        if not run_dir.isdigit():
            continue
        run_id = int(run_dir)
        try:
            manifest = Manifest.from_json(files.get(layout.manifest_path(run_id)))
        except FileNotFoundError:
            continue  # a run id claimed by a process that never wrote its manifest
        except (ValueError, TypeError) as err:
            print(f"run {run_id}: skipped, its manifest cannot be read ({err})")
            continue
        if effective_status(manifest) == "running":
            print(f"run {run_id}: recording now, skipped")
            continue
        try:
            garbage = find_garbage(files, run_id, args.older_than)
        except CorruptCheckpoint as err:
            print(f"run {run_id}: skipped, a checkpoint record cannot be read ({err})")
            continue
        if not args.dry_run:
            for path in garbage.paths:
                files.delete(path)
        if garbage.paths:
            print(f"run {run_id}: {verb} {len(garbage.paths)} files ({_mb(garbage.bytes)}) no checkpoint refers to")
        if garbage.young:
            print(f"run {run_id}: kept {garbage.young} unreferenced files newer than {args.older_than:g} s")
        total_files += len(garbage.paths)
        total_bytes += garbage.bytes
    print(f"{verb} {total_files} files, {_mb(total_bytes)}" if total_files else "nothing to remove")
    return 0


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def cmd_check(args: argparse.Namespace) -> int:
    from florql.check import check_script

    if not os.path.isfile(args.script):
        raise UsageError(f"cannot read {args.script}: no such file")
    findings = check_script(args.script)
    for f in findings:
        print(f"{args.script}:{f.lineno}: {f.message}")
    if not findings:
        print(f"{args.script}: no patterns found that replay cannot restore")
    return 1 if findings else 0


def cmd_replay_server(args: argparse.Namespace) -> int:
    """The store's replay fork servers (one per florql/torch/interpreter version): show or stop them."""
    from florql.replay.warm import running_servers, stop_servers
    from florql.storage.layout import locate_store

    store = None if args.all else locate_store(args.store).home
    if args.action == "stop":
        print(f"stopped {stop_servers(store)} replay server(s)")
        return 0
    servers = running_servers(store)
    if not servers:
        print("no replay server is running: the next replay starts one (a cold start, seconds)")
        return 0
    for info in servers:
        print(
            f"pid {info['pid']}: {_serves(info['store'])}, up {time.time() - info['started_at']:.0f} s, "
            f"stops after {info['idle_timeout_s']:.0f} s idle, {_resident_mb(info['pid'])} MB, "
            f"python {info['python']}, torch {info['torch']}"
            + ("" if info["current"] else " (another florql or torch version's: it stops when idle)")
        )
    return 0


def _serves(store: str) -> str:
    return f"store {store}" if store else "template (forks new stores' servers)"


def _resident_mb(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            kilobytes = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return "?"
    return f"{kilobytes / 1024:.0f}"


def cmd_demo(args: argparse.Namespace) -> int:
    from florql.demo import run_demo

    return run_demo(args.dir)


def cmd_serve(args: argparse.Namespace) -> int:
    from florql.server import run_serve

    return run_serve(args)


def cmd_ui(args: argparse.Namespace) -> int:
    from florql.ui import run_ui

    return run_ui(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="florql", description="Hindsight logging for PyTorch training.")
    parser.add_argument("--store", default=None, help="store folder (default: $FLORQL_HOME or ./.florql)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("runs", help="list the recorded runs").set_defaults(func=cmd_runs)
    p = sub.add_parser("show", help="one run: manifest, columns, checkpoints")
    p.add_argument("run", type=int)
    p.set_defaults(func=cmd_show)
    for name, func, text in (
        ("query", cmd_query, "answer a FlorQL query (replays what is missing)"),
        ("explain", cmd_explain, "show the replay plan of a query"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("sql")
        p.add_argument("--workers", type=int, default=None, help="replay workers (default: GPUs, else CPU cores)")
        p.add_argument("--executor", choices=["local", "ray"], default=None)
        p.add_argument("--ray-address", default=None)
        p.set_defaults(func=func)
        if name == "query":
            p.add_argument("--format", choices=["table", "csv", "json", "parquet", "svg", "png"], default="table")
            p.add_argument("-o", "--output", default=None, help="write the result to a file")
            p.add_argument("--max-rows", type=int, default=60)
    p = sub.add_parser(
        "replay-server",
        help="show or stop the store's replay fork server (it keeps torch imported so replays start warm)",
    )
    p.add_argument("action", nargs="?", choices=["status", "stop"], default="status")
    p.add_argument("--all", action="store_true", help="every store's server of this user, not only this store's")
    p.set_defaults(func=cmd_replay_server)
    sub.add_parser("rebuild", help="recreate the DuckDB file from the run files").set_defaults(func=cmd_rebuild)
    p = sub.add_parser("gc", help="remove checkpoint chunks no checkpoint refers to (left by killed writes)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.add_argument(
        "--older-than",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="leave files younger than this (default 3600): a live persist writes chunks before their record",
    )
    p.set_defaults(func=cmd_gc)
    p = sub.add_parser("check", help="report patterns in a training script that replay cannot restore")
    p.add_argument("script")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("demo", help="record the example run, then ask a hindsight query")
    p.add_argument("--dir", default="florql-demo", help="where the demo project goes (default ./florql-demo)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("serve", help="serve the store to BI tools over the PostgreSQL protocol")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("ui", help="serve a web page of charts: runs, hindsight values, query answers")
    from florql.ui import add_ui_arguments

    add_ui_arguments(p)
    p.set_defaults(func=cmd_ui)
    return parser


def add_listening_arguments(parser: argparse.ArgumentParser, port: int) -> None:
    """The options `florql serve` and `florql ui` share: where to listen, and how to let people in."""
    # SUPPRESS: `florql --store X serve` must keep the global option's value.
    parser.add_argument("--store", default=argparse.SUPPRESS, help="store directory (default .florql/ or $FLORQL_HOME)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=port, help=f"port to listen on (default {port})")
    parser.add_argument("--password-file", help="file holding the password (required unless listening on loopback)")
    parser.add_argument("--tls-cert", help="PEM certificate for TLS")
    parser.add_argument("--tls-key", help="PEM private key for TLS")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """`florql serve`'s options; here so that other commands never import the server."""
    add_listening_arguments(parser, 5433)
    parser.add_argument(
        "--replay-budget",
        type=_duration,
        default=60.0,
        help="ceiling on the replay a query may trigger, e.g. 60, '10 min', 'unlimited' (default 60 s); SET may only lower it",
    )
    parser.add_argument(
        "--session-budget",
        type=_duration,
        default=None,
        help="every session's starting budget (default: --replay-budget); analysts may lower it, admins raise it up to --replay-budget",
    )
    parser.add_argument(
        "--max-workers", type=int, help="replay slots shared by all sessions; no session may SET workers above it"
    )
    parser.add_argument(
        "--no-replay", action="store_true", help="serve stored values only; a NOTICE names what a replay would compute"
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="clients connected at once (default 64); one more is refused with SQLSTATE 53300",
    )
    parser.add_argument(
        "--statement-timeout",
        type=_duration,
        default=None,
        help="ceiling on one statement's time, replay included, e.g. '10 min' (default none); "
        "a client's SET statement_timeout may only lower it",
    )
    parser.add_argument("--users-file", help="users, roles and SCRAM verifiers (write one with --add-user)")
    parser.add_argument("--add-user", metavar="NAME", help="add or replace NAME in --users-file, then exit")
    parser.add_argument(
        "--role", choices=("reader", "analyst", "admin"), default="analyst", help="the role --add-user gives"
    )


def _duration(text: str) -> float | None:
    from florql.api import parse_duration

    try:
        return parse_duration(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    reads.stop()  # the CLI is the query side: it records no run
    try:
        return args.func(args)
    except FlorqlError as err:
        print(f"florql: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
