"""Pure step functions, the epoch loop and optax chains. Imports only JAX-side libraries;
what pretraining optimises is `mae_jax.objectives`."""
