"""Ray Tune sweeps over pretraining configs: YAML space -> Tuner whose trials are Train runs -> report."""
