"""The CLI's error type and argument parser."""
from __future__ import annotations

import argparse


class CLIError(Exception):
    """A problem with the user's input; printed as one line."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and does not exit by itself."""

    def error(self, message):
        raise CLIError(message)
