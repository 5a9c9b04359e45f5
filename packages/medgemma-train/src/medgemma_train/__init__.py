"""medgemma-train: training and evaluation of MedGemma models.

* :mod:`medgemma_train.evals`: the MedGemma report's benchmarks as pluggable tasks
  (``medgemma-train eval``), with loglik and generate scoring, bootstrap intervals and reports.
* :mod:`medgemma_train.cli`: the ``medgemma-train`` command and its subcommand registry.
"""

__version__ = "0.1.0"
