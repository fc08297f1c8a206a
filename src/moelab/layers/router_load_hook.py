"""The between-step hook of routers that keep state across optimizer steps.

Some routing methods adapt something once per step from the step's expert loads - DeepSeek-V3's
aux-loss-free balancing nudges a per-expert selection bias. Like ReMoE's λ
(:class:`~moelab.layers.SparsityController`), that update happens at one named point between steps,
never inside a forward: the trainer calls :meth:`RouterLoadHook.observe` with the routed layers
after each micro-batch forward and :meth:`RouterLoadHook.step` once per optimizer step, so every
micro-batch of a step routes with the same state, and the loads the update sees are those of the
whole step (all micro-batches, all data-parallel ranks). The state itself lives in the routers'
buffers, so it is saved with the model's weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from moelab.layers.base import RoutedLayer
from moelab.layers.ranks import SumsOverRanks


def _stateful_router(layer: RoutedLayer) -> object | None:
    router = getattr(layer, "router", None)
    return router if getattr(router, "updates_between_steps", False) else None


class RouterLoadHook(SumsOverRanks):
    """Sums each stateful router's expert loads over a step and hands them to its
    ``step_update`` once per optimizer step. ``layers`` fixes which layers it serves, in order.
    Under data parallelism the loads are summed over the ranks by the
    :class:`~moelab.layers.ranks.RankSum` the parallelism layer hands in (``set_rank_sum``)."""

    name = "router_load"

    def __init__(self, layers: Iterable[RoutedLayer]) -> None:
        self.layers = [layer for layer in layers if _stateful_router(layer) is not None]
        self.steps = 0
        self._loads: list[torch.Tensor | None] = [None] * len(self.layers)
        self._position = {id(layer): i for i, layer in enumerate(self.layers)}

    @classmethod
    def for_layers(cls, layers: Iterable[RoutedLayer]) -> RouterLoadHook | None:
        """A hook for the layers whose router updates between steps; None if there are none."""
        hook = cls(layers)
        return hook if hook.layers else None

    def observe(self, layers: Iterable[RoutedLayer] | None = None) -> None:
        """Add the expert loads of the last training forward of ``layers``.

        The trainer calls every between-step hook as ``observe(routed layers)`` (the λ
        controller reads the same argument), so ``layers`` may hold layers whose router keeps no
        state: they are skipped. None: every layer this hook serves. A stateful layer the hook was
        not built for is an error (nothing is added): :meth:`step` updates the routers fixed at
        construction, so another router's loads would have nowhere to go. Each served layer must
        be observed at least once before :meth:`step`.
        """
        if layers is None:
            layers = self.layers
        positions: list[int] = []
        for layer in layers:
            if _stateful_router(layer) is None:
                continue
            if id(layer) not in self._position:
                raise ValueError(
                    "RouterLoadHook.observe() got a layer with a between-step router that this "
                    "hook was not built for (build the hook from the same model's routed layers)"
                )
            positions.append(self._position[id(layer)])
        for i in positions:
            stats = self.layers[i].last_stats
            if stats is None or stats.tokens_per_expert is None:
                continue
            load = stats.tokens_per_expert.to(torch.float64)
            self._loads[i] = load if self._loads[i] is None else self._loads[i] + load

    def step(self) -> None:
        """Apply each router's between-step update from the step's summed loads."""
        if any(load is None for load in self._loads):
            raise RuntimeError(
                "RouterLoadHook.step() saw no expert loads of some of its layers since the last "
                "step: call observe() with every layer it serves after each training forward"
            )
        for layer, load in zip(self.layers, self._loads, strict=True):
            load = self.sum_over_ranks(load)
            router = _stateful_router(layer)
            router.step_update(load.to(router.weight.device))  # type: ignore[attr-defined]
        self._loads = [None] * len(self.layers)
        self.steps += 1

    def state_dict(self) -> dict[str, object]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.steps = int(state["steps"])
        self._loads = [None] * len(self.layers)
