"""Statements a skip job may leave out: helper calls after the inner loop that no asked name needs.

In a skip job every iteration's first inner loop is replaced by restoring its checkpoint, which
overwrites the registered objects' state and modes, every RNG and the plain variables of the
outer loop's scope. A statement after the inner loop whose effects reach no asked name before the
next restore overwrites them need not run: in the pytorch/examples layout,
`test_acc = test(model, test_loader)` when the query asks for `train_loss`. It is left out only
where the code shows that:
- it calls a function of the script, passing plain names, whose body only puts modules it was
  given in eval mode and calls them under `torch.no_grad()`, iterates a loader it was given,
  binds local names and computes with side-effect-free functions (`replay.state_neutral`'s
  lists): all it changes is those modules' modes, the RNG a loader draws from when iterated, and
  the names it binds;
- the modules it gets are registered with `florql.checkpointing` (the restore resets them), the
  loaders it iterates are `DataLoader(...)`s over a `TensorDataset` or a torchvision data set,
  with no sampler, generator or persistent workers of their own;
- the names it binds are read only by `florql.log` calls of names the query does not ask for,
  which are left out too (those values go unchecked in that job);
- what runs after it in the iteration is side-effect-free, or a registered object's `step()` or
  `zero_grad()` without arguments (they neither draw random numbers nor read modes), and reads no
  module's mode (`.training`);
- no asked name is logged before the inner loop (that code runs before the restore).
The premise, as `explain` says: calling a registered module changes only what its state_dict and
modes hold.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache

from florql.replay.state_neutral import (
    _callee_name,
    _expression_keeps_state,
    _is_florql_log,
    _no_grad_context,
    _pure_call,
    _statement_keeps_state,
)

REGISTERED_METHODS = frozenset({"step", "zero_grad"})  # on optimizers and schedulers: no RNG, no modes
LOADER_OPTIONS = frozenset({"batch_size", "shuffle", "num_workers", "pin_memory", "drop_last"})
MODE_ATTRIBUTES = frozenset({"training", "__dict__"})


@dataclass(frozen=True)
class Pruned:
    source: str  # the script with the statements left out (as `pass`, line numbers unchanged)
    left_out: tuple[str, ...]  # each left-out statement, as written


@lru_cache(maxsize=64)
def prune_skip_tail(source: str, asked: frozenset[str]) -> Pruned | None:
    """The script without what a skip job asking for `asked` need not run; None when nothing can go."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    functions = _module_functions(tree)
    found = _outer_loop(tree, functions)
    if found is None:
        return None
    loop, inner_at = found
    if any(_logs(stmt, asked) for stmt in loop.body[:inner_at]) or _helper_logs_before_loop(
        loop.body[inner_at], functions, asked
    ):
        return None
    registered = _registered(tree)
    dropped: list[ast.stmt] = []
    for j in range(len(loop.body) - 1, inner_at, -1):  # last first: a later left-out call is no obstacle
        stmt = loop.body[j]
        if stmt in dropped:
            continue
        dependents = _droppable(stmt, loop.body[j + 1 :], dropped, functions, registered, asked, tree)
        if dependents is not None:
            dropped += [stmt, *dependents]
    if not dropped:
        return None
    lines = source.splitlines(keepends=True)
    for stmt in dropped:
        if not _blank_out(lines, stmt):
            return None
    return Pruned("".join(lines), tuple(ast.unparse(s) for s in sorted(dropped, key=lambda s: s.lineno)))


def _droppable(
    stmt: ast.stmt,
    after: list[ast.stmt],
    dropped: list[ast.stmt],
    functions: dict[str, ast.FunctionDef],
    registered: set[str],
    asked: frozenset[str],
    tree: ast.Module,
) -> list[ast.stmt] | None:
    """The statements to leave out with `stmt` (those reading what it binds), or None if it must run."""
    call, bound = _helper_call(stmt)
    if call is None or not isinstance(call.func, ast.Name) or call.func.id not in functions:
        return None
    effects = _helper_effects(functions[call.func.id])
    if effects is None:
        return None
    moded, iterated = effects
    arguments = _arguments(functions[call.func.id], call)
    if arguments is None:
        return None
    if any(arguments.get(p) not in registered for p in moded):
        return None
    if any(not _plain_loader(arguments.get(p), tree) for p in iterated):
        return None
    kept = [s for s in after if s not in dropped]
    dependents = [s for s in kept if _loads(s) & bound]
    if any(not _unasked_log(s, asked) for s in dependents):
        return None
    if _load_count(tree, bound) != sum(len(_load_nodes(s, bound)) for s in dependents):
        return None  # read elsewhere (the next iteration, another function): it must run
    rest = [s for s in kept if s not in dependents]
    return dependents if all(_harmless_after(s, registered) for s in rest) else None


# ---- the helper's body --------------------------------------------------------------------------
def _helper_effects(fn: ast.FunctionDef) -> tuple[set[str], set[str]] | None:
    """(parameters it puts in eval mode and calls, parameters it iterates), or None when its body
    may change anything else."""
    if fn.decorator_list or fn.args.vararg or fn.args.kwarg:
        return None
    params = {a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs}
    moded: set[str] = set()
    iterated: set[str] = set()

    def expression(node: ast.expr, no_grad: bool) -> bool:
        for sub in ast.walk(node):
            if isinstance(sub, (ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom, ast.Lambda)):
                return False
            if isinstance(sub, ast.Name) and sub.id == "florql":
                return False
            if isinstance(sub, ast.Call):
                if isinstance(sub.func, ast.Name) and sub.func.id in params:
                    if not (no_grad and sub.func.id in moded):
                        return False
                elif _rooted_at(sub.func, params) or not _pure_call(sub):
                    return False
        return True

    def block(stmts: list[ast.stmt], no_grad: bool) -> bool:
        for s in stmts:
            if _eval_call(s, params):
                moded.add(s.value.func.value.id)  # type: ignore[attr-defined]
            elif isinstance(s, ast.With):
                if not all(_no_grad_context(item) for item in s.items) or not block(s.body, True):
                    return False
            elif isinstance(s, ast.For):
                if s.orelse or not _plain_target(s.target) or not isinstance(s.iter, ast.Name):
                    return False
                if s.iter.id not in params or _names(s.target) & params:
                    return False
                iterated.add(s.iter.id)
                if not block(s.body, no_grad):
                    return False
            elif isinstance(s, (ast.Assign, ast.AugAssign)):
                targets = s.targets if isinstance(s, ast.Assign) else [s.target]
                if not all(_plain_target(t) for t in targets) or any(_names(t) & params for t in targets):
                    return False
                if isinstance(s.value, ast.Name) and s.value.id in params:
                    return False  # an alias of a parameter: its calls would escape the checks
                if not expression(s.value, no_grad):
                    return False
            elif isinstance(s, ast.Return):
                if s.value is not None and not expression(s.value, no_grad):
                    return False
            elif not isinstance(s, ast.Pass):
                return False
        return True

    return (moded, iterated) if block(fn.body, False) else None


def _eval_call(stmt: ast.stmt, params: set[str]) -> bool:
    if not isinstance(stmt, ast.Expr) or not isinstance(stmt.value, ast.Call):
        return False
    call = stmt.value
    func = call.func
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "eval"
        and isinstance(func.value, ast.Name)
        and func.value.id in params
        and not call.args
        and not call.keywords
    )


def _rooted_at(node: ast.expr, names: set[str]) -> bool:
    """`p.x.y` for a name p of `names`: a call on it may change p."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return isinstance(node, ast.Name) and node.id in names and not isinstance(node.ctx, ast.Store)


def _arguments(fn: ast.FunctionDef, call: ast.Call) -> dict[str, str] | None:
    """Parameter → the plain name passed for it, or None when an argument is not a plain name."""
    positional = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    if len(call.args) > len(positional) or any(not isinstance(a, ast.Name) for a in call.args):
        return None
    if any(k.arg is None or not isinstance(k.value, ast.Name) for k in call.keywords):
        return None
    passed = {p: a.id for p, a in zip(positional, call.args)}  # type: ignore[attr-defined]
    passed.update({k.arg: k.value.id for k in call.keywords})  # type: ignore[attr-defined,misc]
    return passed


# ---- the call site and the code around it ---------------------------------------------------------
def _helper_call(stmt: ast.stmt) -> tuple[ast.Call | None, set[str]]:
    """(the call, the names it binds) for `f(...)` or `x = f(...)`."""
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        return stmt.value, set()
    if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call) and all(map(_plain_target, stmt.targets)):
        return stmt.value, set().union(*(_names(t) for t in stmt.targets))
    return None, set()


def _harmless_after(stmt: ast.stmt, registered: set[str]) -> bool:
    """Runs the same whether the left-out call ran or not (reads no mode, draws no random number)."""
    if any(isinstance(n, ast.Attribute) and n.attr in MODE_ATTRIBUTES for n in ast.walk(stmt)):
        return False
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        call = stmt.value
        func = call.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr in REGISTERED_METHODS
            and isinstance(func.value, ast.Name)
            and func.value.id in registered
            and not call.args
            and not call.keywords
        ):
            return True
        if _is_florql_log(func):
            return all(_expression_keeps_state(a) for a in call.args)
    return _statement_keeps_state(stmt)


def _unasked_log(stmt: ast.stmt, asked: frozenset[str]) -> bool:
    """`florql.log("name", …)` of a name the query does not ask for (the run logged it)."""
    if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and _is_florql_log(stmt.value.func)):
        return False
    args = stmt.value.args
    return bool(args) and isinstance(args[0], ast.Constant) and args[0].value not in asked


def _logs(node: ast.AST, asked: frozenset[str]) -> bool:
    """Whether `node` may log an asked name (a log whose name is not a literal may)."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call) and _is_florql_log(sub.func):
            first = sub.args[0] if sub.args else None
            if not isinstance(first, ast.Constant) or first.value in asked:
                return True
    return False


def _helper_logs_before_loop(stmt: ast.stmt, functions: dict[str, ast.FunctionDef], asked: frozenset[str]) -> bool:
    """Whether the helper holding the inner loop may log an asked name before its loop."""
    for call in (n for n in ast.walk(stmt) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)):
        fn = functions.get(call.func.id)  # type: ignore[attr-defined]
        if fn is None:
            continue
        for s in fn.body:
            if _florql_loops(s):
                break
            if _logs(s, asked):
                return True
    return False


def _plain_loader(name: str | None, tree: ast.Module) -> bool:
    """`name` is bound once, to `DataLoader(dataset, …)` over a TensorDataset or a torchvision data set."""
    value = _only_binding(name, tree)
    if not (isinstance(value, ast.Call) and _callee_name(value.func) == "DataLoader"):
        return False
    if any(k.arg not in LOADER_OPTIONS for k in value.keywords) or len(value.args) != 1:
        return False
    dataset: ast.expr | None = value.args[0]
    if isinstance(dataset, ast.Name):
        dataset = _only_binding(dataset.id, tree)
    if not isinstance(dataset, ast.Call):
        return False
    func = dataset.func
    torchvision = isinstance(func, ast.Attribute) and _callee_name(func.value) == "datasets"
    return torchvision or _callee_name(func) == "TensorDataset"


def _only_binding(name: str | None, tree: ast.Module) -> ast.expr | None:
    bindings = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, (ast.Store, ast.Del))
    ]
    if len(bindings) != 1:
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and node.targets[0] is bindings[0]:
            return node.value
    return None


def _registered(tree: ast.Module) -> set[str]:
    """Names passed to `florql.checkpointing(...)`: their state and modes are restored."""
    names: set[str] = set()
    for node in ast.walk(tree):
        func = node.func if isinstance(node, ast.Call) else None
        if isinstance(func, ast.Attribute) and func.attr == "checkpointing" and _callee_name(func.value) == "florql":
            names |= {k.value.id for k in node.keywords if isinstance(k.value, ast.Name)}  # type: ignore[attr-defined]
    return names


# ---- loops ----------------------------------------------------------------------------------------
def _module_functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    defined: dict[str, list[ast.FunctionDef]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.setdefault(node.name, []).append(node)  # type: ignore[arg-type]
    top = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    return {name: nodes[0] for name, nodes in defined.items() if name in top and len(nodes) == 1}


def _is_florql_loop(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.For)
        and isinstance(node.iter, ast.Call)
        and isinstance(node.iter.func, ast.Attribute)
        and node.iter.func.attr == "loop"
        and _callee_name(node.iter.func.value) == "florql"
    )


def _florql_loops(node: ast.AST) -> bool:
    return any(_is_florql_loop(n) for n in ast.walk(node))


def _holds_inner_loop(stmt: ast.stmt, functions: dict[str, ast.FunctionDef]) -> bool:
    if _florql_loops(stmt):
        return True
    calls = (n for n in ast.walk(stmt) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name))
    return any(c.func.id in functions and _florql_loops(functions[c.func.id]) for c in calls)  # type: ignore[attr-defined]


def _outer_loop(tree: ast.Module, functions: dict[str, ast.FunctionDef]) -> tuple[ast.For, int] | None:
    """The outer `florql.loop` and the index in its body of the statement holding the inner loop."""
    for node in ast.walk(tree):
        if _is_florql_loop(node):
            assert isinstance(node, ast.For)
            for index, stmt in enumerate(node.body):
                if _holds_inner_loop(stmt, functions):
                    return node, index
    return None


# ---- names ----------------------------------------------------------------------------------------
def _plain_target(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return True
    return isinstance(node, (ast.Tuple, ast.List)) and all(_plain_target(e) for e in node.elts)


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _loads(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _load_nodes(node: ast.AST, names: set[str]) -> list[ast.Name]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in names and isinstance(n.ctx, ast.Load)]


def _load_count(tree: ast.Module, names: set[str]) -> int:
    return len(_load_nodes(tree, names))


def _blank_out(lines: list[str], stmt: ast.stmt) -> bool:
    """Replace `stmt` by `pass` on its first line and blank lines after (so line numbers hold);
    False when it shares a line with other code."""
    first, last = stmt.lineno - 1, (stmt.end_lineno or stmt.lineno) - 1
    indent = lines[first][: stmt.col_offset]
    tail = lines[last][stmt.end_col_offset or 0 :]
    if indent.strip() or (tail.strip() not in ("", "\\") and not tail.strip().startswith("#")):
        return False
    lines[first] = f"{indent}pass\n"
    for i in range(first + 1, last + 1):
        lines[i] = "\n"
    return True
