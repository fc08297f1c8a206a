"""Which claims each suite's results block judges: suite name → the function listing them
(:mod:`moelab.analysis.claims` for the miniature suites, :mod:`moelab.analysis.claims_paper` for
the `paper` protocol). A suite without an entry shows its tables only (the `paper-lr` sweep)."""

from __future__ import annotations

from collections.abc import Callable

from moelab.analysis.claims import (
    Verdict,
    experts_scaling_claims,
    load_balance_claims,
    paper_mini_claims,
    routers_claims,
)
from moelab.analysis.claims_paper import paper_claims, peer_optim_claims, remoe_collapse_claims
from moelab.analysis.suite_data import SuiteData

CLAIMS: dict[str, Callable[[SuiteData], list[tuple[str, str, Verdict | None]]]] = {
    "paper": paper_claims,
    "paper-mini": paper_mini_claims,
    "experts-scaling": experts_scaling_claims,
    "load-balance": load_balance_claims,
    "routers": routers_claims,
    "remoe-collapse": remoe_collapse_claims,
    "peer-optim": peer_optim_claims,
}
