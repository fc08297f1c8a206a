"""The linear assignment problem (which row goes with which column at the least total cost), for
aligning experts' hidden units (:mod:`moelab.compress.alignment`).

``scipy.optimize.linear_sum_assignment`` is the well-kept implementation and is used when scipy
is installed; moelab does not depend on scipy (a large package for this one call), so without it
the Hungarian method below runs: the O(n³) shortest-augmenting-path form with row and column
potentials (Kuhn 1955, Munkres 1957; the formulation of Jonker & Volgenant 1987), vectorised over
columns with numpy, so its Python loop is O(n²) steps. Both give an optimal assignment (ties may
be broken differently).
"""

from __future__ import annotations

import numpy as np

__all__ = ["linear_sum_assignment"]


def linear_sum_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``0..n-1`` and the column each is assigned, minimising the summed ``cost`` of a square
    ``[n, n]`` matrix of finite numbers (scipy's when installed, else :func:`hungarian`)."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1] or not np.isfinite(cost).all():
        raise ValueError(f"cost must be a square matrix of finite numbers, got {cost.shape}")
    try:
        from scipy.optimize import linear_sum_assignment as scipy_assignment
    except ImportError:
        return np.arange(cost.shape[0]), hungarian(cost)
    rows, cols = scipy_assignment(cost)
    return rows, cols


def hungarian(cost: np.ndarray) -> np.ndarray:
    """The column of each row in a minimum-cost assignment of the square ``cost``.

    Rows are added one at a time; each addition grows a tree of tight edges (reduced cost
    ``cost[i, j] − u[i] − v[j] = 0``) by Dijkstra-like steps over the columns until it reaches a
    free column, then flips the path. ``u``/``v`` stay feasible duals, so the result is optimal.
    Index 0 of ``v``, ``match`` and ``way`` is a virtual column (the row being added)."""
    n = cost.shape[0]
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)  # match[j]: the row (1-based) holding column j
    way = np.zeros(n + 1, dtype=np.int64)  # the previous column on the path to column j
    for i in range(1, n + 1):
        match[0], col = i, 0
        min_v = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while match[col] != 0:  # grow until a free column is reached
            used[col] = True
            row = match[col]
            reduced = cost[row - 1] - u[row] - v[1:]
            free = ~used[1:]
            better = free & (reduced < min_v[1:])
            min_v[1:][better] = reduced[better]
            way[1:][better] = col
            candidates = np.where(free, min_v[1:], np.inf)
            nxt = int(np.argmin(candidates)) + 1
            delta = candidates[nxt - 1]
            u[match[used]] += delta
            v[used] -= delta
            min_v[1:][free] -= delta
            col = nxt
        while col:  # flip the path back to the virtual column
            prev = way[col]
            match[col] = match[prev]
            col = prev
    col_of_row = np.empty(n, dtype=np.int64)
    col_of_row[match[1:] - 1] = np.arange(n)
    return col_of_row
