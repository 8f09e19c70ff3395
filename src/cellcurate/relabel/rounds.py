"""Relabeling rounds: ``run_round(store, N)``.

Round 1 (cross-source): for every set of candidate classes that unresolved nuclei carry (PanNuke
``Inflammatory`` -> {Lymphocyte, Macrophage, Neutrophil}; MoNuSAC ``Epithelial`` -> {Neoplastic,
Epithelial}), a classifier is trained on the nuclei *of the other sources* whose label is one of
those classes. Its held-out accuracy (grouped K-fold: no patient / PanNuke fold on both sides) and
confusion matrix are reported; the fold models then propose a class for every unresolved nucleus.

Round N ≥ 2 (unified): grouped K-fold over every labelled nucleus with its current label gives an
out-of-sample probability vector; cleanlab turns disagreement into ranked flags
(:mod:`cellcurate.relabel.detect`); still-unresolved nuclei get proposals as in round 1.

Policy: a proposal whose confidence (its largest probability) is at least ``auto_accept`` is
recorded as ``auto_accepted`` (it sets the label in the ledger fold); the others are ``queued`` and
also flagged ``low_confidence_proposal`` so the review queue is one list of flags. Flags are not
made for nuclei a reviewer already decided (status ``reviewed``) nor for ``conflict`` nuclei.

Writes: ``STORE/features/<backbone>/`` (cache), ``STORE/rounds/<N>/`` (config.json, summary.json,
proposals.parquet, flags.parquet, oos.parquet, report.html + PNGs, written in a temp folder and
renamed into place *before* the ledger commits) and the ledger events of the run in one ``append``
(started, proposals, flags, finished), all under the store's write lock. Any error before the
commit leaves the ledger unchanged and puts the previous folder back; a crash between the rename
and the commit leaves a folder whose ``run_seq`` the ledger never finished, which
``curate verify`` reports (a finished round always has its folder).

Dimensions: N nuclei, F features, K = the store taxonomy's classes.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..core.atomic import atomic_write_json, fsync_dir, remove_tree, replace_dir
from ..errors import ConfigError, StateError, StoreError
from .backbones import BACKBONES, DEVICES, PRECISIONS, make_backbone
from .classify import CLASSIFIERS, cross_val_probs, nucleus_groups, predict_mean
from .detect import find_issues
from .features import cache_dir, check_features, load_cached, nucleus_features

if TYPE_CHECKING:  # pragma: no cover
    from ..datasets.store import Store

# Class ids, their number and the probability columns p<id> follow the store's taxonomy
# (store.taxonomy.ids): nothing here assumes 7 classes or contiguous ids.


@dataclass
class RoundConfig:
    """Options of a round; saved as ``rounds/<N>/config.json`` and in the "started" event."""

    backbone: str = "handcrafted"
    encoder: str | None = None
    weights: str | None = None
    classifier: str = "hgb"
    folds: int = 5
    seed: int = 0
    auto_accept: float = 0.9
    filter_by: str = "prune_by_noise_rate"
    n_jobs: int = 1
    max_train: int | None = 40000
    gallery: int = 24
    report: bool = True
    device: str = "cpu"
    precision: str | None = None  # timm backbone: fp32 | fp16 | bf16; None = fp16 on CUDA, fp32 on CPU

    def validate(self) -> "RoundConfig":
        if self.backbone not in BACKBONES:
            raise ConfigError(f"unknown backbone {self.backbone!r}; expected one of {', '.join(BACKBONES)}")
        if self.device != "auto" and self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"unknown --device {self.device!r}; expected auto, cpu, cuda or cuda:N")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"unknown --precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if self.precision is not None and self.backbone != "timm":
            raise ConfigError(f"--precision applies to the timm backbone, not {self.backbone!r}")
        if self.classifier not in CLASSIFIERS:
            raise ConfigError(f"unknown classifier {self.classifier!r}; expected one of {', '.join(CLASSIFIERS)}")
        if not isinstance(self.folds, int) or self.folds < 2:
            raise ConfigError(f"--folds must be an integer >= 2, got {self.folds!r}")
        if not 0.0 <= float(self.auto_accept) <= 1.0:
            raise ConfigError(f"--auto-accept must lie in [0, 1], got {self.auto_accept}")
        if self.filter_by not in ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                                  "predicted_neq_given"):
            raise ConfigError(f"unknown cleanlab filter_by {self.filter_by!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RoundResult:
    """What a round did (or, with ``dry_run``, would do)."""

    round: int
    dry_run: bool
    plan: list[str]
    folder: Path | None = None
    run_seq: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """The terminal summary."""
        if self.dry_run:
            return "\n".join(["dry run (nothing written):", *("  " + p for p in self.plan)])
        m, c = self.metrics, self.counts
        lines = [f"round {self.round} finished in {self.seconds:.1f} s (run seq {self.run_seq}); {self.folder}"]
        for clf in m.get("classifiers", []):
            lines.append(f"  classifier {clf['model']}: held-out accuracy {clf['accuracy']:.3f} over {clf['folds']} "
                         f"grouped folds, {clf['n_train']} training nuclei -> {clf['n_targets']} proposals")
        if "cv_accuracy" in m:
            lines.append(f"  unified cross-validation: accuracy {m['cv_accuracy']:.3f} over {m['cv_folds']} folds, "
                         f"{c.get('labelled', 0)} labelled nuclei")
        lines.append(f"  proposals: {c.get('proposals', 0)} ({c.get('auto_accepted', 0)} auto-accepted at >= "
                     f"{m.get('auto_accept', 0):.2f}, {c.get('queued', 0)} queued)")
        by = m.get("flags_by_reason", {})
        lines.append(f"  flags: {c.get('flags', 0)}" + (" (" + ", ".join(f"{k} {v}" for k, v in by.items()) + ")"
                                                        if by else ""))
        if m.get("ece") is not None:
            lines.append(f"  calibration: ECE {m['ece']:.3f}")
        if m.get("flip_rate") is not None:
            lines.append(f"  flip rate vs round {self.round - 1}: {m['flip_rate']:.3f} "
                         f"({m.get('flip_compared', 0)} nuclei proposed in both)")
        if m.get("truth"):
            t = m["truth"]
            lines.append(f"  against truth: proposal accuracy {t['proposal_accuracy']:.3f} "
                         f"(n={t['n_proposals']}), flag precision {t['flag_precision']:.3f}, "
                         f"recall {t['flag_recall']:.3f} ({t['n_flipped']} planted flips)")
        return "\n".join(lines)


# -- ledger state ---------------------------------------------------------------------------------
def round_runs(store: "Store") -> pd.DataFrame:
    """One row per run: round, started seq, finished (bool), superseded (bool)."""
    ev = store.ledger.events(kinds=("round",))
    started = ev[ev["action"] == "started"]
    fin = set(ev.loc[ev["action"] == "finished", "ref"].dropna().astype(int))
    sup = set(ev.loc[ev["action"] == "superseded", "ref"].dropna().astype(int))
    return pd.DataFrame({
        "round": started["round"].astype(int).to_numpy(),
        "seq": started["seq"].astype(int).to_numpy(),
        "finished": [int(s) in fin for s in started["seq"]],
        "superseded": [int(s) in sup for s in started["seq"]],
    })


def active_run(store: "Store", round: int) -> int | None:
    """Seq of the finished, not superseded run of ``round`` (the latest), or None."""
    runs = round_runs(store)
    ok = runs[(runs["round"] == round) & runs["finished"] & ~runs["superseded"]]
    return None if ok.empty else int(ok["seq"].max())


def _labels_before(store: "Store", retire: int | None) -> pd.DataFrame:
    """Current labels of the store's nuclei, as if the run ``retire`` were already superseded."""
    from ..datasets.ledger import fold_labels

    nuclei = store.nuclei(include_ignore=False)
    if retire is None:
        cur = store.current_labels()
        return cur[cur["kind"] == "nucleus"].reset_index(drop=True)
    ev = store.ledger.events(kinds=("ingest", "proposal", "decision", "round"))
    fake = pd.DataFrame([{"seq": int(ev["seq"].max()) + 1, "kind": "round", "action": "superseded",
                          "ref": retire, "actor": "relabel"}])
    folded = fold_labels(pd.concat([ev, fake], ignore_index=True))
    return nuclei.join(folded.drop(columns=["source_label", "candidates"]), on="nucleus_id")


def _candidate_sets(cands: pd.Series) -> np.ndarray:
    return cands.fillna("").astype(str).to_numpy()


def _probs_k(probs: np.ndarray, classes: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(n, K) probabilities over the taxonomy's class ids ``ids`` from (n, len(classes)) ones."""
    out = np.zeros((len(probs), len(ids)))
    out[:, np.searchsorted(ids, np.asarray(classes))] = probs
    return out


# -- the round ------------------------------------------------------------------------------------
def run_round(store: "Store", round: int, *, config: RoundConfig | None = None, overwrite: bool = False,
              dry_run: bool = False, truth: pd.DataFrame | None = None,
              progress: bool | None = None) -> RoundResult:
    """Run relabeling round ``round`` (1 = cross-source, ≥ 2 = unified) on ``store``.

    Parameters
    ----------
    store
        Opened with ``mode="a"`` (``mode="r"`` is enough for ``dry_run``).
    round
        Round number, ≥ 1. Round N ≥ 2 needs a finished round N-1.
    config
        :class:`RoundConfig`; defaults when None.
    overwrite
        Supersede a finished run of this round (its events stay in the history).
    dry_run
        Print nothing, write nothing: return the plan.
    truth
        Optional synthetic truth (``truth.parquet``); adds truth metrics to the summary and report.
    """
    t0 = time.perf_counter()
    cfg = (config or RoundConfig()).validate()
    if not isinstance(round, (int, np.integer)) or isinstance(round, bool) or round < 1:
        raise ConfigError(f"--round must be an integer >= 1, got {round!r}")
    round = int(round)
    nuclei = store.nuclei(include_ignore=False)
    if nuclei.empty:
        raise StoreError("the store has no ingested nuclei; run `curate ingest` first", path=store.path)
    previous = active_run(store, round - 1) if round > 1 else None
    if round > 1 and previous is None:
        raise StateError(f"{store.path}: round {round - 1} has not been run (or was superseded without a "
                         f"replacement); run `curate relabel {store.path} --round {round - 1}` first")
    existing = active_run(store, round)
    if existing is not None and not overwrite:
        raise StateError(f"{store.path}: round {round} already finished (run seq {existing}); "
                         "pass --overwrite to supersede it (its history is kept)")
    if existing is not None and active_run(store, round + 1) is not None:
        raise StateError(f"{store.path}: round {round + 1} builds on round {round}; overwrite round "
                         f"{round + 1} after round {round}, or start a new round instead")
    backbone = make_backbone(cfg.backbone, weights=cfg.weights, encoder=cfg.encoder, seed=cfg.seed,
                             device=cfg.device, precision=cfg.precision)
    labels = _labels_before(store, existing)

    plan = _plan(store, round, cfg, labels, backbone, existing)
    if dry_run:
        return RoundResult(round, True, plan, seconds=time.perf_counter() - t0)
    if store.readonly:
        raise StoreError("the store is open read-only", path=store.path)

    with store.write_lock("relabel"):
        feats, ids = nucleus_features(store, backbone, progress=progress)
        pos = pd.Index(ids).get_indexer(labels["nucleus_id"].to_numpy())
        if (pos < 0).any():
            raise StoreError(f"{cache_dir(store, backbone.id)}: features miss {int((pos < 0).sum())} nuclei",
                             path=store.path)
        X = feats[pos].astype(np.float64)
        check_features(X, labels["nucleus_id"].to_numpy(), where=cache_dir(store, backbone.id) / "features.npy")
        groups = nucleus_groups(labels, store.images())
        model_id = f"{cfg.classifier}-{backbone.id}"
        tax = store.taxonomy
        if round == 1:
            out = _round_one(labels, X, groups, cfg, model_id, tax)
        else:
            out = _round_unified(labels, X, groups, cfg, model_id, tax)
        out["previous_run"] = previous
        return _commit(store, round, cfg, backbone.id, model_id, labels, out, existing, plan, truth, t0)


def _plan(store: "Store", round: int, cfg: RoundConfig, labels: pd.DataFrame, backbone: Any,
          existing: int | None) -> list[str]:
    cached = load_cached(store, backbone) is not None
    lab = labels["label"].to_numpy()
    status = labels["status"].astype(str).to_numpy()
    lines = [
        f"round {round} ({'cross-source' if round == 1 else 'unified'}) on {store.path}",
        f"nuclei: {len(labels)} ({int((lab > 0).sum())} labelled, {int((status == 'unresolved').sum())} "
        f"unresolved, {int((lab < 0).sum())} rejected)",
        f"features: {backbone.id} ({'cached' if cached else 'to compute'} in {cache_dir(store, backbone.id)})",
        f"classifier: {cfg.classifier}, {cfg.folds} grouped folds, seed {cfg.seed}; "
        f"auto-accept at confidence >= {cfg.auto_accept}",
        f"writes: ledger events of the run and {store.path / 'rounds' / str(round)}",
    ]
    if existing is not None:
        lines.append(f"supersedes run seq {existing} of round {round} (--overwrite)")
    return lines


def _require_counts(y: np.ndarray, classes: np.ndarray, folds: int, what: str, tax: Any) -> None:
    for c in classes:
        n = int((y == c).sum())
        if 0 < n < folds:
            name = tax.class_name(int(c))
            raise ConfigError(f"class {name} has {n} labelled nuclei in {what}, fewer than --folds {folds}; "
                              "lower --folds or add nuclei of that class")


def _round_one(labels: pd.DataFrame, X: np.ndarray, groups: np.ndarray, cfg: RoundConfig,
               model_id: str, tax: Any) -> dict[str, Any]:
    ids = np.asarray(tax.ids, dtype=np.int64)
    lab = labels["label"].to_numpy(np.int64)
    status = labels["status"].astype(str).to_numpy()
    src = labels["source"].astype(str).to_numpy()
    cands = _candidate_sets(labels["candidates"])
    unresolved = (status == "unresolved") & (np.char.find(cands.astype(str), "|") >= 0)
    proposals, classifiers, calib = [], [], []
    for key in sorted(set(zip(src[unresolved], cands[unresolved]))):
        source, cset = key
        classes = np.array(sorted(int(c) for c in cset.split("|")))
        targets = np.flatnonzero(unresolved & (src == source) & (cands == cset))
        train = np.flatnonzero((src != source) & np.isin(lab, classes) & (status != "conflict"))
        names = [tax.class_name(int(c)) for c in classes]
        what = f"the other sources than {source}"
        present = np.unique(lab[train])
        if len(present) < 2:
            raise StateError(
                f"round 1 needs labelled {'/'.join(names)} nuclei from a source other than {source} to resolve "
                f"{len(targets)} {source} nuclei with candidates {cset}; found "
                f"{', '.join(tax.class_name(int(c)) for c in present) or 'none'} (ingest the other source)")
        _require_counts(lab[train], classes, cfg.folds, what, tax)
        cv = cross_val_probs(X[train], lab[train], groups[train], classes=present, folds=cfg.folds,
                             seed=cfg.seed, classifier=cfg.classifier, n_jobs=cfg.n_jobs,
                             max_train=cfg.max_train)
        mid = f"r1-{'-'.join(n.lower()[:3] for n in names)}-{model_id}"
        p = predict_mean(cv.models, X[targets], present, n_jobs=cfg.n_jobs)
        classifiers.append({
            "model": mid, "source": source, "candidates": cset, "classes": present.tolist(),
            "missing_classes": sorted(set(classes.tolist()) - set(present.tolist())),
            "n_train": int(len(train)), "n_targets": int(len(targets)), "folds": cv.folds,
            "accuracy": cv.accuracy, "confusion": cv.confusion.tolist(),
            "train_groups": int(len(np.unique(groups[train]))),
        })
        calib.append((cv.probs.max(axis=1), present[cv.probs.argmax(axis=1)] == lab[train]))
        proposals.append(pd.DataFrame({"row": targets, "model": mid}).assign(
            **{f"p{c}": col for c, col in zip(ids, _probs_k(p, present, ids).T)}))
    props = pd.concat(proposals, ignore_index=True) if proposals else pd.DataFrame(
        columns=["row", "model", *(f"p{c}" for c in ids)])
    conf = np.concatenate([c[0] for c in calib]) if calib else np.zeros(0)
    corr = np.concatenate([c[1] for c in calib]) if calib else np.zeros(0, bool)
    return {"proposals": props, "flags": _empty_flags(), "classifiers": classifiers, "calibration": (conf, corr),
            "oos": None}


def _empty_flags() -> pd.DataFrame:
    return pd.DataFrame({"row": pd.Series(dtype=np.int64), "reason": pd.Series(dtype=object),
                         "score": pd.Series(dtype=np.float64), "suggested": pd.Series(dtype=np.int64),
                         "quality": pd.Series(dtype=np.float64), "rank": pd.Series(dtype=np.int64)})


def _round_unified(labels: pd.DataFrame, X: np.ndarray, groups: np.ndarray, cfg: RoundConfig,
                   model_id: str, tax: Any) -> dict[str, Any]:
    ids = np.asarray(tax.ids, dtype=np.int64)
    lab = labels["label"].to_numpy(np.int64)
    status = labels["status"].astype(str).to_numpy()
    cands = _candidate_sets(labels["candidates"])
    labelled = np.flatnonzero((lab > 0) & (status != "conflict"))
    present = np.unique(lab[labelled])
    if len(present) < 2:
        raise StateError(f"round ≥ 2 needs labelled nuclei of at least 2 classes, found {len(present)}")
    _require_counts(lab[labelled], present, cfg.folds, "the store", tax)
    cv = cross_val_probs(X[labelled], lab[labelled], groups[labelled], classes=present, folds=cfg.folds,
                         seed=cfg.seed, classifier=cfg.classifier, n_jobs=cfg.n_jobs,
                             max_train=cfg.max_train)
    col = {int(c): i for i, c in enumerate(present)}
    y_idx = np.array([col[int(v)] for v in lab[labelled]], dtype=np.int64)
    iss = find_issues(y_idx, cv.probs, filter_by=cfg.filter_by, n_jobs=cfg.n_jobs)
    checkable = status[labelled] != "reviewed"
    keep = iss.issue & checkable
    flags = pd.DataFrame({
        "row": labelled[keep], "reason": iss.reason[keep], "score": iss.score[keep],
        "suggested": present[iss.suggested[keep]], "quality": iss.quality[keep], "rank": iss.rank[keep],
    })
    flags["rank"] = flags["score"].rank(ascending=False, method="first").astype(np.int64) if len(flags) else []
    pk = _probs_k(cv.probs, present, ids)
    oos = pd.DataFrame({"row": labelled, "given": lab[labelled], **{f"p{c}": pk[:, j] for j, c in enumerate(ids)}})
    # unresolved nuclei: fold models' mean, restricted to the candidate classes
    unres = np.flatnonzero(status == "unresolved")
    pu = _probs_k(predict_mean(cv.models, X[unres], present, n_jobs=cfg.n_jobs), present, ids)
    mask = np.zeros_like(pu)
    for i, cs in enumerate(cands[unres]):
        cset = [int(c) for c in cs.split("|") if c]
        mask[i, np.searchsorted(ids, np.array(cset, dtype=np.int64))] = 1.0
    pu = pu * mask
    tot = pu.sum(axis=1)
    ok = tot > 0
    props = pd.DataFrame({"row": unres[ok], "model": f"r-unified-{model_id}",
                          **{f"p{c}": pu[ok, j] / tot[ok] for j, c in enumerate(ids)}})
    clf = {"model": f"r-unified-{model_id}", "classes": present.tolist(), "n_train": int(len(labelled)),
           "n_targets": int(ok.sum()), "folds": cv.folds, "accuracy": cv.accuracy,
           "confusion": cv.confusion.tolist(), "train_groups": int(len(np.unique(groups[labelled])))}
    return {"proposals": props, "flags": flags, "classifiers": [clf], "cv": clf,
            "calibration": (cv.probs.max(axis=1), present[cv.probs.argmax(axis=1)] == lab[labelled]), "oos": oos}


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, *, bins: int = 10) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy − confidence| × share."""
    if not len(confidence):
        return float("nan")
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += abs(float(correct[m].mean()) - float(confidence[m].mean())) * m.mean()
    return float(ece)


def _previous_proposals(store: "Store", previous: int | None) -> pd.Series:
    if previous is None:
        return pd.Series(dtype=np.int64)
    ev = store.ledger.events(kinds=("proposal",))
    ev = ev[ev["ref"] == previous]
    return ev.set_index("nucleus_id")["label"].astype(np.int64)


def _commit(store: "Store", round: int, cfg: RoundConfig, backbone_id: str, model_id: str,
            labels: pd.DataFrame, out: dict[str, Any], existing: int | None, plan: list[str],
            truth: pd.DataFrame | None, t0: float) -> RoundResult:
    from .report import write_report

    nid = labels["nucleus_id"].to_numpy(np.int64)
    lab = labels["label"].to_numpy(np.int64)
    props: pd.DataFrame = out["proposals"]
    flags: pd.DataFrame = out["flags"]
    ids = np.asarray(store.taxonomy.ids, dtype=np.int64)
    pcols = [f"p{c}" for c in ids]
    P = props[pcols].to_numpy(np.float64) if len(props) else np.zeros((0, len(ids)))
    props = props.assign(
        nucleus_id=nid[props["row"].to_numpy(np.int64)],
        proposed=ids[P.argmax(axis=1)].astype(np.int64) if len(P) else np.zeros(0, np.int64),
        confidence=P.max(axis=1) if len(P) else np.zeros(0),
        source_label=labels["source_label"].astype(str).to_numpy()[props["row"].to_numpy(np.int64)],
        source=labels["source"].astype(str).to_numpy()[props["row"].to_numpy(np.int64)],
    )
    props["action"] = np.where(props["confidence"] >= cfg.auto_accept, "auto_accepted", "queued")
    # queued proposals are also flags (one review list)
    q = props[props["action"] == "queued"]
    low = pd.DataFrame({"row": q["row"].to_numpy(np.int64), "reason": "low_confidence_proposal",
                        "score": 1.0 - q["confidence"].to_numpy(), "suggested": q["proposed"].to_numpy(np.int64),
                        "quality": np.nan, "rank": 0})
    all_flags = pd.concat([flags, low], ignore_index=True) if len(low) else flags.copy()
    all_flags["nucleus_id"] = nid[all_flags["row"].to_numpy(np.int64)]
    all_flags["given"] = lab[all_flags["row"].to_numpy(np.int64)]
    all_flags = all_flags.sort_values(["score", "nucleus_id"], ascending=[False, True], kind="stable")
    all_flags["rank"] = np.arange(1, len(all_flags) + 1)
    all_flags = all_flags.reset_index(drop=True)

    # labels after this round's auto-accepts
    after = lab.copy()
    acc = props[props["action"] == "auto_accepted"]
    after[acc["row"].to_numpy(np.int64)] = acc["proposed"].to_numpy(np.int64)
    prev = _previous_proposals(store, out.get("previous_run"))
    both = props[props["nucleus_id"].isin(prev.index)]
    flip_rate = float((both["proposed"].to_numpy() != prev.reindex(both["nucleus_id"]).to_numpy()).mean()) \
        if len(both) else None
    conf, corr = out["calibration"]
    metrics: dict[str, Any] = {
        "round": round, "backbone": backbone_id, "model": model_id, "auto_accept": cfg.auto_accept,
        "classifiers": out["classifiers"],
        "class_before": {int(c): int((lab == c).sum()) for c in (-1, 0, *ids)},
        "class_after": {int(c): int((after == c).sum()) for c in (-1, 0, *ids)},
        "flags_by_reason": {str(k): int(v) for k, v in all_flags["reason"].value_counts().sort_index().items()},
        "ece": expected_calibration_error(conf, corr) if len(conf) else None,
        "flip_rate": flip_rate, "flip_compared": int(len(both)),
    }
    if "cv" in out:
        metrics["cv_accuracy"] = out["cv"]["accuracy"]
        metrics["cv_folds"] = out["cv"]["folds"]
    counts = {
        "nuclei": int(len(labels)), "labelled": int((lab > 0).sum()), "proposals": int(len(props)),
        "auto_accepted": int((props["action"] == "auto_accepted").sum()),
        "queued": int((props["action"] == "queued").sum()), "flags": int(len(all_flags)),
    }

    rounds_dir = store.path / "rounds"
    rounds_dir.mkdir(exist_ok=True)
    tmp = rounds_dir / f".tmp-{round}-{secrets.token_hex(4)}"
    tmp.mkdir()
    final = rounds_dir / str(round)
    aside: Path | None = None
    placed = False
    try:
        started_seq = store.ledger.head()[0] + 1 + (1 if existing is not None else 0)
        actor = f"relabel:r{round}:{model_id}"
        config_doc = {"round": round, **cfg.to_dict(), "backbone_id": backbone_id, "model": model_id,
                      "supersedes": existing}
        events: list[dict[str, Any]] = []
        if existing is not None:
            events.append({"kind": "round", "round": round, "actor": "relabel", "action": "superseded",
                           "ref": existing, "payload": {"by_round": round}})
        events.append({"kind": "round", "round": round, "actor": "relabel", "action": "started",
                       "payload": config_doc})
        src_or_cur = props["source_label"].to_numpy()
        for i, r in enumerate(props.itertuples(index=False)):
            events.append({
                "kind": "proposal", "nucleus_id": int(r.nucleus_id), "round": round, "actor": actor,
                "action": r.action, "label": int(r.proposed), "prev_label": int(lab[r.row]),
                "score": round_f(r.confidence), "ref": started_seq,
                "payload": {"probs": [round_f(v) for v in P[i]], "model": r.model, "backbone": backbone_id,
                            "from": str(src_or_cur[i])},
            })
        P_all = _flag_probs(all_flags, props, out.get("oos"), pcols)
        for i, f in enumerate(all_flags.itertuples(index=False)):
            events.append({
                "kind": "flag", "nucleus_id": int(f.nucleus_id), "round": round, "actor": actor,
                "action": f.reason, "label": int(f.suggested), "prev_label": int(f.given),
                "score": round_f(f.score), "ref": started_seq,
                "payload": {"probs": [round_f(v) for v in P_all[i]],
                            "label_quality": None if pd.isna(f.quality) else round_f(f.quality), "rank": int(f.rank)},
            })
        events.append({"kind": "round", "round": round, "actor": "relabel", "action": "finished",
                       "ref": started_seq, "payload": {"counts": counts}})

        # the round folder
        atomic_write_json(tmp / "config.json", config_doc)
        props.drop(columns=["row"]).to_parquet(tmp / "proposals.parquet", index=False)
        all_flags.drop(columns=["row"]).to_parquet(tmp / "flags.parquet", index=False)
        if out.get("oos") is not None:
            oos = out["oos"]
            oos.assign(nucleus_id=nid[oos["row"].to_numpy(np.int64)]).drop(columns=["row"]).to_parquet(
                tmp / "oos.parquet", index=False)
        if truth is not None:
            from .truth import score_frames

            metrics["truth"] = score_frames(labels, props, all_flags, truth)
        metrics["run_seq"] = started_seq
        metrics["seconds_compute"] = round_f(time.perf_counter() - t0)
        if cfg.report:
            write_report(store, tmp, round=round, labels=labels, props=props, flags=all_flags, metrics=metrics,
                         calibration=(conf, corr), gallery=cfg.gallery)
        atomic_write_json(tmp / "summary.json", {"counts": counts, "metrics": metrics}, default=_json)
        # The folder goes in place first, then the ledger commits: a crash in between leaves a
        # folder whose run_seq the ledger never finished (curate verify reports it), never a
        # finished round without its folder.
        if final.exists():
            aside = rounds_dir / (f"{round}-superseded-{existing if existing is not None else 'orphan'}"
                                  f"-{secrets.token_hex(2)}")
            os.replace(final, aside)
        replace_dir(tmp, final)
        placed = True
        _before_commit(final)
        seqs = store.ledger.append(events)  # commit point: one ledger transaction
        real_started = seqs[1] if existing is not None else seqs[0]
        if real_started != started_seq:  # another writer slipped in between head() and append()
            store.ledger.append([{"kind": "round", "round": round, "actor": "relabel", "action": "superseded",
                                  "ref": real_started, "payload": {"reason": "concurrent write; rerun"}}])
            raise StoreError("another process wrote the ledger during the round; the run was retired, rerun it",
                             path=store.path)
    except BaseException:
        if placed:
            remove_tree(final)
        if aside is not None:  # also when putting the new folder in place failed after the old one moved aside
            os.replace(aside, final)
            fsync_dir(rounds_dir)
        remove_tree(tmp)
        raise
    return RoundResult(round, False, plan, final, started_seq, counts, metrics, time.perf_counter() - t0)


def _before_commit(folder: Path) -> None:
    """Hook between putting the round folder in place and the ledger commit (tests crash here)."""


def _flag_probs(flags: pd.DataFrame, props: pd.DataFrame, oos: pd.DataFrame | None, pcols: list[str]) -> np.ndarray:
    out = np.zeros((len(flags), len(pcols)))
    sources = [props.set_index("row")[pcols]]
    if oos is not None:
        sources.append(oos.set_index("row")[pcols])
    for s in sources:
        s = s[~s.index.duplicated()]
        hit = flags["row"].isin(s.index).to_numpy()
        out[hit] = s.loc[flags.loc[hit, "row"]].to_numpy()
    return out


def round_f(v: float) -> float:
    return float(round(float(v), 6))


def _json(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)
