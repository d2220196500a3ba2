"""Full evaluation of CKF checkpoints and baselines (``python -m ckf_dist.evaluate``): metrics, inference, report."""
