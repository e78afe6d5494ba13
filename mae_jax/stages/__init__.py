"""What `main.py` runs: one function per stage, on top of every other layer."""
