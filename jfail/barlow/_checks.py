"""Validation shared by the Barlow modules."""

from __future__ import annotations

import numpy as np


def check_features_and_errors(features, errors) -> tuple[np.ndarray, np.ndarray]:
    """features: [N, D] finite numbers -> float32; errors: [N] booleans or 0/1 -> bool.

    Args:
      features: `[N, D]` numbers, N and D at least 1, all finite.
      errors: `[N]` booleans or 0/1 (True where the model is wrong).

    Returns:
      `(features, errors)` as `[N, D]` float32 and `[N]` bool arrays.

    Raises:
      ValueError: wrong shapes, lengths that differ, no rows or columns, non-numeric or
        non-finite features, or errors other than booleans or 0/1.
    """
    features = np.asarray(features)
    errors = np.asarray(errors)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D [N, D], got shape {features.shape}.")
    if errors.ndim != 1:
        raise ValueError(f"errors must be 1-D [N], got shape {errors.shape}.")
    if len(errors) != len(features):
        raise ValueError(
            f"features has {len(features)} rows but errors has {len(errors)} entries; "
            "they must describe the same examples."
        )
    if len(features) == 0:
        raise ValueError("features is empty: there are no examples to analyse.")
    if features.shape[1] == 0:
        raise ValueError("features has no columns (D = 0).")
    if not (
        np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)
    ):
        raise ValueError(f"features must be numeric, got dtype {features.dtype}.")
    features = features.astype(np.float32, copy=False)
    bad = ~np.isfinite(features)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise ValueError(
            f"features contains {int(bad.sum())} NaN/Inf value(s); the first is at row {row}, "
            f"feature {column}."
        )
    if errors.dtype != bool:
        if not np.isin(errors, (0, 1)).all():
            raise ValueError(
                "errors must be booleans (True where the model is wrong) or 0/1, got values "
                f"{np.unique(errors)[:5]}."
            )
        errors = errors.astype(bool)
    return features, errors


def check_groups(groups, num_rows: int) -> list[np.ndarray]:
    """Each group: a non-empty 1-D array of row indices in [0, num_rows) -> int64.

    Args:
      groups: a sequence of row-index arrays.
      num_rows: N, the rows the indices point into.

    Returns:
      A list of 1-D int64 arrays, one per group.

    Raises:
      ValueError: no groups, or a group that is not 1-D, empty, a boolean mask, not integer, or
        out of `[0, num_rows)`.
    """
    checked = []
    for position, members in enumerate(groups):
        members = np.asarray(members)
        if members.ndim != 1:
            raise ValueError(
                f"group {position} must be a 1-D array of row indices, got shape {members.shape}."
            )
        if members.size == 0:
            raise ValueError(f"group {position} is empty; every group needs at least one example.")
        if members.dtype == bool:
            raise ValueError(
                f"group {position} is a boolean mask; pass np.flatnonzero(mask) instead."
            )
        if not np.issubdtype(members.dtype, np.integer):
            raise ValueError(
                f"group {position} must hold integer row indices, got dtype {members.dtype}."
            )
        if members.min() < 0 or members.max() >= num_rows:
            raise ValueError(
                f"group {position} has row indices outside [0, {num_rows}): "
                f"min {members.min()}, max {members.max()}."
            )
        checked.append(members.astype(np.int64))
    if not checked:
        raise ValueError("there are no groups to analyse.")
    return checked
