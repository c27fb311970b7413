"""How visible the local-morphology demo's carrier tiles are, to a mean of tile features and tile by tile.

    python scripts/demo_local_diagnostics.py RUN_DIR      (a `histofuse demo --morphology local` run)

Prints and writes RUN_DIR/local_diagnostics.json; from the run's own features and split only (nothing from the
trained model):
- the test C-index of the planted slide term alone (the number of carrier tiles) and of the oracle;
- carrier presence from the slide's mean tile feature (10 PCs fitted on training slides, logistic
  regression fitted on train + val patients): its test ROC AUC, i.e. whether mean pooling sees the carriers;
- carrier vs other tiles from single tile features (logistic regression on training tiles): its test ROC AUC
  over all test tiles, an upper bound of what attention can separate with these features.

With the run's model (``model.safetensors`` and ``attributions/tiles.csv``), also ``model_tiles``: carrier vs
other tile AUC within each carrier test slide (averaged) and the tile deletion gaps against random (over all test
slides, and over the carrier slides only), for the attention, the tile IG and, in a ``model.skip=fitted`` run,
the offset's exact tile score: the frozen linear
offset's slide term is linear in the mean tile feature, ``w . u(mean_i x_i) = sum_i w . u(x_i) / N`` (``u``: the
standardisation and PC projection, affine), so tile i adds ``w . u(x_i) / N`` to the log hazard, and the tile
scores of a slide sum to its slide term (:meth:`models.linear.LinearSurvival.tile_shares`; read from the run's
``tiles.csv``, column ``linear_share``). ``log_hz_sd`` splits the test log hazards' spread into the
offset's and the gated residual's (the part the attention can act on).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.files import write_json
from pipeline.slides.features import load_features
from pipeline.stats.metrics import harrell_cindex


def main() -> None:
    run = Path(sys.argv[1])
    truth = run / "cohort" / "truth"
    p = pd.read_csv(truth / "patients.csv").merge(
        pd.read_csv(run / "cohort" / "patients.csv")[["patient_id", "time", "event"]]
    )
    tiles = pd.read_csv(truth / "tiles.csv").set_index(["slide_id", "x", "y"]).is_carrier
    (fdir,) = [d for d in (run / "features").iterdir() if d.is_dir()]
    means, tile_x, tile_y, tile_split = [], [], [], []
    for pid, split in zip(p.patient_id, p.split, strict=True):
        feats, coords, _ = load_features(fdir / f"{pid}.h5")
        means.append(feats.mean(0))
        tile_x.append(feats)
        tile_y.append(tiles.loc[[(pid, int(x), int(y)) for x, y in coords]].to_numpy())
        tile_split += [split] * len(feats)
    test, fit, train = (p.split == "test").to_numpy(), (p.split != "test").to_numpy(), (p.split == "train").to_numpy()
    t, e = p.time.to_numpy(float), p.event.to_numpy(bool)
    r: dict = {
        "test_patients": int(test.sum()),
        "cindex_slide_term_alone": harrell_cindex(t[test], e[test], p.carrier_tiles.to_numpy(float)[test]),
        "cindex_oracle": harrell_cindex(t[test], e[test], p.oracle_log_hz.to_numpy()[test]),
    }
    x, present = np.stack(means), (p.carrier_tiles > 0).to_numpy()
    pca = make_pipeline(StandardScaler(), PCA(10, random_state=0)).fit(x[train])
    clf = LogisticRegression(max_iter=2000).fit(pca.transform(x[fit]), present[fit])
    r["mean_pool_presence_test_auc"] = float(
        roc_auc_score(present[test], clf.decision_function(pca.transform(x[test])))
    )
    xt, yt, st = np.concatenate(tile_x), np.concatenate(tile_y), np.array(tile_split)
    tile_clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(
        xt[st == "train"], yt[st == "train"]
    )
    r["tile_carrier_test_auc"] = float(roc_auc_score(yt[st == "test"], tile_clf.decision_function(xt[st == "test"])))
    r["carrier_share_of_tiles_in_carrier_slides"] = float(np.mean([y.mean() for y in tile_y if y.any()]))
    if (run / "model.safetensors").is_file() and (run / "attributions" / "tiles.csv").is_file():
        r["model_tiles"] = model_tiles(run, fdir, tiles)
    print(json.dumps(r, indent=2))
    write_json(run / "local_diagnostics.json", r)


@torch.inference_mode()
def model_tiles(run: Path, fdir: Path, truth: pd.Series) -> dict:
    """Carrier AUCs and deletion gaps of attention, IG and (fitted runs) the offset's tile score."""
    from data_specs.cohort import load_cohort
    from pipeline.outputs.attribution import tile_deletion_curves
    from pipeline.training.bundle import data_for_model, load_bundle
    from pipeline.training.data import make_loader, model_inputs

    model, card = load_bundle(run / "model.safetensors")
    data = data_for_model(load_cohort(run / "cohort" / "cohort.yaml"), card, fdir)
    idx = data.splits["test"]
    att = pd.read_csv(run / "attributions" / "tiles.csv").set_index(["slide_id", "x", "y"])
    cols = {"attention": "attn", "ig": "ig", "offset_tile": "linear_share"}  # the run's own tile scores
    cols = {k: c for k, c in cols.items() if c in att.columns}
    scores: dict[str, list[np.ndarray]] = {k: [] for k in cols}
    labels = []
    for i in idx:
        keys = [(s, int(x), int(y)) for s, x, y in data.tiles[i]]
        for k, c in cols.items():
            scores[k].append(att.loc[keys, c].to_numpy())
        labels.append(truth.loc[keys].to_numpy().astype(bool))
    out: dict = {"model_skip": card.config.model.skip, "carrier_auc": {}, "top_tile_is_carrier": {}}
    car = [j for j, y in enumerate(labels) if 0 < y.sum() < len(y)]
    for k, v in scores.items():
        out["carrier_auc"][k] = float(np.mean([roc_auc_score(labels[j], v[j]) for j in car]))
        out["top_tile_is_carrier"][k] = float(np.mean([labels[j][np.argmax(v[j])] for j in car]))
    out["carrier_slides"] = len(car)
    ac = card.config.attribute
    f = tile_deletion_curves(model, data, idx, scores, ac.deletion_steps, seed=ac.seed)
    out["deletion"] = {"auc": f["auc"], "gap_vs_random": f["gap"], "patients": f["patients"]}
    on_car = {k: [v[j] for j in car] for k, v in scores.items()}  # the carrier slides only: the same curves
    f = tile_deletion_curves(model, data, idx[car], on_car, ac.deletion_steps, seed=ac.seed)
    out["deletion_carrier_slides"] = {"auc": f["auc"], "gap_vs_random": f["gap"], "patients": f["patients"]}
    off, res = [], []
    for batch in make_loader(data, idx, 16, train=False):
        inputs = model_inputs(batch)
        o = model(**inputs)
        if model.offset is not None:
            off.append(model.frozen_offset(*(inputs.get(k) for k in OFFSET_INPUTS)).numpy())
        if o.residual is not None:
            res.append(o.residual.numpy())
    out["log_hz_sd"] = {k: float(np.concatenate(v).std()) for k, v in (("offset", off), ("residual", res)) if v}
    if model.residual_gate is not None:
        out["residual_gate"] = float(model.residual_gate.detach()[0])
    return out


OFFSET_INPUTS = ("features", "mask", "omics", "omics_mask", "clinical", "clinical_mask")


if __name__ == "__main__":
    main()
