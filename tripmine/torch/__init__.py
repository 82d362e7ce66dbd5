"""PyTorch integration of tripmine."""
