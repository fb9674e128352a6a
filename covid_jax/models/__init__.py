"""Backbones (named after their Keras layers), their preprocessing, the name table, and the op formulations."""

from covid_jax.models import formulations
from covid_jax.models.formulations import Formulations
from covid_jax.models.preprocessing import preprocess
from covid_jax.models.registry import BACKBONES, BackboneSpec, create_backbone, get_spec

__all__ = ['BACKBONES', 'BackboneSpec', 'Formulations', 'create_backbone', 'formulations', 'get_spec', 'preprocess']
