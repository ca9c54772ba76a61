"""The engine layer: the only package that imports vLLM."""

from rollout_service.engine.engine import RolloutEngine

__all__ = ["RolloutEngine"]
