"""covid_jax: Flax backbones with ported Keras ImageNet weights for chest X-ray classification."""
