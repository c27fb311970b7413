"""How visible the local-morphology demo's carrier tiles are, to a mean of tile features and tile by tile.

    python scripts/demo_local_diagnostics.py RUN_DIR      (a `histofuse demo --morphology local` run)

Uses the run's own features and split (nothing from the trained model). Prints and writes
RUN_DIR/local_diagnostics.json:
- the test C-index of the planted slide term alone (the number of carrier tiles) and of the oracle;
- carrier presence from the slide's mean tile feature (10 PCs fitted on training slides, logistic
  regression fitted on train + val patients): its test ROC AUC, i.e. whether mean pooling sees the carriers;
- carrier vs other tiles from single tile features (logistic regression on training tiles): its test ROC AUC
  over all test tiles, an upper bound of what attention can separate with these features.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
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
    print(json.dumps(r, indent=2))
    write_json(run / "local_diagnostics.json", r)


if __name__ == "__main__":
    main()
