"""`florql check train.py`: the patterns in a training script that replay cannot restore, before any run.

A static pass over one script (no import, nothing runs). It reports, with line numbers:

- ``unregistered-state``: a model, optimizer, LR scheduler, GradScaler or EMA/averaged model created
  in the scope of the outer ``florql.loop`` before the loop, but not passed to
  ``florql.checkpointing(...)``: a replay from a checkpoint would start it from its initial state.
- ``persistent-workers``: a ``DataLoader`` with ``persistent_workers=True`` (and workers): the worker
  processes keep RNG state across epochs that no checkpoint captures.
- ``log-outside-loop``: a ``florql.log`` that runs outside every ``florql.loop`` (resolved through
  helper-function calls): it cannot be replayed, so it cannot be asked for in hindsight.
- ``dynamic-name``: a ``florql.log``/``florql.loop`` whose name is not a string literal: hindsight
  queries find statements by name, so such values cannot be asked for.
- ``absolute-path``: a file read by absolute path: a replay reads it where it is, and a hindsight
  query refuses once it has changed (relative paths get the copy recorded with the run).
- ``network-download``: a download (``download=True``, ``urlopen``, ``requests.get``…): what a run
  fetched is not recorded; a replay fetches it again.

It is deliberately conservative in what it names: objects are recognised by how they are built
(``torch.optim.X(...)``, ``nn.X(...)``, a class of the script deriving from ``nn.Module``,
``copy.deepcopy(model)``, ...), not by running the script; `florql.scope` warns at record time
about what this pass cannot see.
"""

from __future__ import annotations

import ast
import os
import sys
from dataclasses import dataclass

from florql.replay.analysis import analyze


@dataclass(frozen=True)
class Finding:
    lineno: int
    message: str
    code: str = ""

    def __str__(self) -> str:
        return f"line {self.lineno}: {self.message}"


# nn.X constructors that hold parameters or buffers (losses, activations, pooling and dropout do not).
_STATEFUL_NN = (
    "Linear",
    "Bilinear",
    "LazyLinear",
    "Conv",
    "LazyConv",
    "ConvTranspose",
    "Embedding",
    "EmbeddingBag",
    "RNN",
    "LSTM",
    "GRU",
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "Transformer",
    "MultiheadAttention",
    "BatchNorm",
    "LazyBatchNorm",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm",
    "LocalResponseNorm",
    "RMSNorm",
    "Sequential",
    "ModuleList",
    "ModuleDict",
    "ParameterList",
    "ParameterDict",
    "PReLU",
    "Module",
)
_MODULE_BASES = {"Module", "nn.Module", "torch.nn.Module"}
_EMA_WORDS = ("EMA", "Ema", "ExponentialMovingAverage", "AveragedModel", "ModelEma")
_PASSTHROUGH = {
    "to",
    "cuda",
    "cpu",
    "train",
    "eval",
    "double",
    "float",
    "half",
    "bfloat16",
    "requires_grad_",
    "share_memory",
    "to_empty",
}
_READERS = {
    "open",
    "load",
    "loadtxt",
    "genfromtxt",
    "fromfile",
    "Path",
    "PurePath",
    "ImageFolder",
    "DatasetFolder",
    "safe_open",
    "load_file",
    "from_pretrained",
    "load_state_dict",
    "memmap",
    "imread",
}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


class _Kinds:
    """What kind of stateful object a constructor call builds, if any."""

    def __init__(self, tree: ast.Module) -> None:
        bases: dict[str, list[str]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = [_dotted(b) for b in node.bases]
        self.module_classes: set[str] = set()
        changed = True
        while changed:
            changed = False
            for name, parents in bases.items():
                if name not in self.module_classes and any(
                    p in _MODULE_BASES or p.split(".")[-1] in self.module_classes for p in parents
                ):
                    self.module_classes.add(name)
                    changed = True

    def of_call(self, call: ast.Call, known: dict[str, str]) -> str | None:
        func = _dotted(call.func)
        if not func:
            return None
        last = func.split(".")[-1]
        if isinstance(call.func, ast.Attribute) and last in _PASSTHROUGH:
            inner = call.func.value
            if isinstance(inner, ast.Call):
                return self.of_call(inner, known)
            if isinstance(inner, ast.Name):
                return known.get(inner.id)
            return None
        if func in ("copy.deepcopy", "deepcopy") and call.args and isinstance(call.args[0], ast.Name):
            return "EMA copy of a model" if known.get(call.args[0].id) == "model" else None
        if any(w in last for w in _EMA_WORDS):
            return "EMA model"
        if last == "GradScaler":
            return "GradScaler"
        if (
            "lr_scheduler" in func
            or (last.endswith(("LR", "Scheduler")) and last[:1].isupper())
            or last in ("ReduceLROnPlateau", "OneCycleLR", "CosineAnnealingWarmRestarts", "LambdaLR")
        ):
            return "scheduler"
        if ("optim" in func.split(".")[:-1] and last[:1].isupper()) or last in (
            "SGD",
            "Adam",
            "AdamW",
            "Adagrad",
            "Adadelta",
            "RMSprop",
            "Adamax",
            "NAdam",
            "RAdam",
            "LBFGS",
        ):
            return "optimizer"
        if last in self.module_classes:
            return "model"
        if func.split(".")[0] in ("nn", "torch") and last.startswith(_STATEFUL_NN):
            return "model"
        return None


def _targets(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, (ast.Tuple, ast.List)):
        return [n for e in node.elts for n in _targets(e)]
    return []


def _scope_statements(body: list[ast.stmt]):
    """Statements of one scope in source order, nested blocks included, nested defs and classes not."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for field in ("body", "orelse", "finalbody", "handlers"):
            child = getattr(stmt, field, None)
            if isinstance(child, list):
                yield from _scope_statements(
                    [c for c in child if isinstance(c, ast.stmt)]
                    + [s for h in child if isinstance(h, ast.ExceptHandler) for s in h.body]
                )


def _unconditional(body: list[ast.stmt]) -> set[int]:
    """The statements of a scope that run on every path through it (ids): its own statements and
    those of the `with` blocks among them, not those under an if, loop, try or match."""
    out: set[int] = set()
    for stmt in body:
        out.add(id(stmt))
        if isinstance(stmt, (ast.With, ast.AsyncWith)):
            out |= _unconditional(stmt.body)
    return out


def _function_body(tree: ast.Module, qualname: str | None) -> list[ast.stmt]:
    if qualname is None:
        return tree.body
    body: list[ast.stmt] = tree.body
    for part in qualname.replace(".<locals>", "").split("."):
        node = next(
            (
                n
                for n in body
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part
            ),
            None,
        )
        if node is None:
            return []
        body = node.body
    return body


def _checkpointing_names(tree: ast.Module) -> set[str] | None:
    """Names passed to florql.checkpointing(...) anywhere; None when a call passes **objects."""
    registered: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _dotted(node.func).split(".")[-1] == "checkpointing":
            for kw in node.keywords:
                if kw.arg is None:
                    return None
                registered.update(n.id for n in ast.walk(kw.value) if isinstance(n, ast.Name))
    return registered


_DOWNLOADERS = frozenset({"urlopen", "urlretrieve", "download_url", "hf_hub_download", "snapshot_download"})


def _downloads(node: ast.Call, func: str, last: str) -> bool:
    """`MNIST(..., download=True)`, `urlopen(...)`, `requests.get(...)`, `hf_hub_download(...)`."""
    if any(k.arg == "download" and _literal(k.value) is True for k in node.keywords):
        return True
    return last in _DOWNLOADERS or (func.startswith(("requests.", "httpx.")) and last in ("get", "post", "stream"))


def _literal(node: ast.AST | None):
    return node.value if isinstance(node, ast.Constant) else None


def _is_absolute(text: object) -> bool:
    if not isinstance(text, str) or not text:
        return False
    return text.startswith(("/", "~")) or (len(text) > 2 and text[1] == ":" and text[2] in "\\/")


def check_source(source: str, filename: str = "<script>") -> list[Finding]:
    tree = ast.parse(source, filename)
    analysis = analyze(source, filename)
    findings: list[Finding] = []

    # ---- state created before the outer loop and not registered -------------------------------
    outer = next((lp for lp in analysis.loops if len(lp.loop_path) == 1), None)
    registered = _checkpointing_names(tree)
    if outer is not None and registered is not None:
        kinds = _Kinds(tree)
        known: dict[str, str] = {}
        created: dict[str, tuple[int, str]] = {}
        body = _function_body(tree, outer.function)
        every_path = _unconditional(body)
        conditional: set[str] = set()
        for stmt in _scope_statements(body):
            if stmt.lineno >= outer.lineno:
                break
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and isinstance(stmt.value, ast.Call):
                kind = kinds.of_call(stmt.value, known)
                targets = [
                    n for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]) for n in _targets(t)
                ]
                for name in targets:
                    if kind is None:
                        known.pop(name, None)
                        created.pop(name, None)
                    else:
                        known[name] = "model" if kind in ("model", "EMA model", "EMA copy of a model") else kind
                        created[name] = (stmt.lineno, kind)
                        if id(stmt) in every_path:
                            conditional.discard(name)
                        else:
                            conditional.add(name)
        for name, (lineno, kind) in sorted(created.items(), key=lambda kv: kv[1][0]):
            if name in registered:
                continue
            if name in conditional:
                findings.append(
                    Finding(
                        lineno,
                        f"'{name}' ({kind}) is created before the outer florql.loop only on some paths (under a "
                        f"condition) and is not passed to florql.checkpointing(...): replays from checkpoints would "
                        f"start it from its initial state. Register it on the paths that create it, e.g. "
                        f"objects = dict(model=model); objects['{name}'] = {name} under the same condition; "
                        f"florql.checkpointing(**objects)",
                        "unregistered-state",
                    )
                )
            else:
                findings.append(
                    Finding(
                        lineno,
                        f"'{name}' ({kind}) is created before the outer florql.loop but not passed to "
                        f"florql.checkpointing(...): replays from checkpoints would start it from its initial state. "
                        f"Register it: florql.checkpointing({name}={name}, ...)",
                        "unregistered-state",
                    )
                )

    # ---- DataLoaders with persistent workers, files read by absolute path -----------------------
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = _dotted(node.func)
        last = func.split(".")[-1] if func else (node.func.attr if isinstance(node.func, ast.Attribute) else "")
        if _downloads(node, func, last):
            findings.append(
                Finding(
                    node.lineno,
                    "downloads over the network: a run records the files it reads, not what it fetched; a replay "
                    "downloads again (into its sandbox) and gets whatever the server sends then",
                    "network-download",
                )
            )
        if last == "DataLoader":
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            workers = _literal(kw.get("num_workers"))
            if _literal(kw.get("persistent_workers")) is True and workers != 0:
                findings.append(
                    Finding(
                        node.lineno,
                        "DataLoader with persistent_workers=True: its worker processes keep RNG state "
                        "across epochs that no checkpoint captures, so replays may diverge; use persistent_workers=False",
                        "persistent-workers",
                    )
                )
        if last in _READERS or last.startswith(("read_", "load")):
            path = (
                _literal(node.args[0])
                if node.args
                else _literal(
                    next(
                        (
                            k.value
                            for k in node.keywords
                            if k.arg in ("file", "path", "fname", "filepath_or_buffer", "root", "f")
                        ),
                        None,
                    )
                )
            )
            mode = (
                _literal(node.args[1])
                if last == "open" and len(node.args) > 1
                else _literal(next((k.value for k in node.keywords if k.arg == "mode"), None))
            )
            if isinstance(mode, str) and any(c in mode for c in "wax+"):
                continue
            if _is_absolute(path):
                findings.append(
                    Finding(
                        node.lineno,
                        f"reads {path!r} by absolute path: a replay reads that file where it is, and a hindsight "
                        "query refuses once it has changed; a relative path lets replays use the copy recorded "
                        "with the run (files up to 1 MiB)",
                        "absolute-path",
                    )
                )

    # ---- log statements: outside loops, names that are not literals ------------------------------
    for site in analysis.log_sites:
        if not site.loop_path:
            findings.append(
                Finding(
                    site.lineno,
                    f"florql.log({site.name!r}) runs outside any florql.loop: it cannot be replayed, "
                    "so it cannot be asked for in hindsight",
                    "log-outside-loop",
                )
            )
        elif () in site.loop_paths:
            findings.append(
                Finding(
                    site.lineno,
                    f"florql.log({site.name!r}) in {site.function}() also runs outside every florql.loop (it is "
                    "called before or after the loop too): the values logged there cannot be replayed or asked "
                    "for in hindsight; log them under another name if you need them",
                    "log-outside-loop",
                )
            )
    for dyn in analysis.dynamic_sites:
        findings.append(
            Finding(
                dyn.lineno,
                f"florql.{dyn.kind}(...) with a name that is not a string literal: hindsight queries find "
                'statements by name; write the name as a literal, e.g. florql.log("loss", loss)',
                "dynamic-name",
            )
        )
    return sorted(findings, key=lambda f: (f.lineno, f.code))


def check_script(path: str | os.PathLike) -> list[Finding]:
    """The patterns in the script at `path` that replay cannot restore, by line."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    return check_source(source, os.fspath(path))


def main(argv: list[str] | None = None) -> int:
    """`python -m florql.check train.py ...`: print the findings; exit status 1 when there are any."""
    paths = sys.argv[1:] if argv is None else argv
    status = 0
    for path in paths:
        for finding in check_script(path):
            print(f"{path}:{finding}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
