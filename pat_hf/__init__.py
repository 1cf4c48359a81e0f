"""pat-hf: Perspective-Aware Teaching and heterogeneous knowledge distillation on the Hugging Face stack."""

__version__ = "0.1.0"
