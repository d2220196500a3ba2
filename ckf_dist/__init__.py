"""ckf_dist: CKF multi-task LLM recommenders on Ray Train + DeepSpeed."""
__version__ = "0.1.0"
