"""SuperFed: weight-shared federated training of a supernet whose subnetworks are all usable after training.

- :mod:`gradshard.supernet.config` — the ``[supernet]`` table of a run (``SupernetConfig``);
- :mod:`gradshard.supernet.model` — the elastic ResNet, subnetwork extraction, write-back, coverage, MACs;
- :mod:`gradshard.supernet.distribution` — which client trains which subnetwork (tracking sandwich, static, random);
- :mod:`gradshard.supernet.plugin` — the round plugin that ties them into :class:`gradshard.fl.driver.Trainer`;
- :mod:`gradshard.supernet.task` — the task whose ``train`` trains the assigned subnetwork.

See ``docs/superfed.md``.
"""
