"""``GrowingColumns``: batches written into columns allocated once, grown when the estimate was low."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.growing_columns import GrowingColumns


@pytest.mark.parametrize("capacity", [1, 7, 1000])
def test_batches_come_back_in_order_whatever_the_first_capacity(capacity):
    cols = GrowingColumns({"a": (np.int32, ()), "box": (np.float32, (4,))}, capacity)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 100, n).astype(np.int64), rng.random((n, 4))) for n in (5, 0, 11, 3, 40)]
    for a, box in batches:
        cols.append({"a": a, "box": box})
    assert cols.rows == 59
    a, box = cols.pop("a"), cols.pop("box")
    assert a.dtype == np.int32 and box.dtype == np.float32 and box.shape == (59, 4)
    np.testing.assert_array_equal(a, np.concatenate([b[0] for b in batches]))
    np.testing.assert_allclose(box, np.concatenate([b[1] for b in batches]).astype(np.float32))


def test_a_batch_must_hold_every_column_at_one_length():
    cols = GrowingColumns({"a": (np.int32, ()), "b": (np.int8, ())}, 4)
    with pytest.raises(ValueError, match="expected"):
        cols.append({"a": np.zeros(2)})
    with pytest.raises(ValueError, match="different lengths"):
        cols.append({"a": np.zeros(2), "b": np.zeros(3)})
    assert cols.rows == 0


def test_keep_drops_rows_of_a_range_and_moves_the_later_rows_up():
    cols = GrowingColumns({"a": (np.int32, ()), "box": (np.float32, (4,))}, 4)
    a = np.arange(10)
    cols.append({"a": a, "box": np.repeat(a[:, None], 4, axis=1)})
    mask = np.array([True, False, False, True, False])  # rows 2..6: keep 2 and 5
    cols.keep(2, 7, mask)
    assert cols.rows == 7
    assert cols.column("a").tolist() == [0, 1, 2, 5, 7, 8, 9]
    np.testing.assert_array_equal(cols.column("box")[:, 3], [0, 1, 2, 5, 7, 8, 9])
    cols.append({"a": np.array([42]), "box": np.zeros((1, 4))})  # appends after the kept rows
    assert cols.pop("a").tolist() == [0, 1, 2, 5, 7, 8, 9, 42]
    with pytest.raises(ValueError, match="a mask of 2 rows"):
        cols.keep(0, 3, np.ones(2, dtype=bool))
