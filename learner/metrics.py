"""Merge the per-rank stats of one training step into the step's figures."""
from collections import Counter

SUMMED = ("consumed", "informative_groups", "trained_tokens")


def merge_rank_stats(per_rank: list[dict]) -> dict:
    """Counts add up; rates over samples are weighted by `consumed`, loss statistics by
    `trained_tokens`; lag histograms add up. Keys every rank shares keep rank 0's value
    (the version, timings)."""
    merged = dict(per_rank[0])
    consumed = sum(s["consumed"] for s in per_rank)
    for key in ("reward", "accuracy"):
        merged[key] = sum(s[key] * s["consumed"] for s in per_rank) / consumed
    for key in SUMMED:
        merged[key] = sum(s.get(key, 0) for s in per_rank)
    tokens = merged["trained_tokens"]
    weighted = {k for s in per_rank for k, v in s.items()
                if isinstance(v, float) and k not in ("reward", "accuracy") and not k.endswith("_s")}
    for key in weighted:
        if tokens:
            merged[key] = sum(s.get(key, 0.0) * s.get("trained_tokens", 0) for s in per_rank) / tokens
    histograms = [s["lag_histogram"] for s in per_rank if s.get("trained_tokens")]
    if histograms:
        merged["lag_histogram"] = dict(sum((Counter(h) for h in histograms), Counter()))
    return merged
