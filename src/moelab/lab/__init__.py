"""Break, analyse and report: failure-mode experiments (`failures` runs them, `experiments`
declares them, one module each), expert specialisation (`specialization`), plots
(`plots`), the HTML report (`report`) and the demo (`demo`).

Submodules are imported on use (``from moelab.lab.failures import run_experiment``): the
demo pulls in the trainer and matplotlib, which a caller of the statistics alone does not need.
"""
