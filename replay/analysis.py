"""Static analysis of training scripts: where florql logs and loops, and what a statement reads.

`analyze` finds the florql log sites and loops of a script, with the loop nesting resolved
through calls to helper functions; `statement_inputs` gives the variables a log statement's value
may depend on. `florql.replay.propagation` builds on the helpers here.

Everything here is pure: source text in, data out.
"""

from __future__ import annotations

import ast
import builtins
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeGuard

__all__ = [
    "DynamicSite",
    "LogSite",
    "LoopSite",
    "ModuleAnalysis",
    "analyze",
    "statement_inputs",
]

_BUILTINS = frozenset(dir(builtins))
_BODY_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)
_DYNAMIC = "<dynamic>"


@dataclass(frozen=True)
class LogSite:
    name: str
    lineno: int
    function: str | None
    loop_path: tuple[str, ...]
    loop_paths: tuple[tuple[str, ...], ...]
    reads: frozenset[str]
    lex_path: tuple[str, ...] = ()  # the loops around it inside its own function


@dataclass(frozen=True)
class LoopSite:
    name: str
    lineno: int
    function: str | None
    loop_path: tuple[str, ...]
    loop_paths: tuple[tuple[str, ...], ...]
    assigned: frozenset[str]
    same_function_as_parent: bool


@dataclass(frozen=True)
class DynamicSite:
    """A florql.log/loop call whose name is not a string literal."""

    kind: str  # "log" or "loop"
    lineno: int
    function: str | None


@dataclass(frozen=True)
class ModuleAnalysis:
    filename: str
    log_sites: tuple[LogSite, ...]
    loops: tuple[LoopSite, ...]
    dynamic_sites: tuple[DynamicSite, ...]

    def loggable_names(self) -> dict[str, LogSite]:
        """Each logged name with its first site in source order."""
        out: dict[str, LogSite] = {}
        for site in self.log_sites:
            out.setdefault(site.name, site)
        return out


# ---------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Aliases:
    """How a module spells florql: `import florql as fl`, `from florql import log as L`..."""

    modules: frozenset[str]
    logs: frozenset[str]
    loops: frozenset[str]

    def call_kind(self, node: ast.AST) -> str | None:
        if not isinstance(node, ast.Call):
            return None
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr in ("log", "loop")
            and isinstance(func.value, ast.Name)
            and func.value.id in self.modules
        ):
            return func.attr
        if isinstance(func, ast.Name):
            if func.id in self.logs:
                return "log"
            if func.id in self.loops:
                return "loop"
        return None

    def is_call(self, node: ast.AST, kind: str) -> TypeGuard[ast.Call]:
        """Whether `node` calls florql's `log` or `loop` (`kind`)."""
        return self.call_kind(node) == kind

    def names(self) -> frozenset[str]:
        return self.modules | self.logs | self.loops


def _aliases(tree: ast.AST) -> _Aliases:
    modules: set[str] = set()
    funcs: dict[str, set[str]] = {"log": set(), "loop": set()}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "florql":
                    modules.add(alias.asname or "florql")
                elif alias.name.startswith("florql.") and alias.asname is None:
                    modules.add("florql")
        elif isinstance(node, ast.ImportFrom) and node.module == "florql" and not node.level:
            for alias in node.names:
                if alias.name in funcs:
                    funcs[alias.name].add(alias.asname or alias.name)
    return _Aliases(frozenset(modules), frozenset(funcs["log"]), frozenset(funcs["loop"]))


def _name_arg(call: ast.Call) -> ast.expr | None:
    if call.args:
        return call.args[0]
    return next((k.value for k in call.keywords if k.arg == "name"), None)


def _literal_name(call: ast.Call) -> str | None:
    arg = _name_arg(call)
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    return None


def _value_args(call: ast.Call) -> list[ast.expr]:
    name_arg = _name_arg(call)
    values = [a for a in call.args if a is not name_arg]
    return values + [k.value for k in call.keywords if k.value is not name_arg]


def _all_args(args: ast.arguments) -> list[ast.arg]:
    extra = [a for a in (args.vararg, args.kwarg) if a is not None]
    return args.posonlyargs + args.args + args.kwonlyargs + extra


def _store_names(target: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def _reads(node: ast.AST, local: frozenset[str] = frozenset()) -> set[str]:
    """Free variable names loaded by an expression (comprehension and lambda locals excluded)."""
    if isinstance(node, ast.Name):
        return {node.id} if isinstance(node.ctx, ast.Load) and node.id not in local else set()
    if isinstance(node, ast.Lambda):
        outer = set().union(*(_reads(d, local) for d in node.args.defaults + node.args.kw_defaults if d))
        params = {a.arg for a in _all_args(node.args)}
        return outer | _reads(node.body, local | params)
    if isinstance(node, _COMPREHENSIONS):
        out: set[str] = set()
        inner = set(local)
        for i, gen in enumerate(node.generators):
            # the first iterable is evaluated in the enclosing scope
            out |= _reads(gen.iter, local if i == 0 else frozenset(inner))
            inner |= _store_names(gen.target)
            for cond in gen.ifs:
                out |= _reads(cond, frozenset(inner))
        results = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        for expr in results:
            out |= _reads(expr, frozenset(inner))
        return out
    return set().union(*(_reads(child, local) for child in ast.iter_child_nodes(node)))


def _block_reads(stmts: Iterable[ast.stmt], local: frozenset[str] = frozenset()) -> set[str]:
    """Names a statement sequence reads before assigning them itself."""
    out: set[str] = set()
    for stmt in stmts:
        if isinstance(stmt, ast.If):
            out |= _reads(stmt.test, local)
            out |= _block_reads(stmt.body, local) | _block_reads(stmt.orelse, local)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                out |= _reads(item.context_expr, local)
            out |= _block_reads(stmt.body, local | _assigned(stmt.items, roots=False))
        else:
            out |= _reads(stmt, local)
        local = local | _assigned([stmt], roots=False)
    return out


def _iter_scope(nodes: Iterable[ast.AST]) -> Iterator[ast.AST]:
    """Walk nodes without entering nested function, class, lambda or comprehension scopes."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, _SCOPES):
            # only the decorators run in the enclosing scope (defaults too, but they bind nothing)
            stack.extend(getattr(node, "decorator_list", []))
            continue
        if isinstance(node, _COMPREHENSIONS):
            stack.append(node.generators[0].iter)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _assigned(nodes: Iterable[ast.AST], roots: bool) -> frozenset[str]:
    """Names bound by `nodes` in their own scope.

    With `roots`, also the base name of stored attributes and subscripts
    (`stats["loss"] = ...` changes `stats`), which matters for dependencies.
    """
    out: set[str] = set()
    for node in _iter_scope(nodes):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, (*_DEFS, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in node.names if a.name != "*")
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            out.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            out.add(node.rest)
        elif roots and isinstance(node, (ast.Attribute, ast.Subscript)) and isinstance(node.ctx, ast.Store):
            base = node.value
            while isinstance(base, (ast.Attribute, ast.Subscript)):
                base = base.value
            if isinstance(base, ast.Name):
                out.add(base.id)
    return frozenset(out)


def _scope_bound(scope: ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> frozenset[str]:
    """Names bound in a module or function scope, parameters included."""
    params = {a.arg for a in _all_args(scope.args)} if isinstance(scope, _DEFS) else set()
    return _assigned(scope.body, roots=False) | params


def _loop_call(iterable: ast.expr, aliases: _Aliases) -> ast.Call | None:
    return next((n for n in ast.walk(iterable) if aliases.is_call(n, "loop")), None)


# ---------------------------------------------------------------- analyze


@dataclass
class _Raw:
    """A site before its loop paths are resolved through calls."""

    kind: str
    name: str
    lineno: int
    function: str | None
    lex: tuple[str, ...]
    reads: frozenset[str] = frozenset()
    assigned: frozenset[str] = frozenset()


@dataclass
class _CallSite:
    caller: str | None
    lex: tuple[str, ...]
    method_class: str | None
    key: tuple[str, str]  # ("name", f) for f(...), ("self", m) for self.m(...)
    # A function handed to a registration (`register_forward_hook(hook)`, `callbacks=[cb]`) runs
    # later, wherever the object it was given to runs: possibly in any loop below this place.
    deferred: bool = False


# Calls that keep a function to call it later (hooks, callbacks), unlike `opt.step(closure)`.
_REGISTERS = ("register", "hook", "callback", "connect", "subscribe")


@dataclass
class _Collector(ast.NodeVisitor):
    aliases: _Aliases
    sites: list[_Raw] = field(default_factory=list)
    dynamic: list[DynamicSite] = field(default_factory=list)
    calls: list[_CallSite] = field(default_factory=list)
    functions: dict[str, str | None] = field(default_factory=dict)  # qualname -> owning class
    classes: set[str] = field(default_factory=set)
    func: str | None = None
    method_class: str | None = None
    prefix: str = ""
    lex: tuple[str, ...] = ()

    def _enter(self, body: list[ast.stmt], **state: object) -> None:
        saved = {k: getattr(self, k) for k in state}
        for k, v in state.items():
            setattr(self, k, v)
        for stmt in body:
            self.visit(stmt)
        for k, v in saved.items():
            setattr(self, k, v)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for expr in node.decorator_list + node.args.defaults + node.args.kw_defaults:
            if expr is not None:
                self.visit(expr)
        qual = self.prefix + node.name
        in_class = self.prefix.endswith(".") and self.prefix[:-1] in self.classes
        owner = self.prefix[:-1] if in_class else None
        self.functions[qual] = owner
        self._enter(node.body, func=qual, method_class=owner or self.method_class, prefix=qual + ".<locals>.", lex=())

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in node.decorator_list + node.bases + [k.value for k in node.keywords]:
            self.visit(expr)
        qual = self.prefix + node.name
        self.classes.add(qual)
        self._enter(node.body, prefix=qual + ".")

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        call = _loop_call(node.iter, self.aliases)
        if call is None:
            self.generic_visit(node)
            return
        self.visit(node.iter)
        self.visit(node.target)
        name = _literal_name(call)
        if name is None:
            self.dynamic.append(DynamicSite("loop", node.lineno, self.func))
            name = _DYNAMIC
        assigned = _assigned([node.target, *node.body], roots=True)
        self.sites.append(_Raw("loop", name, node.lineno, self.func, self.lex + (name,), assigned=assigned))
        self._enter(node.body, lex=self.lex + (name,))
        for stmt in node.orelse:
            self.visit(stmt)

    visit_AsyncFor = visit_For

    def visit_Call(self, node: ast.Call) -> None:
        kind = self.aliases.call_kind(node)
        if kind == "log":
            self._log(node)
        elif kind is None and (key := _call_key(node)):
            self.calls.append(_CallSite(self.func, self.lex, self.method_class, key))
        if kind is None:
            self._passed_functions(node)
        self.generic_visit(node)

    def _passed_functions(self, node: ast.Call) -> None:
        """A function passed as an argument (`opt.step(closure)`, `m.register_forward_hook(hook)`)
        runs where the call that receives it runs: it counts as called there."""
        callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for keyword in node.keywords:
            deferred = any(r in f"{callee} {keyword.arg or ''}".lower() for r in _REGISTERS)
            self._passed(keyword.value, deferred)
        deferred = any(r in callee.lower() for r in _REGISTERS)
        for arg in node.args:
            self._passed(arg, deferred)

    def _passed(self, value: ast.expr, deferred: bool) -> None:
        values = value.elts if isinstance(value, (ast.List, ast.Tuple)) else [value]
        for v in values:
            if key := _callee_key(v):
                self.calls.append(_CallSite(self.func, self.lex, self.method_class, key, deferred))

    def _log(self, node: ast.Call) -> None:
        name = _literal_name(node)
        if name is None:
            self.dynamic.append(DynamicSite("log", node.lineno, self.func))
            return
        reads = set().union(*(_reads(a) for a in _value_args(node)))
        self.sites.append(_Raw("log", name, node.lineno, self.func, self.lex, reads=frozenset(reads)))


class _CallGraph:
    """Loop contexts in which each function can run, following calls by simple name or self.name."""

    def __init__(self, col: _Collector) -> None:
        self.functions = col.functions
        self.classes = col.classes
        self.callers: dict[str, list[_CallSite]] = {}
        for call in col.calls:
            for callee in self._resolve(call):
                self.callers.setdefault(callee, []).append(call)
        self.memo: dict[str, frozenset[tuple[str, ...]]] = {}
        self.loop_paths: frozenset[tuple[str, ...]] = frozenset()

    def reach_loops(self, loop_paths: Iterable[tuple[str, ...]]) -> None:
        """Let functions registered as hooks or callbacks reach every loop nested where they were registered."""
        self.loop_paths = frozenset(loop_paths)
        self.memo.clear()

    def _resolve(self, call: _CallSite) -> list[str]:
        kind, ident = call.key
        if kind == "self":
            own = f"{call.method_class}.{ident}"
            if own in self.functions:
                return [own]
            # probably inherited: any method of that name in the module
            return [q for q, cls in self.functions.items() if cls and q == f"{cls}.{ident}"]
        for qual in (f"{call.caller}.<locals>.{ident}" if call.caller else None, ident, f"{ident}.__init__"):
            if qual in self.functions:
                return [qual]
        return []

    def contexts(self, func: str | None) -> frozenset[tuple[str, ...]]:
        if func is None:
            return frozenset({()})
        return self._contexts(func, set())[0]

    def _contexts(self, func: str, active: set[str]) -> tuple[frozenset[tuple[str, ...]], bool]:
        """Returns the contexts and whether a recursive cycle was cut (then it is not memoised)."""
        if func in self.memo:
            return self.memo[func], False
        sites = self.callers.get(func, [])
        out: set[tuple[str, ...]] = set()
        cut = False
        active.add(func)
        for site in sites:
            if site.caller is None:
                here = {site.lex}
            elif site.caller in active:
                cut = True
                continue
            else:
                outer, outer_cut = self._contexts(site.caller, active)
                cut |= outer_cut
                here = {p + site.lex for p in outer}
            below = {lp for lp in self.loop_paths for p in here if lp[: len(p)] == p} if site.deferred else set()
            out.update(below or here)
        active.discard(func)
        result = frozenset(out) if out else frozenset({()})  # never called here: an entry point
        if not cut:
            self.memo[func] = result
        return result, cut


def _call_key(node: ast.Call) -> tuple[str, str] | None:
    """Calls that can be resolved statically: f(...) and self.f(...)/cls.f(...)."""
    return _callee_key(node.func)


def _callee_key(func: ast.expr) -> tuple[str, str] | None:
    if isinstance(func, ast.Name):
        return ("name", func.id)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in ("self", "cls"):
        return ("self", func.attr)
    return None


def _ordered(paths: Iterable[tuple[str, ...]]) -> tuple[tuple[str, ...], ...]:
    return tuple(sorted(set(paths), key=lambda p: (len(p), p)))


def analyze(source: str, filename: str = "<script>") -> ModuleAnalysis:
    """Find the florql log sites and loops of a script, loop paths resolved through calls."""
    tree = ast.parse(source, filename)
    col = _Collector(_aliases(tree))
    col.visit(tree)
    graph = _CallGraph(col)
    graph.reach_loops(p + raw.lex for raw in col.sites if raw.kind == "loop" for p in graph.contexts(raw.function))
    # builtins are not variables, unless the script rebinds them
    scopes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (*_DEFS, ast.ClassDef))]
    hidden = _BUILTINS - frozenset().union(*(_scope_bound(s) for s in scopes))
    logs, loops = [], []
    for raw in col.sites:
        paths = _ordered(p + raw.lex for p in graph.contexts(raw.function))
        deepest = max(paths, key=len)
        if raw.kind == "log":
            logs.append(LogSite(raw.name, raw.lineno, raw.function, deepest, paths, raw.reads - hidden, raw.lex))
        else:
            nested = len(raw.lex) > 1
            loops.append(LoopSite(raw.name, raw.lineno, raw.function, deepest, paths, raw.assigned, nested))
    by_line = operator.attrgetter("lineno")
    return ModuleAnalysis(
        filename,
        tuple(sorted(logs, key=by_line)),
        tuple(sorted(loops, key=by_line)),
        tuple(sorted(col.dynamic, key=by_line)),
    )


def statement_inputs(source: str, name: str) -> frozenset[str]:
    """The variables the value of `florql.log(name, …)` may depend on, within its own function.

    What the statement reads, plus what every assignment or in-place call on those variables in
    the same scope reads, to a fixed point. A superset (control flow is ignored): the planner
    uses it to decide whether restoring a checkpoint can stand in for running the inner loop.
    """
    tree = ast.parse(source)
    aliases = _aliases(tree)
    scopes = [tree, *(n for n in ast.walk(tree) if isinstance(n, _DEFS))]
    for scope in scopes:
        call = next(
            (n for n in _iter_scope(scope.body) if aliases.is_call(n, "log") and _literal_name(n) == name), None
        )
        if call is not None:
            break
    else:
        return frozenset()
    # Set-up code before the loop runs again, identically, in every replay: only what the loop
    # around the statement assigns or changes can make a skipped iteration's state differ.
    flows = list(_flows(_enclosing_loop(scope.body, call) or scope.body))
    deps = set().union(*(_reads(a) for a in _value_args(call)))
    changed = True
    while changed:
        changed = False
        for targets, reads in flows:
            if targets & deps and not reads <= deps:
                deps |= reads
                changed = True
    return frozenset(deps)


def _enclosing_loop(body: list[ast.stmt], call: ast.Call) -> list[ast.stmt] | None:
    """The outermost `for` loop of the scope that contains `call`, as a one-statement body."""
    stack = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.For, ast.AsyncFor)) and any(n is call for n in _iter_scope([node])):
            return [node]
        if not isinstance(node, _SCOPES):
            stack.extend(n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt))
    return None


def _flows(body: list[ast.stmt]) -> Iterator[tuple[frozenset[str], set[str]]]:
    """(variables written, variables read) for each assignment and in-place method call of a scope."""
    for node in _iter_scope(body):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            written = _assigned(targets, roots=True)
            yield (
                written,
                _reads(node.value)
                | ({t.id for t in targets if isinstance(t, ast.Name)} if isinstance(node, ast.AugAssign) else set()),
            )
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            yield _assigned([node.target], roots=True), _reads(node.iter)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                if item.optional_vars is not None:
                    yield _assigned([item.optional_vars], roots=True), _reads(item.context_expr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            base = node.func.value
            while isinstance(base, (ast.Attribute, ast.Subscript)):
                base = base.value
            if isinstance(base, ast.Name):  # `recent.append(loss)` changes `recent`
                yield frozenset({base.id}), _reads(node)
