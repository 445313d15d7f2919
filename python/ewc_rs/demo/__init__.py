"""The demo: ``python -m ewc_rs.demo seed`` and ``python -m ewc_rs.demo permuted``.

* :mod:`.seed`: the seed article's MNIST → Fashion-MNIST table (four rows).
* :mod:`.permuted`: permuted MNIST (Kirkpatrick et al. 2017), six methods.
* :mod:`.sweep`: the validation sweep that chose the permuted demo's λ values.
* :mod:`.models`, :mod:`.train`, :mod:`.plots`: the models, a plain PyTorch training loop
  (``loss = ce + ewc.penalty(model)``), accuracy, data loading, figures.

Needs matplotlib (``pip install ewc_rs[demo]``).
"""
