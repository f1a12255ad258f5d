"""Small helpers every stage may import (the bottom of the import graph: they import nothing from softmoe).

One module per concern: precision/autocast, atomic file writes, argument checks and their exception types,
shared constants. Nothing here runs at import time.
"""
