"""The distributed engine: the only package that imports Horovod or torch.distributed."""
