import os
import sys

# The suites import their shared helpers (benchutil) by name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
