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


@pytest.mark.slow
def test_two_processes_write_1000_decisions_each(store):
    ids = [int(n) for n in build_queue(store)["nucleus_id"]]
    script = textwrap.dedent("""
        import sys
        from cellcurate.curation.review import decide
        from cellcurate.datasets.ledger import Ledger
        from cellcurate.datasets.store import Store
        path, who, ids = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
        store = Store.open(path, mode="a")
        ledger = Ledger(store.ledger.path, durable=True)
        print("ready", flush=True)
        sys.stdin.readline()
        for i in range(1000):
            decide(store, ids[i % len(ids)], "set_class", reviewer=who, label=1 + i % 7, ledger=ledger)
        print("done", flush=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(store.path), who, ",".join(map(str, ids))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for who in ("ana", "bob")]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:  # start both at once
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "done"
    again = Store.open(store.path, mode="r")
    dec = again.ledger.events(kinds=("decision",))
    assert len(dec) == 2000
    assert dec["actor"].value_counts().to_dict() == {"ana": 1000, "bob": 1000}
    assert dec["seq"].is_unique and again.ledger.verify_chain() == []
    # interleaved, not one after the other
    actors = dec["actor"].tolist()
    assert sum(a != b for a, b in zip(actors, actors[1:])) > 1
