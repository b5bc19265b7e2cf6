"""Multi-process training: process groups and device meshes, FSDP2, tensor-parallel plans, sharded loading.

Sits below ``tinytune.training`` (which may import it) and above ``tinytune.checkpoint``.
"""
