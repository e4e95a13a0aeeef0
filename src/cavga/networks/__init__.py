"""CAVGA networks, created by name from one registry."""

from cavga.networks.model import CAVGA, MODELS, ModelOutput, ModelSpec, create_model

__all__ = ["CAVGA", "MODELS", "ModelOutput", "ModelSpec", "create_model"]
