"""The Flower app directory `flwr run` submits: a pyproject naming the installed components.

``storefed server`` passes this directory (inside the installed package) to ``flwr run``, so the
deployment works from a plain ``pip install`` without a checkout.
"""

from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
