"""Helpers for testing code that uses ckptkit, and for air-gapped demos.

Everything here but ``loftr`` uses only the standard library (no pytest, TensorFlow or numpy),
so it can be imported by any test suite and run on a machine without network access:

* :mod:`ckptkit.testing.hubs` — local stand-ins for TF Hub and the Kaggle Models API
  (:class:`~ckptkit.testing.hubs.TFHubStub`, :class:`~ckptkit.testing.hubs.KaggleStub`), and
  :class:`~ckptkit.testing.hubs.MirrorServer`, which serves a whole mirror directory on one
  port; ``python -m ckptkit.testing.hubs ROOT`` runs the latter.
* :mod:`ckptkit.testing.hf_hub` — a Hugging Face Hub and its CDN
  (:class:`~ckptkit.testing.hf_hub.HfHubStandIn`) that the real ``huggingface_hub`` client
  downloads from; ``python -m ckptkit.testing.hf_hub ROOT`` serves a folder of repos.
* :mod:`ckptkit.testing.faults` — the faults (429, drop, reset, corrupt, ignore-range) the
  stand-ins inject.
* :mod:`ckptkit.testing.static` — :class:`~ckptkit.testing.static.StaticServer`, a static file
  server (byte ranges, query ignored), what ``ckpt mirror serve`` runs to try a mirror tree.
* :mod:`ckptkit.testing.loftr` — a LoFTR-shaped Lightning checkpoint written without torch
  (the layout of the released weights as data; needs numpy, a core dependency), which the
  demo exports to its mirror as LoFTR; ``python -m ckptkit.testing.loftr OUT`` writes one.
* :mod:`ckptkit.testing.adversarial` — small files that ask a reader for gigabytes (zip bombs
  nested in zips, floods of pickle opcodes, broadcast views, giant headers): what the reading
  budget (:mod:`ckptkit.storage.budget`) is tested and benchmarked with;
  ``python -m ckptkit.testing.adversarial DIR`` writes the set.

The other modules of this package are the parts of ``hubs`` and ``hf_hub``.
"""
