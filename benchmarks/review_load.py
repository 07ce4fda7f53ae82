"""How long `character review` takes to open a large run: a synthetic run (tests/synthetic_run.py: every file
the review reads, written from the schemas) of 10 and of 1,000 traits, timed side by side, interleaved,
medians over --reps: reading the run and indexing it (create_app), the first view (the trait list), a trait's
page and its pairs, answers and message pages, through Starlette's test client (no network).

    .venv/bin/python benchmarks/review_load.py --traits 10 1000 --messages 20 --reps 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def folder_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def time_once(run_dir: str, trait: str, message_id: str) -> dict:
    from starlette.testclient import TestClient

    from character.review.app import create_app

    times = {}
    start = time.perf_counter()
    app = create_app(run_dir, "bench", token="t")
    times["read and index"] = time.perf_counter() - start
    client = TestClient(app, client=("127.0.0.1", 1), base_url="http://127.0.0.1")
    for label, path in (("first view (trait list)", "/"), ("trait page", f"/trait/{trait}"),
                        ("pairs tab", f"/trait/{trait}?tab=pairs&disagree=1"),
                        ("answers by PM change", f"/trait/{trait}?tab=answers&sort=pm_change"),
                        ("message page", f"/message/{message_id}"), ("trait list, last page", "/?page=20")):
        t = time.perf_counter()
        assert client.get(path).status_code == 200
        times[label] = time.perf_counter() - t
    times["open to first view"] = times["read and index"] + times["first view (trait list)"]
    return times


def main() -> None:
    from synthetic_run import synthetic_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traits", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--messages", type=int, default=20, help="messages per trait")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="review-bench-")
    runs = {}
    for n in args.traits:
        run_dir = os.path.join(root, f"traits-{n}")
        info = synthetic_run(run_dir, traits=n, messages_per_trait=args.messages)
        trait = info["traits"][len(info["traits"]) // 2]
        runs[n] = (run_dir, trait, info["pairs"][trait][0]["message_id"])
        pairs = sum(len(p) for p in info["pairs"].values())
        print(f"{n} traits: {n * args.messages} messages, {pairs} pairs, {folder_bytes(run_dir) / 1e6:.1f} MB on disk")
    results = {n: [] for n in args.traits}
    for _ in range(args.reps):  # interleaved: each rep times every size once
        for n in args.traits:
            results[n].append(time_once(*runs[n]))
    print(f"\nmedian seconds over {args.reps} reps (interleaved)")
    labels = list(results[args.traits[0]][0])
    print(f"{'':28}" + "".join(f"{str(n) + ' traits':>14}" for n in args.traits))
    for label in labels:
        print(f"{label:28}" + "".join(f"{statistics.median(r[label] for r in results[n]):>14.3f}" for n in args.traits))


if __name__ == "__main__":
    main()
