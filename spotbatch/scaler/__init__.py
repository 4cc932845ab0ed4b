"""Scaling from queue lag: KEDA-exact lag, lag -> replicas, the KEDA external scaler,
and the local autoscaler for worker processes."""
