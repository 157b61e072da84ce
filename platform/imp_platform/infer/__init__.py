"""Running a trained model over a corpus: Ray Data batch inference (``batch``) with model actors (``predictor``)."""
