"""Adapters of :class:`ewc_rs.EWC` to training frameworks. Each lives in its own module, which imports
its framework when it is imported; this package imports none of them. Import the one you use:

- :mod:`ewc_rs.integrations.transformers`: ``EWCTrainer``, a Hugging Face ``transformers.Trainer``
  that adds the penalty to the loss in ``compute_loss`` (once per optimizer step, whatever the
  gradient accumulation) and consolidates from its own train dataloader (``trainer.consolidate()``).
- :mod:`ewc_rs.integrations.lightning`: ``EWCCallback``, a Lightning callback that adds the penalty's
  gradient in ``on_before_optimizer_step`` (after AMP unscaling, before clipping) and consolidates
  at the end of ``fit``.
- :mod:`ewc_rs.integrations.avalanche`: ``EWCPlugin``, an Avalanche ``SupervisedPlugin`` with the
  per-sample Fisher of :func:`ewc_rs.fisher_diag`.
- :mod:`ewc_rs.integrations.peft`: ``lora_delta_penalty``, the EWC penalty of the merged weights
  W0 + ΔW of a LoRA model, with the Fisher of the base weights (plain ``EWC`` on a PEFT model
  protects the adapters themselves).

Install the frameworks with the extras of the same names: ``pip install 'ewc_rs[transformers]'``,
``[lightning]``, ``[avalanche]``, ``[peft]``.
"""
