"""Hindsight statement propagation: new `florql.log` statements into old recorded code.

`propagate` copies the named statements from the current script into the version a run
recorded, matching the code around them by AST (renamed variables, inserted or removed lines),
so that replaying the recorded code yields the new values. Pure: source text in, source text out.
"""

from __future__ import annotations

import ast
import copy
import difflib
import functools
import re
from collections.abc import Collection
from dataclasses import dataclass

from florql.replay.analysis import (
    _BODY_FIELDS,
    _BUILTINS,
    _DEFS,
    _DYNAMIC,
    _Aliases,
    _aliases,
    _all_args,
    _assigned,
    _block_reads,
    _literal_name,
    _loop_call,
    _name_arg,
    _scope_bound,
)

__all__ = ["PropagationError", "propagate"]


class PropagationError(ValueError):
    """A log statement cannot be placed safely into the recorded code."""


class _Refusal(Exception):
    """Internal: why one statement cannot be placed; wrapped into PropagationError."""


class _Normalizer(ast.NodeTransformer):
    """Canonical form of a statement for alignment.

    Strict form keeps names and constants; loose form replaces variable names
    and constants by placeholders (called function names and log names stay,
    they identify a statement well). Original names are kept in `_orig` so
    that two aligned statements can be zipped into a renaming map.
    """

    def __init__(self, aliases: _Aliases, loose: bool) -> None:
        self.aliases = aliases
        self.loose = loose

    def visit_Call(self, node: ast.Call) -> ast.AST:
        kind = self.aliases.call_kind(node)
        if kind:
            name_arg = _name_arg(node)
            node.func = ast.Name(id=f"<florql.{kind}>", ctx=ast.Load())
            node.args = [a if a is name_arg else self.visit(a) for a in node.args]
            node.keywords = [k if k.value is name_arg else self.visit(k) for k in node.keywords]
            return node
        if self.loose and isinstance(node.func, ast.Name):
            node.args = [self.visit(a) for a in node.args]
            node.keywords = [self.visit(k) for k in node.keywords]
            return node
        return self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> ast.AST:
        node._orig = node.id  # type: ignore[attr-defined]
        if self.loose:
            node.id = "_"
        return node

    def visit_arg(self, node: ast.arg) -> ast.AST:
        self.generic_visit(node)
        node._orig = node.arg  # type: ignore[attr-defined]
        if self.loose:
            node.arg = "_"
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        return ast.Constant(value=type(node.value).__name__) if self.loose else node


def _header(node: ast.AST) -> ast.AST:
    """The node without its nested statement lists: compound statements align by header."""
    head = copy.copy(node)
    for name, _ in _blocks(node):
        setattr(head, name, [])
    return copy.deepcopy(head)


def _blocks(node: ast.AST) -> list[tuple[str, list]]:
    """The statement-list fields of a node (`body` of a lambda or IfExp is an expression)."""
    return [(name, block) for name in _BODY_FIELDS if isinstance(block := getattr(node, name, None), list)]


class _Source:
    def __init__(self, text: str, filename: str, role: str) -> None:
        try:
            self.tree = ast.parse(text, filename)
        except SyntaxError as exc:
            raise PropagationError(f"the {role} source does not parse: {exc}") from exc
        self.text = text
        self.lines = text.split("\n")
        self.aliases = _aliases(self.tree)
        self.parents: dict[int, tuple[ast.AST, str, int]] = {}
        for node in ast.walk(self.tree):
            for name, block in _blocks(node):
                for i, child in enumerate(block):
                    self.parents[id(child)] = (node, name, i)
        self._norm: dict[tuple[int, bool], ast.AST] = {}
        self._dump: dict[tuple[int, bool], str] = {}

    def normal(self, node: ast.AST, loose: bool) -> ast.AST:
        key = (id(node), loose)
        if key not in self._norm:
            self._norm[key] = _Normalizer(self.aliases, loose).visit(_header(node))
            self._dump[key] = ast.dump(self._norm[key])
        return self._norm[key]

    def fingerprint(self, node: ast.AST, loose: bool) -> str:
        self.normal(node, loose)
        return self._dump[(id(node), loose)]

    def chain(self, node: ast.AST) -> list[tuple[ast.AST, str, int]]:
        """(parent, field, index) steps from the module down to `node`."""
        steps = []
        while id(node) in self.parents:
            steps.append(self.parents[id(node)])
            node = steps[-1][0]
        return steps[::-1]

    def indent_of(self, stmt: ast.stmt) -> str | None:
        """The indentation of a statement, None when it shares its line with code before it."""
        prefix = self.lines[stmt.lineno - 1].encode()[: stmt.col_offset].decode()
        return prefix if not prefix.strip() else None


def _anchor_key(node: ast.AST, aliases: _Aliases) -> tuple[str, str] | None:
    if isinstance(node, (*_DEFS, ast.ClassDef)):
        return ("class" if isinstance(node, ast.ClassDef) else "def", node.name)
    if isinstance(node, (ast.For, ast.AsyncFor)):
        call = _loop_call(node.iter, aliases)
        if call is not None:
            return ("loop", _literal_name(call) or _DYNAMIC)
    return None


def _describe(node: ast.stmt, aliases: _Aliases) -> str:
    key = _anchor_key(node, aliases)
    if key is None:
        return f"'{type(node).__name__.lower()}' block (line {node.lineno})"
    if key[0] == "loop":
        return f'florql.loop("{key[1]}") (line {node.lineno})'
    return f"{'class' if key[0] == 'class' else 'function'} '{key[1]}' (line {node.lineno})"


@dataclass
class _Insertion:
    at: int  # index into the recorded lines to insert before
    lines: list[str]
    order: int  # line in the current source: keeps its order among statements at one place


_Edit = tuple[int, int | None, str]  # byte columns start, end (as ast gives it: optional) and the replacement


class _Planner:
    """Places one current-source log statement into the recorded source."""

    def __init__(self, cur: _Source, rec: _Source) -> None:
        self.cur = cur
        self.rec = rec
        self._aligned: dict[tuple[int, int], dict[int, int]] = {}

    # -- alignment

    def align(self, cur_list: list, rec_list: list, skip: frozenset[int] = frozenset()) -> dict[int, int]:
        """Map indices of cur_list to rec_list: exact fingerprints first, then loose ones in the gaps."""
        key = (id(cur_list), id(rec_list))
        if not skip and key in self._aligned:
            return self._aligned[key]
        keep = [i for i in range(len(cur_list)) if i not in skip]
        out: dict[int, int] = {}
        self._match(keep, cur_list, list(range(len(rec_list))), rec_list, False, out)
        if not skip:
            self._aligned[key] = out
        return out

    def _match(
        self, ci: list[int], cur_list: list, ri: list[int], rec_list: list, loose: bool, out: dict[int, int]
    ) -> None:
        a = [self.cur.fingerprint(cur_list[i], loose) for i in ci]
        b = [self.rec.fingerprint(rec_list[j], loose) for j in ri]
        matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag == "equal":
                out.update(zip(ci[i1:i2], ri[j1:j2]))
            elif tag == "replace" and not loose:
                self._match(ci[i1:i2], cur_list, ri[j1:j2], rec_list, True, out)

    def _zip_names(self, a: ast.AST, b: ast.AST, pairs: dict[str, set[str]]) -> None:
        if self.cur.fingerprint(a, True) != self.rec.fingerprint(b, True):
            return
        for x, y in zip(ast.walk(self.cur.normal(a, True)), ast.walk(self.rec.normal(b, True))):
            if hasattr(x, "_orig") and hasattr(y, "_orig"):
                pairs.setdefault(x._orig, set()).add(y._orig)

    def collect_pairs(self, cur_list: list, rec_list: list, pairs: dict[str, set[str]], nested: bool) -> None:
        """Name correspondences from aligned statements, recursing into aligned blocks."""
        for i, j in self.align(cur_list, rec_list).items():
            a, b = cur_list[i], rec_list[j]
            self._zip_names(a, b, pairs)
            if nested and not isinstance(a, (*_DEFS, ast.ClassDef)):
                self._collect_fields(a, b, pairs)

    def _collect_fields(self, a: ast.AST, b: ast.AST, pairs: dict[str, set[str]]) -> None:
        for name, x in _blocks(a):
            y = getattr(b, name, None)
            if x and y:
                self.collect_pairs(x, y, pairs, nested=True)

    # -- locating the target block

    def _match_child(self, cur_list: list, index: int, rec_list: list) -> ast.AST | None:
        node = cur_list[index]
        key = _anchor_key(node, self.cur.aliases)
        if key is not None:
            hits = [r for r in rec_list if _anchor_key(r, self.rec.aliases) == key]
            return hits[0] if len(hits) == 1 else None
        j = self.align(cur_list, rec_list).get(index)
        return None if j is None else rec_list[j]

    def _find_anchor(self, node: ast.AST, rec_scope: ast.AST) -> ast.AST | None:
        """The unique statement with the same anchor key anywhere in rec_scope's own code."""
        key = _anchor_key(node, self.cur.aliases)
        hits = []
        stack = [c for _, block in _blocks(rec_scope) for c in block]
        while stack:
            child = stack.pop()
            if _anchor_key(child, self.rec.aliases) == key:
                hits.append(child)
            if not isinstance(child, (*_DEFS, ast.ClassDef)):
                stack.extend(c for _, block in _blocks(child) for c in block)
        return hits[0] if len(hits) == 1 else None

    def locate(self, chain: list[tuple[ast.AST, str, int]]) -> tuple[ast.AST, list[tuple[ast.AST, ast.AST]]]:
        """The recorded node whose statement list corresponds to the unit's block, plus matched ancestors."""
        rec_node: ast.AST = self.rec.tree
        matched = []
        k = 0
        while k < len(chain) - 1:
            parent, name, index = chain[k]
            cur_list = getattr(parent, name)
            hit = self._match_child(cur_list, index, getattr(rec_node, name, None) or [])
            if hit is None:
                hit, k = self._jump(chain, k, rec_node)
            matched.append((getattr(chain[k][0], chain[k][1])[chain[k][2]], hit))
            rec_node = hit
            k += 1
        return rec_node, matched

    def _jump(self, chain: list, k: int, rec_node: ast.AST) -> tuple[ast.AST, int]:
        """Skip unmatched wrappers (a new `with`, a moved block) down to the next strong anchor."""
        missing = getattr(chain[k][0], chain[k][1])[chain[k][2]]
        for j in range(k, len(chain) - 1):
            node = getattr(chain[j][0], chain[j][1])[chain[j][2]]
            if _anchor_key(node, self.cur.aliases) is not None:
                hit = self._find_anchor(node, rec_node)
                if hit is None:
                    missing = node
                    break
                return hit, j
        raise _Refusal(
            f"its enclosing {_describe(missing, self.cur.aliases)} has no unique counterpart in the recorded code"
        )

    # -- the statement itself

    def plan(self, stmt: ast.stmt) -> _Insertion:
        top = self._wrapper(stmt)
        chain = self.cur.chain(top)
        rec_parent, matched = self.locate(chain)
        parent, name, index = chain[-1]
        cur_list = getattr(parent, name)
        rec_list = getattr(rec_parent, name, None)
        if not rec_list:
            raise _Refusal(f"the recorded code has no block matching the one at line {top.lineno}")
        scopes = [self.rec.tree] + [r for c, r in matched if isinstance(r, _DEFS)]
        bound = frozenset().union(*(_scope_bound(s) for s in scopes))
        pairs = self._pairs(matched)
        start = self._setup_start(cur_list, index, pairs, bound)
        unit = cur_list[start : index + 1]
        renames = self._renames(unit, pairs, bound)
        at, indent = self._position(cur_list, rec_list, start, index)
        return _Insertion(at, self._text(unit, renames, indent), unit[0].lineno)

    def _wrapper(self, stmt: ast.stmt) -> ast.stmt:
        """Grow the unit to an enclosing `if`/`with` that exists only for this log statement."""
        top = stmt
        while id(top) in self.cur.parents:
            parent, name, _ = self.cur.parents[id(top)]
            if not (isinstance(parent, (ast.If, ast.With, ast.AsyncWith)) and name == "body"):
                break
            if getattr(parent, "orelse", None) or parent.body[-1] is not top or _is_elif(parent, self.cur):
                break
            if not all(_is_simple_assign(s) for s in parent.body[:-1]):
                break
            top = parent
        return top

    def _pairs(self, matched: list[tuple[ast.AST, ast.AST]]) -> dict[str, set[str]]:
        pairs: dict[str, set[str]] = {}
        self.collect_pairs(self.cur.tree.body, self.rec.tree.body, pairs, nested=False)
        for cur_node, rec_node in matched:
            self._zip_names(cur_node, rec_node, pairs)
            if isinstance(cur_node, _DEFS) and isinstance(rec_node, _DEFS):  # matched by name: both defs
                cur_params, rec_params = _all_args(cur_node.args), _all_args(rec_node.args)
                if len(cur_params) == len(rec_params):
                    for x, y in zip(cur_params, rec_params):
                        pairs.setdefault(x.arg, set()).add(y.arg)
            self._collect_fields(cur_node, rec_node, pairs)
        return pairs

    def _setup_start(self, cur_list: list, index: int, pairs: dict[str, set[str]], bound: frozenset[str]) -> int:
        """Include new assignments right above the unit that only compute what it reads."""
        start = index
        reads = _block_reads(cur_list[start : index + 1])
        while start > 0:
            prev = cur_list[start - 1]
            targets = _assigned([prev], roots=False)
            if not _is_simple_assign(prev) or not targets & reads:
                break
            if any(t in bound or t in pairs for t in targets):
                break
            start -= 1
            reads = _block_reads(cur_list[start : index + 1])
        return start

    def _renames(self, unit: list[ast.stmt], pairs: dict[str, set[str]], bound: frozenset[str]) -> dict[str, str]:
        clobbered = sorted(_assigned(unit, roots=False) & bound)
        if clobbered:
            raise _Refusal(f"it assigns '{clobbered[0]}', which the recorded code already uses")
        renames = {}
        for name in sorted(_block_reads(unit) - self.cur.aliases.names()):
            target = self._map_name(name, pairs.get(name, set()), bound)
            if target != name:
                renames[name] = target
        return renames

    @staticmethod
    def _map_name(name: str, candidates: set[str], bound: frozenset[str]) -> str:
        known = sorted(c for c in candidates if c in bound)
        if name in known or (not known and (name in bound or name in _BUILTINS)):
            return name
        if len(known) == 1:
            return known[0]
        if known:
            raise _Refusal(f"the variable '{name}' it reads matches several recorded variables: {', '.join(known)}")
        raise _Refusal(f"the variable '{name}' it reads does not exist in the recorded code")

    def _position(self, cur_list: list, rec_list: list, start: int, end: int) -> tuple[int, str]:
        """Index into the recorded lines, and indentation, for the unit cur_list[start:end+1]."""
        aligned = self.align(cur_list, rec_list, skip=frozenset(range(start, end + 1)))
        before = [aligned[i] for i in range(start) if i in aligned]
        after = [aligned[i] for i in range(end + 1, len(cur_list)) if i in aligned]
        if before:
            ref = rec_list[before[-1]]
            at = ref.end_lineno
        elif after or start == 0:
            ref = rec_list[after[0] if after else 0]
            at = min([ref.lineno] + [d.lineno for d in getattr(ref, "decorator_list", [])]) - 1
        elif end == len(cur_list) - 1:
            ref = rec_list[-1]
            at = ref.end_lineno
        else:
            raise _Refusal("no statement around it matches the recorded code")
        indent = self.rec.indent_of(ref)
        if indent is None:
            raise _Refusal(f"the recorded block at line {ref.lineno} shares a line with other code")
        return at, indent

    def _text(self, unit: list[ast.stmt], renames: dict[str, str], indent: str) -> list[str]:
        spelling = self._log_spelling()
        first, last = unit[0], unit[-1]
        lines = self.cur.lines[first.lineno - 1 : last.end_lineno]
        head = lines[0].encode()[: first.col_offset].decode()
        tail = lines[-1].encode()[last.end_col_offset :].decode().strip()
        multiline_str = any(
            isinstance(n, ast.Constant) and isinstance(n.value, (str, bytes)) and n.lineno != n.end_lineno
            for s in unit
            for n in ast.walk(s)
        )
        if head.strip() or (tail and not tail.startswith("#")) or multiline_str:
            return self._unparsed(unit, renames, spelling, indent)
        edits = self._edits(unit, renames, spelling)
        out = []
        for offset, line in enumerate(lines):
            raw = line.encode()
            for col, end, text in sorted(edits.get(first.lineno + offset, []), reverse=True):
                raw = raw[:col] + text.encode() + raw[end:]
            text = raw.decode().rstrip("\r")
            body = text[len(head) :] if text.startswith(head) else text.lstrip()
            out.append(indent + body if body.strip() else "")
        return out

    def _edits(self, unit: list[ast.stmt], renames: dict[str, str], spelling: str) -> dict[int, list[_Edit]]:
        """Text replacements by line: renamed variables and the recorded spelling of florql.log."""
        edits: dict[int, list[_Edit]] = {}
        for node in (n for s in unit for n in ast.walk(s)):
            if self.cur.aliases.is_call(node, "log"):
                func = node.func
                edits.setdefault(func.lineno, []).append((func.col_offset, func.end_col_offset, spelling))
            elif isinstance(node, ast.Name) and node.id in renames:
                edits.setdefault(node.lineno, []).append((node.col_offset, node.end_col_offset, renames[node.id]))
        return edits

    def _unparsed(self, unit: list[ast.stmt], renames: dict[str, str], spelling: str, indent: str) -> list[str]:
        aliases = self.cur.aliases

        class Rewrite(ast.NodeTransformer):
            def visit_Call(self, node: ast.Call) -> ast.AST:
                self.generic_visit(node)
                if aliases.call_kind(node) == "log":
                    node.func = ast.parse(spelling, mode="eval").body
                return node

            def visit_Name(self, node: ast.Name) -> ast.AST:
                node.id = renames.get(node.id, node.id)
                return node

        text = "\n".join(ast.unparse(Rewrite().visit(copy.deepcopy(s))) for s in unit)
        return [indent + line if line.strip() else "" for line in text.split("\n")]

    def _log_spelling(self) -> str:
        aliases = self.rec.aliases
        if aliases.modules:
            module = "florql" if "florql" in aliases.modules else min(aliases.modules)
            return f"{module}.log"
        if aliases.logs:
            return min(aliases.logs)
        raise _Refusal("the recorded code does not import florql.log")


@functools.lru_cache(maxsize=32)
def _source(text: str, filename: str, role: str) -> _Source:
    """A parsed source, shared by the propagations of one query (all its names, then each alone):
    parsing and fingerprinting its statements is most of a propagation's time. Read-only once built
    (its caches of fingerprints only grow)."""
    return _Source(text, filename, role)


def _is_elif(node: ast.stmt, src: _Source) -> bool:
    return isinstance(node, ast.If) and src.indent_of(node) is None


def _is_simple_assign(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.Assign):
        return all(isinstance(t, ast.Name) for t in stmt.targets)
    return isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None


def _log_statements(src: _Source, name: str) -> list[tuple[ast.Call, ast.stmt | None]]:
    exprs = {id(s.value): s for s in ast.walk(src.tree) if isinstance(s, ast.Expr)}
    calls = [n for n in ast.walk(src.tree) if src.aliases.is_call(n, "log") and _literal_name(n) == name]
    return [(c, exprs.get(id(c))) for c in sorted(calls, key=lambda c: (c.lineno, c.col_offset))]


def _logged_names(src: _Source) -> set[str]:
    calls = (n for n in ast.walk(src.tree) if src.aliases.is_call(n, "log"))
    return {name for name in map(_literal_name, calls) if name is not None}


def propagate(recorded: str, current: str, names: Collection[str], filename: str = "<script>") -> str:
    """Insert the current source's log statements for `names` into the recorded source.

    Names the recorded source already logs are skipped. The recorded text is
    kept verbatim apart from the inserted lines. Raises PropagationError when
    a statement cannot be placed safely.
    """
    rec = _source(recorded, filename, "recorded")
    cur = _source(current, filename, "current")
    planner = _Planner(cur, rec)
    already = _logged_names(rec)
    insertions: list[_Insertion] = []
    for name in dict.fromkeys(names):
        if name in already:
            continue
        sites = _log_statements(cur, name)
        if not sites:
            raise PropagationError(
                f'cannot place florql.log("{name}"): the current source ({filename}) does not log it'
            )
        for call, stmt in sites:
            where = f'cannot place florql.log("{name}") ({filename} line {call.lineno})'
            if stmt is None:
                raise PropagationError(f"{where}: the call is not a statement of its own")
            try:
                insertions.append(planner.plan(stmt))
            except _Refusal as why:
                raise PropagationError(f"{where}: {why}") from None
    return _apply(rec, insertions, filename)


def _apply(rec: _Source, insertions: list[_Insertion], filename: str) -> str:
    if not insertions:
        return rec.text
    lines = re.findall(r"[^\n]*\n|[^\n]+\Z", rec.text)
    eol = "\r\n" if "\r\n" in rec.text else "\n"
    for ins in sorted(insertions, key=lambda i: (i.at, i.order), reverse=True):
        new = [line + eol for line in ins.lines]
        if ins.at == len(lines) and not lines[-1].endswith("\n"):
            # keep a missing final newline missing
            lines[-1] += eol
            new[-1] = new[-1][: -len(eol)]
        lines[ins.at : ins.at] = new
    result = "".join(lines)
    try:
        ast.parse(result, filename)
    except SyntaxError as exc:  # a bug here must not reach a replay run
        raise PropagationError(f"propagated source does not parse ({exc}); please report this") from exc
    return result
