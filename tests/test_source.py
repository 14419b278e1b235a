"""Tests for florql.replay.analysis and florql.replay.propagation: log sites, statement propagation."""

from __future__ import annotations

import sys
import textwrap
import types

import pytest

from florql.replay.analysis import DynamicSite, analyze
from florql.replay.propagation import PropagationError, propagate


def src(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def site(analysis, name):
    return analysis.loggable_names()[name]


def loop(analysis, name):
    return next(lp for lp in analysis.loops if lp.name == name)


class FakeFlorql(types.ModuleType):
    """Stands in for florql when executing scripts: records log calls."""

    def __init__(self) -> None:
        super().__init__("florql")
        self.logged: list[tuple[str, object]] = []

    def log(self, name, value):
        self.logged.append((name, value))
        return value

    def loop(self, name, iterable):
        yield from iterable


def run_script(text: str, monkeypatch) -> list[tuple[str, object]]:
    fake = FakeFlorql()
    monkeypatch.setitem(sys.modules, "florql", fake)
    exec(compile(text, "train.py", "exec"), {"__name__": "__main__"})
    return fake.logged


def values(logged, name):
    return [v for n, v in logged if n == name]


def inserted_lines(recorded: str, result: str) -> list[str]:
    """Lines of result that are not in recorded, checking that recorded survives verbatim."""
    rec = recorded.split("\n")
    out, i = [], 0
    for line in result.split("\n"):
        if i < len(rec) and line == rec[i]:
            i += 1
        else:
            out.append(line)
    assert i == len(rec), "recorded lines were changed or reordered"
    return out


# ------------------------------------------------------------- analyze


def test_log_site_forms_and_aliases():
    a = analyze(
        src("""
        import florql
        import florql as fl
        from florql import log
        from florql import log as L
        florql.log("a", 1)
        fl.log("b", 2)
        log("c", 3)
        L("d", 4)
        other.log("e", 5)
        def log2(): pass
        log2("f", 6)
    """)
    )
    assert [(s.name, s.lineno) for s in a.log_sites] == [("a", 5), ("b", 6), ("c", 7), ("d", 8)]
    assert all(s.function is None and s.loop_path == () for s in a.log_sites)


def test_loop_aliases():
    a = analyze(
        src("""
        import florql as fl
        from florql import loop as lp
        for e in fl.loop("epoch", range(2)):
            for s in lp("step", range(3)):
                fl.log("x", s)
    """)
    )
    assert [lp.name for lp in a.loops] == ["epoch", "step"]
    assert site(a, "x").loop_path == ("epoch", "step")


def test_dynamic_names_are_listed_not_logged():
    a = analyze(
        src("""
        import florql
        def f(name, v):
            florql.log(name, v)
            florql.log(f"x_{v}", v)
            for i in florql.loop(name, range(3)):
                florql.log("ok", i)
    """)
    )
    assert set(a.loggable_names()) == {"ok"}
    assert a.dynamic_sites == (DynamicSite("log", 3, "f"), DynamicSite("log", 4, "f"), DynamicSite("loop", 5, "f"))


def test_name_and_value_keywords():
    a = analyze(
        src("""
        import florql
        florql.log(name="k", value=total)
    """)
    )
    assert site(a, "k").reads == frozenset({"total"})


HELPERS = src("""
    import florql

    def evaluate(model, data):
        acc = sum(model(x) == y for x, y in data) / len(data)
        florql.log("acc", acc)
        return acc

    def clip(model):
        norm = model.norm()
        florql.log("grad_norm", norm)

    def train(model, loader, opt):
        for x, y in florql.loop("step", loader):
            loss = model.loss(x, y)
            loss.backward()
            clip(model)
            florql.log("loss", loss.item())

    def main():
        florql.log("start", 0)
        for epoch in florql.loop("epoch", range(3)):
            train(model, loader, opt)
            evaluate(model, data)

    if __name__ == "__main__":
        main()
""")


def test_loop_paths_through_helper_calls():
    a = analyze(HELPERS)
    assert site(a, "acc").loop_path == ("epoch",)
    assert site(a, "acc").function == "evaluate"
    assert site(a, "loss").loop_path == ("epoch", "step")
    assert site(a, "grad_norm").loop_path == ("epoch", "step")  # main -> train -> clip
    assert site(a, "start").loop_path == ()
    assert loop(a, "step").loop_path == ("epoch", "step")
    assert loop(a, "step").function == "train"
    assert loop(a, "epoch").loop_path == ("epoch",)


def test_same_function_as_parent():
    a = analyze(HELPERS)
    assert loop(a, "step").same_function_as_parent is False
    assert loop(a, "epoch").same_function_as_parent is False
    b = analyze(
        src("""
        import florql
        for e in florql.loop("epoch", range(2)):
            for s in florql.loop("step", range(2)):
                pass
    """)
    )
    assert loop(b, "step").same_function_as_parent is True
    assert loop(b, "epoch").same_function_as_parent is False


def test_function_called_from_several_contexts():
    a = analyze(
        src("""
        import florql
        def report(v):
            florql.log("r", v)
        def main():
            for e in florql.loop("epoch", range(2)):
                for s in florql.loop("step", range(2)):
                    report(s)
                report(e)
            report(-1)
        main()
    """)
    )
    r = site(a, "r")
    assert r.loop_paths == ((), ("epoch",), ("epoch", "step"))
    assert r.loop_path == ("epoch", "step")


def test_methods_through_self_and_nested_functions():
    a = analyze(
        src("""
        import florql
        class Trainer:
            def fit(self):
                for e in florql.loop("epoch", range(2)):
                    self.train_epoch()
            def train_epoch(self):
                def inner(b):
                    florql.log("b", b)
                for b in florql.loop("step", self.batches):
                    inner(b)
        Trainer().fit()
    """)
    )
    assert site(a, "b").function == "Trainer.train_epoch.<locals>.inner"
    assert site(a, "b").loop_path == ("epoch", "step")
    assert loop(a, "step").function == "Trainer.train_epoch"
    assert loop(a, "step").loop_path == ("epoch", "step")


def test_recursion_terminates():
    a = analyze(
        src("""
        import florql
        def walk(n):
            florql.log("n", n)
            if n:
                walk(n - 1)
        for e in florql.loop("epoch", range(2)):
            walk(3)
    """)
    )
    assert site(a, "n").loop_paths == (("epoch",),)


def test_loop_assigned_names():
    a = analyze(
        src("""
        import florql
        total = 0
        for e in florql.loop("epoch", range(2)):
            running = 0.0
            for i, (x, y) in enumerate(data):
                running += x
            with ctx() as c:
                stats["loss"] = running
            self.best = max(self.best, running)
            if (n := len(data)) > 0:
                total += n
            def helper(q):
                inner_only = q
        print(total)
    """)
    )
    assert loop(a, "epoch").assigned == frozenset(
        {"e", "running", "i", "x", "y", "c", "stats", "self", "n", "total", "helper"}
    )


def test_reads_excludes_comprehension_variables_and_builtins():
    a = analyze(
        src("""
        import florql
        def f(model, loss):
            florql.log("g", sum(p.grad.norm() for p in model.parameters()) + loss * scale)
            florql.log("h", (lambda k: k + offset)(1))
    """)
    )
    assert site(a, "g").reads == frozenset({"model", "loss", "scale"})
    assert site(a, "h").reads == frozenset({"offset"})


def test_shadowed_builtin_is_a_read():
    a = analyze(
        src("""
        import florql
        max = 3
        florql.log("m", max)
    """)
    )
    assert site(a, "m").reads == frozenset({"max"})


def test_loggable_names_first_site_wins():
    a = analyze(
        src("""
        import florql
        florql.log("x", 1)
        florql.log("x", 2)
    """)
    )
    assert a.loggable_names()["x"].lineno == 2
    assert len(a.log_sites) == 2


# ------------------------------------------------------------- propagate

RECORDED = src("""
    import florql

    def make_data(n):
        return [(i, 2 * i) for i in range(n)]

    def train(w, data):
        for x, y in florql.loop("step", data):
            out = w * x
            l = (out - y) ** 2
            w = w - 0.01 * l
            florql.log("loss", l)
        return w

    def main():
        w = 1.0
        data = make_data(4)
        for epoch in florql.loop("epoch", range(3)):
            w = train(w, data)
        florql.log("w", w)

    if __name__ == "__main__":
        main()
""")

CURRENT = src("""
    import florql

    def make_data(n):
        return [(i, 2 * i) for i in range(n)]

    def train(w, data):
        for x, y in florql.loop("step", data):
            out = w * x
            loss = (out - y) ** 2
            florql.log("residual", out - y)
            w = w - 0.01 * loss
            florql.log("loss", loss)
        florql.log("w_end", w)
        return w

    def main():
        w = 1.0
        data = make_data(4)
        for epoch in florql.loop("epoch", range(3)):
            w = train(w, data)
            florql.log("epoch_w", w * 10)
        florql.log("w", w)

    if __name__ == "__main__":
        main()
""")


def test_propagate_renamed_variable_and_exec(monkeypatch):
    rec = RECORDED.replace("out = w * x", "pred = w * x").replace("(out - y)", "(pred - y)")
    result = propagate(rec, CURRENT, ["residual"], "train.py")
    compile(result, "train.py", "exec")
    assert inserted_lines(rec, result) == ['        florql.log("residual", pred - y)']
    assert result.index('florql.log("residual"') > result.index("l = (pred - y) ** 2")
    assert result.index('florql.log("residual"') < result.index("w = w - 0.01 * l")
    got = values(run_script(result, monkeypatch), "residual")
    want = values(run_script(CURRENT, monkeypatch), "residual")
    assert got == want and len(got) == 12


def test_propagate_renamed_loss_rewrites_to_old_name():
    cur = CURRENT.replace('florql.log("residual", out - y)', 'florql.log("sq", loss.real)')
    result = propagate(RECORDED, cur, ["sq"])
    assert inserted_lines(RECORDED, result) == ['        florql.log("sq", l.real)']


def test_propagate_inner_and_outer_loop_statements(monkeypatch):
    result = propagate(RECORDED, CURRENT, ["w_end", "epoch_w"], "train.py")
    assert inserted_lines(RECORDED, result) == [
        '    florql.log("w_end", w)',
        '        florql.log("epoch_w", w * 10)',
    ]
    lines = result.split("\n")
    # w_end goes after the step loop, inside train; epoch_w at the end of the epoch body
    assert lines[lines.index('    florql.log("w_end", w)') - 1] == '        florql.log("loss", l)'
    assert lines[lines.index('        florql.log("epoch_w", w * 10)') - 1] == "        w = train(w, data)"
    assert analyze(result).loggable_names()["epoch_w"].loop_path == ("epoch",)
    assert analyze(result).loggable_names()["w_end"].loop_path == ("epoch",)
    got, want = run_script(result, monkeypatch), run_script(CURRENT, monkeypatch)
    assert values(got, "epoch_w") == values(want, "epoch_w")
    assert values(got, "w_end") == values(want, "w_end")


def test_propagate_skips_names_already_logged():
    assert propagate(RECORDED, CURRENT, ["loss", "w"]) == RECORDED
    result = propagate(RECORDED, CURRENT, ["loss", "residual"])
    assert result.count('florql.log("loss"') == 1
    assert result.count('florql.log("residual"') == 1


def test_propagate_survives_added_and_deleted_lines(monkeypatch):
    rec = src("""
        import florql
        total = 0
        scale = 3
        debug = []
        for i in florql.loop("step", range(5)):
            debug.append(i)
            v = i * scale
            total += v
            print("step", i)
    """)
    cur = src("""
        import florql
        import math  # new
        total = 0
        scale = 3
        for i in florql.loop("step", range(5)):
            extra = math.sqrt(i)
            v = i * scale
            total += v
            florql.log("running", total)
            print("step", i)
    """)
    result = propagate(rec, cur, ["running"])
    assert inserted_lines(rec, result) == ['    florql.log("running", total)']
    assert result.split("\n").index('    florql.log("running", total)') == 8
    assert values(run_script(result, monkeypatch), "running") == [0, 3, 9, 18, 30]


def test_propagate_ignores_comments_formatting_and_constants(monkeypatch):
    rec = src("""
        import florql

        # an old comment
        def run(n):
            acc = 0
            for k in florql.loop("step",
                                 range(n)):   # odd formatting
                acc = acc + \\
                    k * 2
                acc -= 1
            return acc

        run(4)
    """)
    cur = src('''
        import florql

        def run(n):
            """Docstring added."""
            acc = 0
            for k in florql.loop("step", range(n)):
                acc = acc + k * 5  # new constant
                florql.log("acc", acc)  # hindsight!
                acc -= 1
            return acc

        run(4)
    ''')
    result = propagate(rec, cur, ["acc"])
    assert inserted_lines(rec, result) == ['        florql.log("acc", acc)  # hindsight!']
    assert result.index('florql.log("acc"') > result.index("k * 2")
    assert values(run_script(result, monkeypatch), "acc") == [0, 1, 4, 9]


def test_propagate_into_helper_with_renamed_parameter(monkeypatch):
    rec = src("""
        import florql
        def evaluate(net, rows):
            hits = sum(1 for r in rows if net(r))
            return hits / len(rows)
        for e in florql.loop("epoch", range(2)):
            evaluate(lambda r: r % 2 == e, range(6))
    """)
    cur = src("""
        import florql
        def evaluate(model, rows):
            hits = sum(1 for r in rows if model(r))
            florql.log("hits", hits)
            florql.log("first", model(rows[0]))
            return hits / len(rows)
        for e in florql.loop("epoch", range(2)):
            evaluate(lambda r: r % 2 == e, range(6))
    """)
    result = propagate(rec, cur, ["hits", "first"])
    assert inserted_lines(rec, result) == [
        '    florql.log("hits", hits)',
        '    florql.log("first", net(rows[0]))',
    ]
    assert analyze(result).loggable_names()["hits"].loop_path == ("epoch",)
    got = run_script(result, monkeypatch)
    assert values(got, "hits") == [3, 3]
    assert values(got, "first") == [True, False]


def test_propagate_uses_recorded_spelling_of_florql():
    rec = src("""
        import florql as fl
        for s in fl.loop("step", range(3)):
            y = s * s
    """)
    cur = src("""
        from florql import log, loop
        for s in loop("step", range(3)):
            y = s * s
            log("y", y)
    """)
    assert inserted_lines(rec, propagate(rec, cur, ["y"])) == ['    fl.log("y", y)']
    rec2 = rec.replace("import florql as fl", "from florql import loop, log as L").replace("fl.loop", "loop")
    assert inserted_lines(rec2, propagate(rec2, cur, ["y"])) == ['    L("y", y)']


def test_propagate_if_block_and_setup_lines(monkeypatch):
    rec = src("""
        import florql
        vals = []
        for s in florql.loop("step", range(6)):
            vals.append(s)
            last = s
    """)
    cur = src("""
        import florql
        vals = []
        for s in florql.loop("step", range(6)):
            vals.append(s)
            if s % 2 == 0:
                mean = sum(vals) / len(vals)
                florql.log("mean", mean)
            spread = max(vals) - min(vals)
            florql.log("spread", spread)
            last = s
    """)
    result = propagate(rec, cur, ["mean", "spread"])
    assert inserted_lines(rec, result) == [
        "    if s % 2 == 0:",
        "        mean = sum(vals) / len(vals)",
        '        florql.log("mean", mean)',
        "    spread = max(vals) - min(vals)",
        '    florql.log("spread", spread)',
    ]
    got, want = run_script(result, monkeypatch), run_script(cur, monkeypatch)
    assert got == want


def test_propagate_module_level_block_start():
    rec = src("""
        import florql
        for s in florql.loop("step", range(3)):
            a = s + 1
    """)
    cur = src("""
        import florql
        for s in florql.loop("step", range(3)):
            florql.log("s", s)
            b = s + 100
    """)
    result = propagate(rec, cur, ["s"])
    assert result.split("\n")[2] == '    florql.log("s", s)'


def test_propagate_through_new_wrapper_block():
    rec = src("""
        import florql
        def main():
            for e in florql.loop("epoch", range(2)):
                x = e
    """)
    cur = src("""
        import florql, contextlib
        def main():
            with contextlib.nullcontext():
                for e in florql.loop("epoch", range(2)):
                    x = e
                    florql.log("x", x)
    """)
    assert inserted_lines(rec, propagate(rec, cur, ["x"])) == ['        florql.log("x", x)']


def test_propagate_several_statements_in_order():
    rec = src("""
        import florql
        for s in florql.loop("step", range(3)):
            a = s
    """)
    cur = src("""
        import florql
        for s in florql.loop("step", range(3)):
            a = s
            florql.log("one", a)
            florql.log("two", a + 1)
    """)
    result = propagate(rec, cur, ["two", "one"])
    assert inserted_lines(rec, result) == ['    florql.log("one", a)', '    florql.log("two", a + 1)']


def test_propagate_keeps_crlf_and_missing_final_newline():
    rec = 'import florql\r\nfor s in florql.loop("step", range(3)):\r\n    a = s'
    cur = 'import florql\nfor s in florql.loop("step", range(3)):\n    a = s\n    florql.log("a", a)\n'
    result = propagate(rec, cur, ["a"])
    assert result == rec + '\r\n    florql.log("a", a)'
    rec_nl = rec + "\r\n"
    assert propagate(rec_nl, cur, ["a"]) == rec_nl + '    florql.log("a", a)\r\n'


# ------------------------------------------------------------- refusals


def test_refuses_unknown_variable_with_message():
    rec = src("""
        import florql
        def train(model):
            for b in florql.loop("step", range(3)):
                model.step(b)
    """)
    cur = src("""
        import florql
        def train(model):
            for b in florql.loop("step", range(3)):
                model.step(b)
                florql.log("grad_norm", total_norm)
    """)
    with pytest.raises(PropagationError) as err:
        propagate(rec, cur, ["grad_norm"], "train.py")
    assert str(err.value) == (
        'cannot place florql.log("grad_norm") (train.py line 5): '
        "the variable 'total_norm' it reads does not exist in the recorded code"
    )
    assert isinstance(err.value, ValueError)


def test_refuses_missing_enclosing_function():
    rec = src("""
        import florql
        def train():
            for b in florql.loop("step", range(3)):
                pass
    """)
    cur = src("""
        import florql
        def fit():
            for b in florql.loop("step", range(3)):
                florql.log("b", b)
    """)
    with pytest.raises(PropagationError, match=r"line 4\): its enclosing function 'fit' \(line 2\) has no"):
        propagate(rec, cur, ["b"], "train.py")


def test_refuses_missing_loop():
    rec = 'import florql\nfor e in florql.loop("epoch", range(2)):\n    pass\n'
    cur = src("""
        import florql
        for e in florql.loop("epoch", range(2)):
            for s in florql.loop("step", range(2)):
                florql.log("s", s)
    """)
    with pytest.raises(PropagationError, match=r'florql.loop\("step"\)'):
        propagate(rec, cur, ["s"])


def test_refuses_log_that_is_not_a_statement_and_unknown_name():
    rec = "import florql\nx = 1\n"
    cur = 'import florql\nx = 1\ny = florql.log("y", x)\n'
    with pytest.raises(PropagationError, match="not a statement of its own"):
        propagate(rec, cur, ["y"])
    with pytest.raises(PropagationError, match="does not log it"):
        propagate(rec, cur, ["nope"])


def test_refuses_to_overwrite_recorded_variable():
    rec = src("""
        import florql
        for s in florql.loop("step", range(3)):
            norm = s
    """)
    cur = src("""
        import florql
        for s in florql.loop("step", range(3)):
            if s:
                norm = s * 2
                florql.log("norm2", norm)
    """)
    with pytest.raises(PropagationError, match="assigns 'norm', which the recorded code already uses"):
        propagate(rec, cur, ["norm2"])


def test_refuses_ambiguous_rename():
    rec = src("""
        import florql
        def f(p, q):
            for s in florql.loop("step", range(3)):
                a = p + 1
                b = q + 1
    """)
    cur = src("""
        import florql
        def f(p, q):
            for s in florql.loop("step", range(3)):
                x = p + 1
                x = q + 1
                florql.log("x", x)
    """)
    with pytest.raises(PropagationError, match="matches several recorded variables: a, b"):
        propagate(rec, cur, ["x"])


def test_propagate_multiline_statement_keeps_its_text_and_renames():
    rec = 'import florql\nfor s in florql.loop("step", range(3)):\n    val = s * 2\n'
    cur = src("""
        import florql
        for s in florql.loop("step", range(3)):
            v = s * 2
            florql.log(
                "a",
                v + 1,  # why
            )
    """)
    assert inserted_lines(rec, propagate(rec, cur, ["a"])) == [
        "    florql.log(",
        '        "a",',
        "        val + 1,  # why",
        "    )",
    ]


def test_propagate_into_except_handler_and_before_decorated_def():
    rec = src("""
        import florql
        def deco(f):
            return f
        for s in florql.loop("step", range(3)):
            try:
                r = 1 / s
            except ZeroDivisionError:
                r = 0
            @deco
            def g():
                return r
    """)
    cur = src("""
        import florql
        def deco(f):
            return f
        for s in florql.loop("step", range(3)):
            try:
                r = 1 / s
            except ZeroDivisionError:
                florql.log("zero", s)
                r = 0
            florql.log("r", r)
            @deco
            def g():
                return r
    """)
    result = propagate(rec, cur, ["zero", "r"])
    lines = result.split("\n")
    assert lines[lines.index("        r = 0") - 1] == '        florql.log("zero", s)'
    assert lines[lines.index("    @deco") - 1] == '    florql.log("r", r)'


def test_refuses_recorded_block_written_on_one_line():
    rec = 'import florql\nfor s in florql.loop("step", range(3)): a = s\n'
    cur = 'import florql\nfor s in florql.loop("step", range(3)):\n    a = s\n    florql.log("a", a)\n'
    with pytest.raises(PropagationError, match="shares a line with other code"):
        propagate(rec, cur, ["a"])


def test_statement_inputs_follow_what_the_loop_changes_not_the_set_up_before_it():
    from florql.replay.analysis import statement_inputs

    source = textwrap.dedent(
        """
        import florql

        def main():
            parser = make_parser()
            args = parser.parse_args()
            history = []
            for epoch in florql.loop("epoch", range(3)):
                loss = train(args, model)
                history.append(loss)
                florql.log("loss_avg", sum(history) / len(history))
                florql.log("lr", args.lr)
        """
    )
    # `args` comes from `parser` in the set-up, which every replay runs again: `parser` is no input.
    assert statement_inputs(source, "loss_avg") == {"sum", "len", "history", "loss", "train", "args", "model"}
    assert statement_inputs(source, "lr") == {"args"}
