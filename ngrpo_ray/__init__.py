"""ngrpo_ray: N-GRPO / N-GSPO reinforcement learning with Semantic Neighbor Mixing on Ray, vLLM and DeepSpeed."""
__version__ = "0.1.0"
