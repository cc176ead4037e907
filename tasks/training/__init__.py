"""The training runtime: run config, precompute, train (one GPU or torchrun), evaluate, the PoC
report, the model store. It reads the dataset that tasks/dataset builds, never the other way round."""
