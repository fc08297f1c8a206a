"""Routing analysis and side-by-side experiment reports (docs/analysis.md).

* :mod:`moelab.analysis.stats` - the statistics, pure functions of numpy arrays.
* :mod:`moelab.analysis.runs` - a run's logged metrics and summary as arrays (via ``RunDir``).
* :mod:`moelab.analysis.collect` - one eval pass recording every layer's routing decisions.
* :mod:`moelab.analysis.analyses` - the papers' analyses on collected traces and metrics.
* :mod:`moelab.analysis.plots` - PNG plots (matplotlib, the optional ``analysis`` extra), saved
  at one resolution and palette by :mod:`moelab.analysis.figures`.
* :mod:`moelab.analysis.report` - ``report.md`` / ``report.html`` for one or many runs, from the
  tables of :mod:`moelab.analysis.tables` and the plots of :mod:`moelab.analysis.report_plots`,
  rendered by :mod:`moelab.analysis.render`.
* :mod:`moelab.analysis.origin` / :mod:`moelab.analysis.settings` - the report's provenance
  header, run-settings table and warnings (what produced the numbers, what differs between runs).
* :mod:`moelab.analysis.suites` - named experiment suites for ``moelab compare``; their record,
  ``suite.json``, in :mod:`moelab.analysis.suite_record`.
* :mod:`moelab.analysis.export` / :mod:`moelab.analysis.results` - a suite copied into (or
  redrawn in) ``docs/results/<suite>/``, and the results blocks of ``docs/results/README.md`` and
  each suite's README generated from it (``make results``).

Importing this package does not import matplotlib.
"""

from moelab.analysis.analyses import (
    ANALYSES,
    domain_analysis,
    dynamic_compute,
    dynamics,
    expert_load_analysis,
    stability,
    top_tokens,
    usage_analysis,
)
from moelab.analysis.collect import LayerTrace, RoutingTrace, collect_routing
from moelab.analysis.evalpass import EvalSettings
from moelab.analysis.report import analyze_run, build_report
from moelab.analysis.runs import RunRecord, read_run, training_curves
from moelab.analysis.stats import (
    SparsityStages,
    active_by_frequency,
    active_experts_per_token,
    dead_expert_fraction,
    detect_sparsity_stages,
    domain_expert_shares,
    domain_specialisation,
    expert_load,
    flip_rate,
    gate_mass,
    top_tokens_per_expert,
    usage_unevenness,
)

__all__ = [
    "ANALYSES",
    "EvalSettings",
    "LayerTrace",
    "RoutingTrace",
    "RunRecord",
    "SparsityStages",
    "active_by_frequency",
    "active_experts_per_token",
    "analyze_run",
    "build_report",
    "collect_routing",
    "dead_expert_fraction",
    "detect_sparsity_stages",
    "domain_analysis",
    "domain_expert_shares",
    "domain_specialisation",
    "dynamic_compute",
    "dynamics",
    "expert_load",
    "expert_load_analysis",
    "flip_rate",
    "gate_mass",
    "read_run",
    "stability",
    "top_tokens",
    "top_tokens_per_expert",
    "training_curves",
    "usage_analysis",
    "usage_unevenness",
]
