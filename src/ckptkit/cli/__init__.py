"""The ``ckpt`` command line: the only package that imports click."""
