"""Branch and fan out: one sandbox reaches a state, three forks of it try the strategies a model
proposes, the best one is kept.

The task is to write `dedupe(items)` in /work/solution.py: the items without repeats, in the
order they were first seen, fast. The parent sandbox gets the task, a grader and the grader's
test data (the state every attempt starts from), then is forked into three children. For each
child, the model is asked for a solution with a different strategy hint; the child writes it
and grades it, in parallel with its siblings and unseen by them. The fastest correct solution
wins: its sandbox keeps running (its id is printed) and the others are killed.

The model is any OpenAI-compatible chat-completions endpoint: FORKD_EXAMPLE_MODEL_URL (default:
OPENAI_BASE_URL, then https://api.openai.com/v1), OPENAI_API_KEY and FORKD_EXAMPLE_MODEL
(default gpt-4o-mini).

    python fanout_agent.py --tag python-numpy
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional

import httpx

from forkd import Sandbox

TASK = ("Write a Python module defining dedupe(items): return a list of the items without "
        "repeats, in the order each was first seen. items may hold a million hashable values.")
STRATEGIES = [
    "Track the values already seen in a set.",
    "Use the insertion order of a dict.",
    "Compare each item with the ones already kept.",
]
GRADER = '''\
import json, random, sys, time
sys.path.insert(0, "/work")
cases = json.load(open("/work/cases.json"))
try:
    from solution import dedupe
    correct = all(dedupe(list(case)) == expected for case, expected in cases)
except Exception as e:
    print(json.dumps({"correct": False, "error": repr(e)}))
    sys.exit(0)
rng = random.Random(7)
big = [rng.randrange(3000) for _ in range(3000)]
start = time.perf_counter()
dedupe(big)
print(json.dumps({"correct": correct, "seconds": time.perf_counter() - start}))
'''


@dataclass
class Attempt:
    strategy: str
    sandbox: Sandbox
    correct: bool = False
    seconds: float = float("inf")
    note: str = ""


def ask_model(strategy: str) -> str:
    """The code the model proposes for TASK following `strategy` (fences stripped)."""
    base = (os.environ.get("FORKD_EXAMPLE_MODEL_URL") or os.environ.get("OPENAI_BASE_URL")
            or "https://api.openai.com/v1")
    key = os.environ.get("OPENAI_API_KEY", "")
    reply = httpx.post(
        f"{base.rstrip('/')}/chat/completions",
        headers={"Authorization": f"Bearer {key}"} if key else {},
        json={
            "model": os.environ.get("FORKD_EXAMPLE_MODEL", "gpt-4o-mini"),
            "messages": [
                {"role": "system", "content": "Reply with the Python module only."},
                {"role": "user", "content": f"{TASK}\nStrategy: {strategy}"},
            ],
        },
        timeout=120,
    )
    reply.raise_for_status()
    text = reply.json()["choices"][0]["message"]["content"]
    fenced = re.search(r"```(?:python)?\n(.*?)```", text, re.S)
    return fenced.group(1) if fenced else text


def prepare(sandbox: Sandbox) -> None:
    """The state every attempt starts from: the grader and its cases."""
    sandbox.files.make_dir("/work")
    sandbox.files.write("/work/grade.py", GRADER)
    cases = [[[3, 1, 3, 2, 1], [3, 1, 2]], [[], []], [["b", "a", "b"], ["b", "a"]],
             [[5] * 50, [5]], [list(range(20, 0, -1)) * 2, list(range(20, 0, -1))]]
    sandbox.files.write("/work/cases.json", json.dumps(cases))


def attempt(a: Attempt) -> Attempt:
    """Asks the model, writes its answer into a's sandbox and grades it there."""
    a.sandbox.files.write("/work/solution.py", ask_model(a.strategy))
    run = a.sandbox.commands.run("python3 /work/grade.py", timeout=600)
    try:
        grade = json.loads(run.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        a.note = f"the grader failed: {run.stderr.strip()[-200:]}"
        return a
    a.correct = bool(grade["correct"])
    a.seconds = grade.get("seconds", float("inf"))
    a.note = grade.get("error", "")
    return a


def run(tag: str, host: Optional[str] = None) -> Attempt:
    with Sandbox.create(tag, host=host, metadata={"example": "fanout"}) as parent:
        prepare(parent)
        children = parent.fork(len(STRATEGIES))
    attempts: List[Attempt] = [Attempt(s, c) for s, c in zip(STRATEGIES, children)]
    with ThreadPoolExecutor(len(attempts)) as pool:
        attempts = list(pool.map(attempt, attempts))
    for a in attempts:
        verdict = f"{a.seconds * 1000:.1f} ms" if a.correct else f"wrong {a.note}".strip()
        print(f"{a.sandbox.id}  {verdict:<12}  {a.strategy}")
    correct = [a for a in attempts if a.correct]
    best = min(correct, key=lambda a: a.seconds) if correct else None
    for a in attempts:
        if a is not best:
            a.sandbox.kill()
    if best is None:
        sys.exit("no strategy gave a correct solution")
    print(f"kept {best.sandbox.id}: {best.strategy}")
    return best


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default=os.environ.get("FORKD_TAG", "python-numpy"),
                        help="a snapshot of a Linux image with python3 (default: python-numpy)")
    run(parser.parse_args().tag)
