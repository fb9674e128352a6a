"""Backbones (named after their Keras layers), their preprocessing, and the name table."""

from covid_jax.models.preprocessing import preprocess
from covid_jax.models.registry import BACKBONES, BackboneSpec, create_backbone, get_spec

__all__ = ['BACKBONES', 'BackboneSpec', 'create_backbone', 'get_spec', 'preprocess']
