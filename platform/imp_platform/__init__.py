"""imp-platform: IMP-style multimodal MoE pretraining on Ray."""
__version__ = "0.1.0"
