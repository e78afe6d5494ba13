"""`python -m mae_jax.convert --checkpoint FILE --config CONFIG --out DIR`: PyTorch MAE
weights to a stage checkpoint (kept at this path from the flat layout; the code is
`mae_jax/models/load.py`)."""

from mae_jax.models import load

if __name__ == "__main__":
  load.main()
