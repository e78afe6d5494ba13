"""mae_jax: a JAX/Flax masked autoencoder for strong-lensing images, in layers by role.

models/, train/, runtime/ (JAX only) < data/, eval/ < stages/ (what main.py runs).
"""
