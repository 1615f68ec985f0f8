"""Mesh construction and logical-axis sharding rules.

`make_mesh` is the project's only mesh constructor (axes data, fsdp, sequence,
tensor); `LOGICAL_RULES` is the one table mapping logical axis names to mesh axes;
`lctx.parallel.distributed` starts multi-process runs and picks each process's data.
"""

from lctx.parallel import distributed
from lctx.parallel.mesh import MESH_AXES, make_mesh, mesh_shape
from lctx.parallel.sharding import (LOGICAL_RULES, constrain_logical, dim_shards,
                                    logical_to_spec, param_shardings)

__all__ = ["LOGICAL_RULES", "MESH_AXES", "constrain_logical", "dim_shards", "distributed",
           "logical_to_spec", "make_mesh", "mesh_shape", "param_shardings"]
