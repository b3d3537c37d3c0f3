"""Fixes for Megatron-Core's DistributedOptimizer checkpoint load on the torch-AdamW fallback
(no Transformer Engine / Apex, e.g. CPU runs). Applied only when Megatron uses that fallback.

0. Loading needs Adam's state to exist, but a fresh optimizer has none and Megatron's
   `init_state_fn` creates exp_avg/exp_avg_sq without the `step` that `state_dict()` reads
   (KeyError: 'step'): `init_optimizer_state` creates all three before a load.
1. `load_parameter_state_from_fully_reshardable` drops the per-parameter "step" from the loaded
   state but copies every destination key -> KeyError: 'step'. We keep the already-restored step.
2. `load_state_dict` puts ONE shared `step` tensor into every parameter's state; torch AdamW then
   increments it once per parameter -> wrong bias correction after resume. We un-share it.
"""
from __future__ import annotations

import torch

_APPLIED = False


def apply_if_needed() -> bool:
    global _APPLIED
    from megatron.core import optimizer as mopt

    if _APPLIED or not getattr(mopt, "USING_PYTORCH_OPTIMIZER", False):
        return _APPLIED
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as DO

    original_set = DO._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][order]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"].clone()}
        return original_set(self, model_param, tensors)

    original_load = DO.load_state_dict

    def load_state_dict(self, state_dict):
        result = original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        return result

    DO._set_main_param_and_optimizer_states = set_states
    DO.load_state_dict = load_state_dict
    _APPLIED = True
    return True


def init_optimizer_state(optimizer, step: float = 0.0) -> None:
    """Give every parameter Adam state (zero moments, `step`) where it has none, so that a checkpoint
    load can fill it in place (and a fresh optimizer's state is saved at all)."""
    from megatron.core import optimizer as mopt

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init, inner = getattr(opt, "init_state_fn", None), getattr(opt, "optimizer", None)
        if init is None or inner is None:
            continue
        try:
            init(inner, opt.config)
        except TypeError:  # older signature: init_state_fn(optimizer)
            init(inner)
        if getattr(mopt, "USING_PYTORCH_OPTIMIZER", False):
            for state in inner.state.values():
                state.setdefault("step", torch.tensor(step, dtype=torch.float32))
