"""The engine layer: the only code that drives vLLM (the OpenAI routes, api/openai_compat/, import
vLLM's request models, chat templates and tool parsers, and never an engine)."""

from rollout_service.engine.engine import RolloutEngine

__all__ = ["RolloutEngine"]
