"""tsd_model."""
