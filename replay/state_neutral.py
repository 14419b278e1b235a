"""Whether propagated hindsight statements leave the training state as the recorded code had it.

A checkpoint a replay writes holds the state its code produced. When the statements propagated
into the recorded code only read state (a norm, an accuracy, a `.item()`), that state is the
recorded code's own, and any later replay of the run may restore it. Anything else (a call we do
not know, an RNG draw, an in-place method, an assignment to an attribute) may change it, and
then only replays of exactly that patched code may. The check is static and conservative: an
unknown call makes the code count as changing state.
"""

from __future__ import annotations

import ast
import difflib

# Functions and methods that compute a value from their arguments and change nothing.
PURE_BUILTINS = frozenset(
    [
        "abs",
        "all",
        "any",
        "bool",
        "dict",
        "enumerate",
        "float",
        "int",
        "isinstance",
        "len",
        "list",
        "max",
        "min",
        "range",
        "reversed",
        "round",
        "set",
        "sorted",
        "str",
        "sum",
        "tuple",
        "zip",
    ]
)
PURE_METHODS = frozenset(
    [
        "abs",
        "all",
        "any",
        "argmax",
        "argmin",
        "buffers",
        "clone",
        "cpu",
        "detach",
        "dim",
        "double",
        "eq",
        "exp",
        "float",
        "flatten",
        "ge",
        "get",
        "gt",
        "half",
        "isfinite",
        "isnan",
        "item",
        "items",
        "keys",
        "le",
        "log",
        "log10",
        "lt",
        "max",
        "mean",
        "min",
        "modules",
        "named_buffers",
        "named_modules",
        "named_parameters",
        "ne",
        "norm",
        "numel",
        "numpy",
        "parameters",
        "pow",
        "reshape",
        "size",
        "sqrt",
        "square",
        "state_dict",
        "std",
        "sum",
        "to",
        "tolist",
        "values",
        "var",
        "view",
    ]
)
PURE_MODULE_FUNCTIONS = frozenset(
    [
        "abs",
        "all",
        "any",
        "argmax",
        "cat",
        "dot",
        "exp",
        "isfinite",
        "isnan",
        "log",
        "max",
        "mean",
        "min",
        "norm",
        "numel",
        "sqrt",
        "square",
        "stack",
        "std",
        "sum",
        "tensor",
        "var",
        "vector_norm",
        "matrix_norm",
        "fsum",
        "prod",
        "isclose",
    ]
)
PURE_MODULES = frozenset({"torch", "np", "numpy", "math", "linalg", "statistics"})
NO_GRAD_CONTEXTS = frozenset({"no_grad", "inference_mode"})


def inserted_code_keeps_state(recorded: str, patched: str) -> bool:
    """True when every statement `patched` adds to `recorded` provably changes no state."""
    inserted = _inserted_lines(recorded, patched)
    if not inserted:
        return True
    tree = ast.parse(patched)
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    units = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.stmt) and node.lineno in inserted and not _inserted_parent(node, parents, inserted)
    ]
    return all(_statement_keeps_state(unit) for unit in units)


def _inserted_lines(recorded: str, patched: str) -> set[int]:
    """1-based line numbers of `patched` that `recorded` does not have."""
    matcher = difflib.SequenceMatcher(a=recorded.splitlines(), b=patched.splitlines(), autojunk=False)
    lines: set[int] = set()
    for tag, _, _, j1, j2 in matcher.get_opcodes():
        if tag in ("insert", "replace"):
            lines.update(range(j1 + 1, j2 + 1))
    return lines


def _inserted_parent(node: ast.stmt, parents: dict[int, ast.AST], inserted: set[int]) -> bool:
    """Whether the statement enclosing `node` was inserted too (then that one is checked whole)."""
    parent = parents.get(id(node))
    return isinstance(parent, ast.stmt) and parent.lineno in inserted


def _statement_keeps_state(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.Expr):
        return _expression_keeps_state(stmt.value)
    if isinstance(stmt, ast.Assign):
        targets_plain = all(isinstance(t, ast.Name) for t in stmt.targets)
        return targets_plain and _expression_keeps_state(stmt.value)
    if isinstance(stmt, ast.If):
        return _expression_keeps_state(stmt.test) and all(map(_statement_keeps_state, stmt.body + stmt.orelse))
    if isinstance(stmt, ast.With):
        contexts_pure = all(_no_grad_context(item) for item in stmt.items)
        return contexts_pure and all(map(_statement_keeps_state, stmt.body))
    return isinstance(stmt, ast.Pass)


def _no_grad_context(item: ast.withitem) -> bool:
    call = item.context_expr
    return (
        item.optional_vars is None
        and isinstance(call, ast.Call)
        and _callee_name(call.func) in NO_GRAD_CONTEXTS
        and not call.args
    )


def _expression_keeps_state(expr: ast.expr) -> bool:
    for node in ast.walk(expr):
        if isinstance(node, (ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)):
            return False
        if isinstance(node, ast.Call) and not _pure_call(node):
            return False
    return True


def _pure_call(call: ast.Call) -> bool:
    func = call.func
    if _is_florql_log(func):
        return True
    if isinstance(func, ast.Name):
        return func.id in PURE_BUILTINS
    if isinstance(func, ast.Attribute):
        owner = func.value
        if (isinstance(owner, ast.Name) and owner.id in PURE_MODULES) or _is_module_path(owner):
            return func.attr in PURE_MODULE_FUNCTIONS
        return func.attr in PURE_METHODS
    return False


def _is_module_path(node: ast.expr) -> bool:
    """`torch.linalg` and the like: an attribute chain rooted at a known module."""
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in PURE_MODULES


def _is_florql_log(func: ast.expr) -> bool:
    return isinstance(func, ast.Attribute) and func.attr == "log" and _callee_name(func.value) == "florql"


def _callee_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None
