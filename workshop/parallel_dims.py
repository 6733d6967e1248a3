"""A device mesh's dimensions, named and checked once: their product is the world.

    dims = ParallelDims(world_size=4, dp=2, tp=2)     # raises unless 2 x 2 == 4
    mesh = build_mesh(env, dp=2, tp=2)                # init_device_mesh(env.device_type, (2, 2), ("dp", "tp"))

The order of the keywords is the mesh's order, outermost first: the innermost dimension holds consecutive ranks,
which, with ranks numbered node by node, share a node. So tensor parallelism (it talks in every layer) goes
innermost, pipeline parallelism (one activation per micro-batch and boundary) outermost. Every mesh of the package
(`sharding.shard_mesh`, `sharding.hybrid_mesh`, `tp.make_mesh`, `pipeline.make_mesh`) is built here, as torchtitan's
ParallelDims builds its meshes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workshop.dist import DistEnv


@dataclass(frozen=True, init=False)
class ParallelDims:
    """The size of each named dimension, outermost first, and the world they must fill."""

    world_size: int
    sizes: tuple[tuple[str, int], ...]

    def __init__(self, world_size: int, **sizes: int):
        object.__setattr__(self, "world_size", world_size)
        object.__setattr__(self, "sizes", tuple(sizes.items()))
        for name, value in self.sizes:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}_size must be a whole number >= 1, got {value!r}")
        if self.product != world_size:
            terms = " x ".join(f"{name}_size {value}" for name, value in self.sizes)
            if len(self.sizes) == 2:
                pairs = [(d, world_size // d) for d in range(1, world_size + 1) if world_size % d == 0]
                names = ", ".join(f"{name}_size" for name in self.names)
                choose = f"choose ({names}) from {pairs}"
            else:
                choose = "choose sizes whose product is the number of ranks"
            raise ValueError(f"mesh {terms} = {self.product} ranks, but the world has {world_size};\n{choose}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.sizes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(value for _, value in self.sizes)

    @property
    def product(self) -> int:
        return math.prod(self.shape)


def build_mesh(env: DistEnv, **sizes: int):
    """The DeviceMesh of `sizes` (name=size, outermost first) over this world, after ParallelDims checked them."""
    from torch.distributed.device_mesh import init_device_mesh

    dims = ParallelDims(env.world_size, **sizes)
    return init_device_mesh(env.device_type, dims.shape, mesh_dim_names=dims.names)
