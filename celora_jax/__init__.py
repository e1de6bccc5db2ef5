"""celora-jax: personalized, communication-efficient federated fine-tuning with tri-matrix LoRA."""

__version__ = "0.1.0"
