"""Reference experiments: distillation under a teacher-call budget, in PyTorch.

The paper's protocol through the torch adapter (see the README's "Reference
experiments"): ``config`` (the run configuration), ``engine`` (the one training
loop; stacked runs), ``protocol`` (lr phases, selection on validation),
``methods`` (the registry, one class per method), ``teacher_cache``, ``rows``,
``grid``, ``campaign``, ``report``, ``quickstart``; ``data``, ``augment``,
``models`` and ``teacher`` underneath. Import submodules explicitly: this
package import stays light.
"""
