"""ddptrain: train an MLP on your own table with PyTorch DistributedDataParallel."""

__version__ = "0.1.0"
