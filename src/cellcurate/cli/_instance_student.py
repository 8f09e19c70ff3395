"""Out-of-fold instance predictions by the student network (``curate instances --predictor student``).

This module sits in ``cli`` because it joins ``models`` (training, prediction) with ``relabel``
(folds, the prediction cache), which may not import each other; ``relabel`` receives it as a
:class:`~cellcurate.relabel.instance_predict.CustomPredictor` (:func:`student_predictor`).

The student architecture of :mod:`cellcurate.models.student` is trained from the ground truth
alone (:func:`cellcurate.models.train.distill` with no teacher: flips, 90° rotations and stain
jitter on every batch) with **grouped K-fold** on the store (the groups of
:func:`cellcurate.relabel.instance_predict.image_folds`), and every image is predicted
(:func:`cellcurate.models.predict.predict_image`: tiled inference, the student's own
post-processing, resampling to the model's pixel size and back) by the fold model that never saw
it nor any image of its group. Optional ``extra_stores`` (other stores, e.g. other datasets'
fixtures) join *every* fold's training set: their images belong to no group of this store, so the
predictions stay out of sample.

A nucleus's confidence is the student's nuclear probability (the ``np`` map), as for the built-in
model; the class head is trained with one class (every annotated nucleus is class 1, ignore
regions are ignored), as the instance round does not use classes.

CPU by default, ``threads`` torch threads (default 1: the CI machine has 2 shared cores).

Dimensions: B images, K folds, T×T training tiles.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import Dataset

from ..errors import ConfigError, StateError, StoreError

if TYPE_CHECKING:  # pragma: no cover
    from ..datasets.store import Store
    from ..relabel.instance_predict import CustomPredictor


@dataclass(frozen=True)
class StudentPredictorConfig:
    """K-fold student predictor (saved in the prediction cache's meta; its hash is the predictor id)."""

    folds: int = 3
    seed: int = 0
    preset: str = "tiny"  # student widths (models.student.STUDENT_PRESETS)
    epochs: int = 30
    batch_size: int = 8
    lr: float = 3e-3
    tile_size: int = 128
    device: str = "cpu"
    threads: int = 1
    threshold: float = 0.5  # post-processing: nuclear probability that makes a pixel foreground
    extra_stores: tuple[str, ...] = field(default_factory=tuple)  # joined to every fold's training set

    def validate(self) -> "StudentPredictorConfig":
        from ..models.student import student_preset

        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            raise ConfigError(f"--folds must be an integer >= 2, got {self.folds!r}")
        for name in ("epochs", "batch_size", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"student {name} must be an integer >= 1, got {v!r}")
        if int(self.tile_size) < 32 or int(self.tile_size) % 32:
            raise ConfigError(f"student tile_size must be a multiple of 32 (>= 32), got {self.tile_size!r}")
        if not float(self.lr) > 0:
            raise ConfigError(f"student lr must be > 0, got {self.lr!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"student device must be cpu, cuda or auto, got {self.device!r}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise ConfigError(f"student threshold must lie in (0, 1), got {self.threshold!r}")
        student_preset(self.preset)
        return self

    def config_doc(self, store: "Store") -> dict[str, Any]:
        """What the cache is valid for: this config and the fingerprints of the extra stores."""
        from ..datasets.store import Store
        from ..relabel.features import store_fingerprint

        extra = []
        for p in self.extra_stores:
            if Path(p).resolve() == Path(store.path).resolve():
                raise ConfigError(f"{p}: an extra training store must not be the store itself "
                                  "(its images would be predicted by a model that saw them)")
            with Store.open(p, mode="r") as s:
                extra.append({"path": str(Path(p).resolve()), "fingerprint": store_fingerprint(s)})
        return {"kind": "oof-student", **{k: v for k, v in asdict(self).items() if k != "extra_stores"},
                "extra_stores": extra}

    def predictor_id(self, doc: dict[str, Any]) -> str:
        text = json.dumps(doc, sort_keys=True)
        return f"oof-student-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


class StoreImages(Dataset):
    """A base dataset (:mod:`cellcurate.models.data`) of store images, held in memory: every
    annotated nucleus is class 1, ignore regions class 255, background 0. Images whose pixel size
    differs from ``mpp`` by more than 10 % are resampled to it once here (bilinear image, nearest
    labels), as the tile dataset would otherwise do on every access of a shuffled tile."""

    def __init__(self, store: "Store", image_ids: list[str], *, mpp: float = 0.25) -> None:
        from scipy import ndimage

        images = store.images().set_index("image_id")
        nuclei = store.nuclei()
        ignore = nuclei[nuclei["kind"] == "ignore"].groupby("image_id")["instance_id"].apply(list).to_dict()
        self.items: list[dict[str, Any]] = []
        for image_id, img, ins in store.iter_images(list(image_ids)):
            ins = np.asarray(ins).astype(np.int32)
            classes = (ins > 0).astype(np.uint8)
            ig = ignore.get(image_id)
            if ig:
                classes[np.isin(ins, ig)] = 255
            image = np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))
            px = float(images.loc[image_id, "mpp"])
            if px > 0 and abs(px / mpp - 1.0) > 0.1:
                f = px / mpp
                image = np.clip(ndimage.zoom(image.astype(np.float32), (1, f, f), order=1), 0, 255).round().astype(np.uint8)
                ins = ndimage.zoom(ins, f, order=0)
                classes = ndimage.zoom(classes, f, order=0)
                px = mpp
            self.items.append({"image": image, "instances": ins, "classes": classes, "image_id": str(image_id),
                               "mpp": px})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def student_oof_predictions(store: "Store", *, config: StudentPredictorConfig | None = None,
                            progress: bool | None = None, work_dir: str | Path | None = None
                            ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield ``(image_id, instances (H, W) int32, nuclear probability (H, W) float32)`` for every
    store image, each predicted by the student of the fold that did not see its group.

    Fold checkpoints go to a temp folder under ``work_dir`` (default: the system's), removed after.
    """
    import torch
    from torch.utils.data import ConcatDataset
    from tqdm import tqdm

    from ..datasets.store import Store
    from ..models.losses import LossConfig
    from ..models.postprocess import PostprocessConfig
    from ..models.predict import predict_image
    from ..models.student import StudentConfig, student_preset
    from ..models.train import TrainConfig, distill
    from ..relabel.instance_predict import image_folds

    cfg = (config or StudentPredictorConfig()).validate()
    images = store.images().reset_index(drop=True)
    if images.empty:
        raise StoreError("the store has no images; run `curate ingest` first", path=store.path)
    fold, k, _note = image_folds(images, cfg.folds, cfg.seed)
    ids = images["image_id"].astype(str).to_numpy()
    mpp = dict(zip(ids, images["mpp"].astype(float)))
    extra: list[StoreImages] = []
    data_mpp = StudentConfig().data_mpp
    for p in cfg.extra_stores:
        with Store.open(p, mode="r") as s:
            extra.append(StoreImages(s, list(s.images()["image_id"].astype(str)), mpp=data_mpp))
    # one class (the round uses no classes): no class-balanced foreground term; no consistency
    # term (a second forward pass per batch), the flips/rotations/stain jitter stay
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, device=cfg.device,  # type: ignore[arg-type]
                       amp=False, tile_size=cfg.tile_size, progress=bool(progress), val_metric="PQ",
                       loss=LossConfig(tp_fg_ce=0.0, consistency=0.0))
    scfg = StudentConfig(channels=student_preset(cfg.preset), dropout=0.0, tile_size=cfg.tile_size)
    post = PostprocessConfig(threshold=cfg.threshold)
    dev = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device)
    bar = tqdm(total=len(ids), desc="instance predictions (student, out of fold)", unit="image",
               disable=None if progress is None else not progress, leave=False)
    try:
        with _torch_threads(cfg.threads), tempfile.TemporaryDirectory(prefix="oof-student-", dir=work_dir) as tmp:
            for f in range(k):
                train_ids = list(ids[fold != f])
                base: Any = StoreImages(store, train_ids, mpp=data_mpp)
                if not any((it["classes"] == 1).any() for it in base.items):
                    raise StateError(f"{store.path}: fold {f} of the student has no annotated nucleus to train on")
                if extra:
                    base = ConcatDataset([base, *extra])
                result = distill(None, base, out_dir=Path(tmp) / f"fold{f}", student_config=scfg, config=tcfg)
                model = result.model.eval()
                with torch.no_grad():
                    for image_id, img, _ins in store.iter_images(list(ids[fold == f])):
                        pred = predict_image(model, np.asarray(img), mpp=mpp[image_id], tile=cfg.tile_size * 2,
                                             overlap=cfg.tile_size // 2, device=dev, config=post,
                                             with_polygons=False, with_prob=True)
                        assert pred.nucleus_prob is not None
                        bar.update(1)
                        yield image_id, pred.instances.astype(np.int32), np.clip(pred.nucleus_prob, 0, 1)
    finally:
        bar.close()


def student_predictor(store: "Store", config: StudentPredictorConfig | None = None) -> "CustomPredictor":
    """The K-fold student as a predictor for :func:`~cellcurate.relabel.instance_predict.get_predictions`."""
    from ..relabel.instance_predict import CustomPredictor

    cfg = (config or StudentPredictorConfig()).validate()
    doc = cfg.config_doc(store)
    return CustomPredictor(cfg.predictor_id(doc), doc,
                           lambda s, progress: student_oof_predictions(s, config=cfg, progress=progress))
