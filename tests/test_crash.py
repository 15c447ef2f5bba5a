"""Crash injection: a child process adds to, upserts into, removes from and saves an index in
a loop and is killed with SIGKILL at a random point, over and over. After every kill the
index must open, pass ``check()`` (every HNSW label has its SQLite row and the reverse) and
hold exactly the state of the last completed save or of the interrupted one, never a mix.

Two ways of choosing the point:

* *traced*: the child counts the Python lines it executes in ``mmedge/runtime/index.py``
  (all of them, or only those of the save path) and SIGKILLs itself at line number N (N
  drawn from a seeded generator), so every line of ``add``/``remove``/``save``/``open`` is
  a possible crash point and a run is reproducible;
* *commit*: right after the commit point of the first, second or third save, before the
  child can report the step done (the new state must be there);
* *timed*: the parent sends SIGKILL a random few milliseconds after the child announced a
  step, which also lands inside C code (hnswlib writing the graph, SQLite committing).

The child shrinks SQLite's page cache and writes long captions every few steps, so SQLite
spills uncommitted pages into ``items.sqlite`` and a kill leaves a hot journal to roll back.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmedge.errors import SearchIndexError
from mmedge.runtime.index import Index, IndexParams

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")

REPO = Path(__file__).resolve().parents[1]
DIM = 16
PARAMS = IndexParams(M=8, ef_construction=32, ef=32)
N_TRACED = 16
N_COMMIT = 2
N_TIMED = 6

# The operations of step s (generation s-1 -> s), shared by the child and the model below.
STEP_CODE = '''
import numpy as np

def step_ops(s, dim):
    """(adds, add_vectors, upserts, upsert_vectors, removes, caption_len) of step s >= 1."""
    rng = np.random.default_rng(s)
    n = 3 + s % 5
    adds = [f"s{s}k{i}" for i in range(n)]
    add_v = rng.standard_normal((n, dim)).astype(np.float32)
    ups = [f"s{s - 1}k0"] if s >= 2 else []
    up_v = rng.standard_normal((len(ups), dim)).astype(np.float32)
    removes = [f"s{s - 2}k{i}" for i in range(1, 3 + (s - 2) % 5, 2)] if s >= 3 else []
    caption_len = 3000 if s % 4 == 0 else 20
    return adds, add_v, ups, up_v, removes, caption_len
'''

CHILD = STEP_CODE + '''
import os, signal, sys
from mmedge.runtime.index import Index, Item
import mmedge.runtime.index as index_mod

folder, kill_at, steps, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
scope = sys.argv[5]  # "all": any line of index.py; "save": lines of the save path only;
                    # "commit": right after the kill_at-th commit point (inside save)
SAVE_PATH = {"save", "_commit_generation", "_write_index_json", "_cleanup_files",
             "_atomic_write_text", "_fsync_file", "_fsync_dir", "_unlink_quietly"}

if kill_at > 0 and scope == "commit":
    real_commit = Index._commit_generation
    commits = 0

    def commit_then_die(self, generation):
        global commits
        real_commit(self, generation)
        commits += 1
        if commits >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    Index._commit_generation = commit_then_die
elif kill_at > 0:  # traced mode: SIGKILL at the kill_at-th line executed in index.py
    target = index_mod.__file__
    seen = 0

    def local(frame, event, arg):
        global seen
        if event == "line" and (scope == "all" or frame.f_code.co_name in SAVE_PATH):
            seen += 1
            if seen >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == target else None

    sys.settrace(tracer)

idx = Index.open(folder)
idx._conn.execute("PRAGMA cache_size=2")  # spill uncommitted pages into the database file
start = idx.generation
for s in range(start + 1, start + 1 + steps):
    print(f"begin {s}", flush=True)
    adds, add_v, ups, up_v, removes, cap = step_ops(s, dim)
    idx.add([Item(key=k, modality="text", caption=k + " " + "x" * cap, metadata={"step": s})
             for k in adds], add_v)
    if ups:
        idx.add([Item(key=k, modality="image", path=f"/u/{s}.png", metadata={"up": s}) for k in ups],
                up_v, upsert=True)
    if removes:
        idx.remove(removes)
    idx.save()
    print(f"done {s}", flush=True)
idx.close()
'''

_ns: dict[str, Any] = {}
exec(STEP_CODE, _ns)  # noqa: S102 - our own constant code, shared with the child
step_ops = _ns["step_ops"]


def model_state(generation: int) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """key -> (unit vector, metadata) after the first ``generation`` steps."""
    state: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    for s in range(1, generation + 1):
        adds, add_v, ups, up_v, removes, _cap = step_ops(s, DIM)
        for k, v in zip(adds, add_v):
            state[k] = (v / np.linalg.norm(v), {"step": s})
        for k, v in zip(ups, up_v):
            state[k] = (v / np.linalg.norm(v), {"up": s})
        for k in removes:
            del state[k]
    return state


def verify(folder: Path, allowed: set[int]) -> int:
    """Open after a kill: readers see an allowed generation (or are told to let a writer
    roll back first), the writable open repairs, and the content equals the model."""
    try:
        with Index.open(folder, readonly=True) as ro:
            assert ro.generation in allowed, (ro.generation, allowed)
            ro.check()
    except SearchIndexError as exc:  # a hot journal: only a writer may roll it back
        assert "open it once without readonly" in str(exc), exc
    with Index.open(folder) as idx:
        gen = idx.generation
        assert gen in allowed, (gen, allowed)
        idx.check()
        want = model_state(gen)
        assert sorted(idx.keys()) == sorted(want)
        assert len(idx) == len(want)
        if want:
            keys = sorted(want)
            np.testing.assert_allclose(idx.vectors(keys), np.stack([want[k][0] for k in keys]), atol=1e-6)
            for k in keys[:: max(1, len(keys) // 5)]:
                item = idx.get(k)
                assert item is not None and item.metadata == want[k][1]
                assert idx.search(want[k][0], k=1)[0][0].key == k
    names = sorted(os.listdir(folder))
    assert names == [f"hnsw.{gen}.bin", "index.json", "items.sqlite"], names
    return gen


def run_child(folder: Path, kill_at: int, steps: int, scope: str = "all") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder), str(kill_at), str(steps), str(DIM), scope],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def progress(lines: list[str], before: int) -> set[int]:
    """Generations the index may hold: the last completed step's, plus the begun one."""
    done = max([int(x.split()[1]) for x in lines if x.startswith("done ")], default=before)
    begun = max([int(x.split()[1]) for x in lines if x.startswith("begin ")], default=before)
    assert begun in (done, done + 1), lines
    return {done, begun}


def test_sigkill_at_random_points_never_leaves_a_mix(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    Index.create(folder, DIM, "fp-crash", PARAMS).close()
    rng = random.Random(20240601)
    gen = 0
    kills = 0
    outcomes = {"between steps": 0, "mid-step, old state": 0, "mid-step, new state": 0}
    for round_no in range(N_TRACED + N_COMMIT + N_TIMED):
        if round_no >= N_TRACED and round_no < N_TRACED + N_COMMIT:  # just after the commit point
            proc = run_child(folder, kill_at=rng.randint(1, 3), steps=60, scope="commit")
            out, err = proc.communicate(timeout=120)
            lines = [ln for ln in out.splitlines() if ln.strip()]
        elif round_no < N_TRACED:
            if round_no % 2:  # anywhere in index.py (add, remove, open's repairs, save)
                proc = run_child(folder, kill_at=rng.randint(1, 2500), steps=60)
            else:  # inside save: around the commit point, index.json, the cleanup
                proc = run_child(folder, kill_at=rng.randint(1, 300), steps=60, scope="save")
            out, err = proc.communicate(timeout=120)
            lines = [ln for ln in out.splitlines() if ln.strip()]
        else:
            proc = run_child(folder, kill_at=0, steps=200)
            assert proc.stdout is not None
            lines = []
            wait_for = rng.randint(1, 3)
            while True:  # wait for the wait_for-th step to begin, then kill a little later
                line = proc.stdout.readline().strip()
                assert line, proc.stderr.read() if proc.stderr else "child ended early"
                lines.append(line)
                if sum(x.startswith("begin ") for x in lines) == wait_for:
                    break
            time.sleep(rng.uniform(0.0, 0.03))
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=60)
            lines += [ln for ln in out.splitlines() if ln.strip()]
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
        kills += 1
        allowed = progress(lines, gen)
        new_gen = verify(folder, allowed)
        if len(allowed) == 1:
            outcomes["between steps"] += 1
        else:
            outcomes["mid-step, new state" if new_gen == max(allowed) else "mid-step, old state"] += 1
        assert new_gen >= gen
        gen = new_gen
    assert kills >= 20
    assert gen >= 5, "the child should get some saves through between kills"
    # most kills land inside a step; at least the N_COMMIT ones after its commit point
    assert outcomes["mid-step, old state"] >= 5 and outcomes["mid-step, new state"] >= N_COMMIT, outcomes
