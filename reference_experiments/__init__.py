"""Reference experiments: distillation under a teacher-call budget, in PyTorch.

The paper's protocol through the torch adapter (see the README's "Reference
experiments"):

- command line: ``__main__`` (``python -m reference_experiments``), its parser built
  without torch from ``cli_options``; ``prepare_data`` (builds cifar10-jpeg, checks
  that data exist) and ``import_teacher`` (RepDistiller/mdistiller checkpoints);
- runs: ``config`` (the run configuration and presets), ``engine`` (the training
  phases), over ``stack`` (``Trial``/``Stack``: runs trained together) and
  ``stepping`` (``TrialByTrial`` on CPU, ``Vmapped`` on CUDA), ``protocol`` (lr phases,
  selection on validation), ``methods`` (the registry, one class per method,
  ``register_variant``), ``devices``, ``distributed``;
- teachers: ``teacher_spec`` (``TeacherSpec``, torch-free), ``teacher`` (training,
  safe save/load), ``teacher_cache``;
- data and models: ``datasets`` (the ``DatasetSpec`` registry), ``data``,
  ``data_cifar``, ``data_cars``, ``datafiles``, ``splits``, ``augment``, ``models``;
- results: ``rows``, ``grid``, ``campaign``, ``report``, ``spectrum``, ``quickstart``,
  ``keras_quickstart``.

Import submodules explicitly: this package import stays light.
"""
