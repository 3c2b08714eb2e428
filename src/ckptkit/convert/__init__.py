"""Checkpoint conversion between frameworks: rules, recipes, coverage reports and writers.

Modules: ``writers`` (streaming, atomic output in npz / safetensors / torch / flax msgpack),
``rules`` (generic PyTorch <-> Flax naming and layout rules), ``recipes`` (recipes as data),
``plan`` (decide the mapping and its coverage report before any tensor is read) and
``engine`` (run a plan: read one tensor at a time, transform, write).
"""
