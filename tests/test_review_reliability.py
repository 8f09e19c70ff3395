"""Decisions survive a SIGKILL and concurrent writers (several annotators, several processes)."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from cellcurate.curation.queue import build_queue
from cellcurate.datasets.store import Store
from cellcurate.napari_plugin.sample import write_disc_store, write_flags


@pytest.fixture()
def store(tmp_path):
    s = write_disc_store(tmp_path / "s", n_images=2, per_image=9, size=128, seed=3)
    write_flags(s, fraction=0.5, seed=4)
    return s


def test_sigkill_right_after_a_decision(store, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from cellcurate.curation.review import ReviewSession
        from cellcurate.datasets.store import Store
        s = ReviewSession(Store.open({str(store.path)!r}, mode="a"), reviewer="ana")
        d = s.act("not_nucleus")
        print(d.seq, d.nucleus_id, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    seq, nid = (int(x) for x in line.split())
    again = Store.open(store.path, mode="r")
    ev = again.ledger.events(kinds=("decision",))
    assert ev["seq"].tolist() == [seq] and int(ev["nucleus_id"].iloc[0]) == nid
    assert again.current_labels().set_index("nucleus_id").loc[nid, "status"] == "rejected"
    assert again.ledger.verify_chain() == []
    q = build_queue(again, reviewer="ana")
    assert bool(q.set_index("nucleus_id").loc[nid, "decided"])


WRITER = textwrap.dedent("""
    import os, signal, sys
    from cellcurate.curation.review import decide
    from cellcurate.datasets.ledger import Ledger
    from cellcurate.datasets.store import Store
    path, who, ids = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
    rounds, per_round, die_at = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    store = Store.open(path, mode="a")
    ledger = Ledger(store.ledger.path, durable=True)
    if die_at >= 0:  # SIGKILL inside the write transaction of decision number die_at, before its COMMIT
        insert, calls = ledger._insert, []

        def insert_then_die(c, events):
            seqs = insert(c, events)
            calls.append(1)
            if len(calls) == die_at + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return seqs

        ledger._insert = insert_then_die
    print("ready", flush=True)
    n = 0
    for r in range(rounds):
        sys.stdin.readline()  # the parent's "go": rounds run in lockstep with the other writer
        for _ in range(per_round):
            decide(store, ids[n % len(ids)], "set_class", reviewer=who, label=1 + n % 7, ledger=ledger)
            n += 1
        print("tick", flush=True)
    print("done", flush=True)
""")
HANG = 1800  # seconds: a guard against a hang only, far above what a loaded 2-core machine needs


def _writers(store, plan: dict[str, int], *, rounds: int, per_round: int):
    """Start one writer process per reviewer (``plan``: reviewer -> decision number to die at, -1
    never) and drive them in lockstep rounds: in each round both write ``per_round`` decisions at
    the same time; the next round starts when both finished (or died). No wall-clock assumption."""
    ids = [int(n) for n in build_queue(store)["nucleus_id"]]
    procs = {who: subprocess.Popen([sys.executable, "-c", WRITER, str(store.path), who, ",".join(map(str, ids)),
                                    str(rounds), str(per_round), str(die)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for who, die in plan.items()}
    for p in procs.values():
        assert p.stdout.readline().strip() == "ready"
    alive = dict(procs)
    for _ in range(rounds):
        for p in alive.values():
            p.stdin.write("go\n")
            p.stdin.flush()
        for who, p in list(alive.items()):
            if p.stdout.readline().strip() != "tick":  # EOF: the process died
                del alive[who]
    for p in procs.values():
        try:
            p.stdin.close()
        except BrokenPipeError:
            pass
        p.wait(timeout=HANG)
    return procs


@pytest.mark.slow
def test_two_processes_write_decisions_concurrently(store):
    procs = _writers(store, {"ana": -1, "bob": -1}, rounds=3, per_round=25)
    assert all(p.returncode == 0 for p in procs.values())
    again = Store.open(store.path, mode="r")
    dec = again.ledger.events(kinds=("decision",))
    assert len(dec) == 150
    assert dec["actor"].value_counts().to_dict() == {"ana": 75, "bob": 75}
    assert dec["seq"].is_unique and again.ledger.verify_chain() == []
    # interleaved: the lockstep rounds guarantee at least one switch per round
    actors = dec["actor"].tolist()
    assert sum(a != b for a, b in zip(actors, actors[1:])) >= 3


@pytest.mark.slow
def test_sigkill_of_one_of_two_reviewers_mid_write(store):
    """bob is killed inside the transaction of his 31st decision (rows inserted, not committed, the
    write lock held); ana keeps writing. Nothing of ana's is lost, bob's 30 committed decisions stay,
    his half-written one is gone, the chain is intact, and the store verifies."""
    from cellcurate.datasets.checks import verify_store

    procs = _writers(store, {"ana": -1, "bob": 30}, rounds=2, per_round=25)
    assert procs["ana"].returncode == 0
    assert procs["bob"].returncode == -signal.SIGKILL
    again = Store.open(store.path, mode="r")
    dec = again.ledger.events(kinds=("decision",))
    assert dec["actor"].value_counts().to_dict() == {"ana": 50, "bob": 30}
    assert dec["seq"].tolist() == list(range(int(dec["seq"].min()), int(dec["seq"].min()) + 80))  # no gap
    assert again.ledger.verify_chain() == []
    assert verify_store(again, progress=False).ok
    again.close()
    # the dead writer's lock is gone: bob can carry on at once
    from cellcurate.curation.review import decide

    with Store.open(store.path, mode="a") as s:
        d = decide(s, int(dec["nucleus_id"].iloc[0]), "set_class", reviewer="bob", label=3)
        assert d.seq == int(dec["seq"].max()) + 1
