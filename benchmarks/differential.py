"""Differential check of hindsight answers at volume: the generator of tests/test_differential.py,
run for many more examples.

    python benchmarks/differential.py                   # 2000 generated queries
    python benchmarks/differential.py --examples 300 --restore-every 50 --replays-per-cycle 10 -v

Records the stores once (ground truth per variant of the script, and the recorded store; see
tests/differential/support.py), then asks each generated query of the recorded store (replaying
what is missing) and of the oracle over the ground truth. Prints the count of equal answers,
clear errors (acceptable refusals) and WRONG answers, with the wrong ones listed; exits 1 on any
wrong answer or crash (a non-FlorqlError), 0 otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from differential import support as D  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000, help="generated queries (default 2000)")
    parser.add_argument(
        "--restore-every",
        type=int,
        default=100,
        help="put the recorded store back to its pristine state every N queries (default 100)",
    )
    parser.add_argument(
        "--replays-per-cycle",
        type=int,
        default=None,
        help="replay attempts allowed between restores; past them, queries that would replay "
        "are skipped (default: no limit)",
    )
    parser.add_argument(
        "--switch-one-in",
        type=int,
        default=20,
        help="switch the current code between full.py and full_b.py about once in N queries",
    )
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: derandomized)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to record the stores (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the stores afterwards")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every query and its outcome")
    args = parser.parse_args(argv)

    base = args.workdir or Path(tempfile.mkdtemp(prefix="florql-differential-"))
    try:
        print(f"recording the stores in {base} …", flush=True)
        lab = D.build_lab(base / "lab", helper=False)
        print(f"recorded in {lab.build_s:.0f} s", flush=True)
        session = D.Session(
            lab, restore_every=args.restore_every, replays_per_cycle=args.replays_per_cycle, verbose=args.verbose
        )
        started = time.monotonic()

        @settings(
            max_examples=args.examples,
            deadline=None,
            derandomize=args.seed is None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(D.steps(switch_one_in=args.switch_one_in))
        def run(step: D.Step) -> None:
            session.run(step)
            n = len(session.outcomes)
            if not args.verbose and n % 50 == 0:
                counts = session.counts()
                print(
                    f"{n:6d} queries, {time.monotonic() - started:6.0f} s: "
                    + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                    flush=True,
                )

        if args.seed is not None:
            run = seed(args.seed)(run)
        run()
        print()
        print(session.summary())
        failures = session.failures()
        counts = session.counts()
        print(
            f"\nequal: {counts.get('equal', 0) + counts.get('both_error', 0)}   "
            f"clear-error: {counts.get('clear_error', 0)}   skipped: {counts.get('skipped', 0)}   "
            f"WRONG: {counts.get('wrong', 0)}   crash: {counts.get('crash', 0)}   "
            f"unclear-error: {counts.get('unclear_error', 0)}"
        )
        if failures:
            print()
            print(session.report(limit=200))
        return 1 if failures else 0
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
