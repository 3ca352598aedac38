"""How sure a figure is, and what chance would score.

- ``bootstrap_ci``: a seeded percentile bootstrap over queries (resample the
  test queries with replacement, take the mean each time, keep the 2.5th and
  97.5th percentiles). It says how much a figure would move on another test
  sample of the same size; it does not cover training randomness.
- ``random_ranking_expectation``: the expected Recall@k / AP@k of a uniformly
  random ordering, in closed form, for the same metric definitions as ranx
  (AP@k divides by the number of relevant items).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from tasks.evaluate.metrics import metric_names

CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 1000
_CHUNK_VALUES = 2_000_000  # resampled values held at once (16 MB of float64), whatever the query count


def bootstrap_ci(
    per_query: Mapping[str, Sequence[float]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> dict[str, list[float] | None]:
    """Percentile interval of the mean of each metric's per-query values.

    All metrics share the same resampled query sets (paired), so the
    intervals of one system's metrics describe the same resamples. The same
    seed and values give the same interval.
    """
    names = list(per_query)
    if not names:
        return {}
    values = np.array([np.asarray(per_query[name], dtype=np.float64) for name in names])
    n = values.shape[1]
    if n == 0:
        return {name: None for name in names}
    rng = np.random.default_rng(seed)
    means = np.empty((len(names), resamples))
    chunk = max(1, _CHUNK_VALUES // (n * len(names)))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(size, n))
        means[:, start : start + size] = values[:, idx].mean(axis=2)
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail], axis=1)
    return {name: [float(lo[i]), float(hi[i])] for i, name in enumerate(names)}


def summarize(
    qids: Sequence[str], per_query: Mapping[str, Sequence[float]], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict:
    """The results.json form of a metric set: means, intervals and the per-query values behind them."""
    metrics = {name: float(np.mean(v)) if len(v) else 0.0 for name, v in per_query.items()}
    return {
        "metrics": metrics,
        "ci": bootstrap_ci(per_query, resamples, seed),
        "per_query": {"qids": list(qids), **{name: [float(x) for x in v] for name, v in per_query.items()}},
    }


def random_ranking_expectation(n_items: int, n_relevant: int, ks: Iterable[int]) -> dict[str, float]:
    """Expected Recall@k and AP@k when ``n_items`` are ordered uniformly at random
    and ``n_relevant`` of them are relevant.

    Position i holds a relevant item with probability R/N, so the expected
    recall@k is min(k, N)/N. AP@k = (1/R) * sum_{i<=k} rel_i * hits_i / i and,
    for i's item relevant, the other i-1 positions hold (R-1)/(N-1) relevant
    items on average: E[rel_i * hits_i] = R/N * (1 + (i-1)(R-1)/(N-1)).
    With R = 1 this is H_min(k,N) / N (the expected reciprocal rank within k).
    """
    if n_items < 1 or not 1 <= n_relevant <= n_items:
        raise ValueError(f"need 1 <= relevant ({n_relevant}) <= items ({n_items})")
    big_n, r, ks = n_items, n_relevant, sorted(set(ks))
    out: dict[str, float] = {}
    for k in ks:
        top = min(k, big_n)
        i = np.arange(1, top + 1, dtype=np.float64)
        others = (i - 1) * (r - 1) / (big_n - 1) if big_n > 1 else np.zeros_like(i)
        out[f"recall@{k}"] = top / big_n
        out[f"map@{k}"] = float(np.sum((1.0 + others) / i) / big_n)
    return {name: out[name] for name in metric_names(ks)}
