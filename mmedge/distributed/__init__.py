"""Running mmedge on engines people already operate: torch.distributed for
training (see :mod:`mmedge.train.pipeline`) and Ray for corpus embedding
(:mod:`mmedge.distributed.ray_index`). Nothing here is imported by the runtime."""
