"""Differential testing of hindsight answers ("no silent wrong answers").

Two kinds of store hold the same runs of the same deterministic training script:

- a GROUND-TRUTH store recorded the *full* script (scripts/full.py), which logs every hindsight
  name from the start; one such store per variant of the script (full.py, and full_b: full.py with
  `w_norm` of the last layer);
- the RECORDED store recorded scripts/minimal.py (only `loss` per step and `val_acc` per epoch);
  afterwards the project's current train.py is replaced by the full script, so the hindsight
  names are loggable and asking for them replays part of the recorded run.

Both have run 1 (defaults) and run 2 (`lr=0.05`). The expected answer to a query comes from the
`Oracle`: the ground-truth store answers only the simplest query over each table the query uses
(`SELECT <its columns> FROM run_<id>`), and plain DuckDB evaluates the query over those relations,
so CTEs, unions, joins and subqueries do not go through florql's binder on the expected side. The
recorded store must give the same answer, bit for bit; it may instead refuse with a FlorqlError
that says what went wrong, never answer differently. Used by tests/test_differential.py and
benchmarks/differential.py.
"""

from __future__ import annotations

import collections
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from hypothesis import strategies as st

import florql
from florql.errors import FlorqlError, MissingHindsight, ReplayFailed

SCRIPTS = Path(__file__).resolve().parent / "scripts"
EPOCHS, STEPS = 6, 6
RUN_ARGS: dict[int, tuple[str, ...]] = {1: (), 2: ("lr=0.05",)}
VARIANTS = ("full", "full_b")  # the current code of the recorded store; full_b changes `w_norm`

EPOCH_NAMES = ("val_acc", "w_start", "w_norm", "recent", "even_only")  # logged once per epoch
STEP_NAMES = ("loss", "grad_norm")  # logged once per step
LOGGED = ("loss", "val_acc")  # what minimal.py logs
HINDSIGHT = ("w_start", "grad_norm", "w_norm", "recent", "even_only")
HELPER_HINDSIGHT = ("h_w_start", "h_grad_norm", "h_w_norm", "h_train_loss")  # helper_full.py over helper_min.py
LOOPS = ("epoch", "step")


# ---- recording ----------------------------------------------------------------------------------
def env_for(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FLORQL_ARGS", "FLORQL_RUNS", "FLORQL_REPLAY_JOB", "FLORQL_EXECUTOR")
    }
    env["FLORQL_HOME"] = str(home)
    return env


W_NORM = 'florql.log("w_norm", float(net[0].weight.detach().norm()))'


def script_source(script: str) -> str:
    """The text of scripts/<script>; full_b.py is full.py with `w_norm` of the last layer instead."""
    if script == "full_b.py":
        source = (SCRIPTS / "full.py").read_text()
        assert W_NORM in source
        return source.replace(W_NORM, W_NORM.replace("net[0]", "net[-1]"))
    return (SCRIPTS / script).read_text()


def set_code(work: Path, script: str) -> None:
    """Make scripts/<script> the project's current train.py."""
    (work / "train.py").write_text(script_source(script))


def record(work: Path, script: str, args: tuple[str, ...] = ()) -> None:
    """Run scripts/<script> as <work>/train.py, into the store <work>/.florql."""
    set_code(work, script)
    cmd = [sys.executable, "train.py", *(["--florql-args", *args] if args else [])]
    proc = subprocess.run(cmd, cwd=work, env=env_for(work / ".florql"), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(
            f"recording {script} {' '.join(args)} in {work} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )


def connect(home: Path, **options: Any) -> florql.api.Connection:
    options.setdefault("workers", 1)
    options.setdefault("executor", "local")
    return florql.connect(home, progress=False, **options)


@dataclass
class Lab:
    """The ground-truth stores, the recorded project (its store and a pristine copy of it), and the
    same for the pytorch/examples layout (helper_*.py)."""

    base: Path
    truth: dict[str, Path]  # variant → .florql of a store that logged everything from the start
    work: Path  # the recorded project: train.py is the current code, .florql its store
    pristine: Path  # the recorded store right after recording: no replays yet
    helper_truth: Path | None = None
    helper_work: Path | None = None
    helper_pristine: Path | None = None
    current: str = "full"
    build_s: float = 0.0

    @property
    def home(self) -> Path:
        return self.work / ".florql"

    def use_code(self, variant: str) -> None:
        """Make `variant` (full or full_b) the recorded project's current code."""
        assert variant in VARIANTS, variant
        if variant != self.current or (self.work / "train.py").read_text() != script_source(f"{variant}.py"):
            set_code(self.work, f"{variant}.py")
        self.current = variant

    def restore(self) -> None:
        """Put the shared recorded store back to its state right after recording."""
        shutil.rmtree(self.home)
        shutil.copytree(self.pristine, self.home)

    def fresh(self, dest: Path) -> Path:
        """A private copy of the pristine recorded store (its runs' project is still `work`)."""
        target = dest / "recorded-store"
        shutil.copytree(self.pristine, target)
        return target

    def fresh_helper(self, dest: Path) -> Path:
        assert self.helper_pristine is not None
        target = dest / "helper-store"
        shutil.copytree(self.helper_pristine, target)
        return target

    def truth_home(self, variant: str | None = None) -> Path:
        return self.truth[variant or self.current]


def build_lab(base: Path, helper: bool = True, parallel: int = 3) -> Lab:
    """Record every store (each in its own project folder), in parallel chains of runs."""
    started = time.monotonic()
    base.mkdir(parents=True, exist_ok=True)
    runs = sorted(RUN_ARGS)
    chains: dict[str, tuple[list[tuple[str, tuple[str, ...]]], str | None]] = {
        "recorded": ([("minimal.py", RUN_ARGS[r]) for r in runs], "full.py"),
        "truth-full": ([("full.py", RUN_ARGS[r]) for r in runs], None),
        "truth-full_b": ([("full_b.py", RUN_ARGS[r]) for r in runs], None),
    }
    if helper:
        chains["helper-recorded"] = ([("helper_min.py", ())], "helper_full.py")
        chains["helper-truth"] = ([("helper_full.py", ())], None)

    def run_chain(name: str) -> None:
        steps, final = chains[name]
        work = base / name
        work.mkdir()
        for script, args in steps:
            record(work, script, args)
        if final:
            set_code(work, final)
        connect(work / ".florql").sync()
        ids = sorted(int(d.name) for d in (work / ".florql" / "runs").iterdir() if d.name.isdigit())
        assert ids == list(range(1, len(steps) + 1)), (name, ids)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(run_chain, chains))
    lab = Lab(
        base=base,
        truth={"full": base / "truth-full" / ".florql", "full_b": base / "truth-full_b" / ".florql"},
        work=base / "recorded",
        pristine=base / "recorded-pristine",
    )
    shutil.copytree(lab.home, lab.pristine)
    if helper:
        lab.helper_truth = base / "helper-truth" / ".florql"
        lab.helper_work = base / "helper-recorded"
        lab.helper_pristine = base / "helper-pristine"
        shutil.copytree(lab.helper_work / ".florql", lab.helper_pristine)
    lab.build_s = time.monotonic() - started
    return lab


# ---- comparing answers --------------------------------------------------------------------------
def canon(value: Any) -> tuple[str, str]:
    """A value as a sortable, bit-exact key: floats by their IEEE bits (every NaN equal)."""
    if value is None:
        return ("", "")
    if isinstance(value, float):
        return ("float", "nan" if math.isnan(value) else struct.pack(">d", value).hex())
    return (type(value).__name__, repr(value))


def _rows(table: pa.Table) -> list[tuple]:
    columns = [c.to_pylist() for c in table.columns]
    return list(zip(*columns)) if columns else [()] * table.num_rows


def table_diff(truth: pa.Table, got: pa.Table, ordered: bool) -> str | None:
    """None when `got` equals `truth` (same column names and types, bit-exact values; as sorted
    multisets of rows unless `ordered`); else what differs."""
    if truth.column_names != got.column_names:
        if sorted(map(str.lower, truth.column_names)) == sorted(map(str.lower, got.column_names)):
            return f"column order differs: truth {truth.column_names}, recorded {got.column_names}"
        return f"columns differ: truth {truth.column_names}, recorded {got.column_names}"
    t_types, g_types = [str(f.type) for f in truth.schema], [str(f.type) for f in got.schema]
    if t_types != g_types and truth.num_rows + got.num_rows > 0:
        return f"column types differ: truth {t_types}, recorded {g_types}"
    t_rows, g_rows = _rows(truth), _rows(got)
    t_keys = [tuple(canon(v) for v in r) for r in t_rows]
    g_keys = [tuple(canon(v) for v in r) for r in g_rows]
    if ordered:
        if t_keys == g_keys:
            return None
        first = next((i for i, (a, b) in enumerate(zip(t_keys, g_keys)) if a != b), min(len(t_keys), len(g_keys)))
        return (
            f"{len(t_rows)} rows in truth, {len(g_rows)} recorded; first difference at row {first}: truth "
            f"{t_rows[first] if first < len(t_rows) else '-'}, recorded {g_rows[first] if first < len(g_rows) else '-'}"
        )
    if sorted(t_keys) == sorted(g_keys):
        return None
    t_count, g_count = collections.Counter(t_keys), collections.Counter(g_keys)
    by_key_t = dict(zip(t_keys, t_rows))
    by_key_g = dict(zip(g_keys, g_rows))
    missing = [by_key_t[k] for k in (t_count - g_count).elements()]
    extra = [by_key_g[k] for k in (g_count - t_count).elements()]
    return (
        f"{len(t_rows)} rows in truth, {len(g_rows)} recorded; only in truth ({len(missing)}): {_few(missing)}; "
        f"only in recorded ({len(extra)}): {_few(extra)}"
    )


def _few(rows: list[tuple], n: int = 4) -> str:
    text = ", ".join(repr(r) for r in sorted(rows, key=lambda r: [canon(v) for v in r])[:n])
    return f"[{text}{', …' if len(rows) > n else ''}]"


KNOWN_WORDS = {*LOOPS, *LOGGED, *HINDSIGHT, *HELPER_HINDSIGHT, "run_id", "metrics"}


def names_what_went_wrong(message: str, sql: str) -> bool:
    """The refusal names something of the query: a column, a table, a run, or a replayed name."""
    text = message.lower()
    if len(text.strip()) < 10:
        return False
    words = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", sql)}
    mentioned = {w for w in words if w in KNOWN_WORDS or re.fullmatch(r"run_\d+", w)}
    if not mentioned:
        return True
    for word in mentioned:
        if word in text:
            return True
        run = re.fullmatch(r"run_(\d+)", word)
        if run and f"run {run.group(1)}" in text:
            return True
    return False


# ---- queries with their table references ----------------------------------------------------------
CANON_ORDER = ("run_id", *LOOPS, *LOGGED, *HINDSIGHT, *HELPER_HINDSIGHT)


@dataclass(frozen=True)
class Ref:
    """One reference to a florql table in a query, with every column the query uses from it."""

    table: str  # run_<id>, metrics, or the base table runs
    columns: frozenset[str] = frozenset()
    star: bool = False  # `*` over it: every column, the run's own rows (its finest grain)
    alias: str = ""
    spelling: str = ""  # how the query spells the table name (identifiers are case-insensitive)
    counts_rows: bool = False  # count(*) over it: see COUNT_STAR_FINEST

    def florql(self) -> str:
        name = self.spelling or self.table
        return f"{name} {self.alias}" if self.alias else name

    def oracle(self, index: int) -> str:
        return f"__ref{index} {self.alias}" if self.alias else f"__ref{index} AS {self.table}"


def R(
    table: str,
    columns: str | set[str] | frozenset[str] = "",
    star: bool = False,
    alias: str = "",
    spelling: str = "",
    counts_rows: bool = False,
) -> Ref:
    cols = columns.split() if isinstance(columns, str) else columns
    return Ref(table, frozenset(c.lower() for c in cols), star, alias, spelling, counts_rows)


# What count(*) counts. True: the run's own rows, at its finest grain, whatever else the query uses
# (florql's comment on TableRef.finest; the old binder's "`*` and `count(*)` mean the table's own
# rows"), so `SELECT count(*), count(w_norm) FROM run_1` gives 36, 36. False: rows at the grain of
# the names the query uses, the finest grain only when it uses none (what florql answers at
# 9696674: 6, 6, while `SELECT count(*) FROM run_1` gives 36).
COUNT_STAR_FINEST = True


@dataclass(frozen=True)
class Query:
    """SQL with a `{}` placeholder per florql table reference (no other braces)."""

    template: str
    refs: tuple[Ref, ...] = ()
    ordered: bool = False  # an ORDER BY over every output column: compare rows in order

    @property
    def sql(self) -> str:
        return self.template.format(*(r.florql() for r in self.refs))

    @property
    def oracle_sql(self) -> str:
        sql = self.template.format(*(r.oracle(i) for i, r in enumerate(self.refs)))
        # DuckDB lacks PostgreSQL's BETWEEN SYMMETRIC (florql accepts it): spell out what it means.
        return _SYMMETRIC.sub(r"BETWEEN least(\1, \2) AND greatest(\1, \2)", sql)


_SYMMETRIC = re.compile(r"BETWEEN\s+SYMMETRIC\s+(-?[\w.]+)\s+AND\s+(-?[\w.]+)", re.IGNORECASE)


def Q(template: str, *refs: Ref, ordered: bool = False) -> Query:
    return Query(template, tuple(refs), ordered)


class HarnessError(AssertionError):
    """The ground truth could not answer a simple query: the comparison cannot be made."""


class Oracle:
    """Expected answers, independent of florql's binder and rewriter.

    Each table reference of a query becomes the ground-truth store's answer to the simplest query
    over it — `SELECT <the columns the query uses from it> FROM run_<id>` (or `SELECT *`), whose rows
    are at the grain of those columns (README, "Grain") — and plain DuckDB runs the query over
    those relations. So CTEs, derived tables, unions, joins and subqueries are evaluated by DuckDB
    alone; florql's ground-truth store only answers single-table selects, which the recorded
    store is also checked on."""

    def __init__(self, truth_homes: dict[str, Path]) -> None:
        self.dbs = {v: connect(h, replay="never") for v, h in truth_homes.items()}
        self.cache: dict[tuple[str, str], pa.Table] = {}
        self.asked = 0
        self.con = duckdb.connect()  # plain DuckDB, in memory: it sees only the registered relations
        self.con.execute("SET threads = 1")

    def base(self, variant: str, sql: str) -> pa.Table:
        key = (variant, sql)
        if key not in self.cache:
            answer = _Answer(self.dbs[variant], sql)
            self.asked += 1
            if answer.table is None or answer.warnings:
                problem = answer.crash or answer.error or f"it would replay: {answer.warnings}"
                raise HarnessError(f"the ground-truth store ({variant}) cannot answer {sql!r}: {problem}")
            self.cache[key] = answer.table
        return self.cache[key]

    def _run_relation(self, variant: str, run_id: int, ref: Ref) -> pa.Table:
        cols = [c for c in CANON_ORDER if c in ref.columns and c != "run_id"]
        unknown = sorted(ref.columns - set(CANON_ORDER))
        if unknown:
            raise HarnessError(f"{ref.table}: the oracle knows no column {unknown}")
        names = [c for c in cols if c not in LOOPS]
        if ref.counts_rows and (COUNT_STAR_FINEST or not names):  # the run's own rows: every loop coordinate
            cols = [*LOOPS, *names]
        sql = f"SELECT * FROM run_{run_id}" if ref.star or not cols else f"SELECT {', '.join(cols)} FROM run_{run_id}"
        return self.base(variant, sql)

    def relation(self, variant: str, ref: Ref) -> pa.Table:
        if ref.table.lower() == "metrics":
            run_type = self.base(variant, "SELECT DISTINCT run_id FROM metrics").schema.field("run_id").type
            parts = []
            for run_id in RUNS:
                t = self._run_relation(variant, run_id, ref)
                parts.append(t.add_column(0, "run_id", pa.array([run_id] * t.num_rows, type=run_type)))
            return pa.concat_tables(parts)
        if ref.table.lower() == "runs":  # a base table: only columns that are equal across stores
            cols = [c for c in ("run_id", "lr", "epochs", "seed") if c in ref.columns] or ["run_id"]
            return self.base(variant, f"SELECT {', '.join(cols)} FROM runs")
        match = re.fullmatch(r"run_(\d+)", ref.table.lower())
        if not match:
            raise HarnessError(f"the oracle knows no table {ref.table!r}")
        return self._run_relation(variant, int(match.group(1)), ref)

    def answer(self, variant: str, query: Query) -> pa.Table:
        """The expected table; raises duckdb.Error when DuckDB itself rejects the query."""
        names = [f"__ref{i}" for i in range(len(query.refs))]
        try:
            for name, ref in zip(names, query.refs):
                self.con.register(name, self.relation(variant, ref))
            return self.con.sql(query.oracle_sql).to_arrow_table()
        finally:
            for name in names:
                self.con.unregister(name)


FAILURE_KINDS = ("wrong", "crash", "unclear_error")


@dataclass
class Outcome:
    """equal | both_error | clear_error (acceptable) | skipped (replay budget spent) |
    wrong | crash | unclear_error (failures)."""

    kind: str
    sql: str
    detail: str = ""
    variant: str = "full"
    seconds: float = 0.0
    replayed: bool = False  # the recorded store ran (or tried to run) a replay for it
    shared: str = ""  # for a wrong answer: what the ground-truth store answers to the same SQL

    @property
    def failed(self) -> bool:
        return self.kind in FAILURE_KINDS

    def __str__(self) -> str:
        text = f"[{self.kind}] ({self.variant} code) {self.sql}\n    {self.detail}"
        return text + (f"\n    {self.shared}" if self.shared else "")


class _Answer:
    def __init__(self, db: florql.api.Connection, sql: str) -> None:
        self.table: pa.Table | None = None
        self.error: FlorqlError | None = None
        self.crash: str | None = None
        self.warnings: list[str] = []
        self.replayed = False  # a replay ran or was attempted
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = db.sql(sql)
                self.table = result.arrow()
            self.warnings = list(result.warnings)  # under replay = 'never': what would have replayed
            self.replayed = result.plan is not None
        except FlorqlError as err:
            self.error = err
            self.replayed = isinstance(err, (ReplayFailed, MissingHindsight))
        except Exception as err:
            tb = traceback.extract_tb(err.__traceback__)
            where = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in tb[-3:])
            self.crash = f"{type(err).__name__}: {str(err)[:600]} (at {where})"


def judge(
    query: Query, oracle: Oracle, rec_db: florql.api.Connection, variant: str = "full", skip_planned: bool = False
) -> Outcome:
    """Ask `query` of the recorded store and of the oracle (over the `variant` ground truth);
    classify the pair. With `skip_planned` (the recorded connection has replay = 'never'), an
    answer that needed a replay is 'skipped'."""
    started = time.monotonic()
    out = Outcome("equal", query.sql, variant=variant)

    def done(kind: str, detail: str = "") -> Outcome:
        out.kind, out.detail, out.seconds = kind, detail, time.monotonic() - started
        return out

    expected: pa.Table | None = None
    refused: Exception | None = None
    try:
        expected = oracle.answer(variant, query)
    except HarnessError as err:
        return done("crash", str(err))
    except duckdb.Error as err:
        refused = err
    rec = _Answer(rec_db, query.sql)
    out.replayed = rec.replayed
    if rec.crash:
        return done("crash", f"the recorded store raised a non-FlorqlError: {rec.crash}")
    if skip_planned and (rec.replayed or rec.warnings):
        return done("skipped", "needs a replay; the replay budget of this session is spent")
    if refused is not None:
        if rec.error is not None:
            return done("both_error", f"{type(rec.error).__name__}: {_first_line(rec.error)}")
        return done(
            "wrong",
            f"DuckDB rejects the query ({type(refused).__name__}: {_first_line(refused)}) but the "
            f"recorded store answered {rec.table.num_rows} rows",
        )
    if rec.error is not None:
        message = str(rec.error)
        if not names_what_went_wrong(message, query.sql):
            return done("unclear_error", f"{type(rec.error).__name__} names nothing of the query: {message[:300]}")
        return done("clear_error", f"{type(rec.error).__name__}: {_first_line(rec.error)}")
    assert expected is not None and rec.table is not None
    diff = table_diff(expected, rec.table, query.ordered)
    if not diff:
        return done("equal")
    out.shared = _same_sql_on_truth(oracle, variant, query, rec.table)
    return done("wrong", diff)


def _same_sql_on_truth(oracle: Oracle, variant: str, query: Query, recorded: pa.Table) -> str:
    """Diagnosis of a wrong answer: does the ground-truth store, asked the same SQL, agree with the
    recorded store (a query-layer bug, not a replay bug) or with the oracle?"""
    truth = _Answer(oracle.dbs[variant], query.sql)
    if truth.table is None:
        return f"the ground-truth store, asked the same SQL, fails: {truth.crash or _first_line(truth.error)}"
    if table_diff(truth.table, recorded, query.ordered) is None:
        return "the ground-truth store gives the same wrong answer to the same SQL: a query-layer bug, not replay"
    return "the ground-truth store answers the same SQL differently from the recorded store"


def _first_line(err: BaseException | None, limit: int = 240) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1 and "Traceback" in str(err):  # a replay's traceback: its last line says what failed
        text += " … " + lines[-1]
    return text[:limit]


# ---- generated queries --------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One generated example: optionally switch the recorded project's current code, then ask."""

    query: Query
    switch_code: bool = False


RUNS = (1, 2)
# Literals compared with integer loop coordinates; the long decimals are exact in SQL (DECIMAL)
# but round to an integer as binary floats.
DECIMALS = (
    "2.5",
    "0.5",
    "-0.5",
    "3.5",
    "4.0",
    "3.9999999999999999999",
    "5.9999999999999999999",
    "1.0000000000000000001",
    "2.0000000000000000001",
    "4.4999999999999999999",
)
# Conditions on values that split what the scripts log (see scripts/full.py).
VALUE_ATOMS = {
    "val_acc": ("val_acc > 0.35", "val_acc <= 0.37", "val_acc = 0.3611111044883728"),
    "w_norm": ("w_norm > 2.33", "w_norm < 2.36", "w_norm > 1", "w_norm < 1"),
    "w_start": ("w_start >= 2.33", "w_start < 2.35"),
    "recent": ("recent > 1.05",),
    "even_only": ("even_only IS NULL", "even_only IS NOT NULL", "even_only > 6.2"),
    "grad_norm": ("grad_norm > 0.45",),
    "loss": ("loss < 1.05",),
}
# Column picks; repeated entries weigh more. `recent` weighs little: while a replay cannot produce
# it, every query that asks for it starts a failing replay.
EPOCH_PICKS = ("val_acc", "w_norm", "w_norm", "w_start", "even_only", "even_only", "val_acc", "recent")
STEP_PICKS = ("loss", "grad_norm", "grad_norm")


def _rare(draw: Callable, one_in: int) -> bool:
    """True about once in `one_in` draws (hypothesis favours the first of sampled_from's choices)."""
    return draw(st.sampled_from((False,) * (one_in - 1) + (True,)))


def _case(draw: Callable, name: str) -> str:
    """Identifiers are case-insensitive: sometimes spell one in upper case."""
    return name.upper() if _rare(draw, 8) else name


@dataclass(frozen=True)
class Pred:
    text: str
    cols: frozenset[str]


@st.composite
def numbers(draw: Callable, lo: int = -1, hi: int = EPOCHS + 1) -> str:
    if _rare(draw, 4):
        return draw(st.sampled_from(DECIMALS))
    return str(draw(st.integers(lo, hi)))


@st.composite
def loop_atom(draw: Callable, column: str = "epoch", alias: str = "", hi: int = EPOCHS) -> Pred:
    spelled = _case(draw, column)
    c = f"{alias}.{spelled}" if alias else spelled
    n = lambda: draw(numbers(-1, hi + 1))  # noqa: E731
    i = lambda: draw(st.integers(-1, hi))  # noqa: E731
    kind = draw(
        st.sampled_from(
            (
                "cmp",
                "cmp",
                "cmp",
                "flipped",
                "in",
                "not_in",
                "between",
                "symmetric",
                "not_between",
                "mod",
                "arith",
                "not_null",
            )
        )
    )
    op = draw(st.sampled_from(("=", "<", ">", "<=", ">=", "!=", "<>")))
    if kind == "cmp":
        text = f"{c} {op} {n()}"
    elif kind == "flipped":
        text = f"{n()} {op} {c}"
    elif kind in ("in", "not_in"):
        values = draw(
            st.lists(st.one_of(st.integers(-1, hi).map(str), st.sampled_from(DECIMALS[:3])), min_size=1, max_size=3)
        )
        text = f"{c} {'NOT ' if kind == 'not_in' else ''}IN ({', '.join(values)})"
    elif kind in ("between", "not_between"):
        text = f"{c} {'NOT ' if kind == 'not_between' else ''}BETWEEN {n()} AND {n()}"
    elif kind == "symmetric":
        a, b = sorted((i(), i()))
        text = f"{c} BETWEEN SYMMETRIC {b} AND {a}"
    elif kind == "mod":
        m = draw(st.sampled_from((2, 3)))
        text = f"{c} % {m} {draw(st.sampled_from(('=', '!=')))} {draw(st.integers(0, m - 1))}"
    elif kind == "arith":
        text = f"{c} + 1 {op} {i()}"
    else:
        text = f"{c} IS NOT NULL"
    return Pred(text, frozenset({column}))


@st.composite
def predicate(
    draw: Callable,
    alias: str = "",
    names: tuple[str, ...] = (),
    run_id: bool = False,
    step: bool = True,
    depth: int = 2,
) -> Pred:
    """A condition: mostly on `epoch`, sometimes on `step`, `run_id` (metrics) or on values of `names`."""
    kinds = ["epoch"] * 5 + (["step"] if step else []) + (["run_id"] * 2 if run_id else [])
    kinds += ["value"] * 2 if any(n in VALUE_ATOMS for n in names) else []
    if depth > 0:
        kinds += ["and", "or", "not"]
    kind = draw(st.sampled_from(kinds))
    if kind == "epoch":
        return draw(loop_atom("epoch", alias))
    if kind == "step":
        return draw(loop_atom("step", alias, hi=STEPS))
    if kind == "run_id":
        text = draw(
            st.sampled_from(
                (
                    "run_id = 1",
                    "run_id = 2",
                    "run_id != 1",
                    "run_id IN (2)",
                    "run_id > 1.5",
                    "run_id BETWEEN 1 AND 1",
                    "NOT run_id = 2",
                )
            )
        )
        return Pred(f"{alias}.{text}" if alias else text, frozenset({"run_id"}))
    if kind == "value":
        name, atom = draw(st.sampled_from([(n, a) for n in names for a in VALUE_ATOMS.get(n, ())]))
        return Pred(f"{alias}.{atom}" if alias else atom, frozenset({name}))
    a = draw(predicate(alias, names, run_id, step, depth - 1))
    if kind == "not":
        return Pred(f"NOT ({a.text})", a.cols)
    b = draw(predicate(alias, names, run_id, step, depth - 1))
    return Pred(f"({a.text} {'AND' if kind == 'and' else 'OR'} {b.text})", a.cols | b.cols)


def _where(draw: Callable, **kw: Any) -> Pred:
    """Usually a WHERE clause (text with its leading space), sometimes none."""
    if _rare(draw, 5):
        return Pred("", frozenset())
    p = draw(predicate(**kw))
    return Pred(f" WHERE {p.text}", p.cols)


def _names(draw: Callable, epoch_only: bool = False, min_size: int = 1, max_size: int = 3) -> list[str]:
    picks = EPOCH_PICKS if epoch_only else EPOCH_PICKS + STEP_PICKS
    return draw(st.lists(st.sampled_from(picks), min_size=min_size, max_size=max_size, unique=True))


def _order(draw: Callable, n_columns: int) -> tuple[str, bool]:
    """Maybe an ORDER BY over every output column (a total order on the rows), maybe with LIMIT."""
    kind = draw(st.sampled_from(("none", "none", "all", "positions", "limit")))
    if kind == "none":
        return "", False
    if kind == "all":
        return " ORDER BY ALL", True
    keys = ", ".join(f"{i + 1}{draw(st.sampled_from(('', ' DESC')))}" for i in range(n_columns))
    limit = f" LIMIT {draw(st.integers(1, 8))}" if kind == "limit" else ""
    return f" ORDER BY {keys}{limit}", True


def _run(
    draw: Callable,
    columns: set[str] | frozenset[str],
    star: bool = False,
    alias: str = "",
    run_id: int | None = None,
    counts_rows: bool = False,
) -> Ref:
    r = run_id if run_id is not None else draw(st.sampled_from(RUNS))
    return R(f"run_{r}", frozenset(columns), star, alias, _case(draw, f"run_{r}"), counts_rows)


@st.composite
def queries(draw: Callable) -> Query:
    return SHAPE_FUNCTIONS[draw(st.sampled_from(SHAPES))](draw)


def _expr(draw: Callable, name: str, i: int) -> str:
    """A name as a plain column, or inside an expression (aliased: DuckDB names expressions by text)."""
    kind = draw(st.sampled_from(("plain",) * 6 + ("scaled", "round", "coalesce", "case")))
    if kind == "plain":
        return _case(draw, name)
    return {
        "scaled": f"{name} * 2 AS x{i}",
        "round": f"round({name}, 3) AS x{i}",
        "coalesce": f"coalesce({name}, -1) AS x{i}",
        "case": f"CASE WHEN {name} > 1 THEN 'big' ELSE 'small' END AS x{i}",
    }[kind]


def _simple(draw: Callable) -> Query:
    names = _names(draw)
    loops = ["epoch"] + (["step"] if any(n in STEP_NAMES for n in names) or _rare(draw, 5) else [])
    if _rare(draw, 6):
        loops = []
    where = _where(draw, names=tuple(names))
    order, ordered = _order(draw, len(loops) + len(names))
    r = draw(st.sampled_from(RUNS))
    items = [_case(draw, c) for c in loops] + [_expr(draw, n, i) for i, n in enumerate(names)]
    if _rare(draw, 6):  # table-qualified column names
        items = [f"run_{r}.{c}" if " " not in c else c for c in items]
    distinct = "DISTINCT " if _rare(draw, 8) else ""
    ref = _run(draw, {*loops, *names} | where.cols, run_id=r)
    return Q(f"SELECT {distinct}{', '.join(items)} FROM {{}}{where.text}{order}", ref, ordered=ordered)


def _hidden_order(draw: Callable) -> Query:
    """A name used only in ORDER BY (ties broken by epoch: a total order), with LIMIT."""
    name = draw(st.sampled_from(("w_norm", "w_start", "even_only", "val_acc", "recent")))
    where = _where(draw, names=(name,), step=False)
    direction = draw(st.sampled_from(("", " DESC", " DESC NULLS LAST", " NULLS FIRST")))
    return Q(
        f"SELECT epoch FROM {{}}{where.text} ORDER BY {name}{direction}, epoch LIMIT {draw(st.integers(1, 4))}",
        _run(draw, {"epoch", name} | where.cols),
        ordered=True,
    )


def _runs_join(draw: Callable) -> Query:
    """metrics joined with the base table `runs` (the README's best-accuracy-per-lr example)."""
    name = draw(st.sampled_from(EPOCH_PICKS))
    agg = draw(st.sampled_from(("max", "min", "count")))
    where = draw(predicate(alias="m", names=(name,), run_id=True, step=False, depth=1)) if draw(st.booleans()) else None
    return Q(
        f"SELECT r.lr, {agg}(m.{name}) AS best FROM {{}} JOIN {{}} USING (run_id)"
        f"{' WHERE ' + where.text if where else ''} GROUP BY r.lr",
        R("metrics", {"run_id", name} | (where.cols if where else frozenset()), alias="m"),
        R("runs", "run_id lr", alias="r"),
    )


def _star(draw: Callable) -> Query:
    if draw(st.booleans()):
        where = _where(draw, names=("val_acc", "w_norm"))
        order = " ORDER BY ALL" if draw(st.booleans()) else ""
        return Q(f"SELECT * FROM {{}}{where.text}{order}", _run(draw, where.cols, star=True), ordered=bool(order))
    where = _where(draw, names=("val_acc", "w_norm"), run_id=True)
    return Q(f"SELECT * FROM {{}}{where.text}", R("metrics", where.cols, star=True))


def _metrics(draw: Callable) -> Query:
    names = _names(draw, max_size=2)
    if _rare(draw, 4):
        agg = draw(st.sampled_from(("max", "min", "count")))
        where = _where(draw, run_id=True)
        return Q(
            f"SELECT run_id, {agg}({names[0]}) AS v FROM {{}}{where.text} GROUP BY run_id",
            R("metrics", {"run_id", names[0]} | where.cols),
        )
    loops = ["run_id", "epoch"] + (["step"] if any(n in STEP_NAMES for n in names) else [])
    where = _where(draw, names=tuple(names), run_id=True)
    order, ordered = _order(draw, len(loops) + len(names))
    cols = ", ".join(loops + [_case(draw, n) for n in names])
    return Q(
        f"SELECT {cols} FROM {{}}{where.text}{order}", R("metrics", {*loops, *names} | where.cols), ordered=ordered
    )


def _count(draw: Callable) -> Query:
    name = draw(st.sampled_from(EPOCH_PICKS + STEP_PICKS))
    sel, star = draw(
        st.sampled_from(
            (
                ("count(*) AS n", True),
                (f"count(*) AS n, count({name}) AS c", True),
                (f"count({name}) AS c", False),
                ("count(DISTINCT epoch) AS e", False),
                (f"count(*) FILTER (WHERE {name} IS NULL) AS n", True),
            )
        )
    )
    where = _where(draw, names=(name,))
    used = {c for c in (name, "epoch") if re.search(rf"\b{c}\b", sel)}
    return Q(f"SELECT {sel} FROM {{}}{where.text}", _run(draw, used | where.cols, counts_rows=star))


def _group(draw: Callable) -> Query:
    names = _names(draw, min_size=1, max_size=3)
    aggs = [
        f"{draw(st.sampled_from(('min', 'max', 'count', 'min', 'max', 'count', 'avg')))}({n}) AS a{i}"
        for i, n in enumerate(names)
    ]
    having, star = "", False
    if _rare(draw, 4):  # count(*): see COUNT_STAR_FINEST
        having, star = f" HAVING count(*) > {draw(st.integers(0, 7))}", True
    elif _rare(draw, 4):
        having = f" HAVING max({names[0]}) > {draw(st.sampled_from(('0.35', '1', '2.34')))}"
    where = _where(draw, names=tuple(names))
    return Q(
        f"SELECT epoch, {', '.join(aggs)} FROM {{}}{where.text} GROUP BY epoch{having}",
        _run(draw, {"epoch", *names} | where.cols, counts_rows=star),
    )


def _cte(draw: Callable) -> Query:
    kind = draw(st.sampled_from(("shadow", "shadow", "metrics", "plain", "chain")))
    names = _names(draw, epoch_only=True, max_size=2)
    cols = ", ".join(["epoch", *names])
    inner = _where(draw, names=tuple(names), step=False)
    outer = _where(draw, names=tuple(names), step=False)
    ref = _run(draw, {"epoch", *names} | inner.cols)
    if kind == "shadow":  # the CTE run_<r> hides the table run_<r>; its rows come from `ref`
        r = draw(st.sampled_from(RUNS))
        return Q(f"WITH run_{r} AS (SELECT {cols} FROM {{}}{inner.text}) SELECT {cols} FROM run_{r}{outer.text}", ref)
    if kind == "metrics":
        return Q(f"WITH metrics AS (SELECT {cols} FROM {{}}{inner.text}) SELECT * FROM metrics{outer.text}", ref)
    if kind == "chain":
        return Q(
            f"WITH t AS (SELECT {cols} FROM {{}}{inner.text}), u AS (SELECT * FROM t{outer.text}) SELECT * FROM u", ref
        )
    return Q(f"WITH t AS (SELECT {cols} FROM {{}}{inner.text}) SELECT {cols} FROM t{outer.text}", ref)


def _derived(draw: Callable) -> Query:
    names = _names(draw, max_size=2)
    if draw(st.booleans()):
        sel = ", ".join(f"t.{_case(draw, n)}" for n in names)
        inner = _where(draw, names=("val_acc",))
        outer = draw(predicate(alias="t", step=False, depth=1)) if draw(st.booleans()) else None
        return Q(
            f"SELECT {sel} FROM (SELECT * FROM {{}}{inner.text}) t{' WHERE ' + outer.text if outer else ''}",
            _run(draw, inner.cols, star=True),
        )
    alias = draw(st.sampled_from(("t", "t", "run_1", "run_2", "metrics")))  # an alias may shadow a table name
    sel = ", ".join(f"{alias}.{_case(draw, n)}" for n in names)
    outer = draw(predicate(alias=alias, names=tuple(names), step=False, depth=1)) if draw(st.booleans()) else None
    return Q(
        f"SELECT {alias}.epoch, {sel} FROM (SELECT {', '.join(['epoch', *names])} FROM {{}}) AS {alias}"
        f"{' WHERE ' + outer.text if outer else ''}",
        _run(draw, {"epoch", *names}),
    )


def _subquery(draw: Callable) -> Query:
    name = draw(st.sampled_from(EPOCH_PICKS))
    other = draw(st.sampled_from(EPOCH_PICKS))
    kind = draw(st.sampled_from(("scalar_where", "scalar_select", "in", "exists", "correlated")))
    if kind == "correlated":  # every epoch of b up to a's is needed, whatever a's predicate selects
        where = draw(predicate(alias="a", names=(name,), step=False, depth=1)) if draw(st.booleans()) else None
        return Q(
            f"SELECT a.epoch, a.{name}, (SELECT max(b.{other}) FROM {{}} WHERE b.epoch <= a.epoch) AS m "
            f"FROM {{}}{' WHERE ' + where.text if where else ''}",
            _run(draw, {"epoch", other}, alias="b"),
            _run(draw, {"epoch", name} | (where.cols if where else frozenset()), alias="a"),
        )
    if kind == "scalar_where":
        inner = _where(draw, names=(other,), step=False)
        return Q(
            f"SELECT epoch, {name} FROM {{}} WHERE {name} > (SELECT min({name}) FROM {{}}{inner.text})",
            _run(draw, {"epoch", name}),
            _run(draw, {name} | inner.cols),
        )
    if kind == "scalar_select":
        inner = _where(draw, names=(other,), step=False)
        outer = _where(draw, names=(name,), step=False)
        return Q(
            f"SELECT epoch, {name}, (SELECT max({other}) FROM {{}}{inner.text}) AS m FROM {{}}{outer.text}",
            _run(draw, {other} | inner.cols),
            _run(draw, {"epoch", name} | outer.cols),
        )
    if kind == "in":
        cond = draw(predicate(names=(other,), step=False, depth=1))
        return Q(
            f"SELECT epoch, {name} FROM {{}} WHERE epoch IN (SELECT epoch FROM {{}} WHERE {cond.text})",
            _run(draw, {"epoch", name}),
            _run(draw, {"epoch"} | cond.cols),
        )
    cond = draw(predicate(alias="b", names=(other,), step=False, depth=1))
    return Q(
        f"SELECT a.epoch, a.{name} FROM {{}} WHERE EXISTS (SELECT 1 FROM {{}} WHERE b.epoch = a.epoch AND {cond.text})",
        _run(draw, {"epoch", name}, alias="a"),
        _run(draw, {"epoch"} | cond.cols, alias="b"),
    )


def _join(draw: Callable) -> Query:
    kind = draw(st.sampled_from(("using", "using", "on", "aggregate")))
    a_names = _names(draw, epoch_only=True, max_size=2)
    where = draw(predicate(alias="a", names=tuple(a_names), step=False, depth=1)) if not _rare(draw, 3) else None
    where_text = f" WHERE {where.text}" if where else ""
    a_cols = {"epoch", *a_names} | (where.cols if where else frozenset())
    if kind == "aggregate":
        agg_name = draw(st.sampled_from(("loss", "grad_norm", "w_norm")))
        agg = draw(st.sampled_from(("max", "min", "count")))
        star = draw(st.booleans())
        sel = "*" if star else f"a.epoch, {', '.join('a.' + n for n in a_names)}, b.l"
        return Q(
            f"SELECT {sel} FROM {{}} JOIN (SELECT epoch, {agg}({agg_name}) AS l FROM {{}} GROUP BY epoch) b "
            f"USING (epoch){where_text}",
            _run(draw, a_cols, star=star, alias="a", run_id=1),
            _run(draw, {"epoch", agg_name}, run_id=2),
        )
    b_name = draw(st.sampled_from(EPOCH_PICKS))
    sel = f"a.epoch, {', '.join('a.' + n for n in a_names)}, b.{b_name} AS b_{b_name}"
    join = "USING (epoch)" if kind == "using" else "ON a.epoch = b.epoch"
    return Q(
        f"SELECT {sel} FROM {{}} JOIN {{}} {join}{where_text}",
        _run(draw, a_cols, alias="a", run_id=1),
        _run(draw, {"epoch", b_name}, alias="b", run_id=2),
    )


def _union(draw: Callable) -> Query:
    e = draw(st.sampled_from(EPOCH_PICKS))
    x = draw(st.sampled_from(STEP_PICKS))
    op = draw(st.sampled_from(("UNION ALL", "UNION ALL", "UNION")))
    w1 = _where(draw, names=(e,), step=False)
    w2 = _where(draw, names=(x,))
    return Q(
        f"SELECT epoch, {e} AS v FROM {{}}{w1.text} {op} SELECT epoch, {x} FROM {{}}{w2.text}",
        _run(draw, {"epoch", e} | w1.cols),
        _run(draw, {"epoch", x} | w2.cols),
    )


def _window(draw: Callable) -> Query:
    if not _rare(draw, 3):
        name = draw(st.sampled_from(EPOCH_PICKS))
        fn = draw(
            st.sampled_from(
                (
                    f"lag({name}) OVER (ORDER BY epoch)",
                    f"lead({name}, 2) OVER (ORDER BY epoch)",
                    "row_number() OVER (ORDER BY epoch DESC)",
                    f"first_value({name}) OVER (ORDER BY epoch ROWS BETWEEN 1 PRECEDING AND CURRENT ROW)",
                )
            )
        )
        where = _where(draw, names=(name,), step=False)
        return Q(f"SELECT epoch, {name}, {fn} AS w FROM {{}}{where.text}", _run(draw, {"epoch", name} | where.cols))
    name = draw(st.sampled_from(STEP_PICKS))
    fn = draw(
        st.sampled_from(
            (
                f"lag({name}) OVER (ORDER BY epoch, step)",
                f"max({name}) OVER (PARTITION BY epoch)",
                "rank() OVER (PARTITION BY epoch ORDER BY step)",
            )
        )
    )
    where = _where(draw, names=(name,))
    return Q(
        f"SELECT epoch, step, {name}, {fn} AS w FROM {{}}{where.text}", _run(draw, {"epoch", "step", name} | where.cols)
    )


SHAPE_FUNCTIONS: dict[str, Callable[[Callable], Query]] = {
    "simple": _simple,
    "star": _star,
    "metrics": _metrics,
    "count": _count,
    "group": _group,
    "cte": _cte,
    "derived": _derived,
    "subquery": _subquery,
    "join": _join,
    "union": _union,
    "window": _window,
    "hidden_order": _hidden_order,
    "runs_join": _runs_join,
}
SHAPES = (
    "simple",
    "simple",
    "simple",
    "simple",
    "star",
    "metrics",
    "metrics",
    "count",
    "group",
    "group",
    "cte",
    "cte",
    "derived",
    "subquery",
    "subquery",
    "join",
    "join",
    "union",
    "window",
    "hidden_order",
    "runs_join",
)


@st.composite
def steps(draw: Callable, switch_one_in: int = 20) -> Step:
    return Step(draw(queries()), switch_code=_rare(draw, switch_one_in))


# ---- a differential session over the shared recorded store ----------------------------------------
@dataclass
class Session:
    """Asks generated queries of the shared recorded store and of the oracle over the ground truth
    matching its current code. Every `restore_every` examples the recorded store goes back to its
    pristine state (so answers are exercised from several states of partial coverage) and gets
    `replays_per_cycle` replay attempts; past them the recorded connection runs with
    replay = 'never' and answers that would need a replay are skipped."""

    lab: Lab
    restore_every: int = 40
    replays_per_cycle: int | None = None
    verbose: bool = False
    outcomes: list[Outcome] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.oracle = Oracle(self.lab.truth)
        self.rec_db = connect(self.lab.home)
        self.lab.use_code("full")
        self.restores = self.switches = self.cycle_replays = 0

    def run(self, step: Step) -> Outcome:
        if self.outcomes and len(self.outcomes) % self.restore_every == 0:
            self.lab.restore()
            self.restores += 1
            self.cycle_replays = 0
            self.rec_db.set("replay", "auto")
        if step.switch_code:
            self.lab.use_code("full_b" if self.lab.current == "full" else "full")
            self.switches += 1
        limited = self.replays_per_cycle is not None and self.cycle_replays >= self.replays_per_cycle
        if limited:
            self.rec_db.set("replay", "never")
        outcome = judge(step.query, self.oracle, self.rec_db, self.lab.current, skip_planned=limited)
        self.cycle_replays += outcome.replayed
        self.outcomes.append(outcome)
        if self.verbose or outcome.failed:
            print(
                f"{len(self.outcomes):5d} {time.monotonic() - self.started:7.1f}s {outcome.kind:13s}"
                f"{' (replayed)' if outcome.replayed else ''} [{outcome.variant}] {outcome.sql}",
                flush=True,
            )
        return outcome

    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(o.kind for o in self.outcomes))

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failed]

    def summary(self) -> str:
        counts = self.counts()
        order = ("equal", "both_error", "clear_error", "skipped", "wrong", "crash", "unclear_error")
        head = ", ".join(f"{k}: {counts.get(k, 0)}" for k in order)
        replays = sum(o.replayed for o in self.outcomes)
        lines = [
            f"{len(self.outcomes)} queries in {time.monotonic() - self.started:.0f} s ({replays} with a replay; "
            f"{self.restores} restores, {self.switches} code switches) — {head}"
        ]
        errors = collections.Counter(o.detail[:160] for o in self.outcomes if o.kind == "clear_error")
        if errors:
            lines.append("clear errors (acceptable refusals):")
            lines += [f"  {n:4d} × {text}" for text, n in errors.most_common(12)]
        return "\n".join(lines)

    def report(self, limit: int = 40) -> str:
        fails = self.failures()
        text = "\n".join(str(o) for o in fails[:limit])
        more = f"\n… and {len(fails) - limit} more" if len(fails) > limit else ""
        return f"{len(fails)} failing answers:\n{text}{more}"
