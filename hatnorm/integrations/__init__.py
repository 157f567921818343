"""hatnorm inside trainers that call ``optimizer.step()`` themselves.

Each integration is a module of its own that imports its framework, so ``import hatnorm`` loads none of them:

- :mod:`hatnorm.integrations.lightning`: a Lightning ``Callback`` and the ``LightningModule`` base it drives
  (extra ``[lightning]``);
- :mod:`hatnorm.integrations.transformers`: a ``TrainerCallback`` and the smallest ``Trainer`` subclass that
  adds the regulariser (extra ``[transformers]``, which brings ``accelerate``, the Trainer's own need);
- :mod:`hatnorm.integrations.avalanche`: a training plugin and a multi-task module adapter for Avalanche's
  per-sample task labels (extra ``[avalanche]``).

All three rest on :meth:`hatnorm.HAT.attach`, which hooks HAT's optimizer safety onto ``optimizer.step()``;
docs/integrations.md has a runnable example for each and says how each orders protection, gradient
accumulation and clipping.
"""
