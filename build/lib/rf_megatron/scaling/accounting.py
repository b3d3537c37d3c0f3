"""What a run costs: parameters and training FLOPs per token, by the rule the plan uses.

`rf_megatron.flops` holds the exact counts (checked against instantiated models in
tests/test_scaling.py); this module adds the 6N shortcuts of Kaplan et al. (non-embedding N) and
Hoffmann et al. (all parameters), so a sweep can be planned either way and the difference shown.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ModelConfig
from ..flops import parameter_counts, training_flops_per_token

FLOPS_RULES = ("exact", "6N", "6N_total")


@dataclass(frozen=True)
class Accounting:
    N_nonembed: int  # transformer layers + final norm + lambdas
    N_total: int  # + input embedding (+ untied output layer)
    flops_per_token: float  # exact: forward + backward matmul FLOPs per trained token

    def as_dict(self):
        return asdict(self)


def account(model: ModelConfig, seq_length: int = None) -> Accounting:
    counts = parameter_counts(model)
    return Accounting(N_nonembed=counts.non_embedding, N_total=counts.total,
                      flops_per_token=training_flops_per_token(model, seq_length))


def flops_per_token(model: ModelConfig, rule: str = "exact", seq_length: int = None) -> float:
    """Training FLOPs per token: `exact` (matmuls incl. attention scores and logits), `6N`
    (6 x non-embedding parameters, Kaplan et al. 2020) or `6N_total` (6 x all parameters,
    Hoffmann et al. 2022)."""
    if rule not in FLOPS_RULES:
        raise ValueError(f"flops rule {rule!r}: choose one of {', '.join(FLOPS_RULES)}")
    acc = account(model, seq_length)
    return {"exact": acc.flops_per_token, "6N": 6.0 * acc.N_nonembed, "6N_total": 6.0 * acc.N_total}[rule]
