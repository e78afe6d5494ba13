"""The DeepLense layout, safe .npy reading, the simulator, splits, the tfds builder and
the input pipelines."""
