"""Capacity planning: per-GPU memory of the trainer and the engines of a config, before anything starts.

Pure arithmetic over the model's config.json and the run's settings; no Ray, vLLM or torch import.
"""

from ngrpo_ray.planning.memory import MemoryPlan, format_plan, plan_memory, plan_params

__all__ = ["MemoryPlan", "format_plan", "plan_memory", "plan_params"]
