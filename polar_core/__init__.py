"""polar_core: run, analyse, search and predict programs of layers (PoLar).

The library behind PoLar Explorer. It never imports the UI.
"""
