"""`python -m mae_jax.plots samples --data DIR --out FILE.png`: the figures' command line
(kept at this path from the flat layout; the code is `mae_jax/eval/plots.py`)."""

from mae_jax.eval import plots

if __name__ == "__main__":
  plots.main()
