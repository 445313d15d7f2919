"""The demo: ``python -m ewc_rs.demo seed|permuted|merge|fisher_kinds``.

* :mod:`.seed`: the seed article's MNIST → Fashion-MNIST table (four rows).
* :mod:`.permuted`: permuted MNIST (Kirkpatrick et al. 2017), six methods (and Kronecker-factored ones).
* :mod:`.merge`: Fisher-weighted merging of two fine-tuned models.
* :mod:`.fisher_kinds`: which Fisher, which λ: van de Ven's (2025) split-MNIST comparison.
* :mod:`.sweep`: the validation sweep that chose the permuted demo's λ values.
* :mod:`.models`, :mod:`.train`, :mod:`.plots`: the models, a plain PyTorch training loop
  (``loss = ce + ewc.penalty(model)``), accuracy, figures.
* :mod:`.datasets`, :mod:`.idx`: finding MNIST / Fashion-MNIST on disk (``--data DIR`` or
  ``$EWC_RS_DATA``) and reading their IDX files. The core package ``ewc_rs`` never imports them.

The figures need matplotlib (``pip install 'ewc_rs[demo]'``); without it the demos still run,
skip the figures and say so in one line.
"""
