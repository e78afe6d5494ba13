"""Pure step functions, the epoch loop, optax chains and losses. Imports only JAX-side
libraries."""
