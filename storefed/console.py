"""One console setup for every StoreFed process: the CLI, the ServerApp and each ClientApp (Ray actors too).

Called once per process, as early as possible (``storefed.cli.main`` and the ClientApp module
import it), it gives:

- one handler per line: Flower's own console handler for ``flwr`` (no longer also propagated to a
  root handler that Opacus adds with ``logging.basicConfig`` at import), and one root handler for
  everything else, installed first so Opacus' ``basicConfig`` is a no-op;
- Flower's banner, config dumps and per-round INFO lines off (level WARNING) unless verbose;
- library warnings that are benign here filtered once per process (listed below with why);
- merchant round lines of *simulated* merchants off unless verbose (the run's table shows them).

Verbosity and the role travel to child processes (SuperLink, ServerApp, ClientApp, Ray actors) in
environment variables, so ``storefed -v ...`` brings everything back everywhere.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "STOREFED_VERBOSE"  # "1": Flower INFO lines, library warnings and merchant lines all shown
SIMULATED_ENV = "STOREFED_SIMULATED_MERCHANTS"  # "1": this process runs simulated merchants (quiet lines)
MERCHANT_LOGGER = "storefed.merchant"  # one line per round at a merchant: what it trained and spent

# (message regex, category, why it is safe to hide here)
BENIGN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r".*Full backward hook is firing when gradients are computed with respect to module outputs.*", UserWarning,
     "Opacus ghost clipping's second backward pass; expected, gradients are correct"),
    (r".*Secure RNG turned off.*", UserWarning,
     "secure_mode is off on purpose: privacy/dp_sgd.py seeds the noise generator from OS entropy"),
    (r".*Optimal order is the (largest|smallest) alpha.*", UserWarning,
     "RDP order at the edge of the grid: the bound is still valid, only possibly loose"),
    (r".*Using a non-full backward hook when the forward contains multiple autograd Nodes.*", UserWarning,
     "Opacus hooks on modules with several outputs; per-sample gradients are still computed by Opacus"),
)
# Flower lines that say nothing actionable to a StoreFed user (shown with -v)
FLOWER_NOISE = ("DEPRECATED FEATURE: The `run_simulation` function is deprecated",
                "Manually terminating ClientAppActor",
                "An exception was raised when processing a message by RayBackend",
                "Restart from the setup stage")  # Flower's SecAgg+ mod after a round that did not finish

_configured: bool | None = None  # the verbosity this process was set up with


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV, "") == "1"


def _is_terminal(stream) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (ValueError, OSError):  # a closed stream
        return False


class _CurrentStream(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout``/``sys.stderr`` is at the time of each line (so a
    replaced stream, e.g. a test's capture or a redirected console, never leaves it writing to a closed one)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    @property
    def stream(self):  # noqa: D102
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _DropFlowerNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "ClientAppException" in message:  # a merchant's error: the run's round line names it in one line
            return False
        return not any(message.startswith(noise) for noise in FLOWER_NOISE)


def setup_console(verbose: bool | None = None, simulated_merchants: bool | None = None) -> None:
    """Configure logging and warnings for this process (idempotent; a later call may raise verbosity).

    ``verbose``/``simulated_merchants`` default to the environment (so child processes inherit
    them); given explicitly they are also exported to the environment for children."""
    global _configured
    if verbose is not None:
        os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if simulated_merchants is not None:
        os.environ[SIMULATED_ENV] = "1" if simulated_merchants else "0"
    verbose = verbose_requested()
    root = logging.getLogger()
    if not root.handlers:  # before Opacus is imported: its basicConfig then adds nothing
        handler = _CurrentStream("stderr")
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    flower = logging.getLogger("flwr")
    flower.propagate = False  # Flower has its own console handler: no second copy via the root
    flower.setLevel(logging.DEBUG if verbose else logging.WARNING)
    for handler in flower.handlers:
        if not any(isinstance(f, _DropFlowerNoise) for f in handler.filters) and not verbose:
            handler.addFilter(_DropFlowerNoise())
        if hasattr(handler, "colored"):  # Flower's ConsoleHandler: no colour codes in pipes and CI logs
            handler.colored = _is_terminal(getattr(handler, "stream", None))
    merchant = logging.getLogger(MERCHANT_LOGGER)
    quiet_merchants = os.environ.get(SIMULATED_ENV, "") == "1" and not verbose
    merchant.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet_merchants else logging.INFO)
    if not merchant.handlers:
        line = _CurrentStream("stdout")
        line.setFormatter(logging.Formatter("%(message)s"))
        merchant.addHandler(line)
        merchant.propagate = False
    if not verbose and _configured is None:
        for pattern, category, _why in BENIGN_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
    _configured = verbose

