"""Helpers a learner need not open: what the twins and scripts share.

    common.py      the command line, starting weights, weights file, report,
                   training log and the main both twins run
    progress.py    the one progress bar (training epochs, downloads)
    checks.py      the named checks of the NumPy twin's math and of every
                   speed-up, with a diagnosis a learner reads
    plots.py       the figures, drawn the same way for both twins
    own_digits.py  your own images turned into MNIST-style input
    draw.html      the page that draw.py serves
"""
