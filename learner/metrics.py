"""Merge the parts of one training step's stats (micro-batches, ranks) into the step's figures."""
from collections import Counter

SUMMED = ("consumed", "informative_groups")


def merge_loss_stats(parts: list[dict]) -> dict:
    """Token counts add up (`trained_tokens`, each lag's `tokens`), lag histograms add up, the
    other float figures are weighted by the tokens they average over (`lag/<lag>/...` by that
    lag's, the rest by `trained_tokens`). Timings (`*_s`) and everything else keep the first
    part's value."""
    merged = dict(parts[0])
    merged["trained_tokens"] = sum(part.get("trained_tokens", 0) for part in parts)
    floats = {key for part in parts for key, value in part.items()
              if isinstance(value, float) and not key.endswith("_s")}
    for key in floats:
        if key.endswith("/tokens"):
            merged[key] = sum(part.get(key, 0.0) for part in parts)
            continue
        weight = key.rsplit("/", 1)[0] + "/tokens" if key.startswith("lag/") else "trained_tokens"
        tokens = sum(part.get(weight, 0) for part in parts)
        if tokens:
            merged[key] = sum(part.get(key, 0.0) * part.get(weight, 0) for part in parts) / tokens
    histograms = [part["lag_histogram"] for part in parts if part.get("trained_tokens")]
    if histograms:
        merged["lag_histogram"] = dict(sum((Counter(h) for h in histograms), Counter()))
    return merged


def merge_rank_stats(per_rank: list[dict]) -> dict:
    """The loss statistics merged as `merge_loss_stats` does; counts add up and rates over
    samples (reward, accuracy) are weighted by `consumed`."""
    merged = merge_loss_stats(per_rank)
    consumed = sum(s["consumed"] for s in per_rank)
    for key in ("reward", "accuracy"):
        merged[key] = sum(s[key] * s["consumed"] for s in per_rank) / consumed
    for key in SUMMED:
        merged[key] = sum(s.get(key, 0) for s in per_rank)
    return merged
