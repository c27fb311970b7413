"""The secure sum's encoding (pipeline/federated/secure_sum.py): SecAgg+ inputs whose sum is exact."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from pipeline.federated.secure_sum import (
    CEILING_GRID,
    CLIP,
    FRAC_BITS,
    HALF,
    QUANTISATION,
    Field,
    ceiling_one_hot,
    decode,
    encode,
    largest_ceiling,
    layout_size,
    merge_names,
)
from pipeline.stats.curves import nice_ceil


def test_digit_sums_are_exact_and_reals_within_the_stated_tolerance():
    """Counts sum exactly; reals over 30 orders of magnitude and both signs sum to within n * 2**-(FRAC_BITS+1)
    of the exact (rational) sum, before its one rounding to float64."""
    rng = np.random.default_rng(3)
    lay = (Field("n", 5, True), Field("x", 40))
    n = 7
    sites = [{"n": rng.integers(0, 1000, 5), "x": rng.normal(0, 1, 40) * 10.0 ** rng.integers(-15, 15, 40)}
             for _ in range(n)]  # fmt: skip
    vecs = [encode(lay, v) for v in sites]
    assert all(v.size == layout_size(lay) and np.all(np.abs(v) <= HALF) for v in vecs)
    got = decode(lay, np.sum(vecs, axis=0))
    np.testing.assert_array_equal(got["n"], np.sum([v["n"] for v in sites], axis=0))
    for j in range(40):
        exact = sum(Fraction(float(v["x"][j])) for v in sites)
        tol = n * 2.0 ** -(FRAC_BITS + 1) + abs(float(exact)) * 2.0**-52
        assert abs(Fraction(float(got["x"][j])) - exact) <= tol, j


def test_flowers_quantiser_leaves_every_digit_whole():
    """With clip = 2**23 and quantisation range 2**24 Flower's stochastic quantiser maps a digit d to d + 2**23
    exactly (no rounding), and its dequantiser gives the digit sum back."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    rng = np.random.default_rng(0)
    vecs = [encode((Field("x", 50),), {"x": rng.normal(0, 1e6, 50)}) for _ in range(3)]
    for _ in range(5):  # stochastic: repeat
        q = [quantize([v], CLIP, QUANTISATION)[0] for v in vecs]
        assert all(np.array_equal(qi, v + HALF) for qi, v in zip(q, vecs, strict=True))
    total = dequantize([np.sum(q, axis=0)], CLIP, QUANTISATION)[0] - (len(vecs) - 1) * CLIP
    np.testing.assert_array_equal(total, np.sum(vecs, axis=0))


def test_encode_refuses_what_it_cannot_sum():
    lay = (Field("n", 2, True), Field("x", 1))
    with pytest.raises(ValueError, match="undeclared"):
        encode(lay, {"time": [1.0]})
    with pytest.raises(ValueError, match="n has 3"):
        encode(lay, {"n": [1, 2, 3]})
    with pytest.raises(ValueError, match="not whole"):
        encode(lay, {"n": [1.5, 2]})
    with pytest.raises(ValueError, match="2\\*\\*63"):
        encode(lay, {"x": [2.0**64]})
    with pytest.raises(ValueError, match="not finite"):
        encode(lay, {"x": [math.nan]})
    np.testing.assert_array_equal(decode(lay, encode(lay, {}))["n"], [0, 0])  # nothing to send: zeros


def test_a_maximum_ceiling_is_read_off_the_sum_of_one_hot_ceilings():
    ceilings = [nice_ceil(x) for x in (3652.3, 0.0371, 912.0, 87_000.0)] + [0.0]
    hist = np.sum([ceiling_one_hot(c) for c in ceilings], axis=0)
    assert hist.sum() == 4 and largest_ceiling(hist) == max(ceilings) == 87_000.0
    assert all(largest_ceiling(ceiling_one_hot(c)) == c for c in ceilings)  # the exact float, not a neighbour
    assert np.all(np.diff(CEILING_GRID) > 0)
    with pytest.raises(ValueError, match="not on the pre-agreed grid"):
        ceiling_one_hot(3652.3)


def test_merged_names_follow_the_plain_fits_rules():
    a = {
        "omics": {"values": "counts", "genes": ["G2", "G1", "G3"]},
        "clinical": {"columns": ["age", "stage"], "numeric": ["age"], "categories": {"stage": ["I", "II"]}},
    }
    b = {"omics": {"values": "counts", "genes": ["G1", "G2"]},
         "clinical": {"columns": ["age", "stage"], "numeric": ["age"], "categories": {"stage": ["III"]}}}  # fmt: skip
    m = merge_names([a, b])
    assert m["omics"]["genes"] == ["G2", "G1"] and m["clinical"]["categories"] == {"stage": ["I", "II", "III"]}
    c = {**b, "clinical": {**b["clinical"], "numeric": ["age", "stage"], "categories": {}}}
    with pytest.raises(ValueError, match="numeric at some sites"):
        merge_names([a, c])
