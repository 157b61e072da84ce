"""Self-training (Video-STaR): infer on unlabelled data, keep what agrees with the weak labels, retrain."""
