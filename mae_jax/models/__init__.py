"""Linen modules (ViT encoder, MAE decoder, heads), attention, masking, building a model
from its config, and loading weights. Imports only JAX-side libraries."""
