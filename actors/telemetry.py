"""Live figures in Ray's metrics (`ray.util.metrics`): gauges named `ringrl_<role>_<figure>`,
tagged with the actor's name (`actor="generator-0"`), set as the run goes.

Ray's metrics agent on each node serves them in Prometheus' text format at the node's metrics
export port (the driver logs the address), with Ray's prefix: `ray_ringrl_generator_tokens_per_s`; the Ray dashboard's charts need Prometheus and
Grafana set up as Ray documents (`ray metrics launch-prometheus`). Counts by a reason (a judge's
verdicts, the driver's dropped samples) are one gauge with a `reason` tag.
"""
from ray.util.metrics import Gauge

FIGURES = {
    "generator": {"tokens_per_s": "tokens generated per second since the last reading",
                  "running_rollouts": "rollouts in the decode slots", "paused_rollouts": "rollouts paused by a round",
                  "queued_prompts": "admitted prompts not yet started", "policy_version": "weights version decoding",
                  "loading_weights_s": "seconds spent loading weights, in all"},
    "judge": {"judgments_per_s": "samples judged per second of scoring", "latency_s": "mean seconds to judge a sample",
              "judged_samples": "samples judged, in all", "timeouts": "samples that ran out of judge.timeout_s"},
    "learner": {"step_s": "seconds of the last training step", "loss": "IcePop loss of the last step",
                "reward": "mean reward of the last batch", "accuracy": "share of correct samples in the last batch",
                "masked_frac": "share of tokens IcePop masked in the last step",
                "mean_abs_log_k": "mean |log k| (training-inference mismatch) of the last step",
                "max_lag": "largest policy lag trained on", "version": "policy version"},
    "driver": {"admitted": "samples admitted, in all", "in_flight": "samples admitted and not yet consumed",
               "trained": "samples trained, in all", "step": "RL steps done"},
}
BY_REASON = {"judge": ("verdicts", "samples judged, by verdict"), "driver": ("dropped", "samples dropped, by reason")}


class ActorMetrics:
    def __init__(self, role: str, actor: str):
        self.gauges = {figure: _gauge(f"ringrl_{role}_{figure}", text, actor)
                       for figure, text in FIGURES[role].items()}
        name, text = BY_REASON.get(role, ("", ""))
        self.by_reason = _gauge(f"ringrl_{role}_{name}", text, actor, "reason") if name else None

    def publish(self, figures: dict, by_reason: dict | None = None) -> None:
        """Set the gauges of the figures given (others are left as they are)."""
        for figure, value in figures.items():
            if figure in self.gauges and value is not None:
                self.gauges[figure].set(float(value))
        for reason, count in (by_reason or {}).items():
            self.by_reason.set(float(count), tags={"reason": reason})


def _gauge(name: str, description: str, actor: str, *more_tags: str) -> Gauge:
    return Gauge(name, description, tag_keys=("actor", *more_tags)).set_default_tags({"actor": actor})
